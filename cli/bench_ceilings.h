// The device's ceilings, measured in the same run as a benchmark (the denominators of MFU and
// of bench kernels' percentages): a dense GEMM (bf16 8192^3 on a GPU, fp32 1024^3 on the CPU)
// and a large device copy.
#pragma once
#include "core/backend.h"

namespace decotron::cli {

double measure_gemm_tflops(Device dev);  // TFLOP/s
double measure_copy_gbs(Device dev);     // GB/s, bytes read + written

}  // namespace decotron::cli

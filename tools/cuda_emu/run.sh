#!/bin/bash
# Runs tests/test_cuda_ops.cpp and tests/test_cuda_model.cpp against the CUDA kernels executed on the host (see README.md).
# Usage: tools/cuda_emu/run.sh [gtest flags...]     (builds into build-emu/)
# EMU_JOBS=n compiles n files at a time (default: nproc).
set -e
R=$(cd "$(dirname "$0")/../.." && pwd)
T=$R/tools/cuda_emu
E=$R/build-emu
mkdir -p $E/obj $E/tree
python3 $T/transform.py $R/core/cuda_backend.cu $E/tree/core/cuda_backend.cpp
for f in $R/kernels/cuda/*.cu; do python3 $T/transform.py $f $E/tree/kernels/cuda/$(basename $f .cu).cpp; done
python3 $T/transform.py $R/kernels/cuda/common.cuh $E/tree/kernels/cuda/common.cuh
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
CU="-std=c++20 -O1 -include $T/emu.h -I$E/tree -I$R -I$T -I$CUDA_INC -DDECOTRON_WITH_CUDA=1 -w"
MPI_INC=$(mpicxx --showme:compile 2>/dev/null)
CX="-std=c++20 -O1 -I$R -I$CUDA_INC $MPI_INC -DDECOTRON_WITH_CUDA=1 -DDECOTRON_WITH_NCCL=1 -DDECOTRON_BINARY=\"decotron\" -w"
build() {  # flags source object [dependencies...]: recompiles when the source or a dependency is newer
  local f
  for f in "$2" "${@:4}"; do
    if [[ ! -f $3 || $f -nt $3 ]]; then
      rm -f $3
      g++ $1 -c $2 -o $3 || { echo "cuda_emu: compiling $2 failed" >&2; return 1; }
      return 0
    fi
  done
}
# The emulated kernels also depend on the tool headers and the kernel headers.
KDEPS="$T/emu.h $T/wmma_emu.h $E/tree/kernels/cuda/common.cuh $(ls $R/kernels/cuda/*.h)"
N=${EMU_JOBS:-$(nproc)}
jobs_failed=0
run_limited() {  # runs `build args` in the background, at most N at a time; counts failures
  build "$@" &
  while (( $(jobs -rp | wc -l) >= N )); do wait -n || jobs_failed=1; done
}
for f in $E/tree/core/cuda_backend.cpp $E/tree/kernels/cuda/*.cpp $T/fake_cuda.cpp; do
  run_limited "$CU" $f $E/obj/emu_$(basename $f .cpp).o $KDEPS
done
# Host files depend on the project's headers (coarsely: any newer header rebuilds them).
CXDEPS="$(ls $R/core/*.h $R/kernels/*.h $R/kernels/cpu/*.h $R/kernels/cuda/*.h $R/model/*.h $R/parallel/*.h $R/trainer/*.h $R/tests/*.h)"
# The model, the parallel layer (NCCL through fake_nccl.cpp) and the trainer too, for
# tests/test_cuda_model.cpp (the model and its parallel layouts on the device).
for f in $R/core/*.cpp $R/kernels/ops.cpp $R/kernels/op_profile.cpp $R/kernels/multi_tensor.cpp $R/kernels/cpu/*.cpp $R/model/*.cpp $R/parallel/*.cpp \
         $R/trainer/synthetic_data.cpp $R/trainer/trainer.cpp $R/trainer/optimizer.cpp $R/trainer/lr_schedule.cpp \
         $T/fake_nccl.cpp $R/tests/test_cuda_ops.cpp $R/tests/test_cuda_model.cpp; do
  run_limited "$CX" $f $E/obj/cpu_$(basename $f .cpp).o $CXDEPS
done
while (( $(jobs -rp | wc -l) > 0 )); do wait -n || jobs_failed=1; done
if (( jobs_failed )); then echo "cuda_emu: a compile failed (see above)" >&2; exit 1; fi
g++ -o $E/emu_tests $E/obj/*.o -lgtest -lgtest_main -lopenblas -lyaml-cpp -lpthread $(mpicxx --showme:link 2>/dev/null)
exec $E/emu_tests "$@"

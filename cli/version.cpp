#include <cstdio>

#include "cli/commands.h"
#include "core/backend.h"
#include "core/version.h"
#ifdef DECOTRON_WITH_CUDA
#include "kernels/cuda/cudnn_attention.h"
#endif

namespace decotron::cli {

void register_version(CLI::App& app) {
  auto* cmd = app.add_subcommand("version", "Print the version and the backends this binary was built with");
  cmd->callback([] {
    std::printf("decotron %s\nbackends: cpu%s\n", kVersion, cuda_available() ? ", cuda (GPU visible)" :
#ifdef DECOTRON_WITH_CUDA
                                                                          ", cuda (built, no GPU visible)"
#else
                                                                          ""
#endif
    );
    std::printf("communication: mpi%s\n",
#ifdef DECOTRON_WITH_NCCL
                ", nccl"
#else
                ""
#endif
    );
#ifdef DECOTRON_WITH_CUDA
    // bf16 attention on the GPU: cuDNN first where built (docs/cuda-backend.md), then the flash kernels.
    std::printf("gpu attention: %sflash, reference\n", cuda::cudnn_attention_built() ? "cudnn, " : "");
#endif
  });
}

}  // namespace decotron::cli

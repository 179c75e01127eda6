// decotron bench: benchmarks, one subcommand each (train; decode comes with the runtime).
#include "cli/commands.h"

namespace decotron::cli {

void register_bench(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Benchmarks: training throughput and op split; kernels alone; decode speed");
  bench->require_subcommand(1);
  register_bench_train(*bench);
  register_bench_kernels(*bench);
  register_bench_decode(*bench);
}

}  // namespace decotron::cli

// decotron bench: benchmarks, one subcommand each (train; decode comes with the runtime).
#include "cli/commands.h"

namespace decotron::cli {

void register_bench(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Benchmarks: training throughput and op split");
  bench->require_subcommand(1);
  register_bench_train(*bench);
}

}  // namespace decotron::cli

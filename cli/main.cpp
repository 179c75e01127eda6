// decotron: one program, one subcommand per job (train, preprocess, export, generate, eval, bench...).
#include <cstdio>
#include <exception>

#include "cli/commands.h"
#include "core/error.h"
#include "parallel/mpi_communicator.h"

int main(int argc, char** argv) {
  CLI::App app{"decotron: pretrain, export and run DECO sparse mixture-of-experts language models"};
  app.require_subcommand(1, 1);
  app.fallthrough(false);
  decotron::cli::register_train(app);
  decotron::cli::register_config(app);
  decotron::cli::register_tokenizer(app);
  decotron::cli::register_preprocess(app);
  decotron::cli::register_data(app);
  decotron::cli::register_export(app);
  decotron::cli::register_generate(app);
  decotron::cli::register_eval(app);
  decotron::cli::register_bench(app);
  decotron::cli::register_bench_comm(app);
  decotron::cli::register_version(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const decotron::Error& e) {
    std::fprintf(stderr, "decotron: error: %s%s\n", e.what(), decotron::mpi_rank_suffix().c_str());
    decotron::mpi_abort_if_multi_rank(1);  // the other ranks would wait for this one forever
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "decotron: fatal: %s%s\n", e.what(), decotron::mpi_rank_suffix().c_str());
    decotron::mpi_abort_if_multi_rank(2);
    return 2;
  }
  return 0;
}

// Each subcommand family registers itself on the top-level CLI11 app. One function per family,
// defined next to the code it drives; main.cpp only lists them.
#pragma once
#include <CLI/CLI.hpp>

namespace decotron::cli {
void register_version(CLI::App& app);         // cli/version.cpp
void register_train(CLI::App& app);           // cli/train.cpp
void register_config(CLI::App& app);          // cli/train.cpp
void register_export(CLI::App& app);          // cli/export.cpp
void register_tokenizer(CLI::App& app);       // data/commands.cpp
void register_preprocess(CLI::App& app);      // data/commands.cpp
void register_data(CLI::App& app);            // data/commands.cpp
void register_generate(CLI::App& app);        // inference/commands.cpp
void register_eval(CLI::App& app);            // inference/commands.cpp
void register_bench(CLI::App& app);           // cli/bench.cpp: the `bench` parent
void register_bench_train(CLI::App& bench);   // cli/bench_train.cpp
void register_bench_kernels(CLI::App& bench); // cli/bench_kernels.cpp
void register_bench_decode(CLI::App& bench);  // inference/commands.cpp
void register_bench_comm(CLI::App& app);      // cli/bench_comm.cpp
}  // namespace decotron::cli

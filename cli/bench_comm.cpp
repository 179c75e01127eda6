// decotron bench-comm: the collectives' time and bandwidth over a size sweep, with a correctness
// check in the same run (as nccl-tests): algbw = bytes / time, busbw = algbw x the op's factor
// (all_reduce 2(n-1)/n; all_gather, reduce_scatter, all_to_all (n-1)/n), the figure to compare
// with the link's peak. Run it under the same launcher as training: mpirun -np N decotron bench-comm.
#include <chrono>
#include <cmath>
#include <cstdio>

#include "cli/commands.h"
#include "core/error.h"
#include "core/tensor.h"
#include "parallel/mpi_communicator.h"
#include "parallel/process_groups.h"

namespace decotron::cli {

namespace {

struct BenchArgs {
  std::string op = "all_reduce";
  std::string device = "cpu";
  int64_t min_bytes = 1024, max_bytes = 64 << 20;
  int iters = 20, warmup = 3;
  double timeout_s = 300;
};

Tensor host_floats(const std::vector<float>& v) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::f32);
  std::copy(v.begin(), v.end(), t.data<float>());
  return t;
}

void run_bench(const BenchArgs& a) {
  ParallelConfig pc;
  pc.timeout_s = a.timeout_s;
  auto ctx = make_parallel_context(pc, a.device == "cuda" ? Device::cuda : Device::cpu);
  Communicator& c = *ctx->world;
  const int n = c.size(), r = c.rank();
  const Device dev = c.device();
  if (ctx->is_main())
    std::printf("%s on %d ranks (%s buffers), %d iterations per size\n%12s %12s %12s %12s  %s\n", a.op.c_str(), n,
                device_name(dev), a.iters, "bytes", "time_us", "algbw_GB/s", "busbw_GB/s", "check");
  bool all_ok = true;
  for (int64_t bytes = a.min_bytes; bytes <= a.max_bytes; bytes *= 4) {
    const int64_t count = std::max<int64_t>(n, bytes / 4 / n * n);  // fp32 elements, a multiple of n
    std::vector<float> init(count);
    for (int64_t i = 0; i < count; ++i) init[i] = static_cast<float>(r + 1) + static_cast<float>(i % 7);
    Tensor send = host_floats(init).to(dev), recv = Tensor::empty({count}, DType::f32, dev);
    const std::vector<int64_t> counts(n, count / n);
    auto once = [&] {
      if (a.op == "all_reduce") c.all_reduce(recv.raw(), count, CommType::f32);
      else if (a.op == "all_gather") c.all_gather(send.raw(), recv.raw(), count / n, CommType::f32);
      else if (a.op == "reduce_scatter") c.reduce_scatter(send.raw(), recv.raw(), count / n, CommType::f32);
      else c.all_to_all(send.raw(), counts, recv.raw(), counts, CommType::f32);
    };
    // Correctness, on the first call (all_reduce works in place on recv = send's copy).
    recv.copy_from(send);
    once();
    Tensor got = recv.to(Device::cpu);
    bool ok = true;
    const float* g = got.data<float>();
    const int64_t per = count / n;
    for (int64_t i = 0; i < count && ok; ++i) {
      float want;
      if (a.op == "all_reduce") want = n * (n + 1) / 2.0f + n * static_cast<float>(i % 7);
      else if (a.op == "all_gather") want = static_cast<float>(i / per + 1) + static_cast<float>(i % per % 7);
      else if (a.op == "reduce_scatter") {
        if (i >= per) break;
        want = n * (n + 1) / 2.0f + n * static_cast<float>((r * per + i) % 7);
      } else want = static_cast<float>(i / per + 1) + static_cast<float>((r * per + i % per) % 7);
      ok = g[i] == want;
    }
    ok = c.sum(int64_t{ok ? 0 : 1}) == 0;
    all_ok &= ok;
    for (int k = 0; k < a.warmup; ++k) once();
    c.barrier();
    auto t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < a.iters; ++k) once();
    c.barrier();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / a.iters;
    s = c.sum(s) / n;  // the ranks' mean
    const double moved = static_cast<double>(count) * 4, algbw = moved / s / 1e9;
    const double factor = a.op == "all_reduce" ? 2.0 * (n - 1) / n : static_cast<double>(n - 1) / n;
    if (ctx->is_main())
      std::printf("%12lld %12.1f %12.3f %12.3f  %s\n", static_cast<long long>(moved), s * 1e6, algbw, algbw * factor,
                  ok ? "ok" : "WRONG");
  }
  std::fflush(stdout);
  if (!all_ok) fail("bench-comm: ", a.op, " returned wrong values (see the check column)");
}

}  // namespace

void register_bench_comm(CLI::App& app) {
  auto args = std::make_shared<BenchArgs>();
  auto* cmd = app.add_subcommand("bench-comm",
                                 "Time a collective over a size sweep on every launched rank, checking its result "
                                 "(mpirun -np N decotron bench-comm)");
  cmd->add_option("--op", args->op, "Collective")->check(CLI::IsMember({"all_reduce", "all_gather", "reduce_scatter",
                                                                        "all_to_all"}));
  cmd->add_option("--device", args->device, "Buffers on cpu (MPI) or cuda (NCCL)")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--min-bytes", args->min_bytes, "Smallest message (bytes; sizes grow by 4x)");
  cmd->add_option("--max-bytes", args->max_bytes, "Largest message (bytes)");
  cmd->add_option("--iters", args->iters, "Timed calls per size");
  cmd->add_option("--timeout", args->timeout_s, "Watchdog timeout per collective (seconds)");
  cmd->callback([args] { run_bench(*args); });
}

}  // namespace decotron::cli

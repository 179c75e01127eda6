#include "parallel/process_groups.h"

#include "core/backend.h"
#include "core/cuda_check.h"
#include "core/error.h"
#include "parallel/mpi_communicator.h"
#ifdef DECOTRON_WITH_NCCL
#include "parallel/nccl_communicator.h"
#endif

namespace decotron {

ParallelLayout make_layout(const ParallelConfig& cfg, int world_size, int world_rank) {
  ParallelLayout l;
  l.world_size = world_size, l.world_rank = world_rank;
  const int tp = static_cast<int>(cfg.tensor), ep = static_cast<int>(cfg.expert);
  if (tp < 1 || world_size % tp != 0)
    fail("parallel.tensor = ", tp, " does not divide the world of ", world_size,
         " ranks; launch a multiple of parallel.tensor ranks");
  const int dp = cfg.data > 0 ? static_cast<int>(cfg.data) : world_size / tp;
  if (tp * dp != world_size)
    fail("parallel.tensor x parallel.data = ", tp, " x ", dp, " = ", tp * dp, " but the job has ", world_size,
         " ranks; set parallel.data: 0 (world / tensor) or launch ", tp * dp, " ranks");
  if (ep < 1 || dp % ep != 0)
    fail("parallel.expert = ", ep, " does not divide the data-parallel size ", dp,
         " (expert parallelism is carved out of the data-parallel ranks)");
  l.tp_size = tp, l.dp_size = dp, l.ep_size = ep, l.edp_size = dp / ep;
  l.tp_rank = world_rank % tp;
  l.dp_rank = world_rank / tp;
  l.ep_rank = l.dp_rank % ep;
  l.edp_rank = l.dp_rank / ep;
  return l;
}

std::string describe_layout(const ParallelConfig& cfg, int world_size) {
  ParallelLayout l0 = make_layout(cfg, world_size, 0);
  std::string out = cat("parallel layout: world ", world_size, " = tensor ", l0.tp_size, " x data ", l0.dp_size,
                        " (expert ", l0.ep_size, " within data, expert-data ", l0.edp_size, ")\n");
  const int shown = world_size <= 64 ? world_size : 16;
  for (int r = 0; r < shown; ++r) {
    ParallelLayout l = make_layout(cfg, world_size, r);
    out += cat("  rank ", r, ": tp ", l.tp_rank, " dp ", l.dp_rank, " ep ", l.ep_rank, " edp ", l.edp_rank, "\n");
  }
  if (shown < world_size) out += cat("  ... (", world_size - shown, " more ranks)\n");
  return out;
}

std::shared_ptr<ParallelContext> make_parallel_context(const ParallelConfig& cfg, Device device) {
  auto ctx = std::make_shared<ParallelContext>();
  ctx->log = std::make_shared<CollectiveLog>();
  std::shared_ptr<MpiCommunicator> world = MpiCommunicator::world(cfg.timeout_s, ctx->log);
  ctx->layout = make_layout(cfg, world->size(), world->rank());
  ctx->local_rank = launcher_local_rank();
  const ParallelLayout& l = ctx->layout;
  std::shared_ptr<MpiCommunicator> tp = world->split(l.tp_color(), l.tp_rank, "tp");
  std::shared_ptr<MpiCommunicator> dp = world->split(l.dp_color(), l.dp_rank, "dp");
  std::shared_ptr<MpiCommunicator> ep = world->split(l.ep_color(), l.ep_rank, "ep");
  // Without expert parallelism the expert-data-parallel group is the data-parallel group: the
  // same communicator, so that expert and other gradients share buckets.
  std::shared_ptr<MpiCommunicator> edp = l.ep_size == 1 ? dp : world->split(l.edp_color(), l.edp_rank, "edp");
  DT_ASSERT(tp->size() == l.tp_size && dp->size() == l.dp_size && ep->size() == l.ep_size &&
                edp->size() == l.edp_size && tp->rank() == l.tp_rank && dp->rank() == l.dp_rank,
            "process groups disagree with the layout");
#ifdef DECOTRON_WITH_CUDA
  if (device == Device::cuda && cuda_available()) {
    // GPU binding: local rank i uses visible device i (mod the count), before any CUDA use.
    // (Without a usable GPU the trainer reports train.device = cuda with its own message.)
    int n = 0;
    CUDA_CHECK(cudaGetDeviceCount(&n));
    if (n < 1) fail("train.device = cuda but no GPU is visible (", rank_and_host(), ")");
    CUDA_CHECK(cudaSetDevice(ctx->local_rank % n));
  }
#endif
  if (cfg.backend == "nccl" && device != Device::cuda)
    fail("parallel.backend = nccl needs train.device: cuda (NCCL moves GPU buffers); set parallel.backend: auto");
#ifndef DECOTRON_WITH_NCCL
  if (cfg.backend == "nccl")
    fail("parallel.backend = nccl, but this decotron was built without NCCL (`decotron version` says which backends "
         "it has); set parallel.backend: mpi or auto");
#endif
  // parallel.backend = mpi on a GPU: host buffers, device data staged (several ranks per GPU).
  if (device == Device::cpu || !cuda_available() || cfg.backend == "mpi") {  // no GPU: the trainer says train.device = cuda cannot run
    ctx->world = world, ctx->tp = tp, ctx->dp = dp, ctx->ep = ep, ctx->edp = edp;
  } else {
#ifdef DECOTRON_WITH_NCCL
    ctx->world = make_nccl_communicator(*world);
    ctx->tp = make_nccl_communicator(*tp);
    ctx->dp = make_nccl_communicator(*dp);
    ctx->ep = make_nccl_communicator(*ep);
    ctx->edp = l.ep_size == 1 ? ctx->dp : make_nccl_communicator(*edp);
#else
    // Built without NCCL: the MPI communicators work on host buffers and callers stage device
    // data through host memory (slow, but correct).
    if (ctx->is_main() && world->size() > 1)
      std::fprintf(stderr, "warning: this decotron was built without NCCL: collectives on GPU data go through "
                           "host memory and MPI\n");
    ctx->world = world, ctx->tp = tp, ctx->dp = dp, ctx->ep = ep, ctx->edp = edp;
#endif
  }
  if (ctx->is_main()) {
    std::fputs(describe_layout(cfg, world->size()).c_str(), stdout);
    std::fflush(stdout);
  }
  return ctx;
}

}  // namespace decotron

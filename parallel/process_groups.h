// The process grid: world = TP x DP, with expert parallelism carved out of the data-parallel
// ranks as Megatron does. Rank r has tp_rank = r % TP and dp_rank = r / TP (tensor-parallel
// peers are neighbours, i.e. on the same node). Within each tensor-parallel slice, consecutive
// blocks of EP data-parallel ranks form an expert-parallel group (ep_rank = dp_rank % EP), and
// the ranks holding the same experts (same tp_rank and ep_rank) form the expert-data-parallel
// group over which expert parameters' gradients are averaged (edp_rank = dp_rank / EP).
//
// A ParallelContext is built once per process and passed to whatever communicates (trainer,
// layers): there is no global parallel state. One process without a launcher is a world of
// one: every group has size one and the code path is the same.
#pragma once
#include <memory>
#include <string>

#include "core/config.h"
#include "parallel/communicator.h"

namespace decotron {

// The sizes of the grid and this rank's coordinates in it; pure arithmetic (no MPI), so it can
// be checked for every rank of any world size.
struct ParallelLayout {
  int world_size = 1, world_rank = 0;
  int tp_size = 1, tp_rank = 0;
  int dp_size = 1, dp_rank = 0;
  int ep_size = 1, ep_rank = 0;
  int edp_size = 1, edp_rank = 0;  // expert-data-parallel: dp_size / ep_size

  // Colors for MPI_Comm_split: ranks with the same color share the group.
  int tp_color() const { return dp_rank; }
  int dp_color() const { return tp_rank; }
  int ep_color() const { return tp_rank * edp_size + edp_rank; }
  int edp_color() const { return tp_rank * ep_size + ep_rank; }
};

// The layout of `world_rank` in a world of `world_size` ranks; throws decotron::Error naming
// the config key when the sizes do not divide (parallel.data = 0: world / tensor).
ParallelLayout make_layout(const ParallelConfig& cfg, int world_size, int world_rank);
// The table of every rank's coordinates, printed by rank 0 at start.
std::string describe_layout(const ParallelConfig& cfg, int world_size);

struct ParallelContext {
  ParallelLayout layout;
  int local_rank = 0;  // rank on this node (GPU binding)
  std::shared_ptr<CollectiveLog> log;  // this rank's recent collectives (all groups)
  std::shared_ptr<Communicator> world, tp, dp, ep, edp;

  bool is_main() const { return layout.world_rank == 0; }  // writes metrics, config, checkpoints
};

// Initializes MPI if needed and builds every group: MPI communicators for device = cpu, NCCL
// ones for device = cuda (CUDA builds with NCCL; the CUDA device is chosen from the local rank).
// Collective: every rank of the world must call it.
std::shared_ptr<ParallelContext> make_parallel_context(const ParallelConfig& cfg, Device device);

}  // namespace decotron

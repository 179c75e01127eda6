// The MPI backend of Communicator: host buffers, one MPI communicator per group (from
// MPI_Comm_split), non-blocking collectives polled with MPI_Test against the watchdog's deadline.
// Also the process-wide MPI runtime: MPI is initialized once (under mpirun, srun, or as a
// singleton without a launcher) and finalized at exit.
#pragma once
#include <mpi.h>

#include <memory>
#include <string>

#include "parallel/communicator.h"

namespace decotron {

// MPI_Init_thread (MPI_THREAD_FUNNELED: only the training thread calls MPI) on first use;
// MPI_Finalize at normal process exit.
void mpi_ensure_initialized();
int mpi_world_rank();
int mpi_world_size();
// In a multi-rank job: MPI_Abort(MPI_COMM_WORLD, code), so that an error on one rank ends every
// rank instead of leaving them waiting. Returns (does nothing) in a single-rank job.
void mpi_abort_if_multi_rank(int code);
// " (rank 3 of 8 on node7)" in a multi-rank job, "" otherwise: for error messages.
std::string mpi_rank_suffix();
// The node-local rank from the launcher (OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID,
// MPI_LOCALRANKID), for GPU binding; 0 if none is set.
int launcher_local_rank();

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm` (freed in the destructor). `log` is the rank's collective log
  // shared by all its groups; `world_rank` names the rank in diagnostics.
  MpiCommunicator(MPI_Comm comm, std::string name, double timeout_s, std::shared_ptr<CollectiveLog> log,
                  int world_rank);
  ~MpiCommunicator() override;

  // A communicator over MPI_COMM_WORLD (a duplicate).
  static std::unique_ptr<MpiCommunicator> world(double timeout_s, std::shared_ptr<CollectiveLog> log);
  // MPI_Comm_split of this group: ranks with equal `color` form a group, ordered by `key`.
  std::unique_ptr<MpiCommunicator> split(int color, int key, const std::string& name) const;
  MPI_Comm comm() const { return comm_; }
  double timeout_s() const { return timeout_s_; }
  const std::shared_ptr<CollectiveLog>& log() const { return log_; }
  int world_rank() const { return world_rank_; }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  Device device() const override { return Device::cpu; }

  void all_reduce(void* buf, int64_t count, CommType type) override;
  void reduce_scatter(const void* send, void* recv, int64_t recv_count, CommType type) override;
  void all_gather(const void* send, void* recv, int64_t send_count, CommType type) override;
  void all_to_all(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                  const std::vector<int64_t>& recv_counts, CommType type) override;
  void broadcast(void* buf, int64_t count, CommType type, int root) override;
  void barrier() override;
  // The requests refer to this communicator: wait for them before it is destroyed.
  std::unique_ptr<CommRequest> all_reduce_async(void* buf, int64_t count, CommType type) override;
  std::unique_ptr<CommRequest> reduce_scatter_async(const void* send, void* recv, int64_t recv_count,
                                                    CommType type) override;
  std::unique_ptr<CommRequest> all_gather_async(const void* send, void* recv, int64_t send_count,
                                                CommType type) override;

 private:
  friend class MpiRequest;
  // Polls `req` until it completes; past the deadline (counted from this call) prints the
  // diagnostic and aborts the job.
  void wait(MPI_Request& req, uint64_t seq, const char* op) const;

  MPI_Comm comm_;
  std::string name_;
  double timeout_s_;
  std::shared_ptr<CollectiveLog> log_;
  int world_rank_, rank_ = 0, size_ = 1;
};

}  // namespace decotron

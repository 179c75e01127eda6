// One communicator interface for every process group, with two backends: MPI on host buffers
// (parallel/mpi_communicator.cpp) and NCCL on device buffers (parallel/nccl_communicator.cpp,
// CUDA builds only). Every collective is checked and watched: it is recorded in a per-rank ring
// of recent collectives, and one that does not complete within the timeout aborts the whole job
// after printing the rank, the group, the collective and this rank's recent history
// (docs/parallelism.md).
//
// Buffer contract: all_reduce and broadcast work in place; the others read `send` and overwrite
// `recv`; counts are in elements. all_gather may also run in place, NCCL's convention: `send`
// is this rank's block of `recv` (send == recv + rank * send_count). All ranks of the group must
// call the same collectives in the same order with matching counts. A group of size one is a
// valid communicator: every collective is then a copy (or nothing), the same code path as a
// multi-rank run.
//
// The *_async collectives return a CommRequest at once; the collective then runs while the
// caller computes (data-parallel gradient buckets overlapped with the backward pass), and its
// buffers stay untouched until wait() returns. They count as issued when called: the order
// rule above covers blocking and non-blocking calls together.
#pragma once
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/dtype.h"

namespace decotron {

// Element types the collectives move.
// bf16: activations under mixed precision (tensor-parallel partial sums, sequence-parallel
// slices, expert-parallel rows); summed in fp32 and rounded, as NCCL does.
enum class CommType : uint8_t { f32, f64, i64, bf16 };
size_t comm_type_size(CommType t);
// The wire type of a floating tensor dtype (fp32, fp64, bf16); other dtypes fail clearly.
CommType comm_type_of(DType t);
const char* comm_type_name(CommType t);

// Communication volume: what this rank sent or contributed, per group and collective, counted
// where every collective passes (CollectiveLog::begin). Bytes per op (docs/parallelism.md,
// "Communication volume"): all_reduce, broadcast: the buffer; reduce_scatter: the whole send
// buffer (size x recv_count); all_gather: this rank's part (send_count); all_to_all: the elements
// sent to the other ranks (the block a rank keeps is not counted). Collectives on a group of one
// rank move nothing and are not counted.
struct CommTraffic {
  struct Count {
    uint64_t bytes = 0, calls = 0;
  };
  std::map<std::string, std::map<std::string, Count>> groups;  // group -> op -> count

  uint64_t bytes(const std::string& group) const;  // over the group's ops; 0 if none
  uint64_t total_bytes() const;
  uint64_t total_calls() const;
  // The traffic between two snapshots of the same (cumulative) counters: *this - before.
  CommTraffic since(const CommTraffic& before) const;
  // One line: "12.3 MiB in 456 collectives (dp 10.1 MiB, tp 2.2 MiB)".
  std::string summary() const;
};

// The watchdog's memory of one rank: the last collectives it issued (all groups), each with its
// sequence number, group, op and size, and whether it completed. It also keeps the cumulative
// CommTraffic of every collective it has seen.
class CollectiveLog {
 public:
  struct Entry {
    uint64_t seq = 0;      // per-rank sequence number over every group
    std::string group;     // communicator name ("dp", "tp", ...)
    std::string op;        // "all_reduce", ...
    size_t bytes = 0;      // bytes this rank contributes
    bool done = false;
  };
  explicit CollectiveLog(size_t capacity = 16) : capacity_(capacity) {}
  // Records a collective on `group` (of `group_size` ranks); returns its seq. `bytes`: what the
  // watchdog prints (this rank's input); `sent_bytes`: what CommTraffic counts for it (see there).
  uint64_t begin(const std::string& group, int group_size, const char* op, size_t bytes, size_t sent_bytes);
  void end(uint64_t seq);
  std::vector<Entry> recent() const;  // oldest first
  std::string format() const;         // one line per entry
  CommTraffic traffic() const;        // cumulative since the log was made

 private:
  mutable std::mutex mu_;
  std::deque<Entry> ring_;
  CommTraffic traffic_;
  size_t capacity_;
  uint64_t next_seq_ = 1;
};

// Called when a collective misses its deadline: prints the diagnostic to stderr (rank, group,
// op, seq, seconds waited, the log), waits a short grace period so that peers stuck in the same
// collective can print theirs, and returns; the backend then aborts the job.
void report_collective_timeout(const CollectiveLog& log, int world_rank, const std::string& group,
                               const char* op, uint64_t seq, double waited_s);

// A collective in flight (the *_async calls).
class CommRequest {
 public:
  // Waits for a collective that was not waited for: MPI cannot free an active request, and
  // the buffers must outlive it.
  virtual ~CommRequest() = default;
  // Blocks until the collective has completed on this rank; its buffers may then be used. Watched
  // like a blocking collective: a wait longer than parallel.timeout_s aborts the job with the
  // watchdog's diagnostic. Calling it again does nothing.
  virtual void wait() = 0;
  // Lets the collective progress without blocking (MPI moves non-blocking collectives on only
  // inside MPI calls, so a rank computing between launches pokes its requests); true once done.
  virtual bool test() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;  // rank within this group
  virtual int size() const = 0;
  virtual const std::string& name() const = 0;  // group name for logs ("dp", "tp", "world", ...)
  // Where the buffers live: cpu for MPI, cuda for NCCL.
  virtual Device device() const = 0;

  // buf[i] = sum over ranks of buf[i], in place.
  virtual void all_reduce(void* buf, int64_t count, CommType type) = 0;
  // recv[0:recv_count] = sum over ranks of send[rank*recv_count : (rank+1)*recv_count].
  virtual void reduce_scatter(const void* send, void* recv, int64_t recv_count, CommType type) = 0;
  // recv[r*send_count : (r+1)*send_count] = send of rank r.
  virtual void all_gather(const void* send, void* recv, int64_t send_count, CommType type) = 0;
  // Rank i sends send_counts[j] elements (consecutive in `send`, in rank order) to rank j and
  // receives recv_counts[j] from rank j (consecutive in `recv`, in rank order).
  virtual void all_to_all(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                          const std::vector<int64_t>& recv_counts, CommType type) = 0;
  // buf of `root` copied to every rank, in place.
  virtual void broadcast(void* buf, int64_t count, CommType type, int root) = 0;
  virtual void barrier() = 0;

  // Non-blocking forms of all_reduce, reduce_scatter and all_gather (same buffer contract).
  virtual std::unique_ptr<CommRequest> all_reduce_async(void* buf, int64_t count, CommType type) = 0;
  virtual std::unique_ptr<CommRequest> reduce_scatter_async(const void* send, void* recv, int64_t recv_count,
                                                            CommType type) = 0;
  virtual std::unique_ptr<CommRequest> all_gather_async(const void* send, void* recv, int64_t send_count,
                                                        CommType type) = 0;

  // Convenience on host scalars (any backend; device backends stage through device memory).
  double sum(double v);
  int64_t sum(int64_t v);
  // Element-wise sum of a host vector, in place.
  void sum_in_place(std::vector<double>& v);
  void sum_in_place(std::vector<int64_t>& v);
  // all_to_all of host i64 vectors (counts and indices), staged on device backends.
  void all_to_all_host(const std::vector<int64_t>& send, const std::vector<int64_t>& send_counts,
                       std::vector<int64_t>& recv, const std::vector<int64_t>& recv_counts);

 protected:
  // Host <-> backend buffer staging for the convenience calls.
  void all_reduce_host(void* buf, int64_t count, CommType type);
};

}  // namespace decotron

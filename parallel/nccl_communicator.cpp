// Compiled in every build (CMake globs parallel/*.cpp); the content exists only with NCCL.
#ifdef DECOTRON_WITH_NCCL
#include "parallel/nccl_communicator.h"

#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "core/cuda_backend.h"
#include "core/cuda_check.h"
#include "core/error.h"

// Non-blocking communicators return ncclInProgress from calls whose work is still being
// enqueued; that is not an error (completion is polled with ncclCommGetAsyncError).
#define NCCL_CHECK_NB(call)                                                                            \
  do {                                                                                                 \
    ncclResult_t res_nb_ = (call);                                                                     \
    if (res_nb_ != ncclSuccess && res_nb_ != ncclInProgress)                                           \
      ::decotron::device_call_failed("NCCL", #call,                                                    \
                                     ::decotron::cat(ncclGetErrorString(res_nb_), " (", ::decotron::rank_and_host(), ")"), \
                                     __FILE__, __LINE__);                                              \
  } while (0)

namespace decotron {

namespace {

ncclDataType_t nccl_type(CommType t) {
  switch (t) {
    case CommType::f32: return ncclFloat32;
    case CommType::f64: return ncclFloat64;
    case CommType::i64: return ncclInt64;
    case CommType::bf16: return ncclBfloat16;
  }
  return ncclFloat32;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const MpiCommunicator& group, double timeout_s, std::shared_ptr<CollectiveLog> log,
                   int world_rank)
      : name_(group.name()), timeout_s_(timeout_s), log_(std::move(log)), world_rank_(world_rank),
        rank_(group.rank()), size_(group.size()) {
    ncclUniqueId id;
    if (rank_ == 0) NCCL_CHECK(ncclGetUniqueId(&id));
    MPI_CHECK(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, group.comm()));
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // calls return ncclInProgress; completion is polled (so a hang is seen)
    uint64_t seq = log_->begin(name_, size_, "nccl_init", 0, 0);
    NCCL_CHECK_NB(ncclCommInitRankConfig(&comm_, size_, id, rank_, &config));
    wait_enqueued(seq, "nccl_init");
    log_->end(seq);
  }
  ~NcclCommunicator() override {
    if (comm_) ncclCommDestroy(comm_);  // no throw from a destructor
    if (ready_) cudaEventDestroy(ready_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  Device device() const override { return Device::cuda; }

  // The blocking collectives are the non-blocking ones waited for at once (one watched path).
  void all_reduce(void* buf, int64_t count, CommType type) override { all_reduce_async(buf, count, type)->wait(); }
  void reduce_scatter(const void* send, void* recv, int64_t recv_count, CommType type) override {
    reduce_scatter_async(send, recv, recv_count, type)->wait();
  }
  void all_gather(const void* send, void* recv, int64_t send_count, CommType type) override {
    all_gather_async(send, recv, send_count, type)->wait();
  }
  std::unique_ptr<CommRequest> all_reduce_async(void* buf, int64_t count, CommType type) override {
    uint64_t seq = start("all_reduce", count * comm_type_size(type));
    NCCL_CHECK_NB(ncclAllReduce(buf, buf, count, nccl_type(type), ncclSum, comm_, stream_));
    return launched(seq, "all_reduce");
  }
  std::unique_ptr<CommRequest> reduce_scatter_async(const void* send, void* recv, int64_t recv_count,
                                                    CommType type) override {
    uint64_t seq = start("reduce_scatter", recv_count * size_ * comm_type_size(type));
    NCCL_CHECK_NB(ncclReduceScatter(send, recv, recv_count, nccl_type(type), ncclSum, comm_, stream_));
    return launched(seq, "reduce_scatter");
  }
  // In place when send == recv + rank * send_count: NCCL's own convention.
  std::unique_ptr<CommRequest> all_gather_async(const void* send, void* recv, int64_t send_count,
                                                CommType type) override {
    uint64_t seq = start("all_gather", send_count * comm_type_size(type));
    NCCL_CHECK_NB(ncclAllGather(send, recv, send_count, nccl_type(type), comm_, stream_));
    return launched(seq, "all_gather");
  }
  void all_to_all(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                  const std::vector<int64_t>& recv_counts, CommType type) override {
    DT_ASSERT(static_cast<int>(send_counts.size()) == size_ && static_cast<int>(recv_counts.size()) == size_,
              "all_to_all on group '", name_, "': ", send_counts.size(), " send and ", recv_counts.size(),
              " receive counts for ", size_, " ranks");
    const size_t es = comm_type_size(type);
    int64_t total = 0;
    for (int64_t c : send_counts) total += c;
    uint64_t seq = start("all_to_all", total * es, (total - send_counts[rank_]) * es);
    NCCL_CHECK_NB(ncclGroupStart());
    int64_t so = 0, ro = 0;
    for (int r = 0; r < size_; ++r) {
      if (send_counts[r] > 0)
        NCCL_CHECK_NB(ncclSend(static_cast<const char*>(send) + so * es, send_counts[r], nccl_type(type), r, comm_,
                            stream_));
      if (recv_counts[r] > 0)
        NCCL_CHECK_NB(ncclRecv(static_cast<char*>(recv) + ro * es, recv_counts[r], nccl_type(type), r, comm_, stream_));
      so += send_counts[r], ro += recv_counts[r];
    }
    NCCL_CHECK_NB(ncclGroupEnd());
    launched(seq, "all_to_all")->wait();
  }
  void broadcast(void* buf, int64_t count, CommType type, int root) override {
    uint64_t seq = start("broadcast", count * comm_type_size(type), rank_ == root ? count * comm_type_size(type) : 0);
    NCCL_CHECK_NB(ncclBroadcast(buf, buf, count, nccl_type(type), root, comm_, stream_));
    launched(seq, "broadcast")->wait();
  }
  void barrier() override {
    // NCCL has no barrier: an all-reduce of one value is one.
    DeviceAllocator& a = allocator_for(Device::cuda);
    void* one = a.allocate(sizeof(float));
    a.fill_zero(one, sizeof(float));
    all_reduce(one, 1, CommType::f32);
    a.release(one, sizeof(float));
  }

 private:
  // Records the op (`sent`: the bytes CommTraffic counts, by default the op's bytes), and orders
  // the communication stream after the compute work issued so far.
  uint64_t start(const char* op, size_t bytes, size_t sent = SIZE_MAX) {
    uint64_t seq = log_->begin(name_, size_, op, bytes, sent == SIZE_MAX ? bytes : sent);
    CUDA_CHECK(cudaEventRecord(ready_, cuda::context().stream));
    CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
    return seq;
  }
  // Non-blocking NCCL: a call may return ncclInProgress; the enqueue has finished when the
  // communicator's async error is no longer ncclInProgress.
  void wait_enqueued(uint64_t seq, const char* op) {
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
      ncclResult_t st;
      NCCL_CHECK(ncclCommGetAsyncError(comm_, &st));
      if (st == ncclSuccess) return;
      if (st != ncclInProgress) abort_job(seq, op, cat("asynchronous NCCL error: ", ncclGetErrorString(st)), 0);
      check_deadline(t0, seq, op);
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  // The collective just enqueued on stream_, as a request whose wait() polls an event recorded
  // after it (and the communicator's asynchronous error) against the watchdog's deadline. The
  // compute stream goes on meanwhile: that is the overlap with the backward pass.
  std::unique_ptr<CommRequest> launched(uint64_t seq, const char* op) {
    wait_enqueued(seq, op);
    cudaEvent_t done;
    CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventRecord(done, stream_));
    return std::make_unique<NcclRequest>(*this, done, seq, op);
  }
  // true once the collective's event has completed; aborts the job on an asynchronous error.
  bool poll(cudaEvent_t done, uint64_t seq, const char* op) {
    cudaError_t q = cudaEventQuery(done);
    if (q == cudaSuccess) return true;
    if (q != cudaErrorNotReady) CUDA_CHECK(q);
    ncclResult_t st;
    NCCL_CHECK(ncclCommGetAsyncError(comm_, &st));
    if (st != ncclSuccess && st != ncclInProgress)
      abort_job(seq, op, cat("asynchronous NCCL error: ", ncclGetErrorString(st)), 0);
    return false;
  }
  void wait_done(cudaEvent_t done, uint64_t seq, const char* op) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int spins = 0; !poll(done, seq, op); ++spins) {
      check_deadline(t0, seq, op);
      if (spins > 200) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    log_->end(seq);
  }

  // A collective in flight on stream_. Not run yet: no GPU was available while writing it (it
  // compiles; docs/parallelism.md).
  class NcclRequest final : public CommRequest {
   public:
    NcclRequest(NcclCommunicator& comm, cudaEvent_t done, uint64_t seq, const char* op)
        : comm_(comm), done_(done), seq_(seq), op_(op) {}
    ~NcclRequest() override {
      if (!finished_) {
        try {
          wait();
        } catch (const std::exception& e) {  // no throw from a destructor
          std::fprintf(stderr, "decotron: %s on group '%s' failed while abandoned: %s\n", op_,
                       comm_.name().c_str(), e.what());
        }
      }
      cudaEventDestroy(done_);
    }
    void wait() override {
      if (finished_) return;
      comm_.wait_done(done_, seq_, op_);
      finished_ = true;
    }
    bool test() override {
      if (!finished_ && comm_.poll(done_, seq_, op_)) comm_.log_->end(seq_), finished_ = true;
      return finished_;
    }

   private:
    NcclCommunicator& comm_;
    cudaEvent_t done_;
    uint64_t seq_;
    const char* op_;
    bool finished_ = false;
  };

  void check_deadline(std::chrono::steady_clock::time_point t0, uint64_t seq, const char* op) {
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (waited > timeout_s_) abort_job(seq, op, "", waited);
  }
  [[noreturn]] void abort_job(uint64_t seq, const char* op, const std::string& error, double waited) {
    if (!error.empty())
      std::fprintf(stderr, "decotron: rank %d: group '%s': %s in %s\n", world_rank_, name_.c_str(), error.c_str(), op);
    report_collective_timeout(*log_, world_rank_, name_, op, seq, waited);
    ncclCommAbort(comm_);  // unblocks this rank's kernels; the result does not matter any more
    comm_ = nullptr;
    MPI_Abort(MPI_COMM_WORLD, 3);
    std::_Exit(3);
  }

  std::string name_;
  double timeout_s_;
  std::shared_ptr<CollectiveLog> log_;
  int world_rank_, rank_, size_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(const MpiCommunicator& group) {
  return std::make_unique<NcclCommunicator>(group, group.timeout_s(), group.log(), group.world_rank());
}

}  // namespace decotron
#endif  // DECOTRON_WITH_NCCL

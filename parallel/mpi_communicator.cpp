#include "parallel/mpi_communicator.h"

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <unistd.h>

#include "core/cuda_check.h"
#include "core/error.h"

namespace decotron {

namespace {

MPI_Datatype mpi_type(CommType t) {
  switch (t) {
    case CommType::f32: return MPI_FLOAT;
    case CommType::f64: return MPI_DOUBLE;
    case CommType::i64: return MPI_INT64_T;
    case CommType::bf16: return MPI_UINT16_T;  // moved as 16-bit words; summed by bf16_sum
  }
  return MPI_DATATYPE_NULL;
}

// MPI has no bf16: the sum of two bf16 vectors in fp32, rounded to nearest even.
void bf16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  const bf16* a = static_cast<const bf16*>(in);
  bf16* b = static_cast<bf16*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = bf16(static_cast<float>(a[i]) + static_cast<float>(b[i]));
}

MPI_Op mpi_sum(CommType t) {
  if (t != CommType::bf16) return MPI_SUM;
  static MPI_Op op = [] {
    MPI_Op o;
    MPI_CHECK(MPI_Op_create(&bf16_sum, /*commute=*/1, &o));
    return o;
  }();
  return op;
}

int mpi_count(int64_t n, const char* what) {
  if (n < 0 || n > INT_MAX) fail("MPI ", what, ": count ", n, " does not fit MPI's int counts; use smaller buckets");
  return static_cast<int>(n);
}

void finalize_at_exit() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Finalize();
}

}  // namespace

void mpi_ensure_initialized() {
  int initialized = 0;
  MPI_CHECK(MPI_Initialized(&initialized));
  if (initialized) return;
  int provided = 0;
  MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided));
  // Errors come back as codes (MPI_CHECK reports them) instead of aborting inside MPI.
  MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  std::atexit(finalize_at_exit);
}

int mpi_world_rank() {
  mpi_ensure_initialized();
  int r = 0;
  MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &r));
  return r;
}

int mpi_world_size() {
  mpi_ensure_initialized();
  int s = 1;
  MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &s));
  return s;
}

void mpi_abort_if_multi_rank(int code) {
  int initialized = 0, finalized = 0;
  if (MPI_Initialized(&initialized) != MPI_SUCCESS || !initialized) return;
  if (MPI_Finalized(&finalized) != MPI_SUCCESS || finalized) return;
  int size = 1;
  if (MPI_Comm_size(MPI_COMM_WORLD, &size) != MPI_SUCCESS || size <= 1) return;
  std::fflush(stdout);
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, code);  // does not return when it succeeds
  std::_Exit(code);
}

std::string mpi_rank_suffix() {
  int initialized = 0, finalized = 0, size = 1, rank = 0;
  if (MPI_Initialized(&initialized) != MPI_SUCCESS || !initialized) return "";
  if (MPI_Finalized(&finalized) != MPI_SUCCESS || finalized) return "";
  if (MPI_Comm_size(MPI_COMM_WORLD, &size) != MPI_SUCCESS || size <= 1) return "";
  if (MPI_Comm_rank(MPI_COMM_WORLD, &rank) != MPI_SUCCESS) return "";
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  return cat(" (rank ", rank, " of ", size, " on ", host, ")");
}

int launcher_local_rank() {
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "LOCAL_RANK"})
    if (const char* v = std::getenv(var)) return std::atoi(v);
  return 0;
}

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string name, double timeout_s,
                                 std::shared_ptr<CollectiveLog> log, int world_rank)
    : comm_(comm), name_(std::move(name)), timeout_s_(timeout_s), log_(std::move(log)), world_rank_(world_rank) {
  MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);  // no throw from a destructor
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::world(double timeout_s, std::shared_ptr<CollectiveLog> log) {
  mpi_ensure_initialized();
  MPI_Comm dup;
  MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &dup));
  return std::make_unique<MpiCommunicator>(dup, "world", timeout_s, std::move(log), mpi_world_rank());
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::split(int color, int key, const std::string& name) const {
  MPI_Comm sub;
  MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub));
  return std::make_unique<MpiCommunicator>(sub, name, timeout_s_, log_, world_rank_);
}

// A non-blocking collective of an MpiCommunicator: MPI_Test drives it, the communicator's wait()
// watches it.
class MpiRequest final : public CommRequest {
 public:
  MpiRequest(const MpiCommunicator& comm, MPI_Request req, uint64_t seq, const char* op)
      : comm_(comm), req_(req), seq_(seq), op_(op) {}
  ~MpiRequest() override {
    if (done_) return;
    try {
      wait();
    } catch (const std::exception& e) {  // no throw from a destructor
      std::fprintf(stderr, "decotron: %s on group '%s' failed while abandoned: %s\n", op_, comm_.name().c_str(),
                   e.what());
    }
  }
  void wait() override {
    if (done_) return;
    comm_.wait(req_, seq_, op_);
    done_ = true;
  }
  bool test() override {
    if (done_) return true;
    int flag = 0;
    MPI_CHECK(MPI_Test(&req_, &flag, MPI_STATUS_IGNORE));
    if (flag) comm_.log_->end(seq_), done_ = true;
    return done_;
  }

 private:
  const MpiCommunicator& comm_;
  MPI_Request req_;
  uint64_t seq_;
  const char* op_;
  bool done_ = false;
};

void MpiCommunicator::wait(MPI_Request& req, uint64_t seq, const char* op) const {
  const auto start = std::chrono::steady_clock::now();
  int flag = 0;
  for (int spins = 0;; ++spins) {
    MPI_CHECK(MPI_Test(&req, &flag, MPI_STATUS_IGNORE));
    if (flag) break;
    // Spin briefly (small collectives finish in microseconds), then back off to at most 1 ms so
    // that a rank waiting on a slow peer leaves the core to it (CPU ranks often share cores).
    if (spins > 200) std::this_thread::sleep_for(std::chrono::microseconds(spins > 2000 ? 1000 : 50));
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (waited > timeout_s_) {
      report_collective_timeout(*log_, world_rank_, name_, op, seq, waited);
      MPI_Abort(MPI_COMM_WORLD, 3);  // does not return when it succeeds
      std::_Exit(3);
    }
  }
  log_->end(seq);
}

// The blocking collectives are the non-blocking ones waited for at once (one watched path).
void MpiCommunicator::all_reduce(void* buf, int64_t count, CommType type) { all_reduce_async(buf, count, type)->wait(); }

void MpiCommunicator::reduce_scatter(const void* send, void* recv, int64_t recv_count, CommType type) {
  reduce_scatter_async(send, recv, recv_count, type)->wait();
}

void MpiCommunicator::all_gather(const void* send, void* recv, int64_t send_count, CommType type) {
  all_gather_async(send, recv, send_count, type)->wait();
}

std::unique_ptr<CommRequest> MpiCommunicator::all_reduce_async(void* buf, int64_t count, CommType type) {
  uint64_t seq = log_->begin(name_, size_, "all_reduce", count * comm_type_size(type), count * comm_type_size(type));
  MPI_Request req;
  MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, buf, mpi_count(count, "all_reduce"), mpi_type(type), mpi_sum(type), comm_, &req));
  return std::make_unique<MpiRequest>(*this, req, seq, "all_reduce");
}

std::unique_ptr<CommRequest> MpiCommunicator::reduce_scatter_async(const void* send, void* recv, int64_t recv_count,
                                                                   CommType type) {
  uint64_t seq = log_->begin(name_, size_, "reduce_scatter", recv_count * size_ * comm_type_size(type),
                             recv_count * size_ * comm_type_size(type));
  MPI_Request req;
  MPI_CHECK(MPI_Ireduce_scatter_block(send, recv, mpi_count(recv_count, "reduce_scatter"), mpi_type(type),
                                      mpi_sum(type), comm_, &req));
  return std::make_unique<MpiRequest>(*this, req, seq, "reduce_scatter");
}

std::unique_ptr<CommRequest> MpiCommunicator::all_gather_async(const void* send, void* recv, int64_t send_count,
                                                               CommType type) {
  uint64_t seq = log_->begin(name_, size_, "all_gather", send_count * comm_type_size(type),
                             send_count * comm_type_size(type));
  // In place (send is this rank's block of recv): MPI wants MPI_IN_PLACE, aliased buffers are an error.
  const bool in_place = send == static_cast<const char*>(recv) + rank_ * send_count * comm_type_size(type);
  MPI_Request req;
  MPI_CHECK(MPI_Iallgather(in_place ? MPI_IN_PLACE : send, mpi_count(send_count, "all_gather"), mpi_type(type), recv,
                           mpi_count(send_count, "all_gather"), mpi_type(type), comm_, &req));
  return std::make_unique<MpiRequest>(*this, req, seq, "all_gather");
}

void MpiCommunicator::all_to_all(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                                 const std::vector<int64_t>& recv_counts, CommType type) {
  DT_ASSERT(static_cast<int>(send_counts.size()) == size_ && static_cast<int>(recv_counts.size()) == size_,
            "all_to_all on group '", name_, "' of ", size_, " ranks got ", send_counts.size(), " send and ",
            recv_counts.size(), " receive counts");
  std::vector<int> sc(size_), sd(size_), rc(size_), rd(size_);
  int64_t so = 0, ro = 0;
  for (int r = 0; r < size_; ++r) {
    sc[r] = mpi_count(send_counts[r], "all_to_all"), sd[r] = mpi_count(so, "all_to_all");
    rc[r] = mpi_count(recv_counts[r], "all_to_all"), rd[r] = mpi_count(ro, "all_to_all");
    so += send_counts[r], ro += recv_counts[r];
  }
  uint64_t seq = log_->begin(name_, size_, "all_to_all", so * comm_type_size(type),
                             (so - send_counts[rank_]) * comm_type_size(type));
  MPI_Request req;
  MPI_CHECK(MPI_Ialltoallv(send, sc.data(), sd.data(), mpi_type(type), recv, rc.data(), rd.data(), mpi_type(type),
                           comm_, &req));
  wait(req, seq, "all_to_all");
}

void MpiCommunicator::broadcast(void* buf, int64_t count, CommType type, int root) {
  uint64_t seq = log_->begin(name_, size_, "broadcast", count * comm_type_size(type),
                             rank_ == root ? count * comm_type_size(type) : 0);
  MPI_Request req;
  MPI_CHECK(MPI_Ibcast(buf, mpi_count(count, "broadcast"), mpi_type(type), root, comm_, &req));
  wait(req, seq, "broadcast");
}

void MpiCommunicator::barrier() {
  uint64_t seq = log_->begin(name_, size_, "barrier", 0, 0);
  MPI_Request req;
  MPI_CHECK(MPI_Ibarrier(comm_, &req));
  wait(req, seq, "barrier");
}

}  // namespace decotron

// Host stand-ins for the NCCL calls parallel/nccl_communicator.cpp makes, over MPI: in the
// emulator "device" memory is host memory, so each collective is the matching blocking MPI
// collective on the same pointers, done at once (the stream, its events and the non-blocking
// init then have nothing left to wait for). What this checks: the NCCL communicator's own code
// (bootstrap of the unique id over MPI, buffer and count conventions, in-place forms, grouped
// send/receive for all-to-all, its requests and watchdog polling) and everything above it with
// device pointers. What it cannot: NCCL itself, streams running concurrently, real timing.
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include "core/dtype.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

struct ncclComm {
  MPI_Comm comm;
  int rank, size;
};

namespace {

MPI_Datatype mpi_type(ncclDataType_t t) {
  switch (t) {
    case ncclFloat32:
      return MPI_FLOAT;
    case ncclFloat64:
      return MPI_DOUBLE;
    case ncclInt64:
      return MPI_INT64_T;
    case ncclBfloat16:
      return MPI_UINT16_T;
    default:
      std::abort();
  }
}

size_t type_size(ncclDataType_t t) {
  int s = 0;
  MPI_Type_size(mpi_type(t), &s);
  return static_cast<size_t>(s);
}

// NCCL sums bf16 in fp32 and rounds (core/dtype.h's bf16: round to nearest even).
void bf16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const decotron::bf16*>(in);
  auto* b = static_cast<decotron::bf16*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = decotron::bf16(static_cast<float>(a[i]) + static_cast<float>(b[i]));
}

MPI_Op sum_op(ncclDataType_t t) {
  if (t != ncclBfloat16) return MPI_SUM;
  static MPI_Op op = [] {
    MPI_Op o;
    MPI_Op_create(&bf16_sum, 1, &o);
    return o;
  }();
  return op;
}

ncclResult_t ok(int mpi_rc) { return mpi_rc == MPI_SUCCESS ? ncclSuccess : ncclSystemError; }

// Send/receive calls between ncclGroupStart and ncclGroupEnd, posted together at the end.
struct P2p {
  bool send;
  void* buf;
  int count;
  MPI_Datatype type;
  int peer;
  MPI_Comm comm;
};
int group_depth = 0;
std::vector<P2p> pending;

ncclResult_t run_p2p(const std::vector<P2p>& ops) {
  std::vector<MPI_Request> reqs(ops.size());
  for (size_t i = 0; i < ops.size(); ++i) {
    const P2p& o = ops[i];
    const int rc = o.send ? MPI_Isend(o.buf, o.count, o.type, o.peer, 77, o.comm, &reqs[i])
                          : MPI_Irecv(o.buf, o.count, o.type, o.peer, 77, o.comm, &reqs[i]);
    if (rc != MPI_SUCCESS) return ncclSystemError;
  }
  return ok(MPI_Waitall(static_cast<int>(reqs.size()), reqs.data(), MPI_STATUSES_IGNORE));
}

}  // namespace

extern "C" {

const char* ncclGetErrorString(ncclResult_t) { return "emulated NCCL error"; }

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  std::random_device rd;
  for (size_t i = 0; i < sizeof id->internal; ++i) id->internal[i] = static_cast<char>(rd());
  return ncclSuccess;
}

// Every rank of the world creates its groups' communicators in the same order (process_groups.cpp),
// so one MPI_Comm_split of the world per creation, coloured by the group's unique id, gives each
// group its MPI communicator.
ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank, ncclConfig_t*) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < sizeof id.internal; ++i) h = (h ^ static_cast<unsigned char>(id.internal[i])) * 16777619u;
  auto* c = new ncclComm{MPI_COMM_NULL, rank, nranks};
  if (MPI_Comm_split(MPI_COMM_WORLD, static_cast<int>(h & 0x7fffffffu), rank, &c->comm) != MPI_SUCCESS)
    return ncclSystemError;
  int size = 0;
  MPI_Comm_size(c->comm, &size);
  if (size != nranks) std::abort();  // two groups hashed to one colour: the emulation's own bug
  *comm = c;
  return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (comm) MPI_Comm_free(&comm->comm);
  delete comm;
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t) { return ncclSuccess; }

ncclResult_t ncclCommGetAsyncError(ncclComm_t, ncclResult_t* e) {
  *e = ncclSuccess;
  return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t t, ncclRedOp_t, ncclComm_t c,
                           cudaStream_t) {
  return ok(MPI_Allreduce(send == recv ? MPI_IN_PLACE : send, recv, static_cast<int>(count), mpi_type(t), sum_op(t),
                          c->comm));
}

ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t recvcount, ncclDataType_t t, ncclRedOp_t,
                               ncclComm_t c, cudaStream_t) {
  return ok(MPI_Reduce_scatter_block(send, recv, static_cast<int>(recvcount), mpi_type(t), sum_op(t), c->comm));
}

ncclResult_t ncclAllGather(const void* send, void* recv, size_t sendcount, ncclDataType_t t, ncclComm_t c,
                           cudaStream_t) {
  const bool in_place = send == static_cast<const char*>(recv) + c->rank * sendcount * type_size(t);
  return ok(MPI_Allgather(in_place ? MPI_IN_PLACE : send, static_cast<int>(sendcount), mpi_type(t), recv,
                          static_cast<int>(sendcount), mpi_type(t), c->comm));
}

ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t t, int root, ncclComm_t c,
                           cudaStream_t) {
  if (c->rank == root && send != recv) std::memcpy(recv, send, count * type_size(t));
  return ok(MPI_Bcast(recv, static_cast<int>(count), mpi_type(t), root, c->comm));
}

ncclResult_t ncclGroupStart() {
  ++group_depth;
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
  if (--group_depth > 0) return ncclSuccess;
  std::vector<P2p> ops;
  ops.swap(pending);
  return run_p2p(ops);
}

ncclResult_t ncclSend(const void* buf, size_t count, ncclDataType_t t, int peer, ncclComm_t c, cudaStream_t) {
  P2p o{true, const_cast<void*>(buf), static_cast<int>(count), mpi_type(t), peer, c->comm};
  if (group_depth > 0) return pending.push_back(o), ncclSuccess;
  return run_p2p({o});
}

ncclResult_t ncclRecv(void* buf, size_t count, ncclDataType_t t, int peer, ncclComm_t c, cudaStream_t) {
  P2p o{false, buf, static_cast<int>(count), mpi_type(t), peer, c->comm};
  if (group_depth > 0) return pending.push_back(o), ncclSuccess;
  return run_p2p({o});
}

// The stream and event calls the communicator makes: everything is done when it is enqueued.
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  *e = reinterpret_cast<cudaEvent_t>(new char[8]);
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete[] reinterpret_cast<char*>(e);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
cudaError_t cudaEventQuery(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }

}  // extern "C"

// The NCCL backend of Communicator (CUDA builds with NCCL only): device buffers, one NCCL
// communicator per group created with ncclCommInitRankConfig in non-blocking mode (the unique id
// travels over the group's MPI communicator). Each collective runs on the communicator's own
// stream after the compute stream's work; a blocking call waits for it at once, an *_async call
// returns a request and the compute stream goes on (gradient buckets overlapped with the
// backward pass). Waiting polls an event recorded after the collective (cudaEventQuery) and
// ncclCommGetAsyncError against the watchdog's deadline; on timeout or an asynchronous error the
// communicator is aborted (ncclCommAbort) and so is the job (MPI_Abort).
// Not run yet: no GPU was available while writing it; it compiles.
#pragma once
#ifdef DECOTRON_WITH_NCCL
#include <memory>

#include "parallel/mpi_communicator.h"

namespace decotron {

// A NCCL communicator over the same ranks as `group` (collective over `group`), sharing its
// name, timeout and collective log.
std::unique_ptr<Communicator> make_nccl_communicator(const MpiCommunicator& group);

}  // namespace decotron
#endif

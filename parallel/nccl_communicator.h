// The NCCL backend of Communicator (CUDA builds with NCCL only): device buffers, one NCCL
// communicator per group created with ncclCommInitRankConfig in non-blocking mode (the unique id
// travels over the group's MPI communicator). Each collective runs on the communicator's own
// stream after the compute stream's work, and the host waits for it polling cudaEventQuery and
// ncclCommGetAsyncError against the watchdog's deadline; on timeout or an asynchronous error the
// communicator is aborted (ncclCommAbort) and so is the job (MPI_Abort).
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

// The small interface every device implements (the ggml idea): memory and copies. Ops dispatch
// on a tensor's device in kernels/ops.cpp; a device that lacks an op says so, never silently.
#pragma once
#include <cstddef>
#include <string>

namespace decotron {

enum class Device : uint8_t { cpu, cuda };

inline const char* device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

struct DeviceAllocator {
  virtual ~DeviceAllocator() = default;
  virtual void* allocate(size_t bytes) = 0;
  virtual void release(void* ptr, size_t bytes) = 0;
  virtual void fill_zero(void* ptr, size_t bytes) = 0;
  // Copies between this device and the host (or within the device).
  virtual void copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes) = 0;
  virtual size_t bytes_in_use() const = 0;
  virtual size_t peak_bytes() const = 0;
};

// The allocator of a device; the CUDA one exists only in CUDA builds (and errors otherwise).
DeviceAllocator& allocator_for(Device d);

// True when this binary has the CUDA backend and a GPU is visible.
bool cuda_available();

}  // namespace decotron

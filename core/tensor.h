// Tensor: a contiguous row-major array with a shape, a dtype and a device. Storage is shared
// (views share it); there are no strides: ops that need a layout change copy explicitly.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/dtype.h"
#include "core/error.h"

namespace decotron {

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

class Storage {
 public:
  Storage(size_t bytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_;
};

class Tensor {
 public:
  Tensor() = default;
  static Tensor empty(const Shape& shape, DType dtype, Device device = Device::cpu);
  static Tensor zeros(const Shape& shape, DType dtype, Device device = Device::cpu);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return numel() * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : Device::cpu; }

  void* raw() const { return static_cast<char*>(storage_->data()) + offset_bytes_; }
  template <class T> T* data() const {
    DT_ASSERT(dtype_of<T>() == dtype_, "tensor is ", dtype_name(dtype_), ", asked as ", dtype_name(dtype_of<T>()));
    return static_cast<T*>(raw());
  }

  // Same storage, another shape with the same element count.
  Tensor view(const Shape& shape) const;
  // Rows [start, start+count) of the first dimension, sharing storage.
  Tensor rows(int64_t start, int64_t count) const;

  void zero_();
  Tensor to(Device device) const;          // copy to a device (a copy even if already there)
  void copy_from(const Tensor& src);       // same shape and dtype, any devices
  Tensor clone() const { return to(device()); }
  // Element access through the host for tests and small reads (copies one value if on device).
  double item(int64_t i = 0) const;

 private:
  Shape shape_;
  DType dtype_ = DType::f32;
  std::shared_ptr<Storage> storage_;
  size_t offset_bytes_ = 0;
};

// Converts a floating tensor to another floating dtype on the CPU (fp32 <-> fp64 <-> bf16).
Tensor cast_cpu(const Tensor& x, DType to);

}  // namespace decotron

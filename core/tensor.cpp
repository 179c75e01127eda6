#include "core/tensor.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <sstream>

namespace decotron {

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

namespace {

// Host memory: 64-byte aligned, with the bytes in use tracked for the memory column of the log.
class CpuAllocator final : public DeviceAllocator {
 public:
  void* allocate(size_t bytes) override {
    size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
    if (!p) fail("out of host memory allocating ", bytes, " bytes");
    size_t now = in_use_.fetch_add(bytes) + bytes;
    size_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {}
    return p;
  }
  void release(void* ptr, size_t bytes) override {
    std::free(ptr);
    in_use_.fetch_sub(bytes);
  }
  void fill_zero(void* ptr, size_t bytes) override { std::memset(ptr, 0, bytes); }
  void copy(void* dst, Device, const void* src, Device, size_t bytes) override { std::memcpy(dst, src, bytes); }
  size_t bytes_in_use() const override { return in_use_.load(); }
  size_t peak_bytes() const override { return peak_.load(); }

 private:
  std::atomic<size_t> in_use_{0}, peak_{0};
};

}  // namespace

#ifndef DECOTRON_WITH_CUDA
DeviceAllocator& allocator_for(Device d) {
  static CpuAllocator cpu;
  if (d == Device::cuda) fail("this decotron was built without CUDA: rebuild with -DDECOTRON_CUDA=ON on a machine with nvcc, or set the device to cpu");
  return cpu;
}
bool cuda_available() { return false; }
#else
DeviceAllocator& cuda_allocator();  // core/cuda_backend.cu
DeviceAllocator& allocator_for(Device d) {
  static CpuAllocator cpu;
  if (d == Device::cuda) return cuda_allocator();
  return cpu;
}
#endif

Storage::Storage(size_t bytes, Device device) : bytes_(bytes), device_(device) {
  data_ = allocator_for(device).allocate(bytes);
}

Storage::~Storage() { allocator_for(device_).release(data_, bytes_); }

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  for (int64_t d : shape) DT_ASSERT(d >= 0, "negative dimension in ", shape_str(shape));
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.storage_ = std::make_shared<Storage>(shape_numel(shape) * dtype_size(dtype), device);
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.zero_();
  return t;
}

Tensor Tensor::view(const Shape& shape) const {
  DT_ASSERT(shape_numel(shape) == numel(), "view ", shape_str(shape_), " as ", shape_str(shape));
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::rows(int64_t start, int64_t count) const {
  DT_ASSERT(ndim() >= 1 && start >= 0 && start + count <= shape_[0], "rows ", start, "+", count, " of ", shape_str(shape_));
  Tensor t = *this;
  t.shape_[0] = count;
  t.offset_bytes_ += start * (numel() / std::max<int64_t>(shape_[0], 1)) * dtype_size(dtype_);
  return t;
}

void Tensor::zero_() {
  if (numel() > 0) allocator_for(device()).fill_zero(raw(), nbytes());
}

Tensor Tensor::to(Device device) const {
  Tensor t = empty(shape_, dtype_, device);
  t.copy_from(*this);
  return t;
}

void Tensor::copy_from(const Tensor& src) {
  DT_ASSERT(src.shape_ == shape_ && src.dtype_ == dtype_, "copy ", shape_str(src.shape_), " into ", shape_str(shape_));
  if (numel() == 0) return;
  Device other = (device() == Device::cuda || src.device() == Device::cuda) ? Device::cuda : Device::cpu;
  allocator_for(other).copy(raw(), device(), src.raw(), src.device(), nbytes());
}

double Tensor::item(int64_t i) const {
  DT_ASSERT(i >= 0 && i < numel(), "item ", i, " of ", shape_str(shape_));
  char buf[8];
  size_t es = dtype_size(dtype_);
  const char* p = static_cast<const char*>(raw()) + i * es;
  if (device() != Device::cpu) {
    allocator_for(device()).copy(buf, Device::cpu, p, device(), es);
    p = buf;
  }
  switch (dtype_) {
    case DType::f32: { float v; std::memcpy(&v, p, 4); return v; }
    case DType::f64: { double v; std::memcpy(&v, p, 8); return v; }
    case DType::bf16: { bf16 v; std::memcpy(&v, p, 2); return static_cast<float>(v); }
    case DType::i32: { int32_t v; std::memcpy(&v, p, 4); return v; }
  }
  return 0;
}

template <class From, class To>
static void convert(const Tensor& x, Tensor& y) {
  const From* a = x.data<From>();
  To* b = y.data<To>();
  for (int64_t i = 0; i < x.numel(); ++i) b[i] = static_cast<To>(static_cast<float>(a[i]));
}

Tensor cast_cpu(const Tensor& x, DType to) {
  DT_ASSERT(x.device() == Device::cpu, "cast_cpu on a device tensor");
  if (x.dtype() == to) return x.clone();
  Tensor y = Tensor::empty(x.shape(), to, Device::cpu);
  auto rd = [&](int64_t i) { return x.item(i); };
  if (x.dtype() == DType::f64 || to == DType::f64) {
    for (int64_t i = 0; i < x.numel(); ++i) {
      double v = rd(i);
      if (to == DType::f64) y.data<double>()[i] = v;
      else if (to == DType::f32) y.data<float>()[i] = static_cast<float>(v);
      else if (to == DType::bf16) y.data<bf16>()[i] = bf16(static_cast<float>(v));
      else y.data<int32_t>()[i] = static_cast<int32_t>(v);
    }
  } else if (x.dtype() == DType::f32 && to == DType::bf16) {
    convert<float, bf16>(x, y);
  } else if (x.dtype() == DType::bf16 && to == DType::f32) {
    convert<bf16, float>(x, y);
  } else {
    for (int64_t i = 0; i < x.numel(); ++i) {
      double v = rd(i);
      if (to == DType::f32) y.data<float>()[i] = static_cast<float>(v);
      else if (to == DType::bf16) y.data<bf16>()[i] = bf16(static_cast<float>(v));
      else y.data<int32_t>()[i] = static_cast<int32_t>(v);
    }
  }
  return y;
}

}  // namespace decotron

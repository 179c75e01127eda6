// Thin, checked wrappers over the HDF5 1.10 C API for checkpoints: RAII handles, named
// datasets of any shape with a CRC32 of their bytes, and scalar attributes.
//
// Every HDF5 call goes through H5_CHECK, which throws decotron::Error naming the call, the
// source file and line, and the innermost message of HDF5's error stack (HDF5's own printing
// is switched off: a corrupt checkpoint is an expected event we report once, clearly).
//
// The library may be built without thread safety (it is optional in HDF5 1.10), and async
// saves write from a background thread, so every caller holds hdf5_lock() while it uses HDF5.
#pragma once
#include <hdf5.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace decotron::h5 {

// Throws decotron::Error for a failed HDF5 call (the current error stack's innermost message).
[[noreturn]] void raise_error(const char* call, const char* file, int line);

// The one lock that serializes HDF5 use in this process.
std::unique_lock<std::recursive_mutex> hdf5_lock();

// "1.10.8": the HDF5 library linked at run time.
std::string library_version();

// An owned HDF5 identifier, closed with the matching H5?close when it goes out of scope.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle() = default;
  Handle(hid_t id, Closer close) : id_(id), close_(close) {}
  Handle(Handle&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = H5I_INVALID_HID; }
  Handle& operator=(Handle&& o) noexcept;
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { reset(); }
  hid_t get() const { return id_; }
  operator hid_t() const { return id_; }
  void reset();
  // Gives up ownership without closing (the caller closes, checked).
  hid_t release() {
    hid_t id = id_;
    id_ = H5I_INVALID_HID;
    return id;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer close_ = nullptr;
};

// Files: create (truncating) or open read-only. Both raise on failure.
Handle create_file(const std::string& path);
Handle open_file(const std::string& path);
// Flushes and closes explicitly, so that a write error is raised rather than lost in a destructor.
void close_file(Handle& file);

Handle create_group(hid_t parent, const std::string& name);
Handle open_group(hid_t parent, const std::string& name);
bool exists(hid_t parent, const std::string& name);
// Names of the links in a group, in creation order (the order the writer stored them).
std::vector<std::string> list_group(hid_t group);

// A dataset of fp32 or fp64 values of `shape` (empty shape: a scalar), with a "crc32"
// attribute over its raw little-endian bytes. Reading checks the CRC and the element type.
// The writers return the new dataset, for the caller's attributes.
Handle write_f32(hid_t parent, const std::string& name, const Shape& shape, const float* data);
Handle write_f64(hid_t parent, const std::string& name, const Shape& shape, const double* data);
Shape dataset_shape(hid_t parent, const std::string& name);
std::vector<float> read_f32(hid_t parent, const std::string& name, Shape* shape = nullptr);
std::vector<double> read_f64(hid_t parent, const std::string& name, Shape* shape = nullptr);
// A text blob (the resolved config) as a 1-D uint8 dataset, CRC-checked like the rest.
void write_text(hid_t parent, const std::string& name, const std::string& text);
std::string read_text(hid_t parent, const std::string& name);

// Scalar attributes on any object (file, group, dataset).
void set_attr(hid_t obj, const std::string& name, const std::string& value);
void set_attr(hid_t obj, const std::string& name, int64_t value);
void set_attr(hid_t obj, const std::string& name, double value);
std::string get_attr_string(hid_t obj, const std::string& name);
int64_t get_attr_int(hid_t obj, const std::string& name);
double get_attr_double(hid_t obj, const std::string& name);

// zlib's CRC32 of a byte range (the checksum stored with each dataset).
uint32_t crc32_of(const void* data, size_t bytes);

}  // namespace decotron::h5

// Checks the return value of an HDF5 call (negative herr_t or hid_t means failure).
#define H5_CHECK(call)                                                        \
  ([&]() {                                                                    \
    auto h5_check_result_ = (call);                                           \
    if (h5_check_result_ < 0) ::decotron::h5::raise_error(#call, __FILE__, __LINE__); \
    return h5_check_result_;                                                  \
  }())

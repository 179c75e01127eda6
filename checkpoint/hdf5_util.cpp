#include "checkpoint/hdf5_util.h"

#include <zlib.h>

#include <bit>
#include <cstring>

#include "core/error.h"

namespace decotron::h5 {

// The CRC is documented as over little-endian bytes; we compute it over the native buffer.
static_assert(std::endian::native == std::endian::little, "checkpoint CRCs assume a little-endian host");

namespace {

herr_t innermost_message(unsigned n, const H5E_error2_t* err, void* out) {
  // Walking upward, entry 0 is where HDF5 first detected the problem (the most specific).
  if (n == 0 && err && err->desc) *static_cast<std::string*>(out) = err->desc;
  return 0;
}

// Creation properties that leave out modification times, so the same state always produces
// the same bytes (a sync and an async save of one state are identical files).
Handle untimed(hid_t cls) {
  Handle p(H5_CHECK(H5Pcreate(cls)), H5Pclose);
  H5_CHECK(H5Pset_obj_track_times(p, false));
  return p;
}

std::string object_path(hid_t obj, const std::string& name) {
  char buf[512];
  ssize_t n = H5Iget_name(obj, buf, sizeof buf);
  std::string base = n > 0 ? std::string(buf, std::min<size_t>(n, sizeof buf - 1)) : "?";
  if (base != "/") base += "/";
  return base + name;
}

std::vector<hsize_t> dims_of(const Shape& shape) {
  std::vector<hsize_t> d;
  for (int64_t s : shape) {
    DT_ASSERT(s >= 0, "negative dimension in ", shape_str(shape));
    d.push_back(static_cast<hsize_t>(s));
  }
  return d;
}

Handle dataspace(const Shape& shape) {
  if (shape.empty()) return Handle(H5_CHECK(H5Screate(H5S_SCALAR)), H5Sclose);
  std::vector<hsize_t> d = dims_of(shape);
  return Handle(H5_CHECK(H5Screate_simple(static_cast<int>(d.size()), d.data(), nullptr)), H5Sclose);
}

// Writes `bytes` of `data` (in memory type `mem`) as dataset `name` stored as `file_type`.
Handle write_raw(hid_t parent, const std::string& name, const Shape& shape, hid_t file_type, hid_t mem,
               const void* data, size_t bytes) {
  Handle space = dataspace(shape);
  Handle dcpl = untimed(H5P_DATASET_CREATE);
  Handle ds(H5_CHECK(H5Dcreate2(parent, name.c_str(), file_type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT)), H5Dclose);
  if (bytes > 0) H5_CHECK(H5Dwrite(ds, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, data));
  set_attr(ds, "crc32", static_cast<int64_t>(crc32_of(data, bytes)));
  return ds;
}

// Reads dataset `name`, requiring element class `cls` of `elem_size` bytes; checks the CRC.
template <class T>
std::vector<T> read_raw(hid_t parent, const std::string& name, H5T_class_t cls, hid_t mem, Shape* shape_out) {
  const std::string path = object_path(parent, name);
  if (!exists(parent, name)) fail("missing dataset ", path);
  Handle ds(H5_CHECK(H5Dopen2(parent, name.c_str(), H5P_DEFAULT)), H5Dclose);
  Handle type(H5_CHECK(H5Dget_type(ds)), H5Tclose);
  if (H5Tget_class(type) != cls || H5Tget_size(type) != sizeof(T))
    fail("dataset ", path, " has an unexpected element type (expected ", sizeof(T), "-byte ",
         cls == H5T_FLOAT ? "floats" : "integers", ")");
  Shape shape = dataset_shape(parent, name);
  std::vector<T> out(static_cast<size_t>(shape_numel(shape)));
  if (!out.empty()) H5_CHECK(H5Dread(ds, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()));
  const int64_t stored = get_attr_int(ds, "crc32");
  const uint32_t computed = crc32_of(out.data(), out.size() * sizeof(T));
  if (stored != static_cast<int64_t>(computed))
    fail("checksum mismatch in dataset ", path, " (stored crc32 ", stored, ", computed ", computed,
         "): the file is corrupt");
  if (shape_out) *shape_out = shape;
  return out;
}

Handle attr_for_write(hid_t obj, const std::string& name, hid_t type) {
  // Attributes are written once per object; replacing one would mean deleting it first.
  if (H5_CHECK(H5Aexists(obj, name.c_str()))) H5_CHECK(H5Adelete(obj, name.c_str()));
  Handle space(H5_CHECK(H5Screate(H5S_SCALAR)), H5Sclose);
  return Handle(H5_CHECK(H5Acreate2(obj, name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT)), H5Aclose);
}

Handle attr_for_read(hid_t obj, const std::string& name) {
  if (!H5_CHECK(H5Aexists(obj, name.c_str()))) fail("missing attribute '", name, "' on ", object_path(obj, ""));
  return Handle(H5_CHECK(H5Aopen(obj, name.c_str(), H5P_DEFAULT)), H5Aclose);
}

}  // namespace

void raise_error(const char* call, const char* file, int line) {
  std::string msg;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, innermost_message, &msg);
  H5Eclear2(H5E_DEFAULT);
  fail("HDF5 call ", call, " failed at ", file, ":", line, msg.empty() ? "" : " (", msg, msg.empty() ? "" : ")");
}

std::unique_lock<std::recursive_mutex> hdf5_lock() {
  static std::recursive_mutex m;
  std::unique_lock<std::recursive_mutex> lock(m);
  // Error printing is per thread in thread-safe builds, so switch it off on every entry.
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  return lock;
}

std::string library_version() {
  unsigned maj = 0, min = 0, rel = 0;
  H5_CHECK(H5get_libversion(&maj, &min, &rel));
  return cat(maj, ".", min, ".", rel);
}

Handle& Handle::operator=(Handle&& o) noexcept {
  if (this != &o) {
    reset();
    id_ = o.id_, close_ = o.close_;
    o.id_ = H5I_INVALID_HID;
  }
  return *this;
}

void Handle::reset() {
  // Errors while closing in a destructor cannot be raised; close_file() is the checked path.
  if (id_ >= 0 && close_) close_(id_);
  id_ = H5I_INVALID_HID;
}

Handle create_file(const std::string& path) {
  Handle fcpl = untimed(H5P_FILE_CREATE);
  return Handle(H5_CHECK(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, fcpl, H5P_DEFAULT)), H5Fclose);
}

Handle open_file(const std::string& path) {
  return Handle(H5_CHECK(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT)), H5Fclose);
}

void close_file(Handle& file) {
  if (file.get() < 0) return;
  H5_CHECK(H5Fflush(file, H5F_SCOPE_LOCAL));
  hid_t id = file.release();
  H5_CHECK(H5Fclose(id));
}

Handle create_group(hid_t parent, const std::string& name) {
  Handle gcpl = untimed(H5P_GROUP_CREATE);
  return Handle(H5_CHECK(H5Gcreate2(parent, name.c_str(), H5P_DEFAULT, gcpl, H5P_DEFAULT)), H5Gclose);
}

Handle open_group(hid_t parent, const std::string& name) {
  if (!exists(parent, name)) fail("missing group ", object_path(parent, name));
  return Handle(H5_CHECK(H5Gopen2(parent, name.c_str(), H5P_DEFAULT)), H5Gclose);
}

bool exists(hid_t parent, const std::string& name) { return H5_CHECK(H5Lexists(parent, name.c_str(), H5P_DEFAULT)) > 0; }

std::vector<std::string> list_group(hid_t group) {
  H5G_info_t info;
  H5_CHECK(H5Gget_info(group, &info));
  std::vector<std::string> names;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    ssize_t n = H5_CHECK(H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT));
    std::string s(static_cast<size_t>(n) + 1, '\0');
    H5_CHECK(H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, s.data(), s.size(), H5P_DEFAULT));
    s.resize(static_cast<size_t>(n));
    names.push_back(s);
  }
  return names;
}

Handle write_f32(hid_t parent, const std::string& name, const Shape& shape, const float* data) {
  return write_raw(parent, name, shape, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, data, shape_numel(shape) * sizeof(float));
}

Handle write_f64(hid_t parent, const std::string& name, const Shape& shape, const double* data) {
  return write_raw(parent, name, shape, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, data, shape_numel(shape) * sizeof(double));
}

Shape dataset_shape(hid_t parent, const std::string& name) {
  Handle ds(H5_CHECK(H5Dopen2(parent, name.c_str(), H5P_DEFAULT)), H5Dclose);
  Handle space(H5_CHECK(H5Dget_space(ds)), H5Sclose);
  int rank = H5_CHECK(H5Sget_simple_extent_ndims(space));
  std::vector<hsize_t> d(rank);
  if (rank > 0) H5_CHECK(H5Sget_simple_extent_dims(space, d.data(), nullptr));
  return Shape(d.begin(), d.end());
}

std::vector<float> read_f32(hid_t parent, const std::string& name, Shape* shape) {
  return read_raw<float>(parent, name, H5T_FLOAT, H5T_NATIVE_FLOAT, shape);
}

std::vector<double> read_f64(hid_t parent, const std::string& name, Shape* shape) {
  return read_raw<double>(parent, name, H5T_FLOAT, H5T_NATIVE_DOUBLE, shape);
}

void write_text(hid_t parent, const std::string& name, const std::string& text) {
  write_raw(parent, name, {static_cast<int64_t>(text.size())}, H5T_STD_U8LE, H5T_NATIVE_UCHAR, text.data(),
            text.size());
}

std::string read_text(hid_t parent, const std::string& name) {
  std::vector<unsigned char> bytes = read_raw<unsigned char>(parent, name, H5T_INTEGER, H5T_NATIVE_UCHAR, nullptr);
  return std::string(bytes.begin(), bytes.end());
}

void set_attr(hid_t obj, const std::string& name, const std::string& value) {
  Handle type(H5_CHECK(H5Tcopy(H5T_C_S1)), H5Tclose);
  H5_CHECK(H5Tset_size(type, value.size() + 1));
  H5_CHECK(H5Tset_strpad(type, H5T_STR_NULLTERM));
  Handle a = attr_for_write(obj, name, type);
  H5_CHECK(H5Awrite(a, type, value.c_str()));
}

void set_attr(hid_t obj, const std::string& name, int64_t value) {
  Handle a = attr_for_write(obj, name, H5T_STD_I64LE);
  H5_CHECK(H5Awrite(a, H5T_NATIVE_INT64, &value));
}

void set_attr(hid_t obj, const std::string& name, double value) {
  Handle a = attr_for_write(obj, name, H5T_IEEE_F64LE);
  H5_CHECK(H5Awrite(a, H5T_NATIVE_DOUBLE, &value));
}

std::string get_attr_string(hid_t obj, const std::string& name) {
  Handle a = attr_for_read(obj, name);
  Handle type(H5_CHECK(H5Aget_type(a)), H5Tclose);
  if (H5Tget_class(type) != H5T_STRING || H5_CHECK(H5Tis_variable_str(type)))
    fail("attribute '", name, "' on ", object_path(obj, ""), " is not a fixed-length string");
  size_t n = H5Tget_size(type);
  std::string s(n, '\0');
  H5_CHECK(H5Aread(a, type, s.data()));
  s.resize(std::strlen(s.c_str()));
  return s;
}

int64_t get_attr_int(hid_t obj, const std::string& name) {
  Handle a = attr_for_read(obj, name);
  int64_t v = 0;
  H5_CHECK(H5Aread(a, H5T_NATIVE_INT64, &v));
  return v;
}

double get_attr_double(hid_t obj, const std::string& name) {
  Handle a = attr_for_read(obj, name);
  double v = 0;
  H5_CHECK(H5Aread(a, H5T_NATIVE_DOUBLE, &v));
  return v;
}

uint32_t crc32_of(const void* data, size_t bytes) {
  uLong c = crc32(0L, Z_NULL, 0);
  const Bytef* p = static_cast<const Bytef*>(data);
  while (bytes > 0) {  // zlib takes uInt lengths: feed large tensors in chunks
    uInt n = static_cast<uInt>(std::min<size_t>(bytes, 1u << 30));
    c = crc32(c, p, n);
    p += n, bytes -= n;
  }
  return static_cast<uint32_t>(c);
}

}  // namespace decotron::h5

// Element types of the export file (inference/export.h, docs/export-format.md) and their
// conversions to fp32. The names are the safetensors dtype strings.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "core/dtype.h"

namespace decotron::inference {

enum class FileDType : uint8_t { f32, f16, bf16, i8 };

inline const char* file_dtype_name(FileDType t) {  // safetensors spelling
  switch (t) {
    case FileDType::f32: return "F32";
    case FileDType::f16: return "F16";
    case FileDType::bf16: return "BF16";
    case FileDType::i8: return "I8";
  }
  return "?";
}

inline size_t file_dtype_size(FileDType t) {
  switch (t) {
    case FileDType::f32: return 4;
    case FileDType::f16: return 2;
    case FileDType::bf16: return 2;
    case FileDType::i8: return 1;
  }
  return 0;
}

// Parses a safetensors dtype string; false if Decotron does not read it.
inline bool parse_file_dtype(const std::string& s, FileDType& out) {
  for (FileDType t : {FileDType::f32, FileDType::f16, FileDType::bf16, FileDType::i8})
    if (s == file_dtype_name(t)) {
      out = t;
      return true;
    }
  return false;
}

// IEEE binary16 <-> fp32, round to nearest even; overflow becomes Inf, NaN stays NaN.
inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (absx >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: Inf
  if (absx < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    if (absx < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25 rounds to 0
    // value = mant * 2^(e - 150); in units of the half subnormal step 2^-24: mant >> (126 - e).
    const uint32_t mant = (absx & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(absx >> 23);  // 14..24
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;  // may carry into the smallest normal: right
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = ((absx - 0x38000000u) >> 13);  // rebias exponent 127 -> 15
  const uint32_t rem = absx & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, x;
  if (exp == 0x1f) {
    x = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      x = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while (!(mant & 0x400u));
      x = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else {
    x = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t x = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) { return bf16(f).bits; }

}  // namespace decotron::inference

// Counter-based RNG: Philox4x32-10 (Salmon et al., SC'11), the generator cuRAND and JAX use.
// A value is a pure function of (seed, stream, index), so the CPU and a CUDA kernel produce the
// same numbers, in any order and any parallel layout: parameter init keyed by the parameter's
// global name gives identical weights at TP1 and TP4, and a resumed run needs only the seed.
#pragma once
#include <cmath>
#include <cstdint>
#include <string_view>

#if defined(__CUDACC__)
#define DT_HOST_DEVICE __host__ __device__
#else
#define DT_HOST_DEVICE
#endif

namespace decotron::rng {

struct U32x4 {
  uint32_t v[4];
};

DT_HOST_DEVICE inline void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds; counter c, key k.
DT_HOST_DEVICE inline U32x4 philox4x32(U32x4 c, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, c.v[0], hi0, lo0);
    mulhilo(0xCD9E8D57u, c.v[2], hi1, lo1);
    U32x4 n{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
    c = n;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// Four 32-bit random words for element `index` of `stream` under `seed`.
DT_HOST_DEVICE inline U32x4 random4(uint64_t seed, uint64_t stream, uint64_t index) {
  U32x4 c{{static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), static_cast<uint32_t>(stream),
           static_cast<uint32_t>(stream >> 32)}};
  return philox4x32(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Uniform in (0, 1], 24-bit resolution: never 0, so log() is safe.
DT_HOST_DEVICE inline float to_uniform(uint32_t x) { return ((x >> 8) + 1u) * (1.0f / 16777216.0f); }

DT_HOST_DEVICE inline float uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  return to_uniform(random4(seed, stream, index).v[0]);
}

// Standard normal by Box-Muller on the first two words, computed in double so CPU and GPU agree.
DT_HOST_DEVICE inline float normal(uint64_t seed, uint64_t stream, uint64_t index) {
  U32x4 r = random4(seed, stream, index);
  double u1 = ((r.v[0] >> 8) + 1u) * (1.0 / 16777216.0);
  double u2 = (r.v[1] >> 8) * (1.0 / 16777216.0);
  return static_cast<float>(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// A stream id from a name (FNV-1a 64): "layers.3.attn.wq" always gets the same stream.
inline uint64_t stream_of(std::string_view name) {
  uint64_t h = 1469598103934665603ull;
  for (char ch : name) {
    h ^= static_cast<unsigned char>(ch);
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace decotron::rng

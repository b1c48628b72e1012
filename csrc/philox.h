// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter-based RNG.
// Every random word the mask sampler uses is a pure function of (seed, step, stream, sample, index), so the
// CPU code (any thread count), the CUDA kernels and the Python reference all draw the same numbers.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define IWM_HD __host__ __device__ __forceinline__
#else
#define IWM_HD inline
#endif

namespace iwm_fast {

struct Philox4 {
  uint32_t x, y, z, w;
};

IWM_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

IWM_HD Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, c.x, hi0, lo0);
    philox_mulhilo(0xCD9E8D57u, c.z, hi1, lo1);
    c = Philox4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
  }
  return c;
}

// Independent streams of the sampler; the tag sits in the top 4 bits of the last counter word.
enum MaskStream : uint32_t { kStreamLayout = 0, kStreamTruncate = 1, kStreamBatch = 2 };

// Counter = (index, sample, step low word, step high bits | stream << 28); key = the 64-bit seed.
IWM_HD Philox4 mask_draw(uint64_t seed, uint64_t step, uint32_t stream, uint32_t sample, uint32_t index) {
  const Philox4 ctr{index, sample, static_cast<uint32_t>(step),
                    static_cast<uint32_t>((step >> 32) & 0x0FFFFFFFu) | (stream << 28)};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Integer in [0, n) from one 32-bit word by multiply-shift: exact integer arithmetic on every backend.
IWM_HD uint32_t philox_below(uint32_t r, uint32_t n) {
  return static_cast<uint32_t>((static_cast<uint64_t>(r) * n) >> 32);
}

}  // namespace iwm_fast

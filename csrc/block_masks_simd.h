// Vector paths (AVX-512, AVX2) of the CPU sampler's truncation of one context, picked at run time; the
// algorithm is in block_masks_vec.h. block_masks_cpu.cpp falls back to its portable path where none is
// compiled in or supported, where they are capped off, or when a vector path declines a layout.
#pragma once
#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define IWM_FAST_X86_SIMD 1
#else
#define IWM_FAST_X86_SIMD 0
#endif

namespace iwm_fast {

enum SimdLevel : int { kSimdNone = 0, kSimdAvx2 = 1, kSimdAvx512 = 2 };

// The widest vector path compiled in and supported by this CPU, capped by set_simd_max_level. The cap starts
// from the environment variable IWM_FAST_MASKS_SIMD (avx512, avx2, or portable = off; unset: no cap).
SimdLevel simd_level();

// Caps the vector path (tests and benchmarks compare the paths); process-wide, not for use while sampling.
void set_simd_max_level(SimdLevel level);

// Width of the window around the cut's expected key, in standard deviations (default 4.5). Tests narrow it
// to exercise the fallback; process-wide, not for use while sampling.
void set_simd_window_sigmas(double sigmas);
double simd_window_sigmas();

// Grids up to this wide have each row's membership in one 64-bit word.
constexpr int64_t kSimdMaxWidth = 64;

// One context as a run of n grid tokens first .. first + n - 1 (whole rows): bit i of bits marks a context
// token (bits holds n / 64 + 1 words, zero past n); key[i] is token first + i's truncation key, readable up to
// 16 words past n. win_key and win_tok hold n + 16 entries.
struct SimdContext {
  const uint64_t* bits;
  int64_t n, first;
  const uint32_t* key;
};

// The truncation keys of the quads first .. first + n - 1 (4 words each, as mask_draw on kStreamTruncate).
void truncation_keys_avx512(uint64_t seed, uint64_t step, uint32_t sample, uint32_t first, int64_t n, uint32_t* out);
void truncation_keys_avx2(uint64_t seed, uint64_t step, uint32_t sample, uint32_t first, int64_t n, uint32_t* out);

// Writes the `keep` context tokens with the smallest (key, index), ascending, to out. Returns false, having
// written nothing, when its guess of the cut's key range misses (probability ~1e-4 per context).
bool truncate_context_avx512(const SimdContext& ctx, int64_t keep, int64_t* out, uint32_t* win_key,
                             uint32_t* win_tok);
bool truncate_context_avx2(const SimdContext& ctx, int64_t keep, int64_t* out, uint32_t* win_key,
                           uint32_t* win_tok);

}  // namespace iwm_fast

// AVX-512 truncation of a context: the keep tokens with the smallest (key, index), without sorting, and the
// Philox keys it needs, 16 counters per vector.
//
// The context is a few grid rows with a 64-bit membership word each (no byte masks, no compaction, no gathers).
// The keys are uniform 32-bit words, so the cut (the keep-th smallest key of count) lies near the quantile
// p = keep / count, with standard deviation sqrt(p (1 - p) / count). One vector pass counts the context tokens
// below a window 4.5 standard deviations wide on each side and compresses those inside it into a short
// candidate list; a 256-bin histogram of the candidates leaves a handful to sort; a second vector pass writes
// the kept tokens, widened to int64, with compress stores. A missed window returns false and the caller runs
// the portable path, so the guess only affects speed, never the result.
#include "block_masks_simd.h"

#include "philox.h"

#include <atomic>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#include <immintrin.h>
#define IWM_FAST_AVX512 1
#endif

namespace iwm_fast {

namespace {
std::atomic<bool> simd_enabled{true};
std::atomic<double> window_sigmas{4.5};
}  // namespace

void set_simd_enabled(bool on) { simd_enabled.store(on); }
void set_simd_window_sigmas(double sigmas) { window_sigmas.store(sigmas); }

#if IWM_FAST_AVX512

bool simd_path_available() {
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported && simd_enabled.load(std::memory_order_relaxed);
}

// Everything below is compiled for AVX-512 and runs only after simd_path_available(). It must not instantiate
// templates shared with other files (std::nth_element, std::min, ...): the linker could keep this copy for
// every caller, and a CPU without AVX-512 would then fault in the portable path.
#pragma GCC push_options
#pragma GCC target("avx512f,popcnt")

namespace {

// Sorts the few pairs of the boundary bin (usually 0-3; at most kMaxBucket).
void insertion_sort(uint64_t* a, int64_t n) {
  for (int64_t i = 1; i < n; ++i) {
    const uint64_t v = a[i];
    int64_t j = i;
    for (; j > 0 && a[j - 1] > v; --j) a[j] = a[j - 1];
    a[j] = v;
  }
}

// Writes tokens where `pick` holds, widened to int64; returns how many were written.
inline int64_t store_tokens(int64_t* out, __m512i tok, __mmask16 pick) {
  const __m512i lo8 = _mm512_cvtepu32_epi64(_mm512_castsi512_si256(tok));
  const __m512i hi8 = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(tok, 1));
  const __mmask8 plo = static_cast<__mmask8>(pick), phi = static_cast<__mmask8>(pick >> 8);
  _mm512_mask_compressstoreu_epi64(out, plo, lo8);
  const int64_t nlo = __builtin_popcount(plo);
  _mm512_mask_compressstoreu_epi64(out + nlo, phi, hi8);
  return nlo + __builtin_popcount(phi);
}

// Calls f(offset, tokens, members) for every 16-token vector of every row, in ascending token order.
template <typename F>
__attribute__((always_inline)) inline void for_each_vector(const SimdContext& c, F&& f) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t r = 0; r < c.num_rows; ++r) {
    const uint64_t bits = c.row_bits[r];
    for (int64_t w = 0; w < c.W && (bits >> w) != 0; w += 16) {
      const int64_t off = r * c.W + w;
      const __m512i tok = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(c.first + off)), iota);
      f(off, tok, static_cast<__mmask16>(bits >> w));
    }
  }
}

// 16 lanes of the 32x32 -> 64-bit products a * m: high and low words.
inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                         // lanes 0, 2, ...: 64-bit products
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);   // lanes 1, 3, ...
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

}  // namespace

void truncation_keys_avx512(uint64_t seed, uint64_t step, uint32_t sample, uint32_t first, int64_t n,
                            uint32_t* out) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int32_t>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int32_t>(0xCD9E8D57u));
  const uint32_t y0 = sample, z0 = static_cast<uint32_t>(step);
  const uint32_t w0 = static_cast<uint32_t>((step >> 32) & 0x0FFFFFFFu) | (kStreamTruncate << 28);
  for (int64_t i = 0; i < n; i += 16) {
    __m512i x = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(first + static_cast<uint32_t>(i))), iota);
    __m512i y = _mm512_set1_epi32(static_cast<int32_t>(y0)), z = _mm512_set1_epi32(static_cast<int32_t>(z0));
    __m512i w = _mm512_set1_epi32(static_cast<int32_t>(w0));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      if (r > 0) k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(x, m0, hi0, lo0);
      mulhilo16(z, m1, hi1, lo1);
      const __m512i nx = _mm512_xor_si512(_mm512_xor_si512(hi1, y), _mm512_set1_epi32(static_cast<int32_t>(k0)));
      const __m512i nz = _mm512_xor_si512(_mm512_xor_si512(hi0, w), _mm512_set1_epi32(static_cast<int32_t>(k1)));
      x = nx, y = lo1, z = nz, w = lo0;
    }
    // Interleave to out[4 q + k] = word k of quad q: 4x4 transposes within each 128-bit lane, after which
    // q_j holds quads j, 4 + j, 8 + j, 12 + j; then 128-bit lane shuffles put quads 4 i .. 4 i + 3 in vector i.
    const __m512i xy_lo = _mm512_unpacklo_epi32(x, y), xy_hi = _mm512_unpackhi_epi32(x, y);
    const __m512i zw_lo = _mm512_unpacklo_epi32(z, w), zw_hi = _mm512_unpackhi_epi32(z, w);
    const __m512i q0 = _mm512_unpacklo_epi64(xy_lo, zw_lo), q1 = _mm512_unpackhi_epi64(xy_lo, zw_lo);
    const __m512i q2 = _mm512_unpacklo_epi64(xy_hi, zw_hi), q3 = _mm512_unpackhi_epi64(xy_hi, zw_hi);
    const __m512i a01 = _mm512_shuffle_i32x4(q0, q1, 0x44), a23 = _mm512_shuffle_i32x4(q2, q3, 0x44);  // lanes 0, 1
    const __m512i b01 = _mm512_shuffle_i32x4(q0, q1, 0xEE), b23 = _mm512_shuffle_i32x4(q2, q3, 0xEE);  // lanes 2, 3
    alignas(64) uint32_t buf[64];
    uint32_t* dst = n - i >= 16 ? out + 4 * i : buf;
    _mm512_storeu_si512(dst, _mm512_shuffle_i32x4(a01, a23, 0x88));
    _mm512_storeu_si512(dst + 16, _mm512_shuffle_i32x4(a01, a23, 0xDD));
    _mm512_storeu_si512(dst + 32, _mm512_shuffle_i32x4(b01, b23, 0x88));
    _mm512_storeu_si512(dst + 48, _mm512_shuffle_i32x4(b01, b23, 0xDD));
    if (dst == buf)
      for (int64_t j = 0; j < 4 * (n - i); ++j) out[4 * i + j] = buf[j];
  }
}

bool truncate_context_avx512(const SimdContext& c, int64_t keep, int64_t* out, uint32_t* win_key,
                             uint32_t* win_tok) {
  int64_t count = 0;
  for (int64_t r = 0; r < c.num_rows; ++r) count += __builtin_popcountll(c.row_bits[r]);
  if (count == keep) {  // every context token stays
    for_each_vector(c, [&](int64_t, __m512i tok, __mmask16 mem) { out += store_tokens(out, tok, mem); });
    return true;
  }
  // The window [g_lo, g_hi] of keys, in units of 2^32.
  const double n = static_cast<double>(count), p = static_cast<double>(keep) / n;
  const double half = window_sigmas.load(std::memory_order_relaxed) * __builtin_sqrt(p * (1.0 - p) / n) + 2.0 / n;
  const double flo = p - half > 0.0 ? (p - half) * 4294967296.0 : 0.0;
  const double fhi = p + half < 1.0 ? (p + half) * 4294967296.0 : 4294967295.0;
  const uint32_t g_lo = static_cast<uint32_t>(flo < 4294967295.0 ? flo : 4294967295.0);
  const uint32_t g_hi = static_cast<uint32_t>(fhi < 4294967295.0 ? fhi : 4294967295.0);
  const __m512i vlo = _mm512_set1_epi32(static_cast<int32_t>(g_lo));
  const __m512i vhi = _mm512_set1_epi32(static_cast<int32_t>(g_hi));
  int64_t below = 0, m = 0;
  for_each_vector(c, [&](int64_t off, __m512i tok, __mmask16 mem) {
    const __m512i k = _mm512_loadu_si512(c.key + off);
    const __mmask16 lt = _mm512_mask_cmplt_epu32_mask(mem, k, vlo);
    const __mmask16 win = _mm512_mask_cmple_epu32_mask(mem & static_cast<__mmask16>(~lt), k, vhi);
    below += __builtin_popcount(lt);
    _mm512_mask_compressstoreu_epi32(win_key + m, win, k);
    _mm512_mask_compressstoreu_epi32(win_tok + m, win, tok);
    m += __builtin_popcount(win);
  });
  if (below >= keep || below + m < keep) return false;  // the cut is outside the window
  // Second level: a 256-bin histogram over the window, then the boundary bin's few candidates.
  const uint32_t range = g_hi - g_lo;
  const int shift = range < 256 ? 0 : 32 - __builtin_clz(range) - 8;  // (key - g_lo) >> shift < 256
  int64_t hist[256] = {};
  for (int64_t j = 0; j < m; ++j) ++hist[(win_key[j] - g_lo) >> shift];
  int64_t before = below;
  uint32_t bin = 0;
  while (before + hist[bin] < keep) before += hist[bin++];
  constexpr int64_t kMaxBucket = 256;
  if (hist[bin] > kMaxBucket) return false;  // a pathological bin: leave it to the scalar path
  uint64_t bucket[kMaxBucket];
  int64_t nb = 0;
  for (int64_t j = 0; j < m; ++j)
    if (((win_key[j] - g_lo) >> shift) == bin) bucket[nb++] = (static_cast<uint64_t>(win_key[j]) << 32) | win_tok[j];
  const int64_t need = keep - before;  // 1 <= need <= nb
  insertion_sort(bucket, nb);
  const uint64_t cut = bucket[need - 1];
  const __m512i ck = _mm512_set1_epi32(static_cast<int32_t>(cut >> 32));
  const __m512i cn = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(cut)));
  // Kept iff (key, token) <= (cut key, cut token).
  for_each_vector(c, [&](int64_t off, __m512i tok, __mmask16 mem) {
    const __m512i k = _mm512_loadu_si512(c.key + off);
    const __mmask16 pick = _mm512_mask_cmplt_epu32_mask(mem, k, ck) |
                           (_mm512_mask_cmpeq_epi32_mask(mem, k, ck) & _mm512_cmple_epu32_mask(tok, cn));
    out += store_tokens(out, tok, pick);
  });
  return true;
}

#pragma GCC pop_options

#else  // no AVX-512 code on this compiler or architecture

void truncation_keys_avx512(uint64_t, uint64_t, uint32_t, uint32_t, int64_t, uint32_t*) {}

bool simd_path_available() { return false; }

bool truncate_context_avx512(const SimdContext&, int64_t, int64_t*, uint32_t*, uint32_t*) {
  return false;
}

#endif

}  // namespace iwm_fast

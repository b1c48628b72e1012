// The vector truncation of one context, written once over a vector-traits type V (AVX-512: 16 lanes, AVX2: 8)
// and instantiated by block_masks_avx512.cpp and block_masks_avx2.cpp, each inside its own
// `#pragma GCC target` region. Include only there, after block_masks_simd.h and philox.h: everything defined
// here has internal linkage, so no copy compiled for one instruction set can be picked by the linker for a
// caller built for another (which a shared inline function or template instantiated in the region could be).
//
// The keep tokens with the smallest (key, index), without sorting. The context is a run of whole grid rows
// with a membership bit per token. The keys are uniform 32-bit words, so the cut (the keep-th smallest key of
// count) lies near the quantile p = keep / count, with standard deviation sqrt(p (1 - p) / count). One vector
// pass counts the context tokens below a window some standard deviations wide on each side and compresses
// those inside it into a short candidate list; a 256-bin histogram of the candidates leaves a handful to sort;
// a second vector pass writes the kept tokens, widened to int64. A missed window returns false and the caller
// runs the portable path, so the guess only affects speed, never the result.
//
// V provides: vec, mask, kLanes; iota(), set1(u32), add, xor_, load(const u32*); lanes(u64 bits) (the low
// kLanes bits as a mask); lt/le/eq(mask, a, b) (unsigned, within the mask); count(mask);
// compress32(u32* dst, mask, vec) (may write up to kLanes words past the compressed ones);
// store_tokens(i64* out, vec, mask, room) -> count (the selected tokens, widened; may write up to room
// entries);
// mulhilo(a, m, hi, lo) (32x32 -> 64-bit products); store_quads(dst, x, y, z, w) (dst[4 q + k] = word k of
// lane q).
#pragma once
#include <cstdint>

#include "block_masks_simd.h"
#include "philox.h"  // already included before the target pragma by the includer

namespace iwm_fast {
namespace {

// Sorts the few pairs of the boundary bin (usually 0-3; at most kMaxBucket).
inline void insertion_sort(uint64_t* a, int64_t n) {
  for (int64_t i = 1; i < n; ++i) {
    const uint64_t v = a[i];
    int64_t j = i;
    for (; j > 0 && a[j - 1] > v; --j) a[j] = a[j - 1];
    a[j] = v;
  }
}

// Calls f(offset, tokens, members) for every kLanes-token vector of the run that holds a context token, in
// ascending token order. The run is flat, not per row, so a row narrower than a vector wastes no lanes.
template <typename V, typename F>
__attribute__((always_inline)) inline void for_each_vector(const SimdContext& c, F&& f) {
  constexpr int L = V::kLanes;  // divides 64
  const typename V::vec iota = V::iota();
  for (int64_t off = 0; off < c.n; off += L) {
    const uint64_t word = c.bits[off >> 6];
    if (word == 0) {  // a whole empty word: to the next one
      off = (off | 63) + 1 - L;
      continue;
    }
    const auto members = V::lanes(word >> (off & 63));
    if (members) f(off, V::add(V::set1(static_cast<uint32_t>(c.first + off)), iota), members);
  }
}

// U independent groups of L counters per step: the rounds of one group are a dependent chain of multiplies,
// so several groups in flight keep the multiplier busy.
template <typename V, int U>
__attribute__((always_inline)) inline void philox_groups(uint64_t seed, uint64_t step, uint32_t sample,
                                                         uint32_t first, uint32_t* dst) {
  using vec = typename V::vec;
  constexpr int L = V::kLanes;
  const vec iota = V::iota(), m0 = V::set1(0xD2511F53u), m1 = V::set1(0xCD9E8D57u);
  const uint32_t w0 = static_cast<uint32_t>((step >> 32) & 0x0FFFFFFFu) | (kStreamTruncate << 28);
  vec x[U], y[U], z[U], w[U];
  for (int u = 0; u < U; ++u) {
    x[u] = V::add(V::set1(first + static_cast<uint32_t>(u * L)), iota);
    y[u] = V::set1(sample), z[u] = V::set1(static_cast<uint32_t>(step)), w[u] = V::set1(w0);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {  // Philox4x32-10, as philox.h, on U * L counters at once
    if (r > 0) k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
    const vec vk0 = V::set1(k0), vk1 = V::set1(k1);
    for (int u = 0; u < U; ++u) {
      vec hi0, lo0, hi1, lo1;
      V::mulhilo(x[u], m0, hi0, lo0);
      V::mulhilo(z[u], m1, hi1, lo1);
      const vec nx = V::xor_(V::xor_(hi1, y[u]), vk0);
      const vec nz = V::xor_(V::xor_(hi0, w[u]), vk1);
      x[u] = nx, y[u] = lo1, z[u] = nz, w[u] = lo0;
    }
  }
  for (int u = 0; u < U; ++u) V::store_quads(dst + 4 * L * u, x[u], y[u], z[u], w[u]);
}

template <typename V>
void truncation_keys_vec(uint64_t seed, uint64_t step, uint32_t sample, uint32_t first, int64_t n, uint32_t* out) {
  constexpr int L = V::kLanes, U = V::kPhiloxGroups;
  int64_t i = 0;
  for (; n - i >= U * L; i += U * L) philox_groups<V, U>(seed, step, sample, first + static_cast<uint32_t>(i), out + 4 * i);
  for (; i < n; i += L) {
    alignas(64) uint32_t buf[4 * L];
    uint32_t* dst = n - i >= L ? out + 4 * i : buf;
    philox_groups<V, 1>(seed, step, sample, first + static_cast<uint32_t>(i), dst);
    if (dst == buf)
      for (int64_t j = 0; j < 4 * (n - i); ++j) out[4 * i + j] = buf[j];
  }
}

template <typename V>
bool truncate_context_vec(const SimdContext& c, int64_t keep, int64_t* out, uint32_t* win_key, uint32_t* win_tok) {
  using vec = typename V::vec;
  using mask = typename V::mask;
  int64_t count = 0;
  for (int64_t i = 0; i <= c.n >> 6; ++i) count += __builtin_popcountll(c.bits[i]);
  int64_t* const end = out + keep;  // a store may fill the row up to here; later stores overwrite the excess
  if (count == keep) {  // every context token stays
    for_each_vector<V>(c, [&](int64_t, vec tok, mask mem) { out += V::store_tokens(out, tok, mem, end - out); });
    return true;
  }
  // The window [g_lo, g_hi] of keys, in units of 2^32.
  const double n = static_cast<double>(count), p = static_cast<double>(keep) / n;
  const double half = simd_window_sigmas() * __builtin_sqrt(p * (1.0 - p) / n) + 2.0 / n;
  const double flo = p - half > 0.0 ? (p - half) * 4294967296.0 : 0.0;
  const double fhi = p + half < 1.0 ? (p + half) * 4294967296.0 : 4294967295.0;
  const uint32_t g_lo = static_cast<uint32_t>(flo < 4294967295.0 ? flo : 4294967295.0);
  const uint32_t g_hi = static_cast<uint32_t>(fhi < 4294967295.0 ? fhi : 4294967295.0);
  const vec vlo = V::set1(g_lo), vhi = V::set1(g_hi);
  int64_t below = 0, m = 0;
  for_each_vector<V>(c, [&](int64_t off, vec tok, mask mem) {
    const vec k = V::load(c.key + off);
    const mask lt = V::lt(mem, k, vlo);
    const mask win = V::le(static_cast<mask>(mem & ~lt), k, vhi);
    below += V::count(lt);
    V::compress32(win_key + m, win, k);
    V::compress32(win_tok + m, win, tok);
    m += V::count(win);
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
  if (hist[bin] > kMaxBucket) return false;  // a pathological bin: leave it to the portable path
  uint64_t bucket[kMaxBucket];
  int64_t nb = 0;
  for (int64_t j = 0; j < m; ++j)
    if (((win_key[j] - g_lo) >> shift) == bin) bucket[nb++] = (static_cast<uint64_t>(win_key[j]) << 32) | win_tok[j];
  const int64_t need = keep - before;  // 1 <= need <= nb
  insertion_sort(bucket, nb);
  const uint64_t cut = bucket[need - 1];
  const vec ck = V::set1(static_cast<uint32_t>(cut >> 32)), cn = V::set1(static_cast<uint32_t>(cut));
  // Kept iff (key, token) <= (cut key, cut token).
  for_each_vector<V>(c, [&](int64_t off, vec tok, mask mem) {
    const vec k = V::load(c.key + off);
    const mask pick = static_cast<mask>(V::lt(mem, k, ck) | V::le(V::eq(mem, k, ck), tok, cn));
    out += V::store_tokens(out, tok, pick, end - out);
  });
  return true;
}

}  // namespace
}  // namespace iwm_fast

// AVX2 instantiation of the vector truncation (block_masks_vec.h): 8 lanes. AVX2 has neither mask registers,
// unsigned compares nor compress stores: masks are movemask bits, unsigned order is signed order after
// flipping the top bit, and a compress is a lane permutation looked up by mask, then a full or masked store.
#include "block_masks_simd.h"
#include "philox.h"  // before the target pragma: its inline functions are shared with the portable code

#if IWM_FAST_X86_SIMD
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,popcnt")

#include "block_masks_vec.h"

namespace iwm_fast {
namespace {

// For each 8-bit mask, the indices of its set lanes in order, a nibble each (lane k of the compress reads
// nibble k).
struct CompressTable {
  uint32_t nibbles[256];
};

constexpr CompressTable make_compress_table() {
  CompressTable t{};
  for (uint32_t m = 0; m < 256; ++m) {
    uint32_t packed = 0, k = 0;
    for (uint32_t lane = 0; lane < 8; ++lane)
      if (m >> lane & 1) packed |= lane << (4 * k++);
    t.nibbles[m] = packed;
  }
  return t;
}

constexpr CompressTable kCompress = make_compress_table();

struct Avx2 {
  using vec = __m256i;
  using mask = uint32_t;  // bits 0-7
  static constexpr int kPhiloxGroups = 3;  // independent counter groups per Philox step
  static constexpr int kLanes = 8;
  static vec iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static vec set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int32_t>(v)); }
  static vec add(vec a, vec b) { return _mm256_add_epi32(a, b); }
  static vec xor_(vec a, vec b) { return _mm256_xor_si256(a, b); }
  static vec load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static mask lanes(uint64_t bits) { return static_cast<mask>(bits & 0xFF); }
  static mask bits_of(vec cmp) { return static_cast<mask>(_mm256_movemask_ps(_mm256_castsi256_ps(cmp))); }
  static mask gt(vec a, vec b) {  // unsigned a > b
    const vec sign = set1(0x80000000u);
    return bits_of(_mm256_cmpgt_epi32(xor_(a, sign), xor_(b, sign)));
  }
  static mask lt(mask m, vec a, vec b) { return m & gt(b, a); }
  static mask le(mask m, vec a, vec b) { return m & ~gt(a, b); }
  static mask eq(mask m, vec a, vec b) { return m & bits_of(_mm256_cmpeq_epi32(a, b)); }
  static int count(mask m) { return __builtin_popcount(m); }
  static vec compress(mask m, vec v) {
    const vec idx = _mm256_srlv_epi32(set1(kCompress.nibbles[m]), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    return _mm256_permutevar8x32_epi32(v, _mm256_and_si256(idx, set1(0xF)));
  }
  static void compress32(uint32_t* dst, mask m, vec v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), compress(m, v));
  }
  static vec first_lanes64(int64_t n) {  // 64-bit lanes 0 .. n - 1 all ones
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  // Whole-vector stores while the row has room for them (the excess is overwritten by the next store or is
  // past the last kept token), masked stores near its end.
  static int64_t store_tokens(int64_t* out, vec tok, mask pick, int64_t room) {
    const vec packed = compress(pick, tok);
    const vec lo = _mm256_cvtepu32_epi64(_mm256_castsi256_si128(packed));
    const vec hi = _mm256_cvtepu32_epi64(_mm256_extracti128_si256(packed, 1));
    const int64_t n = count(pick);
    auto* o = reinterpret_cast<__m256i*>(out);
    if (room >= 8) {
      _mm256_storeu_si256(o, lo);
      _mm256_storeu_si256(o + 1, hi);
    } else {
      _mm256_maskstore_epi64(reinterpret_cast<long long*>(out), first_lanes64(n), lo);
      if (n > 4) _mm256_maskstore_epi64(reinterpret_cast<long long*>(out) + 4, first_lanes64(n - 4), hi);
    }
    return n;
  }
  static void mulhilo(vec a, vec m, vec& hi, vec& lo) {
    const vec even = _mm256_mul_epu32(a, m);                        // lanes 0, 2, 4, 6: 64-bit products
    const vec odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  }
  // 4x4 transposes within each 128-bit lane (q_j holds lanes j and 4 + j), then 128-bit lane swaps.
  static void store_quads(uint32_t* dst, vec x, vec y, vec z, vec w) {
    const vec xy_lo = _mm256_unpacklo_epi32(x, y), xy_hi = _mm256_unpackhi_epi32(x, y);
    const vec zw_lo = _mm256_unpacklo_epi32(z, w), zw_hi = _mm256_unpackhi_epi32(z, w);
    const vec q0 = _mm256_unpacklo_epi64(xy_lo, zw_lo), q1 = _mm256_unpackhi_epi64(xy_lo, zw_lo);
    const vec q2 = _mm256_unpacklo_epi64(xy_hi, zw_hi), q3 = _mm256_unpackhi_epi64(xy_hi, zw_hi);
    auto* d = reinterpret_cast<__m256i*>(dst);
    _mm256_storeu_si256(d, _mm256_permute2x128_si256(q0, q1, 0x20));      // lanes 0, 1
    _mm256_storeu_si256(d + 1, _mm256_permute2x128_si256(q2, q3, 0x20));  // lanes 2, 3
    _mm256_storeu_si256(d + 2, _mm256_permute2x128_si256(q0, q1, 0x31));  // lanes 4, 5
    _mm256_storeu_si256(d + 3, _mm256_permute2x128_si256(q2, q3, 0x31));  // lanes 6, 7
  }
};

}  // namespace

void truncation_keys_avx2(uint64_t seed, uint64_t step, uint32_t sample, uint32_t first, int64_t n, uint32_t* out) {
  truncation_keys_vec<Avx2>(seed, step, sample, first, n, out);
}

bool truncate_context_avx2(const SimdContext& ctx, int64_t keep, int64_t* out, uint32_t* win_key,
                           uint32_t* win_tok) {
  return truncate_context_vec<Avx2>(ctx, keep, out, win_key, win_tok);
}

}  // namespace iwm_fast

#pragma GCC pop_options
#endif

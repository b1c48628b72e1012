// AVX-512 instantiation of the vector truncation (block_masks_vec.h): 16 lanes, mask registers, compress stores.
#include "block_masks_simd.h"
#include "philox.h"  // before the target pragma: its inline functions are shared with the portable code

#if IWM_FAST_X86_SIMD
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,popcnt")

#include "block_masks_vec.h"

namespace iwm_fast {
namespace {

struct Avx512 {
  using vec = __m512i;
  using mask = __mmask16;
  static constexpr int kPhiloxGroups = 4;  // independent counter groups per Philox step
  static constexpr int kLanes = 16;
  static vec iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static vec set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int32_t>(v)); }
  static vec add(vec a, vec b) { return _mm512_add_epi32(a, b); }
  static vec xor_(vec a, vec b) { return _mm512_xor_si512(a, b); }
  static vec load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static mask lanes(uint64_t bits) { return static_cast<mask>(bits); }
  static mask lt(mask m, vec a, vec b) { return _mm512_mask_cmplt_epu32_mask(m, a, b); }
  static mask le(mask m, vec a, vec b) { return _mm512_mask_cmple_epu32_mask(m, a, b); }
  static mask eq(mask m, vec a, vec b) { return _mm512_mask_cmpeq_epi32_mask(m, a, b); }
  static int count(mask m) { return __builtin_popcount(m); }
  static void compress32(uint32_t* dst, mask m, vec v) { _mm512_mask_compressstoreu_epi32(dst, m, v); }
  static int64_t store_tokens(int64_t* out, vec tok, mask pick, int64_t /*room*/) {  // exact
    const __m512i lo8 = _mm512_cvtepu32_epi64(_mm512_castsi512_si256(tok));
    const __m512i hi8 = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(tok, 1));
    const __mmask8 plo = static_cast<__mmask8>(pick), phi = static_cast<__mmask8>(pick >> 8);
    _mm512_mask_compressstoreu_epi64(out, plo, lo8);
    const int64_t nlo = __builtin_popcount(plo);
    _mm512_mask_compressstoreu_epi64(out + nlo, phi, hi8);
    return nlo + __builtin_popcount(phi);
  }
  static void mulhilo(vec a, vec m, vec& hi, vec& lo) {
    const vec even = _mm512_mul_epu32(a, m);                        // lanes 0, 2, ...: 64-bit products
    const vec odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // lanes 1, 3, ...
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  }
  // 4x4 transposes within each 128-bit lane, after which q_j holds lanes j, 4 + j, 8 + j, 12 + j; then
  // 128-bit lane shuffles put lanes 4 i .. 4 i + 3 in output vector i.
  static void store_quads(uint32_t* dst, vec x, vec y, vec z, vec w) {
    const vec xy_lo = _mm512_unpacklo_epi32(x, y), xy_hi = _mm512_unpackhi_epi32(x, y);
    const vec zw_lo = _mm512_unpacklo_epi32(z, w), zw_hi = _mm512_unpackhi_epi32(z, w);
    const vec q0 = _mm512_unpacklo_epi64(xy_lo, zw_lo), q1 = _mm512_unpackhi_epi64(xy_lo, zw_lo);
    const vec q2 = _mm512_unpacklo_epi64(xy_hi, zw_hi), q3 = _mm512_unpackhi_epi64(xy_hi, zw_hi);
    const vec a01 = _mm512_shuffle_i32x4(q0, q1, 0x44), a23 = _mm512_shuffle_i32x4(q2, q3, 0x44);  // lanes 0, 1
    const vec b01 = _mm512_shuffle_i32x4(q0, q1, 0xEE), b23 = _mm512_shuffle_i32x4(q2, q3, 0xEE);  // lanes 2, 3
    _mm512_storeu_si512(dst, _mm512_shuffle_i32x4(a01, a23, 0x88));
    _mm512_storeu_si512(dst + 16, _mm512_shuffle_i32x4(a01, a23, 0xDD));
    _mm512_storeu_si512(dst + 32, _mm512_shuffle_i32x4(b01, b23, 0x88));
    _mm512_storeu_si512(dst + 48, _mm512_shuffle_i32x4(b01, b23, 0xDD));
  }
};

}  // namespace

void truncation_keys_avx512(uint64_t seed, uint64_t step, uint32_t sample, uint32_t first, int64_t n,
                            uint32_t* out) {
  truncation_keys_vec<Avx512>(seed, step, sample, first, n, out);
}

bool truncate_context_avx512(const SimdContext& ctx, int64_t keep, int64_t* out, uint32_t* win_key,
                             uint32_t* win_tok) {
  return truncate_context_vec<Avx512>(ctx, keep, out, win_key, win_tok);
}

}  // namespace iwm_fast

#pragma GCC pop_options
#endif

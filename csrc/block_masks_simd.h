// AVX-512 truncation of one context (see block_masks_simd.cpp); block_masks_cpu.cpp falls back to its portable
// path where this is not compiled in, not supported by the CPU, disabled, or declines a layout.
#pragma once
#include <cstdint>

namespace iwm_fast {

// Compiled in, supported by this CPU and not disabled by set_simd_enabled(false).
bool simd_path_available();

// Width of the window around the cut's expected key, in standard deviations (default 4.5). Tests narrow it
// to exercise the fallback; process-wide, not for use while sampling.
void set_simd_window_sigmas(double sigmas);

// Grids up to this wide have each row's membership in one 64-bit word.
constexpr int64_t kSimdMaxWidth = 64;

// One context as rows of the grid: rows r = 0 .. num_rows - 1 hold tokens first + r * W + w, w < W, and
// bit w of row_bits[r] marks a context token. key[r * W + w] is that token's truncation key, readable up to
// 16 words past the last row. win_key and win_tok hold num_rows * W entries.
struct SimdContext {
  const uint64_t* row_bits;
  int64_t num_rows, W, first;
  const uint32_t* key;
};

// The truncation keys of the quads first .. first + n - 1 (4 words each, as mask_draw on kStreamTruncate).
void truncation_keys_avx512(uint64_t seed, uint64_t step, uint32_t sample, uint32_t first, int64_t n, uint32_t* out);

// Writes the `keep` context tokens with the smallest (key, index), ascending, to out. Returns false, having
// written nothing, when its guess of the cut's key range misses (probability ~1e-4 per context).
bool truncate_context_avx512(const SimdContext& ctx, int64_t keep, int64_t* out, uint32_t* win_key,
                             uint32_t* win_tok);

}  // namespace iwm_fast

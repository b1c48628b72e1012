// Multi-block mask sampler (I-JEPA semantics), shared by the CPU implementation, the CUDA kernels and the
// CMake unit tests. Torch-free on purpose: ctest builds it without libtorch.
//
// Algorithm, per batch:
//  * one target extent and one context extent, from the batch stream (one uniform u sets scale and aspect);
//  * per sample, attempt a = 0, 1, ...: draw num_targets target blocks and num_contexts context blocks
//    (corners uniform over every valid position, last row/column included); each context is its block minus
//    the union of the targets (unless allow_overlap); the attempt is accepted when every context keeps at
//    least min_keep tokens. No attempt left -> the sample is marked failed (count -1) and the op errors.
//  * Nc = minimum context count over the batch; each context keeps the Nc tokens with the smallest
//    (truncation key, flat index), a uniformly random subset, written in ascending flat-index order.
#pragma once
#include <cstdint>

#include "philox.h"

namespace iwm_fast {

struct Extent {
  int64_t t, h, w;
  IWM_HD int64_t size() const { return t * h * w; }
};

// Everything the kernels need; extents are computed on the host (block_extent) so all backends share them.
struct MaskSpec {
  int64_t batch, T, H, W;
  int64_t num_targets, num_contexts;
  Extent target, context;
  int64_t min_keep;
  bool allow_overlap;
  uint64_t seed, step;
  int64_t max_tries;
  IWM_HD int64_t num_blocks() const { return num_targets + num_contexts; }
  IWM_HD int64_t tokens() const { return T * H * W; }
};

// Corner (t0, h0, w0) of block j of a sample at one attempt; targets first, then contexts.
IWM_HD void draw_block(const MaskSpec& s, int64_t sample, int64_t attempt, int64_t j, int32_t* corner) {
  const Extent e = j < s.num_targets ? s.target : s.context;
  const Philox4 r = mask_draw(s.seed, s.step, kStreamLayout, static_cast<uint32_t>(sample),
                              static_cast<uint32_t>(attempt * s.num_blocks() + j));
  corner[0] = static_cast<int32_t>(philox_below(r.z, static_cast<uint32_t>(s.T - e.t + 1)));
  corner[1] = static_cast<int32_t>(philox_below(r.x, static_cast<uint32_t>(s.H - e.h + 1)));
  corner[2] = static_cast<int32_t>(philox_below(r.y, static_cast<uint32_t>(s.W - e.w + 1)));
}

IWM_HD bool in_block(const int32_t* corner, const Extent& e, int64_t t, int64_t h, int64_t w) {
  return t >= corner[0] && t < corner[0] + e.t && h >= corner[1] && h < corner[1] + e.h && w >= corner[2] &&
         w < corner[2] + e.w;
}

// Is the token at (t, h, w) covered by any target block of a sample? corners: [num_blocks, 3].
IWM_HD bool in_any_target(const MaskSpec& s, const int32_t* corners, int64_t t, int64_t h, int64_t w) {
  for (int64_t j = 0; j < s.num_targets; ++j)
    if (in_block(corners + 3 * j, s.target, t, h, w)) return true;
  return false;
}

// 32-bit truncation key of flat token n in context c of a sample.
IWM_HD uint32_t truncation_key(const MaskSpec& s, int64_t sample, int64_t c, int64_t n) {
  const int64_t quads = (s.tokens() + 3) / 4;
  const Philox4 r = mask_draw(s.seed, s.step, kStreamTruncate, static_cast<uint32_t>(sample),
                              static_cast<uint32_t>(c * quads + n / 4));
  const int64_t k = n % 4;
  return k == 0 ? r.x : k == 1 ? r.y : k == 2 ? r.z : r.w;
}

// Block extent from one uniform u in [0, 1): the scale and aspect laws of I-JEPA's _sample_block_size,
// generalised to T frames (the time extent is the cube-root share of the scale) and with the block allowed
// to span the whole grid. Rounding is half-to-even (std::nearbyint), as Python's round().
Extent block_extent(double u, double scale_lo, double scale_hi, double aspect_lo, double aspect_hi, int64_t T,
                    int64_t H, int64_t W);

// Batch-level uniforms (target, context) for (seed, step).
void batch_uniforms(uint64_t seed, uint64_t step, double* u_target, double* u_context);

// Phase 1 on the CPU: corners [batch, num_blocks, 3] and counts [batch] (min context count, -1 = failed).
void sample_layouts_cpu(const MaskSpec& s, int32_t* corners, int64_t* counts, int num_threads);

// Phase 2 on the CPU: context [batch, num_contexts, keep] and targets [batch, num_targets, target.size()].
void write_masks_cpu(const MaskSpec& s, const int32_t* corners, int64_t keep, int64_t* context, int64_t* targets,
                     int num_threads);

// The CPU sampler uses AVX-512 or AVX2 where the CPU has it, else a portable path; all give the same masks
// (block_masks_simd.h picks and caps the path).

}  // namespace iwm_fast

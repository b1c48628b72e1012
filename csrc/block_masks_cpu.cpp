// CPU implementation of the multi-block mask sampler (see block_masks.h), parallel over samples with OpenMP.
// Every random word is keyed by (seed, step, sample), so the result does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "block_masks.h"

namespace iwm_fast {

namespace {
int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }
}  // namespace

Extent block_extent(double u, double scale_lo, double scale_hi, double aspect_lo, double aspect_hi, int64_t T,
                    int64_t H, int64_t W) {
  const double scale = scale_lo + u * (scale_hi - scale_lo);
  const double aspect = aspect_lo + u * (aspect_hi - aspect_lo);
  const int64_t keep = static_cast<int64_t>(static_cast<double>(T * H * W) * scale);
  int64_t t = 1;
  if (T > 1) t = clamp64(static_cast<int64_t>(std::nearbyint(T * std::pow(scale, 1.0 / 3.0))), 1, T);
  const double area = static_cast<double>(keep) / static_cast<double>(t);
  const int64_t h = clamp64(static_cast<int64_t>(std::nearbyint(std::sqrt(area * aspect))), 1, H);
  const int64_t w = clamp64(static_cast<int64_t>(std::nearbyint(std::sqrt(area / aspect))), 1, W);
  return Extent{t, h, w};
}

void batch_uniforms(uint64_t seed, uint64_t step, double* u_target, double* u_context) {
  const Philox4 r = mask_draw(seed, step, kStreamBatch, 0, 0);
  *u_target = static_cast<double>(r.x) * (1.0 / 4294967296.0);
  *u_context = static_cast<double>(r.y) * (1.0 / 4294967296.0);
}

namespace {

// Tokens of context c kept after removing the targets (or all of the block when overlap is allowed).
int64_t context_count(const MaskSpec& s, const int32_t* corners, int64_t c) {
  const int32_t* cc = corners + 3 * (s.num_targets + c);
  if (s.allow_overlap) return s.context.size();
  int64_t n = 0;
  for (int64_t t = cc[0]; t < cc[0] + s.context.t; ++t)
    for (int64_t h = cc[1]; h < cc[1] + s.context.h; ++h)
      for (int64_t w = cc[2]; w < cc[2] + s.context.w; ++w) n += !in_any_target(s, corners, t, h, w);
  return n;
}

void sample_layout(const MaskSpec& s, int64_t b, int32_t* corners, int64_t* count) {
  for (int64_t a = 0; a < s.max_tries; ++a) {
    for (int64_t j = 0; j < s.num_blocks(); ++j) draw_block(s, b, a, j, corners + 3 * j);
    int64_t least = INT64_MAX;
    for (int64_t c = 0; c < s.num_contexts; ++c) least = std::min(least, context_count(s, corners, c));
    if (least >= s.min_keep) {
      *count = least;
      return;
    }
  }
  *count = -1;
}

void write_context(const MaskSpec& s, int64_t b, const int32_t* corners, int64_t c, int64_t keep, int64_t* out,
                   std::vector<uint64_t>& scratch) {
  const int32_t* cc = corners + 3 * (s.num_targets + c);
  const int64_t HW = s.H * s.W;
  scratch.clear();
  for (int64_t t = cc[0]; t < cc[0] + s.context.t; ++t)
    for (int64_t h = cc[1]; h < cc[1] + s.context.h; ++h)
      for (int64_t w = cc[2]; w < cc[2] + s.context.w; ++w)
        if (s.allow_overlap || !in_any_target(s, corners, t, h, w)) {
          const int64_t n = t * HW + h * s.W + w;
          scratch.push_back((static_cast<uint64_t>(truncation_key(s, b, c, n)) << 32) | static_cast<uint64_t>(n));
        }
  const int64_t count = static_cast<int64_t>(scratch.size());
  if (count > keep) {
    // Keep the `keep` smallest (key, index) pairs, then restore ascending index order.
    std::nth_element(scratch.begin(), scratch.begin() + keep, scratch.end());
    scratch.resize(keep);
    for (auto& v : scratch) v &= 0xFFFFFFFFull;
    std::sort(scratch.begin(), scratch.end());
  }
  for (int64_t i = 0; i < keep; ++i) out[i] = static_cast<int64_t>(scratch[i] & 0xFFFFFFFFull);
}

void write_targets(const MaskSpec& s, const int32_t* corners, int64_t* out) {
  const int64_t HW = s.H * s.W;
  for (int64_t j = 0; j < s.num_targets; ++j) {
    const int32_t* tc = corners + 3 * j;
    for (int64_t t = tc[0]; t < tc[0] + s.target.t; ++t)
      for (int64_t h = tc[1]; h < tc[1] + s.target.h; ++h)
        for (int64_t w = tc[2]; w < tc[2] + s.target.w; ++w) *out++ = t * HW + h * s.W + w;
  }
}

}  // namespace

void sample_layouts_cpu(const MaskSpec& s, int32_t* corners, int64_t* counts, int num_threads) {
  const int64_t stride = 3 * s.num_blocks();
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
  for (int64_t b = 0; b < s.batch; ++b) sample_layout(s, b, corners + b * stride, counts + b);
}

void write_masks_cpu(const MaskSpec& s, const int32_t* corners, int64_t keep, int64_t* context, int64_t* targets,
                     int num_threads) {
  const int64_t stride = 3 * s.num_blocks();
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
  {
    std::vector<uint64_t> scratch;
    scratch.reserve(static_cast<size_t>(s.context.size()));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < s.batch; ++b) {
      const int32_t* corners_b = corners + b * stride;
      for (int64_t c = 0; c < s.num_contexts; ++c)
        write_context(s, b, corners_b, c, keep, context + (b * s.num_contexts + c) * keep, scratch);
      write_targets(s, corners_b, targets + b * s.num_targets * s.target.size());
    }
  }
}

}  // namespace iwm_fast

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

// Calls fn(n0, len) for each run of context tokens of one row (t, h) of context block cc, in index order:
// the row of the block minus the target intervals covering that row. Rows, not tokens, keep this cheap.
template <class Fn>
void for_each_context_run(const MaskSpec& s, const int32_t* corners, const int32_t* cc, int64_t t, int64_t h,
                          Fn&& fn) {
  const int64_t lo = cc[2], hi = cc[2] + s.context.w, row = t * s.H * s.W + h * s.W;
  int64_t cut[2 * 64];
  int64_t m = 0;
  if (!s.allow_overlap) {
    for (int64_t j = 0; j < s.num_targets; ++j) {
      const int32_t* tc = corners + 3 * j;
      if (t < tc[0] || t >= tc[0] + s.target.t || h < tc[1] || h >= tc[1] + s.target.h) continue;
      const int64_t a = std::max<int64_t>(lo, tc[2]), b = std::min<int64_t>(hi, tc[2] + s.target.w);
      if (a >= b) continue;
      if (m == 64) {  // more overlapping targets than the buffer holds: fall back to a per-token scan
        for (int64_t w = lo; w < hi; ++w)
          if (!in_any_target(s, corners, t, h, w)) fn(row + w, 1);
        return;
      }
      int64_t i = m++;  // insertion sort by start
      for (; i > 0 && cut[2 * (i - 1)] > a; --i) cut[2 * i] = cut[2 * (i - 1)], cut[2 * i + 1] = cut[2 * i - 1];
      cut[2 * i] = a, cut[2 * i + 1] = b;
    }
  }
  int64_t w = lo;
  for (int64_t i = 0; i < m; ++i) {
    if (cut[2 * i] > w) fn(row + w, cut[2 * i] - w);
    w = std::max(w, cut[2 * i + 1]);
  }
  if (w < hi) fn(row + w, hi - w);
}

template <class Fn>
void for_each_context_run(const MaskSpec& s, const int32_t* corners, int64_t c, Fn&& fn) {
  const int32_t* cc = corners + 3 * (s.num_targets + c);
  for (int64_t t = cc[0]; t < cc[0] + s.context.t; ++t)
    for (int64_t h = cc[1]; h < cc[1] + s.context.h; ++h) for_each_context_run(s, corners, cc, t, h, fn);
}

int64_t context_count(const MaskSpec& s, const int32_t* corners, int64_t c) {
  if (s.allow_overlap) return s.context.size();
  int64_t n = 0;
  for_each_context_run(s, corners, c, [&](int64_t, int64_t len) { n += len; });
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

struct Scratch {
  std::vector<uint32_t> tokens, keys;
  std::vector<uint64_t> bucket;
};

// Keeps the `keep` context tokens with the smallest (key, index), as the Python reference and the CUDA kernel,
// by radix selection on the top key byte: linear passes instead of a sort.
void write_context(const MaskSpec& s, int64_t b, const int32_t* corners, int64_t c, int64_t keep, int64_t* out,
                   Scratch& sc) {
  const int32_t* cc = corners + 3 * (s.num_targets + c);
  const int64_t HW = s.H * s.W;
  const int64_t first = cc[0] * HW + cc[1] * s.W + cc[2];
  const int64_t last_n = (cc[0] + s.context.t - 1) * HW + (cc[1] + s.context.h - 1) * s.W + cc[2] + s.context.w - 1;
  // Keys of every quad spanned by the context block, in one tight (vectorisable) loop.
  const int64_t q0 = first / 4, q1 = last_n / 4, quads = (s.tokens() + 3) / 4;
  sc.keys.resize(static_cast<size_t>(4 * (q1 - q0 + 1)));
  for (int64_t q = q0; q <= q1; ++q) {
    const Philox4 r = mask_draw(s.seed, s.step, kStreamTruncate, static_cast<uint32_t>(b),
                                static_cast<uint32_t>(c * quads + q));
    uint32_t* k = &sc.keys[static_cast<size_t>(4 * (q - q0))];
    k[0] = r.x, k[1] = r.y, k[2] = r.z, k[3] = r.w;
  }
  const uint32_t* key = sc.keys.data() - 4 * q0;
  // Context tokens in index order, with a histogram of their keys' top byte.
  int64_t hist[256] = {};
  sc.tokens.resize(static_cast<size_t>(s.context.size()));
  int64_t count = 0;
  for_each_context_run(s, corners, c, [&](int64_t n0, int64_t len) {
    uint32_t* dst = sc.tokens.data() + count;
    for (int64_t i = 0; i < len; ++i) {
      dst[i] = static_cast<uint32_t>(n0 + i);
      ++hist[key[n0 + i] >> 24];
    }
    count += len;
  });
  if (count == keep) {
    std::copy(sc.tokens.begin(), sc.tokens.begin() + count, out);
    return;
  }
  int64_t below = 0, top = 0;
  while (below + hist[top] < keep) below += hist[top++];
  sc.bucket.clear();
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t n = sc.tokens[static_cast<size_t>(i)];
    if ((key[n] >> 24) == static_cast<uint32_t>(top)) sc.bucket.push_back((static_cast<uint64_t>(key[n]) << 32) | n);
  }
  const int64_t need = keep - below;  // 1 <= need <= bucket size
  std::nth_element(sc.bucket.begin(), sc.bucket.begin() + (need - 1), sc.bucket.end());
  // Kept iff (key, index) <= the keep-th smallest pair. Branch-free: the decision is a coin flip per token.
  const uint64_t cut = sc.bucket[static_cast<size_t>(need - 1)];
  int64_t kept = 0;
  for (int64_t i = 0; i < count && kept < keep; ++i) {  // kept < keep: never write past the row
    const uint32_t n = sc.tokens[static_cast<size_t>(i)];
    out[kept] = n;
    kept += static_cast<int64_t>(((static_cast<uint64_t>(key[n]) << 32) | n) <= cut);
  }
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
    Scratch scratch;
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

// CPU implementation of the multi-block mask sampler (see block_masks.h), parallel over samples with OpenMP.
// Every random word is keyed by (seed, step, sample), so the result does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "block_masks.h"
#include "block_masks_simd.h"

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

// Half-open box [t0, t1) x [h0, h1) x [w0, w1) of grid tokens.
struct Box {
  int64_t t0, t1, h0, h1, w0, w1;
  int64_t size() const { return (t1 - t0) * (h1 - h0) * (w1 - w0); }
  bool empty() const { return t0 >= t1 || h0 >= h1 || w0 >= w1; }
};

Box block_box(const int32_t* corner, const Extent& e) {
  return Box{corner[0], corner[0] + e.t, corner[1], corner[1] + e.h, corner[2], corner[2] + e.w};
}

Box intersect(const Box& a, const Box& b) {
  return Box{std::max(a.t0, b.t0), std::min(a.t1, b.t1), std::max(a.h0, b.h0),
             std::min(a.h1, b.h1), std::max(a.w0, b.w0), std::min(a.w1, b.w1)};
}

// |a ∩ (T_j ∪ T_j+1 ∪ ...)| by inclusion-exclusion over the target boxes, pruned at empty intersections:
// |a ∩ U_{i>=j} T_i| = sum_{i>=j} |a ∩ T_i| - |a ∩ T_i ∩ U_{k>i} T_k|. Exact integer arithmetic, a handful of
// box intersections per layout instead of a scan over the block's tokens.
int64_t covered(const Box& a, const Box* targets, int64_t j, int64_t n) {
  int64_t total = 0;
  for (; j < n; ++j) {
    const Box x = intersect(a, targets[j]);
    if (x.empty()) continue;
    total += x.size() - covered(x, targets, j + 1, n);
  }
  return total;
}

// Beyond this many targets the pruned inclusion-exclusion can blow up (2^n subsets when all overlap).
constexpr int64_t kMaxInclusionExclusion = 10;

// Tokens of context block cc not covered by any target: a token scan, for layouts with many targets.
int64_t context_count_scan(const MaskSpec& s, const int32_t* corners, const int32_t* cc) {
  int64_t n = 0;
  for (int64_t t = cc[0]; t < cc[0] + s.context.t; ++t)
    for (int64_t h = cc[1]; h < cc[1] + s.context.h; ++h)
      for (int64_t w = cc[2]; w < cc[2] + s.context.w; ++w) n += !in_any_target(s, corners, t, h, w);
  return n;
}

int64_t context_count(const MaskSpec& s, const int32_t* corners, int64_t c) {
  if (s.allow_overlap) return s.context.size();
  const int32_t* cc = corners + 3 * (s.num_targets + c);
  if (s.num_targets > kMaxInclusionExclusion) return context_count_scan(s, corners, cc);
  Box targets[kMaxInclusionExclusion];
  for (int64_t j = 0; j < s.num_targets; ++j) targets[j] = block_box(corners + 3 * j, s.target);
  const Box box = block_box(cc, s.context);
  return box.size() - covered(box, targets, 0, s.num_targets);
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

// Truncation keys of quads idx[0..n): out[4 i + k] = word k of the Philox draw at index idx[i]. The counter
// differs between quads only in its first word, so the loop vectorises; compiled for AVX-512 and AVX2 too and
// picked at load time (the same integer arithmetic, so the same words, on every path).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void truncation_keys(uint64_t seed, uint64_t step, uint32_t sample, const uint32_t* __restrict__ idx, int64_t n,
                     uint32_t* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) {
    const Philox4 r = mask_draw(seed, step, kStreamTruncate, sample, idx[i]);
    out[4 * i] = r.x, out[4 * i + 1] = r.y, out[4 * i + 2] = r.z, out[4 * i + 3] = r.w;
  }
}

struct Scratch {
  std::vector<uint8_t> in;         // context region: 1 = context token
  std::vector<uint32_t> tokens;    // context tokens, ascending flat index
  std::vector<uint32_t> quads;     // distinct quads (key words) the context tokens use, ascending
  std::vector<uint32_t> words;     // their 4 key words each
  std::vector<uint64_t> pairs;     // (key << 32) | token
  std::vector<uint64_t> bucket;
  // The vector paths: the context's rows as membership words, the keys of their tokens, and the candidates.
  std::vector<uint64_t> row_bits, flat_bits;
  std::vector<uint32_t> row_key, win_key, win_tok;
  void reserve(const MaskSpec& s) {
    const size_t n = static_cast<size_t>(s.context.size());
    in.resize(n), tokens.resize(n), quads.resize(n + 1), words.resize(4 * n + 4), pairs.resize(n), bucket.resize(n);
    const size_t n_all = static_cast<size_t>(s.tokens());
    row_bits.resize(static_cast<size_t>(s.T * s.H)), flat_bits.resize(n_all / 64 + 2);
    row_key.resize(n_all + 80);  // + vector over-reads
    win_key.resize(n_all + 16), win_tok.resize(n_all + 16);  // + AVX2 compress stores of whole vectors
  }
};

// Keeps the `keep` context tokens with the smallest (key, index), as the Python reference and the CUDA kernel,
// by radix selection on the top key byte: linear passes instead of a sort. The portable path.
void write_context_scalar(const MaskSpec& s, int64_t b, const int32_t* corners, int64_t c, int64_t keep,
                          int64_t* out, Scratch& sc) {
  const Box box = block_box(corners + 3 * (s.num_targets + c), s.context);
  const int64_t HW = s.H * s.W, ch = s.context.h, cw = s.context.w, csize = s.context.size();
  // Membership over the context block: all in, then the target boxes cleared row by row.
  uint8_t* in = sc.in.data();
  std::memset(in, 1, static_cast<size_t>(csize));
  if (!s.allow_overlap) {
    for (int64_t j = 0; j < s.num_targets; ++j) {
      const Box x = intersect(box, block_box(corners + 3 * j, s.target));
      if (x.empty()) continue;
      for (int64_t t = x.t0; t < x.t1; ++t)
        for (int64_t h = x.h0; h < x.h1; ++h)
          std::memset(in + ((t - box.t0) * ch + (h - box.h0)) * cw + (x.w0 - box.w0), 0,
                      static_cast<size_t>(x.w1 - x.w0));
    }
  }
  // Context tokens in ascending order (branch-free compaction of each row).
  uint32_t* tokens = sc.tokens.data();
  int64_t count = 0;
  for (int64_t t = box.t0; t < box.t1; ++t)
    for (int64_t h = box.h0; h < box.h1; ++h) {
      const uint8_t* row_in = in + ((t - box.t0) * ch + (h - box.h0)) * cw;
      const uint32_t n0 = static_cast<uint32_t>(t * HW + h * s.W + box.w0);
      for (int64_t w = 0; w < cw; ++w) {
        tokens[count] = n0 + static_cast<uint32_t>(w);
        count += row_in[w];
      }
    }
  if (count == keep) {  // nothing to drop: no keys needed
    for (int64_t i = 0; i < count; ++i) out[i] = tokens[i];
    return;
  }
  // Keys only for the quads that hold context tokens (targets leave whole quads out).
  const uint32_t quads_per_context = static_cast<uint32_t>((s.tokens() + 3) / 4);
  const uint32_t base = static_cast<uint32_t>(c) * quads_per_context;
  uint32_t* quads = sc.quads.data();
  int64_t nq = 0;
  uint32_t last = ~0u;
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t q = tokens[i] >> 2;
    quads[nq] = base + q;
    nq += q != last;
    last = q;
  }
  uint32_t* words = sc.words.data();
  truncation_keys(s.seed, s.step, static_cast<uint32_t>(b), quads, nq, words);
  // (key, token) pairs in token order and a histogram of the keys' top byte.
  int64_t hist[256] = {};
  uint64_t* pairs = sc.pairs.data();
  {
    int64_t qi = -1;
    last = ~0u;
    for (int64_t i = 0; i < count; ++i) {
      const uint32_t n = tokens[i], q = n >> 2;
      qi += q != last;
      last = q;
      const uint32_t key = words[4 * qi + (n & 3)];
      pairs[i] = (static_cast<uint64_t>(key) << 32) | n;
      ++hist[key >> 24];
    }
  }
  int64_t below = 0, top = 0;
  while (below + hist[top] < keep) below += hist[top++];
  uint64_t* bucket = sc.bucket.data();
  int64_t nb = 0;
  for (int64_t i = 0; i < count; ++i) {
    bucket[nb] = pairs[i];
    nb += (pairs[i] >> 56) == static_cast<uint64_t>(top);
  }
  const int64_t need = keep - below;  // 1 <= need <= nb
  std::nth_element(bucket, bucket + (need - 1), bucket + nb);
  // Kept iff (key, index) <= the keep-th smallest pair. Branch-free: the decision is a coin flip per token.
  const uint64_t cut = bucket[need - 1];
  int64_t kept = 0;
  for (int64_t i = 0; i < count && kept < keep; ++i) {  // kept < keep: never write past the row
    out[kept] = static_cast<uint32_t>(pairs[i]);
    kept += static_cast<int64_t>(pairs[i] <= cut);
  }
}

// The vector paths: the context's rows as 64-bit membership words, then one bitset over their tokens, keys for
// every token of those rows, then the AVX-512 or AVX2 truncation; the portable path for wide grids or when the
// vector path declines.
void write_context(const MaskSpec& s, int64_t b, const int32_t* corners, int64_t c, int64_t keep, int64_t* out,
                   Scratch& sc, SimdLevel level) {
  if (level == kSimdNone || s.W > kSimdMaxWidth) return write_context_scalar(s, b, corners, c, keep, out, sc);
  const Box box = block_box(corners + 3 * (s.num_targets + c), s.context);
  const int64_t first_row = box.t0 * s.H + box.h0, num_rows = (box.t1 - 1) * s.H + box.h1 - first_row;
  uint64_t* rows = sc.row_bits.data();
  std::fill(rows, rows + num_rows, uint64_t{0});
  auto span_bits = [](int64_t w0, int64_t w1) {  // bits w0 .. w1 - 1
    return (w1 - w0 == 64 ? ~uint64_t{0} : (uint64_t{1} << (w1 - w0)) - 1) << w0;
  };
  const uint64_t ctx_bits = span_bits(box.w0, box.w1);
  for (int64_t t = box.t0; t < box.t1; ++t)
    for (int64_t h = box.h0; h < box.h1; ++h) rows[t * s.H + h - first_row] = ctx_bits;
  if (!s.allow_overlap)
    for (int64_t j = 0; j < s.num_targets; ++j) {
      const Box x = intersect(box, block_box(corners + 3 * j, s.target));
      if (x.empty()) continue;
      const uint64_t clear = ~span_bits(x.w0, x.w1);
      for (int64_t t = x.t0; t < x.t1; ++t)
        for (int64_t h = x.h0; h < x.h1; ++h) rows[t * s.H + h - first_row] &= clear;
    }
  // Keys of every token of the rows (also when nothing is dropped: only the batch's smallest contexts).
  const int64_t first = first_row * s.W;
  const uint32_t quads_per_context = static_cast<uint32_t>((s.tokens() + 3) / 4);
  const int64_t q0 = first >> 2, nq = ((first + num_rows * s.W - 1) >> 2) - q0 + 1;
  const uint32_t q_first = static_cast<uint32_t>(c) * quads_per_context + static_cast<uint32_t>(q0);
  const bool wide = level == kSimdAvx512;
  (wide ? truncation_keys_avx512 : truncation_keys_avx2)(s.seed, s.step, static_cast<uint32_t>(b), q_first, nq,
                                                         sc.row_key.data());
  // The rows' membership as one bitset over the run of their tokens.
  const int64_t n = num_rows * s.W;
  uint64_t* flat = sc.flat_bits.data();
  std::fill(flat, flat + (n >> 6) + 1, uint64_t{0});
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t o = r * s.W, shift = o & 63;
    flat[o >> 6] |= rows[r] << shift;
    if (shift + s.W > 64) flat[(o >> 6) + 1] |= rows[r] >> (64 - shift);  // shift > 0 here: W <= 64
  }
  const SimdContext ctx{flat, n, first, sc.row_key.data() + (first - 4 * q0)};
  const bool done = (wide ? truncate_context_avx512 : truncate_context_avx2)(ctx, keep, out, sc.win_key.data(),
                                                                            sc.win_tok.data());
  if (!done) write_context_scalar(s, b, corners, c, keep, out, sc);
}

void write_targets(const MaskSpec& s, const int32_t* corners, int64_t* __restrict__ out) {
  const int64_t HW = s.H * s.W;
  for (int64_t j = 0; j < s.num_targets; ++j) {
    const int32_t* tc = corners + 3 * j;
    for (int64_t t = tc[0]; t < tc[0] + s.target.t; ++t)
      for (int64_t h = tc[1]; h < tc[1] + s.target.h; ++h) {
        const int64_t n0 = t * HW + h * s.W + tc[2];
        for (int64_t w = 0; w < s.target.w; ++w) out[w] = n0 + w;
        out += s.target.w;
      }
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
  const SimdLevel level = simd_level();
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
  {
    Scratch scratch;
    scratch.reserve(s);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < s.batch; ++b) {
      const int32_t* corners_b = corners + b * stride;
      for (int64_t c = 0; c < s.num_contexts; ++c)
        write_context(s, b, corners_b, c, keep, context + (b * s.num_contexts + c) * keep, scratch, level);
      write_targets(s, corners_b, targets + b * s.num_targets * s.target.size());
    }
  }
}

}  // namespace iwm_fast

// Unit tests of the torch-free CPU mask sampler (run by ctest; see CMakeLists.txt).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <vector>

#include "block_masks.h"
#include "expect.h"
#include "mask_specs.h"
#include "block_masks_simd.h"

using namespace iwm_fast;


// Known-answer vectors of Random123 for Philox4x32-10.
static void test_philox_known_answers() {
  Philox4 a = philox4x32_10({0, 0, 0, 0}, 0, 0);
  EXPECT(a.x == 0x6627e8d5u && a.y == 0xe169c58du && a.z == 0xbc57ac4cu && a.w == 0x9b00dbd8u);
  Philox4 b = philox4x32_10({~0u, ~0u, ~0u, ~0u}, ~0u, ~0u);
  EXPECT(b.x == 0x408f276du && b.y == 0x41c83b0eu && b.z == 0xa20bc7c6u && b.w == 0x6d5451fdu);
}

static MaskSpec spec(int64_t T, int64_t H, int64_t W, uint64_t step) { return ijepa_spec(T, H, W, 7, step, 64); }

struct Result {
  std::vector<int32_t> corners;
  int64_t keep;
  std::vector<int64_t> context, targets;
};

static Result run(const MaskSpec& s, int threads) {
  Result r;
  r.corners.resize(s.batch * s.num_blocks() * 3);
  std::vector<int64_t> counts(s.batch);
  sample_layouts_cpu(s, r.corners.data(), counts.data(), threads);
  r.keep = *std::min_element(counts.begin(), counts.end());
  EXPECT(r.keep >= s.min_keep);
  r.context.resize(s.batch * s.num_contexts * r.keep);
  r.targets.resize(s.batch * s.num_targets * s.target.size());
  write_masks_cpu(s, r.corners.data(), r.keep, r.context.data(), r.targets.data(), threads);
  return r;
}

static void test_invariants(int64_t T, int64_t H, int64_t W) {
  for (uint64_t step = 0; step < 5; ++step) {
    const MaskSpec s = spec(T, H, W, step);
    const Result r = run(s, 2);
    const int64_t nt = s.target.size();
    for (int64_t b = 0; b < s.batch; ++b) {
      std::set<int64_t> tgt;
      for (int64_t j = 0; j < s.num_targets; ++j) {
        const int64_t* t = &r.targets[(b * s.num_targets + j) * nt];
        int64_t lo[3] = {T, H, W}, hi[3] = {-1, -1, -1};
        for (int64_t k = 0; k < nt; ++k) {
          EXPECT(t[k] >= 0 && t[k] < s.tokens());
          if (k) EXPECT(t[k] > t[k - 1]);
          const int64_t c[3] = {t[k] / (H * W), (t[k] / W) % H, t[k] % W};
          for (int d = 0; d < 3; ++d) lo[d] = std::min(lo[d], c[d]), hi[d] = std::max(hi[d], c[d]);
          tgt.insert(t[k]);
        }
        // A block of nt tokens whose bounding box has nt cells is a full cuboid.
        EXPECT((hi[0] - lo[0] + 1) * (hi[1] - lo[1] + 1) * (hi[2] - lo[2] + 1) == nt);
      }
      const int64_t* c = &r.context[b * r.keep];
      for (int64_t k = 0; k < r.keep; ++k) {
        EXPECT(c[k] >= 0 && c[k] < s.tokens());
        if (k) EXPECT(c[k] > c[k - 1]);
        EXPECT(!tgt.count(c[k]));
      }
    }
  }
}

static void test_thread_count_independent() {
  const MaskSpec s = spec(1, 14, 14, 3);
  const Result a = run(s, 1), b = run(s, 2), c = run(s, 4);
  EXPECT(a.keep == b.keep && a.keep == c.keep);
  EXPECT(a.context == b.context && a.context == c.context);
  EXPECT(a.targets == b.targets && a.targets == c.targets);
}

static void test_last_row_and_column_reachable() {
  bool row = false, col = false;
  for (uint64_t step = 0; step < 20 && !(row && col); ++step) {
    const MaskSpec s = spec(1, 14, 14, step);
    const Result r = run(s, 2);
    for (int64_t v : r.targets) row |= v / 14 == 13, col |= v % 14 == 13;
  }
  EXPECT(row && col);
}

// The AVX-512 and AVX2 paths (where the CPU has them) and the portable path return the same masks, including
// the vector paths' fallback when their window misses the cut (made common here by a window 0.2 sigma wide).
static void test_vector_and_portable_paths_agree() {
  set_simd_max_level(kSimdAvx512);
  const SimdLevel best = simd_level();
  if (best == kSimdNone) {
    std::puts("note: no AVX2 or AVX-512 on this CPU; only the portable path was tested");
    return;
  }
  if (best == kSimdAvx2) std::puts("note: no AVX-512 on this CPU; the AVX2 and portable paths were compared");
  const int64_t grids[][3] = {{1, 14, 14}, {1, 32, 32}, {8, 14, 14}, {1, 7, 13}, {3, 5, 11}, {1, 64, 64},
                              {1, 9, 70}, {2, 3, 3}};
  for (double sigmas : {4.5, 0.2}) {
    set_simd_window_sigmas(sigmas);
    for (const auto& g : grids)
      for (uint64_t step = 0; step < 6; ++step)
        for (int variant = 0; variant < 4; ++variant) {
          const MaskSpec s = with_variant(spec(g[0], g[1], g[2], step), variant);
          set_simd_max_level(kSimdNone);
          const Result portable = run(s, 2);
          for (SimdLevel level : {kSimdAvx2, kSimdAvx512}) {
            if (level > best) continue;
            set_simd_max_level(level);
            EXPECT(simd_level() == level);
            const Result r = run(s, 2);
            EXPECT(r.keep == portable.keep && r.context == portable.context && r.targets == portable.targets);
          }
        }
  }
  set_simd_window_sigmas(4.5);
  set_simd_max_level(kSimdAvx512);
}

static void test_failure_is_reported() {
  MaskSpec s = spec(1, 6, 6, 0);
  s.target = Extent{1, 5, 5};
  s.context = Extent{1, 6, 6};
  s.min_keep = 20;  // 36 - 25 < 20 whatever the layout
  s.max_tries = 5;
  std::vector<int32_t> corners(s.batch * s.num_blocks() * 3);
  std::vector<int64_t> counts(s.batch);
  sample_layouts_cpu(s, corners.data(), counts.data(), 2);
  for (int64_t v : counts) EXPECT(v == -1);
}

int main() {
  test_philox_known_answers();
  test_invariants(1, 14, 14);
  test_invariants(1, 7, 13);
  test_invariants(4, 9, 11);
  test_thread_count_independent();
  test_last_row_and_column_reachable();
  test_failure_is_reported();
  test_vector_and_portable_paths_agree();
  return report("block mask tests");
}

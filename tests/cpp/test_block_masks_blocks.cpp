// The CUDA kernels' thread-block programs (csrc/block_masks_blocks.h) run on CPU threads that meet at a
// std::barrier, one emulated thread block at a time, and must return exactly what the CPU sampler returns:
// the same corners, counts, contexts and targets. Thread counts 1, 7 and 32 (the kernels launch 128 and
// 256) exercise the strided loops, the per-thread chunks and the scan over threads at other sizes; a
// one-entry bin list exercises the truncation's fallback.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "block_masks.h"
#include "block_masks_blocks.h"

using namespace iwm_fast;

static int failures = 0;
#define EXPECT(cond)                                                         \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                            \
    }                                                                        \
  } while (0)

struct ThreadBlock {
  int tid, n;
  std::barrier<>* bar;
  int thread() const { return tid; }
  int size() const { return n; }
  void sync() const { bar->arrive_and_wait(); }
  int atomic_add(int* p, int v) const { return std::atomic_ref<int>(*p).fetch_add(v); }
};

// Runs program(block) on n threads as one thread block.
template <class F>
static void run_block(int n, F&& program) {
  std::barrier<> bar(n);
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) threads.emplace_back([&, i] { program(ThreadBlock{i, n, &bar}); });
  for (auto& t : threads) t.join();
}

struct Masks {
  std::vector<int32_t> corners;
  std::vector<int64_t> counts, context, targets;
  int64_t keep = 0;
};

static Masks cpu_sampler(const MaskSpec& s) {
  Masks m;
  m.corners.resize(s.batch * s.num_blocks() * 3);
  m.counts.resize(s.batch);
  sample_layouts_cpu(s, m.corners.data(), m.counts.data(), 1);
  m.keep = *std::min_element(m.counts.begin(), m.counts.end());
  if (m.keep < 0) return m;
  m.context.resize(s.batch * s.num_contexts * m.keep);
  m.targets.resize(s.batch * s.num_targets * s.target.size());
  write_masks_cpu(s, m.corners.data(), m.keep, m.context.data(), m.targets.data(), 1);
  return m;
}

template <int kList = kMaxBinList>
static Masks block_programs(const MaskSpec& s, int threads) {
  Masks m;
  m.corners.assign(s.batch * s.num_blocks() * 3, -7);  // poisoned: every entry must be written
  m.counts.assign(s.batch, -7);
  for (int64_t b = 0; b < s.batch; ++b) {
    LayoutShared sh{};
    run_block(threads, [&](const ThreadBlock& blk) {
      sample_layout_block(blk, s, b, sh, m.corners.data(), m.counts.data());
    });
  }
  m.keep = *std::min_element(m.counts.begin(), m.counts.end());
  if (m.keep < 0) return m;
  m.context.assign(s.batch * s.num_contexts * m.keep, -7);
  m.targets.assign(s.batch * s.num_targets * s.target.size(), -7);
  std::vector<unsigned char> scratch(write_scratch_bytes(s));
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t c = 0; c < s.num_contexts; ++c) {
      WriteShared sh{};
      run_block(threads, [&](const ThreadBlock& blk) {
        write_masks_block<ThreadBlock, kList>(blk, s, b, c, m.corners.data(), m.keep, m.context.data(),
                                              m.targets.data(), sh, scratch.data());
      });
    }
  return m;
}

static MaskSpec spec(int64_t T, int64_t H, int64_t W, uint64_t step, int variant) {
  MaskSpec s{};
  s.batch = 12;
  s.T = T, s.H = H, s.W = W;
  s.num_targets = 4, s.num_contexts = 1;
  double ut, uc;
  batch_uniforms(11, step, &ut, &uc);
  s.target = block_extent(ut, 0.15, 0.2, 0.75, 1.5, T, H, W);
  s.context = block_extent(uc, 0.85, 1.0, 1.0, 1.0, T, H, W);
  s.min_keep = 1, s.allow_overlap = false, s.seed = 11, s.step = step, s.max_tries = 1000;
  if (variant == 1) s.allow_overlap = true;
  if (variant == 2) s.num_contexts = 2, s.context = block_extent(0.5, 0.4, 0.6, 0.8, 1.25, T, H, W);
  if (variant == 3) s.num_targets = 12, s.target = block_extent(0.5, 0.02, 0.04, 0.75, 1.5, T, H, W);
  return s;
}

static void test_block_programs_match_the_cpu_sampler() {
  const int64_t grids[][3] = {{1, 14, 14}, {1, 16, 16}, {2, 7, 13}, {1, 3, 3}, {4, 9, 11}};
  int compared = 0;
  for (const auto& g : grids)
    for (uint64_t step = 0; step < 2; ++step)
      for (int variant = 0; variant < 4; ++variant) {
        const MaskSpec s = spec(g[0], g[1], g[2], step, variant);
        const Masks want = cpu_sampler(s);
        for (int threads : {1, 7, 32}) {
          const Masks got = block_programs(s, threads);
          EXPECT(got.corners == want.corners && got.counts == want.counts && got.keep == want.keep);
          EXPECT(got.context == want.context && got.targets == want.targets);
          ++compared;
        }
        // A one-entry bin list: most boundary bins overflow it and take the rank-against-all fallback.
        const Masks fallback = block_programs<1>(s, 7);
        EXPECT(fallback.context == want.context && fallback.targets == want.targets);
      }
  EXPECT(compared == 5 * 2 * 4 * 3);
}

// No layout keeps min_keep context tokens: every sample reports -1, as on the CPU.
static void test_failed_layouts_are_reported() {
  MaskSpec s = spec(1, 6, 6, 0, 0);
  s.target = Extent{1, 5, 5};
  s.context = Extent{1, 6, 6};
  s.min_keep = 20, s.max_tries = 5;
  const Masks got = block_programs(s, 7);
  for (int64_t v : got.counts) EXPECT(v == -1);
}

int main() {
  test_block_programs_match_the_cpu_sampler();
  test_failed_layouts_are_reported();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::puts("block program tests passed");
  return EXIT_SUCCESS;
}

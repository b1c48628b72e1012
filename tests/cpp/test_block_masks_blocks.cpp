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
#include "expect.h"
#include "mask_specs.h"
#include "block_masks_blocks.h"

using namespace iwm_fast;


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


static void test_block_programs_match_the_cpu_sampler() {
  const int64_t grids[][3] = {{1, 14, 14}, {1, 16, 16}, {2, 7, 13}, {1, 3, 3}, {4, 9, 11}};
  int compared = 0;
  for (const auto& g : grids)
    for (uint64_t step = 0; step < 2; ++step)
      for (int variant = 0; variant < 4; ++variant) {
        const MaskSpec s = with_variant(ijepa_spec(g[0], g[1], g[2], 11, step, 12), variant);
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
  MaskSpec s = ijepa_spec(1, 6, 6, 11, 0, 12);
  s.target = Extent{1, 5, 5};
  s.context = Extent{1, 6, 6};
  s.min_keep = 20, s.max_tries = 5;
  const Masks got = block_programs(s, 7);
  for (int64_t v : got.counts) EXPECT(v == -1);
}

int main() {
  test_block_programs_match_the_cpu_sampler();
  test_failed_layouts_are_reported();
  return report("block program tests");
}

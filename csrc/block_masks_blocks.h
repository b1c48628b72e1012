// The CUDA sampler's two thread-block programs, written over a Block policy: block_masks.cu runs them as CUDA
// kernels (Block = one CUDA thread block), and the unit tests run the same source on CPU threads that meet at a
// std::barrier (tests/cpp/test_block_masks_blocks.cpp), so the kernels' logic is checked against the CPU
// sampler without a GPU.
//
// Block provides thread() and size() (this thread's index and the thread count), sync() (a barrier of the
// whole block) and atomic_add(int*, int) -> the old value, on the shared struct. Shared state lives in the structs below (CUDA
// shared memory in the kernels); the write program also takes a dynamic scratch of write_scratch_bytes().
#pragma once
#include <climits>
#include <cstddef>
#include <cstdint>

#include "block_masks.h"

#if defined(__CUDACC__)
#define IWM_BLOCK_FN __device__ __forceinline__
#else
#define IWM_BLOCK_FN inline
#endif

namespace iwm_fast {

// Most blocks per sample the programs hold in shared memory, and most threads of the write program.
constexpr int kMaxBlocksCuda = 64;
constexpr int kMaxWriteThreads = 256;

struct LayoutShared {
  int32_t cs[kMaxBlocksCuda * 3];
  int least, n_ctx;
};

// Candidates of the boundary bin kept in shared memory; a bin with more (a vanishing chance for random keys)
// makes the write program rank against every context token instead.
constexpr int kMaxBinList = 256;

struct WriteShared {
  int32_t cs[kMaxBlocksCuda * 3];
  int total;
  int hist[256];  // context tokens per top key byte
  int bin, below, n_list;
  uint32_t list_key[kMaxBinList];
  int32_t list_k[kMaxBinList];
  int chunk_base[kMaxWriteThreads];
};

// Per context-block token: a 32-bit truncation key and a flag byte.
inline size_t write_scratch_bytes(const MaskSpec& s) { return static_cast<size_t>(s.context.size()) * 5; }

// Phase 1 for sample b: draws layouts until every context keeps min_keep tokens (or max_tries run out), then
// writes corners [num_blocks, 3] of b and counts[b] (the smallest context count, -1 = failed).
template <class Block>
IWM_BLOCK_FN void sample_layout_block(const Block& blk, const MaskSpec& s, int64_t b, LayoutShared& sh,
                                      int32_t* __restrict__ corners, int64_t* __restrict__ counts) {
  const int tid = blk.thread(), nt = blk.size();
  const int nb = static_cast<int>(s.num_blocks());
  const Extent ce = s.context;
  const int64_t csize = ce.size();
  for (int64_t a = 0; a < s.max_tries; ++a) {
    for (int j = tid; j < nb; j += nt) draw_block(s, b, a, j, sh.cs + 3 * j);
    if (tid == 0) sh.least = INT_MAX;
    blk.sync();
    for (int64_t c = 0; c < s.num_contexts; ++c) {
      if (tid == 0) sh.n_ctx = 0;
      blk.sync();
      const int32_t* cc = sh.cs + 3 * (s.num_targets + c);
      int mine = 0;
      if (s.allow_overlap) {
        mine = tid == 0 ? static_cast<int>(csize) : 0;
      } else {
        for (int64_t k = tid; k < csize; k += nt) {
          const int64_t t = cc[0] + k / (ce.h * ce.w), h = cc[1] + (k / ce.w) % ce.h, w = cc[2] + k % ce.w;
          mine += !in_any_target(s, sh.cs, t, h, w);
        }
      }
      blk.atomic_add(&sh.n_ctx, mine);
      blk.sync();
      if (tid == 0 && sh.n_ctx < sh.least) sh.least = sh.n_ctx;
      blk.sync();
    }
    if (sh.least >= s.min_keep) {  // the same value in every thread: all leave together
      for (int j = tid; j < 3 * nb; j += nt) corners[b * 3 * nb + j] = sh.cs[j];
      if (tid == 0) counts[b] = sh.least;
      return;
    }
    blk.sync();  // cs is redrawn next attempt
  }
  if (tid == 0) counts[b] = -1;
}

// Phase 2 for context c of sample b: its `keep` tokens with the smallest (key, index), ascending, and (for
// c == 0) the sample's target tokens. kList (at most kMaxBinList) is lowered by tests to force the fallback.
template <class Block, int kList = kMaxBinList>
IWM_BLOCK_FN void write_masks_block(const Block& blk, const MaskSpec& s, int64_t b, int64_t c,
                                    const int32_t* __restrict__ corners, int64_t keep, int64_t* __restrict__ context,
                                    int64_t* __restrict__ targets, WriteShared& sh, unsigned char* scratch) {
  const int tid = blk.thread(), nt = blk.size();
  const int nb = static_cast<int>(s.num_blocks());
  const Extent ce = s.context;
  const int64_t csize = ce.size(), HW = s.H * s.W;
  uint32_t* keys = reinterpret_cast<uint32_t*>(scratch);
  unsigned char* flags = scratch + csize * sizeof(uint32_t);  // bit 0: in the context, bit 1: kept
  for (int j = tid; j < 3 * nb; j += nt) sh.cs[j] = corners[b * 3 * nb + j];
  for (int j = tid; j < 256; j += nt) sh.hist[j] = 0;
  if (tid == 0) sh.total = 0, sh.n_list = 0;
  blk.sync();
  const int32_t* cc = sh.cs + 3 * (s.num_targets + c);

  // Region index k walks the context block in t, h, w order, so flat indices increase with k.
  int in_ctx = 0;
  for (int64_t k = tid; k < csize; k += nt) {
    const int64_t t = cc[0] + k / (ce.h * ce.w), h = cc[1] + (k / ce.w) % ce.h, w = cc[2] + k % ce.w;
    const bool in = s.allow_overlap || !in_any_target(s, sh.cs, t, h, w);
    flags[k] = in ? 1 : 0;
    keys[k] = in ? truncation_key(s, b, c, t * HW + h * s.W + w) : 0u;
    if (in) blk.atomic_add(&sh.hist[keys[k] >> 24], 1);
    in_ctx += in;
  }
  blk.atomic_add(&sh.total, in_ctx);
  blk.sync();
  const bool truncate = sh.total > keep;

  // Radix selection on the top key byte: tokens below the boundary bin are kept, above it dropped, and only
  // the bin's few tokens are ranked, against a list of the bin gathered in shared memory.
  if (truncate) {
    if (tid == 0) {
      int below = 0, bin = 0;
      while (below + sh.hist[bin] < keep) below += sh.hist[bin++];
      sh.bin = bin, sh.below = below;
    }
    blk.sync();
    for (int64_t k = tid; k < csize; k += nt)
      if ((flags[k] & 1) && static_cast<int>(keys[k] >> 24) == sh.bin) {
        const int slot = blk.atomic_add(&sh.n_list, 1);
        if (slot < kList) sh.list_key[slot] = keys[k], sh.list_k[slot] = static_cast<int32_t>(k);
      }
    blk.sync();
  }

  // Contiguous chunk per thread so that an exclusive scan over threads orders the output.
  const int64_t chunk = (csize + nt - 1) / nt;
  const int64_t k0 = tid * chunk < csize ? tid * chunk : csize, k1 = k0 + chunk < csize ? k0 + chunk : csize;
  int kept = 0;
  for (int64_t k = k0; k < k1; ++k) {
    if (!(flags[k] & 1)) continue;
    bool keep_k = true;
    if (truncate) {
      const uint32_t key = keys[k];
      const int top = static_cast<int>(key >> 24);
      if (top != sh.bin) {
        keep_k = top < sh.bin;
      } else if (sh.n_list <= kList) {  // rank of (key, index) within the bin
        int64_t rank = sh.below;
        for (int i = 0; i < sh.n_list; ++i)
          rank += sh.list_key[i] < key || (sh.list_key[i] == key && sh.list_k[i] < k);
        keep_k = rank < keep;
      } else {  // rank among all context tokens; flat index order equals region order
        int64_t rank = 0;
        for (int64_t j = 0; j < csize; ++j)
          rank += (flags[j] & 1) && (keys[j] < key || (keys[j] == key && j < k));
        keep_k = rank < keep;
      }
    }
    if (keep_k) {
      flags[k] |= 2;
      ++kept;
    }
  }
  sh.chunk_base[tid] = kept;
  blk.sync();
  if (tid == 0) {
    int run = 0;
    for (int i = 0; i < nt; ++i) {
      const int v = sh.chunk_base[i];
      sh.chunk_base[i] = run;
      run += v;
    }
  }
  blk.sync();
  int64_t* out = context + (b * s.num_contexts + c) * keep + sh.chunk_base[tid];
  for (int64_t k = k0; k < k1; ++k)
    if (flags[k] & 2) *out++ = (cc[0] + k / (ce.h * ce.w)) * HW + (cc[1] + (k / ce.w) % ce.h) * s.W + cc[2] + k % ce.w;

  if (c == 0) {
    const Extent te = s.target;
    const int64_t tsize = te.size();
    int64_t* tout = targets + b * s.num_targets * tsize;
    for (int64_t i = tid; i < s.num_targets * tsize; i += nt) {
      const int64_t j = i / tsize, k = i % tsize;
      const int32_t* tc = sh.cs + 3 * j;
      tout[i] = (tc[0] + k / (te.h * te.w)) * HW + (tc[1] + (k / te.w) % te.h) * s.W + tc[2] + k % te.w;
    }
  }
}

}  // namespace iwm_fast

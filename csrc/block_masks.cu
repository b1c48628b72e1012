// CUDA implementation of the multi-block mask sampler (see block_masks.h). Same RNG and the same selection
// rule as the CPU code, so both return identical masks for the same arguments.
#include <cuda_runtime.h>

#include "block_masks_cuda.h"

namespace iwm_fast {

namespace {

constexpr int kLayoutThreads = 128;
constexpr int kWriteThreads = 256;

__global__ void sample_layouts_kernel(MaskSpec s, int32_t* __restrict__ corners, int64_t* __restrict__ counts) {
  __shared__ int32_t cs[kMaxBlocksCuda * 3];
  __shared__ int least;
  __shared__ int n_ctx;
  const int64_t b = blockIdx.x;
  const int nb = static_cast<int>(s.num_blocks());
  const Extent ce = s.context;
  const int64_t csize = ce.size();
  for (int64_t a = 0; a < s.max_tries; ++a) {
    for (int j = threadIdx.x; j < nb; j += blockDim.x) draw_block(s, b, a, j, cs + 3 * j);
    if (threadIdx.x == 0) least = INT_MAX;
    __syncthreads();
    for (int64_t c = 0; c < s.num_contexts; ++c) {
      if (threadIdx.x == 0) n_ctx = 0;
      __syncthreads();
      const int32_t* cc = cs + 3 * (s.num_targets + c);
      int mine = 0;
      if (s.allow_overlap) {
        mine = threadIdx.x == 0 ? static_cast<int>(csize) : 0;
      } else {
        for (int64_t k = threadIdx.x; k < csize; k += blockDim.x) {
          const int64_t t = cc[0] + k / (ce.h * ce.w), h = cc[1] + (k / ce.w) % ce.h, w = cc[2] + k % ce.w;
          mine += !in_any_target(s, cs, t, h, w);
        }
      }
      atomicAdd(&n_ctx, mine);
      __syncthreads();
      if (threadIdx.x == 0) least = min(least, n_ctx);
      __syncthreads();
    }
    if (least >= s.min_keep) {
      for (int j = threadIdx.x; j < 3 * nb; j += blockDim.x) corners[b * 3 * nb + j] = cs[j];
      if (threadIdx.x == 0) counts[b] = least;
      return;
    }
    __syncthreads();  // cs is redrawn next attempt
  }
  if (threadIdx.x == 0) counts[b] = -1;
}

// Flags per context-block token: bit 0 = in the context, bit 1 = kept after truncation.
__global__ void write_masks_kernel(MaskSpec s, const int32_t* __restrict__ corners, int64_t keep,
                                   int64_t* __restrict__ context, int64_t* __restrict__ targets) {
  extern __shared__ unsigned char smem[];
  __shared__ int32_t cs[kMaxBlocksCuda * 3];
  __shared__ int chunk_base[kWriteThreads];
  const int64_t b = blockIdx.x, c = blockIdx.y;
  const int nb = static_cast<int>(s.num_blocks());
  const Extent ce = s.context;
  const int64_t csize = ce.size(), HW = s.H * s.W;
  uint32_t* keys = reinterpret_cast<uint32_t*>(smem);
  unsigned char* flags = smem + csize * sizeof(uint32_t);
  for (int j = threadIdx.x; j < 3 * nb; j += blockDim.x) cs[j] = corners[b * 3 * nb + j];
  __syncthreads();
  const int32_t* cc = cs + 3 * (s.num_targets + c);

  // Region index k walks the context block in t, h, w order, so flat indices increase with k.
  int in_ctx = 0;
  for (int64_t k = threadIdx.x; k < csize; k += blockDim.x) {
    const int64_t t = cc[0] + k / (ce.h * ce.w), h = cc[1] + (k / ce.w) % ce.h, w = cc[2] + k % ce.w;
    const bool in = s.allow_overlap || !in_any_target(s, cs, t, h, w);
    flags[k] = in ? 1 : 0;
    keys[k] = in ? truncation_key(s, b, c, t * HW + h * s.W + w) : 0u;
    in_ctx += in;
  }
  __shared__ int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  atomicAdd(&total, in_ctx);
  __syncthreads();
  const bool truncate = total > keep;

  // Contiguous chunk per thread so that an exclusive scan over threads orders the output.
  const int64_t chunk = (csize + blockDim.x - 1) / blockDim.x;
  const int64_t k0 = min(csize, threadIdx.x * chunk), k1 = min(csize, k0 + chunk);
  int kept = 0;
  for (int64_t k = k0; k < k1; ++k) {
    if (!(flags[k] & 1)) continue;
    bool keep_k = true;
    if (truncate) {
      // Rank of (key, index) among the context tokens; flat index order equals region order.
      const uint32_t key = keys[k];
      int64_t rank = 0;
      for (int64_t j = 0; j < csize; ++j)
        rank += (flags[j] & 1) && (keys[j] < key || (keys[j] == key && j < k));
      keep_k = rank < keep;
    }
    if (keep_k) {
      flags[k] |= 2;
      ++kept;
    }
  }
  chunk_base[threadIdx.x] = kept;
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0;
    for (int i = 0; i < blockDim.x; ++i) {
      const int v = chunk_base[i];
      chunk_base[i] = run;
      run += v;
    }
  }
  __syncthreads();
  int64_t* out = context + (b * s.num_contexts + c) * keep + chunk_base[threadIdx.x];
  for (int64_t k = k0; k < k1; ++k)
    if (flags[k] & 2) *out++ = (cc[0] + k / (ce.h * ce.w)) * HW + (cc[1] + (k / ce.w) % ce.h) * s.W + cc[2] + k % ce.w;

  if (c == 0) {
    const Extent te = s.target;
    const int64_t tsize = te.size();
    int64_t* tout = targets + b * s.num_targets * tsize;
    for (int64_t i = threadIdx.x; i < s.num_targets * tsize; i += blockDim.x) {
      const int64_t j = i / tsize, k = i % tsize;
      const int32_t* tc = cs + 3 * j;
      tout[i] = (tc[0] + k / (te.h * te.w)) * HW + (tc[1] + (k / te.w) % te.h) * s.W + tc[2] + k % te.w;
    }
  }
}

}  // namespace

int launch_sample_layouts_cuda(const MaskSpec& s, int32_t* corners, int64_t* counts, void* stream) {
  if (s.num_blocks() > kMaxBlocksCuda) return static_cast<int>(cudaErrorInvalidValue);
  sample_layouts_kernel<<<static_cast<unsigned>(s.batch), kLayoutThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      s, corners, counts);
  return static_cast<int>(cudaGetLastError());
}

int launch_write_masks_cuda(const MaskSpec& s, const int32_t* corners, int64_t keep, int64_t* context,
                            int64_t* targets, void* stream) {
  if (s.num_blocks() > kMaxBlocksCuda) return static_cast<int>(cudaErrorInvalidValue);
  const size_t smem = static_cast<size_t>(s.context.size()) * (sizeof(uint32_t) + 1);
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(write_masks_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  const dim3 grid(static_cast<unsigned>(s.batch), static_cast<unsigned>(s.num_contexts));
  write_masks_kernel<<<grid, kWriteThreads, smem, static_cast<cudaStream_t>(stream)>>>(s, corners, keep, context,
                                                                                     targets);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace iwm_fast

// CUDA kernels of the multi-block mask sampler: the thread-block programs of block_masks_blocks.h, one thread
// block per sample (layouts) and per (sample, context) (writes). Same RNG and the same selection rule as the
// CPU code, so both return identical masks for the same arguments.
#include <cuda_runtime.h>

#include "block_masks_blocks.h"
#include "block_masks_cuda.h"

namespace iwm_fast {

namespace {

constexpr int kLayoutThreads = 128;
constexpr int kWriteThreads = kMaxWriteThreads;

struct CudaBlock {
  __device__ int thread() const { return static_cast<int>(threadIdx.x); }
  __device__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ void sync() const { __syncthreads(); }
  __device__ int atomic_add(int* p, int v) const { return atomicAdd(p, v); }
};

__global__ void sample_layouts_kernel(MaskSpec s, int32_t* __restrict__ corners, int64_t* __restrict__ counts) {
  __shared__ LayoutShared sh;
  sample_layout_block(CudaBlock{}, s, blockIdx.x, sh, corners, counts);
}

__global__ void write_masks_kernel(MaskSpec s, const int32_t* __restrict__ corners, int64_t keep,
                                   int64_t* __restrict__ context, int64_t* __restrict__ targets) {
  extern __shared__ unsigned char scratch[];
  __shared__ WriteShared sh;
  write_masks_block(CudaBlock{}, s, blockIdx.x, blockIdx.y, corners, keep, context, targets, sh, scratch);
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
  const size_t smem = write_scratch_bytes(s);
  if (smem + sizeof(WriteShared) > 48 * 1024) {  // static + dynamic shared memory past the default limit: opt in
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

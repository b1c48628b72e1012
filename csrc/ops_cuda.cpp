// CUDA implementation of iwm_fast::sample_block_masks: two kernels around one host sync (the context length
// is the batch minimum, needed to allocate the output).
#ifdef IWM_FAST_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "block_masks_cuda.h"
#include "ops_common.h"

namespace iwm_fast {

void check_layouts(const MaskSpec& s, int64_t least, c10::IntArrayRef grid);

namespace {

std::tuple<at::Tensor, at::Tensor> sample_block_masks_cuda(
    const at::Tensor& anchor, int64_t batch_size, c10::IntArrayRef grid, int64_t num_targets, int64_t num_contexts,
    c10::ArrayRef<double> target_scale, c10::ArrayRef<double> target_aspect, c10::ArrayRef<double> context_scale,
    c10::ArrayRef<double> context_aspect, int64_t min_keep, bool allow_overlap, int64_t seed, int64_t step,
    int64_t max_tries, int64_t /*num_threads*/) {
  TORCH_CHECK(anchor.is_cuda(), "anchor must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(anchor.device());
  const MaskSpec s = make_mask_spec(batch_size, grid, num_targets, num_contexts, target_scale, target_aspect,
                                    context_scale, context_aspect, min_keep, allow_overlap, seed, step, max_tries);
  TORCH_CHECK_VALUE(s.num_blocks() <= kMaxBlocksCuda, "num_targets + num_contexts must be at most ",
                    kMaxBlocksCuda, " on CUDA, got ", s.num_blocks());
  const auto opts = anchor.options();
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  auto corners = at::empty({s.batch, s.num_blocks(), 3}, opts.dtype(at::kInt));
  auto counts = at::empty({s.batch}, opts.dtype(at::kLong));
  int err = launch_sample_layouts_cuda(s, corners.data_ptr<int32_t>(), counts.data_ptr<int64_t>(), stream);
  TORCH_CHECK(err == 0, "mask layout kernel failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  const int64_t least = counts.min().item<int64_t>();
  check_layouts(s, least, grid);
  auto context = at::empty({s.batch, s.num_contexts, least}, opts.dtype(at::kLong));
  auto targets = at::empty({s.batch, s.num_targets, s.target.size()}, opts.dtype(at::kLong));
  err = launch_write_masks_cuda(s, corners.data_ptr<int32_t>(), least, context.data_ptr<int64_t>(),
                                targets.data_ptr<int64_t>(), stream);
  TORCH_CHECK(err == 0, "mask write kernel failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {context, targets};
}

}  // namespace

TORCH_LIBRARY_IMPL(iwm_fast, CUDA, m) { m.impl("sample_block_masks", &sample_block_masks_cuda); }

}  // namespace iwm_fast
#endif  // IWM_FAST_WITH_CUDA

// Argument checking and MaskSpec construction shared by the CPU and CUDA torch ops.
#pragma once
#include <torch/library.h>

#include "block_masks.h"

namespace iwm_fast {

MaskSpec make_mask_spec(int64_t batch_size, c10::IntArrayRef grid, int64_t num_targets, int64_t num_contexts,
                        c10::ArrayRef<double> target_scale, c10::ArrayRef<double> target_aspect,
                        c10::ArrayRef<double> context_scale, c10::ArrayRef<double> context_aspect,
                        int64_t min_keep, bool allow_overlap, int64_t seed, int64_t step, int64_t max_tries);

}  // namespace iwm_fast

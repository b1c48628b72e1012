// Launchers of the CUDA mask sampler (block_masks.cu). Torch-free: they take raw device pointers and a stream.
#pragma once
#include <cstdint>

#include "block_masks.h"
#include "block_masks_blocks.h"  // kMaxBlocksCuda

namespace iwm_fast {

// Phase 1, one thread block per sample: corners [batch, num_blocks, 3] int32, counts [batch] int64.
// Returns a CUDA error code (0 = success).
int launch_sample_layouts_cuda(const MaskSpec& s, int32_t* corners, int64_t* counts, void* stream);

// Phase 2, one thread block per (sample, context): context [batch, num_contexts, keep], targets
// [batch, num_targets, target.size()], both int64. Returns a CUDA error code (0 = success).
int launch_write_masks_cuda(const MaskSpec& s, const int32_t* corners, int64_t keep, int64_t* context,
                            int64_t* targets, void* stream);

}  // namespace iwm_fast

// Sampler arguments the ctest programs share: I-JEPA's default mask settings on a grid, and the variants
// the comparisons between implementations run.
#pragma once
#include <cstdint>

#include "block_masks.h"

// Four targets at scale 0.15-0.2, one context at 0.85-1.0, min_keep 10, as I-JEPA's collator.
inline iwm_fast::MaskSpec ijepa_spec(int64_t T, int64_t H, int64_t W, uint64_t seed, uint64_t step, int64_t batch) {
  using iwm_fast::block_extent;
  iwm_fast::MaskSpec s{};
  s.batch = batch;
  s.T = T, s.H = H, s.W = W;
  s.num_targets = 4, s.num_contexts = 1;
  double ut, uc;
  iwm_fast::batch_uniforms(seed, step, &ut, &uc);
  s.target = block_extent(ut, 0.15, 0.2, 0.75, 1.5, T, H, W);
  s.context = block_extent(uc, 0.85, 1.0, 1.0, 1.0, T, H, W);
  s.min_keep = 10, s.allow_overlap = false, s.seed = seed, s.step = step, s.max_tries = 100;
  return s;
}

// Variant 0: as given; 1: targets allowed in the context; 2: two contexts of scale 0.4-0.6; 3: twelve small
// targets. Every variant keeps any non-empty context (min_keep 1) and tries hard to place it.
inline iwm_fast::MaskSpec with_variant(iwm_fast::MaskSpec s, int variant) {
  using iwm_fast::block_extent;
  s.min_keep = 1, s.max_tries = 1000;
  if (variant == 1) s.allow_overlap = true;
  if (variant == 2) s.num_contexts = 2, s.context = block_extent(0.5, 0.4, 0.6, 0.8, 1.25, s.T, s.H, s.W);
  if (variant == 3) s.num_targets = 12, s.target = block_extent(0.5, 0.02, 0.04, 0.75, 1.5, s.T, s.H, s.W);
  return s;
}

// torch operator iwm_fast::sample_block_masks: schema, argument checks and the CPU implementation.
// The fake (meta) implementation is registered from Python (iwm_fast/masks/_ops.py) because the context
// length is data-dependent.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "block_masks_simd.h"
#include "ops_common.h"

extern "C" {
// An importable, empty module: loading iwm_fast._C runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace iwm_fast {

namespace {
void check_range(c10::ArrayRef<double> r, const char* name, bool unit) {
  TORCH_CHECK_VALUE(r.size() == 2, name, " must be a (low, high) pair, got ", r.size(), " values");
  TORCH_CHECK_VALUE(r[0] > 0 && r[0] <= r[1], name, " must satisfy 0 < low <= high, got (", r[0], ", ", r[1], ")");
  if (unit) TORCH_CHECK_VALUE(r[1] <= 1.0, name, " must lie in (0, 1], got (", r[0], ", ", r[1], ")");
}
}  // namespace

MaskSpec make_mask_spec(int64_t batch_size, c10::IntArrayRef grid, int64_t num_targets, int64_t num_contexts,
                        c10::ArrayRef<double> target_scale, c10::ArrayRef<double> target_aspect,
                        c10::ArrayRef<double> context_scale, c10::ArrayRef<double> context_aspect,
                        int64_t min_keep, bool allow_overlap, int64_t seed, int64_t step, int64_t max_tries) {
  TORCH_CHECK_VALUE(batch_size > 0, "batch_size must be positive, got ", batch_size);
  TORCH_CHECK_VALUE(grid.size() == 2 || grid.size() == 3, "grid must be (H, W) or (T, H, W), got ", grid);
  for (auto g : grid) TORCH_CHECK_VALUE(g > 0, "grid sides must be positive, got ", grid);
  TORCH_CHECK_VALUE(num_targets > 0, "num_targets must be positive, got ", num_targets);
  TORCH_CHECK_VALUE(num_contexts > 0, "num_contexts must be positive, got ", num_contexts);
  TORCH_CHECK_VALUE(min_keep >= 0, "min_keep must be non-negative, got ", min_keep);
  TORCH_CHECK_VALUE(seed >= 0 && step >= 0, "seed and step must be non-negative, got ", seed, ", ", step);
  TORCH_CHECK_VALUE(step < (int64_t(1) << 60), "step must be below 2**60, got ", step);
  TORCH_CHECK_VALUE(max_tries > 0, "max_tries must be positive, got ", max_tries);
  check_range(target_scale, "target_scale", true);
  check_range(context_scale, "context_scale", true);
  check_range(target_aspect, "target_aspect", false);
  check_range(context_aspect, "context_aspect", false);
  MaskSpec s{};
  s.batch = batch_size;
  s.T = grid.size() == 3 ? grid[0] : 1;
  s.H = grid[grid.size() - 2];
  s.W = grid[grid.size() - 1];
  TORCH_CHECK_VALUE(s.T * s.H * s.W < (int64_t(1) << 31), "grid has too many tokens: ", grid);
  s.num_targets = num_targets;
  s.num_contexts = num_contexts;
  double ut, uc;
  batch_uniforms(static_cast<uint64_t>(seed), static_cast<uint64_t>(step), &ut, &uc);
  s.target = block_extent(ut, target_scale[0], target_scale[1], target_aspect[0], target_aspect[1], s.T, s.H, s.W);
  s.context =
      block_extent(uc, context_scale[0], context_scale[1], context_aspect[0], context_aspect[1], s.T, s.H, s.W);
  s.min_keep = min_keep;
  TORCH_CHECK_VALUE(s.target.size() >= min_keep, "target block of ", s.target.t, "x", s.target.h, "x", s.target.w,
                    " tokens is below min_keep=", min_keep, " on grid ", grid,
                    "; raise target_scale, lower min_keep or use a larger grid");
  TORCH_CHECK_VALUE(s.context.size() >= min_keep, "context block of ", s.context.t, "x", s.context.h, "x",
                    s.context.w, " tokens is below min_keep=", min_keep, " on grid ", grid);
  s.allow_overlap = allow_overlap;
  s.seed = static_cast<uint64_t>(seed);
  s.step = static_cast<uint64_t>(step);
  s.max_tries = max_tries;
  return s;
}

void check_layouts(const MaskSpec& s, int64_t least, c10::IntArrayRef grid) {
  TORCH_CHECK_VALUE(least >= 0, "no layout kept min_keep=", s.min_keep, " context tokens clear of ",
                    s.num_targets, " target blocks of ", s.target.t, "x", s.target.h, "x", s.target.w,
                    " within max_tries=", s.max_tries, " on grid ", grid,
                    "; lower num_targets, target_scale or min_keep, or allow_overlap=True");
}

namespace {

std::tuple<at::Tensor, at::Tensor> sample_block_masks_cpu(
    const at::Tensor& anchor, int64_t batch_size, c10::IntArrayRef grid, int64_t num_targets, int64_t num_contexts,
    c10::ArrayRef<double> target_scale, c10::ArrayRef<double> target_aspect, c10::ArrayRef<double> context_scale,
    c10::ArrayRef<double> context_aspect, int64_t min_keep, bool allow_overlap, int64_t seed, int64_t step,
    int64_t max_tries, int64_t num_threads) {
  TORCH_CHECK(anchor.device().is_cpu(), "anchor must be a CPU tensor");
  const MaskSpec s = make_mask_spec(batch_size, grid, num_targets, num_contexts, target_scale, target_aspect,
                                    context_scale, context_aspect, min_keep, allow_overlap, seed, step, max_tries);
  const int threads = num_threads > 0 ? static_cast<int>(num_threads) : at::get_num_threads();
  auto corners = at::empty({s.batch, s.num_blocks(), 3}, at::kInt);
  auto counts = at::empty({s.batch}, at::kLong);
  sample_layouts_cpu(s, corners.data_ptr<int32_t>(), counts.data_ptr<int64_t>(), threads);
  const int64_t least = counts.min().item<int64_t>();
  check_layouts(s, least, grid);
  auto context = at::empty({s.batch, s.num_contexts, least}, at::kLong);
  auto targets = at::empty({s.batch, s.num_targets, s.target.size()}, at::kLong);
  write_masks_cpu(s, corners.data_ptr<int32_t>(), least, context.data_ptr<int64_t>(), targets.data_ptr<int64_t>(),
                  threads);
  return {context, targets};
}

std::string cpu_vector_path() {
  switch (simd_level()) {
    case kSimdAvx512: return "avx512";
    case kSimdAvx2: return "avx2";
    default: return "portable";
  }
}

// Caps the CPU sampler's vector path for the rest of the process (benchmarks compare the paths); the masks are
// the same on every path. A path this CPU lacks falls to the next narrower one.
void set_cpu_vector_path(c10::string_view path) {
  if (path == "avx512") return set_simd_max_level(kSimdAvx512);
  if (path == "avx2") return set_simd_max_level(kSimdAvx2);
  TORCH_CHECK_VALUE(path == "portable", "cpu vector path must be 'avx512', 'avx2' or 'portable', got '", path, "'");
  set_simd_max_level(kSimdNone);
}

}  // namespace

TORCH_LIBRARY(iwm_fast, m) {
  // anchor: an empty tensor whose device selects the implementation (the op has no other tensor input).
  m.def(
      "sample_block_masks(Tensor anchor, int batch_size, int[] grid, int num_targets, int num_contexts, "
      "float[] target_scale, float[] target_aspect, float[] context_scale, float[] context_aspect, int min_keep, "
      "bool allow_overlap, int seed, int step, int max_tries, int num_threads) -> (Tensor, Tensor)");
  m.def("cpu_vector_path() -> str", &cpu_vector_path);
  m.def("set_cpu_vector_path(str path) -> ()", &set_cpu_vector_path);
}

TORCH_LIBRARY_IMPL(iwm_fast, CPU, m) { m.impl("sample_block_masks", &sample_block_masks_cpu); }

}  // namespace iwm_fast

// Which vector path the CPU sampler takes: what is compiled in, what the CPU supports, and the cap.
#include "block_masks_simd.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace iwm_fast {

namespace {

SimdLevel level_from_env() {
  const char* v = std::getenv("IWM_FAST_MASKS_SIMD");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "avx512") == 0) return kSimdAvx512;
  if (std::strcmp(v, "avx2") == 0) return kSimdAvx2;
  if (std::strcmp(v, "portable") == 0 || std::strcmp(v, "off") == 0) return kSimdNone;
  std::fprintf(stderr, "iwm_fast: ignoring IWM_FAST_MASKS_SIMD=%s (expected avx512, avx2 or portable)\n", v);
  return kSimdAvx512;
}

SimdLevel supported_level() {
#if IWM_FAST_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kSimdAvx512;
  if (__builtin_cpu_supports("avx2")) return kSimdAvx2;
#endif
  return kSimdNone;
}

std::atomic<int> max_level{level_from_env()};
std::atomic<double> window_sigmas{4.5};

}  // namespace

SimdLevel simd_level() {
  static const SimdLevel supported = supported_level();
  const int cap = max_level.load(std::memory_order_relaxed);
  return static_cast<SimdLevel>(supported < cap ? supported : cap);
}

void set_simd_max_level(SimdLevel level) { max_level.store(level); }
void set_simd_window_sigmas(double sigmas) { window_sigmas.store(sigmas); }
double simd_window_sigmas() { return window_sigmas.load(std::memory_order_relaxed); }

#if !IWM_FAST_X86_SIMD  // no vector code on this compiler or architecture: simd_level() is kSimdNone
void truncation_keys_avx512(uint64_t, uint64_t, uint32_t, uint32_t, int64_t, uint32_t*) {}
void truncation_keys_avx2(uint64_t, uint64_t, uint32_t, uint32_t, int64_t, uint32_t*) {}
bool truncate_context_avx512(const SimdContext&, int64_t, int64_t*, uint32_t*, uint32_t*) { return false; }
bool truncate_context_avx2(const SimdContext&, int64_t, int64_t*, uint32_t*, uint32_t*) { return false; }
#endif

}  // namespace iwm_fast

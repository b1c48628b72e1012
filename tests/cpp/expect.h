// The ctest programs' checks: EXPECT records a failure and goes on; report() prints the verdict and gives
// main's exit status.
#pragma once
#include <cstdio>
#include <cstdlib>

inline int expect_failures = 0;

#define EXPECT(cond)                                                         \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      ++expect_failures;                                                     \
    }                                                                        \
  } while (0)

inline int report(const char* what) {
  if (expect_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", expect_failures);
    return EXIT_FAILURE;
  }
  std::printf("%s passed\n", what);
  return EXIT_SUCCESS;
}

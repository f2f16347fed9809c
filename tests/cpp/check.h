// A minimal test harness for the ctest executables: CHECK counts failures, main returns them.
#pragma once

#include <cmath>
#include <cstdio>

namespace berdiff_test {
inline int& failures() {
  static int n = 0;
  return n;
}
inline int& checks() {
  static int n = 0;
  return n;
}
inline bool close(double got, double want, double rtol, double atol) {
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}
inline int finish(const char* name) {
  std::printf("%s: %d checks, %d failed\n", name, checks(), failures());
  return failures() == 0 ? 0 : 1;
}
}  // namespace berdiff_test

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    ++berdiff_test::checks();                                              \
    if (!(cond)) {                                                         \
      if (++berdiff_test::failures() <= 20) {                              \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);        \
        std::printf(__VA_ARGS__);                                          \
        std::printf("\n");                                                 \
      }                                                                    \
    }                                                                      \
  } while (0)

#define CHECK_CLOSE(got, want, rtol, atol, what)                                                  \
  CHECK(berdiff_test::close((got), (want), (rtol), (atol)), "%s: got %.17g, want %.17g", (what), \
        static_cast<double>(got), static_cast<double>(want))

// The CPU kernels for the baseline instruction set of the compiler's target, and the run-time
// choice among the compiled instruction sets.
#include <string.h>

#include "kernels.h"

#define BERDIFF_CPU_ISA isa_default
#define BERDIFF_CPU_ISA_NAME "default"
#define BERDIFF_CPU_TABLE kernels_default
#include "kernels_impl.h"

namespace berdiff {
namespace cpu {

const KernelTable* select_kernels(const char* isa) {
  const bool any = isa == nullptr || *isa == '\0';
#if BERDIFF_CPU_X86
  __builtin_cpu_init();
  const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("bmi2");
  if ((any || strcmp(isa, "avx512") == 0) && has_avx512) return &kernels_avx512();
  if ((any || strcmp(isa, "avx2") == 0) && has_avx2) return &kernels_avx2();
#endif
  if (any || strcmp(isa, "default") == 0) return &kernels_default();
  return nullptr;
}

}  // namespace cpu
}  // namespace berdiff

// The CPU kernels, compiled once per instruction set (kernels_<isa>.cpp) and chosen at run time.
// Torch-free: the ATen drivers (ops_cpu.cpp) validate, allocate and split the work; each kernel
// processes the flat element range [begin, end) of contiguous tensors described by OpArgs.
#pragma once

#include <stdint.h>

#include "../kernel_args.h"

namespace berdiff {
namespace cpu {

struct KernelTable {
  const char* isa;
  void (*q_sample)(const OpArgs&, int64_t begin, int64_t end);
  void (*init_noise)(const OpArgs&, int64_t begin, int64_t end);
  void (*ddpm_step)(const OpArgs&, int64_t begin, int64_t end);
  void (*ddim_step)(const OpArgs&, int64_t begin, int64_t end);
  void (*predict_y0)(const OpArgs&, int64_t begin, int64_t end);
  // The sum of the per-pixel loss (nats) over [begin, end), which lies inside sample b.
  double (*loss_sum)(const OpArgs&, int64_t b, int64_t begin, int64_t end);
  void (*loss_backward)(const OpArgs&, int64_t begin, int64_t end);
};

const KernelTable& kernels_default();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BERDIFF_CPU_X86 1
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
#endif

// The best table this CPU supports, or the one named by `isa` ("default", "avx2", "avx512");
// nullptr when the name is unknown or the CPU lacks it.
const KernelTable* select_kernels(const char* isa);

// Elements of a loss partial sum: fixed, so the result does not depend on the thread count.
constexpr int64_t kLossBlock = 8192;

}  // namespace cpu
}  // namespace berdiff

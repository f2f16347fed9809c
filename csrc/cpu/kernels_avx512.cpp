// The CPU kernels compiled for AVX512 (chosen at run time by select_kernels when the CPU has it).
// The target region opens after every header, so only the kernels themselves use AVX512.
#include "kernels.h"

#if BERDIFF_CPU_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi,bmi2")
#endif

#define BERDIFF_CPU_ISA isa_avx512
#define BERDIFF_CPU_ISA_NAME "avx512"
#define BERDIFF_CPU_TABLE kernels_avx512
#define BERDIFF_CPU_WIDE_PHILOX  // uniform_chunk: 64-bit-lane Philox rounds
#include "kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // BERDIFF_CPU_X86

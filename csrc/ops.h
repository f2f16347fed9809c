// The operators of torch.ops.berdiff, one declaration per device (schemas: torch_bindings.cpp).
//
// Masks (y0, y_t) are bool, uint8, float16, bfloat16, float32 or float64 holding 0 and 1 only
// (not checked here: the Python API checks; other values give meaningless results); logits
// float16, bfloat16, float32 or float64; all of shape [B, ...]. t, s: int64 [B] in paper time,
// 1 <= t <= T and 0 <= s < t (checked on the CPU; clamped into the table on CUDA, see
// cuda/berdiff_kernels.cuh). table: the schedule's [T + 1, 4] rows
// (berdiff_fast.schedule.NoiseSchedule.table), read in the compute type. seed, offset:
// one-element int64 tensors, on the CPU or on the data's device (read there by the kernel).
// The compute type is float64 when a mask or the logits are float64, else float32.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace berdiff {

// ---- CPU (csrc/cpu/ops_cpu.cpp) ----
std::tuple<at::Tensor, at::Tensor> q_sample_cpu(const at::Tensor& y0, const at::Tensor& t, const at::Tensor& table,
                                                const at::Tensor& seed, const at::Tensor& offset);
void init_noise_cpu(at::Tensor& out, const at::Tensor& seed, const at::Tensor& offset);
std::tuple<at::Tensor, at::Tensor> ddpm_step_cpu(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& t,
                                                 const at::Tensor& table, const at::Tensor& seed,
                                                 const at::Tensor& offset, bool return_y0);
std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& t,
                                                 const at::Tensor& s, const at::Tensor& table, const at::Tensor& seed,
                                                 const at::Tensor& offset, double eta, bool return_y0);
at::Tensor predict_y0_cpu(const at::Tensor& logits, const at::Tensor& y_t);
at::Tensor loss_cpu(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& y0, const at::Tensor& t,
                    const at::Tensor& table);
at::Tensor loss_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& y_t,
                             const at::Tensor& y0, const at::Tensor& t, const at::Tensor& table);
// The instruction set of the CPU kernels in use; a non-empty name ("default", "avx2", "avx512")
// switches to it first (for tests and benchmarks).
std::string cpu_isa(const std::string& isa);

// ---- CUDA (csrc/cuda/ops_cuda.cu) ----
std::tuple<at::Tensor, at::Tensor> q_sample_cuda(const at::Tensor& y0, const at::Tensor& t, const at::Tensor& table,
                                                 const at::Tensor& seed, const at::Tensor& offset);
void init_noise_cuda(at::Tensor& out, const at::Tensor& seed, const at::Tensor& offset);
std::tuple<at::Tensor, at::Tensor> ddpm_step_cuda(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& t,
                                                  const at::Tensor& table, const at::Tensor& seed,
                                                  const at::Tensor& offset, bool return_y0);
std::tuple<at::Tensor, at::Tensor> ddim_step_cuda(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& t,
                                                  const at::Tensor& s, const at::Tensor& table, const at::Tensor& seed,
                                                  const at::Tensor& offset, double eta, bool return_y0);
at::Tensor predict_y0_cuda(const at::Tensor& logits, const at::Tensor& y_t);
at::Tensor loss_cuda(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& y0, const at::Tensor& t,
                     const at::Tensor& table);
at::Tensor loss_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& y_t,
                              const at::Tensor& y0, const at::Tensor& t, const at::Tensor& table);

}  // namespace berdiff

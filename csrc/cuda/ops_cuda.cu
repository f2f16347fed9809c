// CUDA drivers of the berdiff ops: set the device guard, the shared host setup (op_setup.h),
// launch on the current stream. Only c10/cuda headers (ATen/cuda/CUDAContext.h needs cuBLAS headers this toolkit lacks).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../op_setup.h"
#include "../ops.h"
#include "berdiff_kernels.cuh"

namespace berdiff {
namespace {

void check_cuda(const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), name, ": expected a CUDA tensor, got one on ", x.device());
}

cudaStream_t stream_of(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> q_sample_cuda(const at::Tensor& y0, const at::Tensor& t, const at::Tensor& table,
                                                 const at::Tensor& seed, const at::Tensor& offset) {
  check_cuda("y0", y0);
  const c10::cuda::CUDAGuard guard(y0.device());
  setup::QSample p = setup::q_sample(y0, t, table, seed, offset);
  if (p.y0.numel() == 0) return {p.y_t, p.eps};
  if (p.a.compute == Dtype::F64) {
    cuda::launch_q_sample<double>(p.a, stream_of(p.y0));
  } else {
    cuda::launch_q_sample<float>(p.a, stream_of(p.y0));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {p.y_t, p.eps};
}

void init_noise_cuda(at::Tensor& out, const at::Tensor& seed, const at::Tensor& offset) {
  check_cuda("out", out);
  const c10::cuda::CUDAGuard guard(out.device());
  const OpArgs a = setup::init_noise(out, seed, offset);
  const int64_t n = out.numel();
  if (n == 0) return;
  cuda::launch_init_noise(a, n, stream_of(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

std::tuple<at::Tensor, at::Tensor> step_cuda(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& t,
                                             const at::Tensor* s, const at::Tensor& table, const at::Tensor& seed,
                                             const at::Tensor& offset, double eta, bool return_y0) {
  check_cuda("y_t", y_t);
  const c10::cuda::CUDAGuard guard(y_t.device());
  setup::Step p = setup::step(logits, y_t, t, s, table, seed, offset, eta, return_y0);
  if (p.y_t.numel() == 0) return {p.y, p.y0_hat};
  if (p.a.compute == Dtype::F64) {
    cuda::launch_step<double>(p.a, s != nullptr, stream_of(p.y_t));
  } else {
    cuda::launch_step<float>(p.a, s != nullptr, stream_of(p.y_t));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {p.y, p.y0_hat};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ddpm_step_cuda(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& t,
                                                  const at::Tensor& table, const at::Tensor& seed,
                                                  const at::Tensor& offset, bool return_y0) {
  return step_cuda(logits, y_t, t, nullptr, table, seed, offset, 1.0, return_y0);
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cuda(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& t,
                                                  const at::Tensor& s, const at::Tensor& table, const at::Tensor& seed,
                                                  const at::Tensor& offset, double eta, bool return_y0) {
  return step_cuda(logits, y_t, t, &s, table, seed, offset, eta, return_y0);
}

at::Tensor predict_y0_cuda(const at::Tensor& logits, const at::Tensor& y_t) {
  check_cuda("y_t", y_t);
  const c10::cuda::CUDAGuard guard(y_t.device());
  setup::PredictY0 p = setup::predict_y0(logits, y_t);
  const int64_t n = p.y_t.numel();
  if (n == 0) return p.out;
  if (p.a.compute == Dtype::F64) {
    cuda::launch_predict_y0<double>(p.a, n, stream_of(p.y_t));
  } else {
    cuda::launch_predict_y0<float>(p.a, n, stream_of(p.y_t));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p.out;
}

at::Tensor loss_cuda(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& y0, const at::Tensor& t,
                     const at::Tensor& table) {
  check_cuda("y_t", y_t);
  const c10::cuda::CUDAGuard guard(y_t.device());
  setup::Loss in = setup::loss(logits, y_t, y0, t, table);
  at::Tensor out = setup::loss_forward(in);
  if (in.a.batch == 0) return out;
  at::Tensor partials = at::empty({in.a.batch, cuda::loss_slices(in.a)}, in.y_t.options().dtype(at::kDouble));
  if (in.cd == at::kDouble) {
    cuda::launch_loss<double>(in.a, partials.data_ptr<double>(), stream_of(in.y_t));
  } else {
    cuda::launch_loss<float>(in.a, partials.data_ptr<double>(), stream_of(in.y_t));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor loss_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& y_t,
                              const at::Tensor& y0, const at::Tensor& t, const at::Tensor& table) {
  check_cuda("y_t", y_t);
  const c10::cuda::CUDAGuard guard(y_t.device());
  setup::Loss in = setup::loss(logits, y_t, y0, t, table);
  at::Tensor out = setup::loss_backward(in, grad);
  if (in.logits.numel() == 0) return out;
  if (in.cd == at::kDouble) {
    cuda::launch_loss_backward<double>(in.a, stream_of(in.y_t));
  } else {
    cuda::launch_loss_backward<float>(in.a, stream_of(in.y_t));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace berdiff

// CUDA drivers of the berdiff ops: check, allocate, set the device guard, launch on the current
// stream. Only c10/cuda headers (ATen/cuda/CUDAContext.h needs cuBLAS headers this toolkit lacks).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../op_checks.h"
#include "../ops.h"
#include "berdiff_kernels.cuh"

namespace berdiff {
namespace {

at::Tensor empty_like_contig(const at::Tensor& x, at::ScalarType dtype) {
  return at::empty(x.sizes(), x.options().dtype(dtype));
}

void check_cuda(const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), name, ": expected a CUDA tensor, got one on ", x.device());
}

cudaStream_t stream_of(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> q_sample_cuda(const at::Tensor& y0_in, const at::Tensor& t_in,
                                                 const at::Tensor& table_in, const at::Tensor& seed,
                                                 const at::Tensor& offset) {
  check_cuda("y0", y0_in);
  const at::Device dev = y0_in.device();
  checks::mask("y0", y0_in, dev);
  checks::times("t", t_in, y0_in.size(0), dev);
  checks::table(table_in, dev);
  checks::rng_key("seed", seed, dev);
  checks::rng_key("offset", offset, dev);
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor y0 = y0_in.contiguous(), t = t_in.contiguous(), table = table_in.contiguous();
  at::Tensor y_t = empty_like_contig(y0, y0.scalar_type()), eps = empty_like_contig(y0, y0.scalar_type());
  const int64_t n = y0.numel();
  if (n == 0) return {y_t, eps};
  OpArgs a;
  a.y = y0.data_ptr();
  a.y_dtype = checks::storage_dtype(y0.scalar_type());
  a.out = y_t.data_ptr();
  a.out2 = eps.data_ptr();
  a.out_dtype = a.out2_dtype = a.y_dtype;
  a.compute = checks::storage_dtype(checks::compute_type({&y0}));
  a.t = t.data_ptr<int64_t>();
  checks::set_table(a, table);
  checks::set_shape(a, y0);
  checks::set_rng(a, seed, offset);
  if (a.compute == Dtype::F64) {
    cuda::launch_q_sample<double>(a, stream_of(y0));
  } else {
    cuda::launch_q_sample<float>(a, stream_of(y0));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y_t, eps};
}

void init_noise_cuda(at::Tensor& out, const at::Tensor& seed, const at::Tensor& offset) {
  check_cuda("out", out);
  const at::Device dev = out.device();
  const auto st = out.scalar_type();
  TORCH_CHECK(st == at::kBool || st == at::kByte || st == at::kHalf || st == at::kBFloat16 || st == at::kFloat ||
                  st == at::kDouble,
              "out: expected a mask dtype (bool, uint8, float16, bfloat16, float32, float64), got ", st);
  TORCH_CHECK(out.is_contiguous(), "out: expected a contiguous tensor (the draw follows its flat index)");
  checks::rng_key("seed", seed, dev);
  checks::rng_key("offset", offset, dev);
  const c10::cuda::CUDAGuard guard(dev);
  const int64_t n = out.numel();
  if (n == 0) return;
  OpArgs a;
  a.out = out.data_ptr();
  a.out_dtype = checks::storage_dtype(st);
  checks::set_rng(a, seed, offset);
  cuda::launch_init_noise(a, n, stream_of(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

std::tuple<at::Tensor, at::Tensor> step_cuda(const at::Tensor& logits_in, const at::Tensor& y_t_in,
                                             const at::Tensor& t_in, const at::Tensor* s_in,
                                             const at::Tensor& table_in, const at::Tensor& seed,
                                             const at::Tensor& offset, double eta, bool return_y0) {
  check_cuda("y_t", y_t_in);
  const at::Device dev = y_t_in.device();
  checks::mask("y_t", y_t_in, dev);
  checks::logits(logits_in, y_t_in);
  checks::times("t", t_in, y_t_in.size(0), dev);
  if (s_in != nullptr) checks::times("s", *s_in, y_t_in.size(0), dev);
  checks::table(table_in, dev);
  checks::rng_key("seed", seed, dev);
  checks::rng_key("offset", offset, dev);
  TORCH_CHECK(eta >= 0.0 && eta <= 1.0, "eta: expected a number in [0, 1], got ", eta);
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor logits = logits_in.contiguous(), y_t = y_t_in.contiguous(), t = t_in.contiguous(),
                   table = table_in.contiguous();
  const at::Tensor s = s_in != nullptr ? s_in->contiguous() : at::Tensor();
  const at::ScalarType cd = checks::compute_type({&logits, &y_t});
  at::Tensor y = empty_like_contig(y_t, y_t.scalar_type());
  at::Tensor y0_hat = return_y0 ? empty_like_contig(y_t, cd) : at::empty({0}, y_t.options().dtype(cd));
  const int64_t n = y_t.numel();
  if (n == 0) return {y, y0_hat};
  OpArgs a;
  a.logits = logits.data_ptr();
  a.logits_dtype = checks::storage_dtype(logits.scalar_type());
  a.y = y_t.data_ptr();
  a.y_dtype = checks::storage_dtype(y_t.scalar_type());
  a.out = y.data_ptr();
  a.out_dtype = a.y_dtype;
  a.out2 = return_y0 ? y0_hat.data_ptr() : nullptr;
  a.out2_dtype = checks::storage_dtype(cd);
  a.compute = checks::storage_dtype(cd);
  a.t = t.data_ptr<int64_t>();
  a.s = s_in != nullptr ? s.data_ptr<int64_t>() : nullptr;
  a.eta = eta;
  checks::set_table(a, table);
  checks::set_shape(a, y_t);
  checks::set_rng(a, seed, offset);
  if (cd == at::kDouble) {
    cuda::launch_step<double>(a, s_in != nullptr, stream_of(y_t));
  } else {
    cuda::launch_step<float>(a, s_in != nullptr, stream_of(y_t));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, y0_hat};
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

at::Tensor predict_y0_cuda(const at::Tensor& logits_in, const at::Tensor& y_t_in) {
  check_cuda("y_t", y_t_in);
  checks::mask("y_t", y_t_in, y_t_in.device());
  checks::logits(logits_in, y_t_in);
  const c10::cuda::CUDAGuard guard(y_t_in.device());
  const at::Tensor logits = logits_in.contiguous(), y_t = y_t_in.contiguous();
  const at::ScalarType cd = checks::compute_type({&logits, &y_t});
  at::Tensor out = empty_like_contig(y_t, cd);
  const int64_t n = y_t.numel();
  if (n == 0) return out;
  OpArgs a;
  a.logits = logits.data_ptr();
  a.logits_dtype = checks::storage_dtype(logits.scalar_type());
  a.y = y_t.data_ptr();
  a.y_dtype = checks::storage_dtype(y_t.scalar_type());
  a.out = out.data_ptr();
  a.out_dtype = a.compute = checks::storage_dtype(cd);
  checks::set_shape(a, y_t);
  if (cd == at::kDouble) {
    cuda::launch_predict_y0<double>(a, n, stream_of(y_t));
  } else {
    cuda::launch_predict_y0<float>(a, n, stream_of(y_t));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

namespace {

struct LossInputs {
  at::Tensor logits, y_t, y0, t, table;
  at::ScalarType cd;
  OpArgs a;
};

LossInputs loss_inputs(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& y0, const at::Tensor& t,
                       const at::Tensor& table) {
  check_cuda("y_t", y_t);
  const at::Device dev = y_t.device();
  checks::mask("y_t", y_t, dev);
  checks::mask("y0", y0, dev);
  checks::same_shape("y0", y0, y_t);
  checks::logits(logits, y_t);
  checks::times("t", t, y_t.size(0), dev);
  checks::table(table, dev);
  LossInputs in{logits.contiguous(), y_t.contiguous(), y0.contiguous(), t.contiguous(), table.contiguous(),
                checks::compute_type({&logits, &y_t, &y0}), OpArgs()};
  OpArgs& a = in.a;
  a.logits = in.logits.data_ptr();
  a.logits_dtype = checks::storage_dtype(in.logits.scalar_type());
  a.y = in.y_t.data_ptr();
  a.y_dtype = checks::storage_dtype(in.y_t.scalar_type());
  a.y0 = in.y0.data_ptr();
  a.y0_dtype = checks::storage_dtype(in.y0.scalar_type());
  a.compute = checks::storage_dtype(in.cd);
  a.t = in.t.data_ptr<int64_t>();
  checks::set_table(a, in.table);
  checks::set_shape(a, in.y_t);
  return in;
}

}  // namespace

at::Tensor loss_cuda(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& y0, const at::Tensor& t,
                     const at::Tensor& table) {
  const c10::cuda::CUDAGuard guard(y_t.device());
  LossInputs in = loss_inputs(logits, y_t, y0, t, table);
  OpArgs& a = in.a;
  at::Tensor out = at::empty({a.batch}, in.y_t.options().dtype(in.cd));
  if (a.batch == 0) return out;
  a.out = out.data_ptr();
  a.out_dtype = checks::storage_dtype(in.cd);
  at::Tensor partials = at::empty({a.batch, cuda::loss_slices(a)}, in.y_t.options().dtype(at::kDouble));
  if (in.cd == at::kDouble) {
    cuda::launch_loss<double>(a, partials.data_ptr<double>(), stream_of(in.y_t));
  } else {
    cuda::launch_loss<float>(a, partials.data_ptr<double>(), stream_of(in.y_t));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor loss_backward_cuda(const at::Tensor& grad_in, const at::Tensor& logits, const at::Tensor& y_t,
                              const at::Tensor& y0, const at::Tensor& t, const at::Tensor& table) {
  const c10::cuda::CUDAGuard guard(y_t.device());
  LossInputs in = loss_inputs(logits, y_t, y0, t, table);
  OpArgs& a = in.a;
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == a.batch, "grad: expected shape [", a.batch, "], got ",
              grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat || grad_in.scalar_type() == at::kDouble,
              "grad: expected float32 or float64, got ", grad_in.scalar_type());
  TORCH_CHECK(grad_in.device() == in.y_t.device(), "grad: on ", grad_in.device(), ", expected ", in.y_t.device());
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor out = empty_like_contig(in.logits, in.logits.scalar_type());
  const int64_t n = in.logits.numel();
  if (n == 0) return out;
  a.grad = grad.data_ptr();
  a.grad_dtype = checks::storage_dtype(grad.scalar_type());
  a.out = out.data_ptr();
  a.out_dtype = a.logits_dtype;
  if (in.cd == at::kDouble) {
    cuda::launch_loss_backward<double>(a, stream_of(in.y_t));
  } else {
    cuda::launch_loss_backward<float>(a, stream_of(in.y_t));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace berdiff

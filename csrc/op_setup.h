// The host side of every op, the same on each device: check the arguments, make the inputs
// contiguous, allocate the outputs and fill OpArgs. A driver (cpu/ops_cpu.cpp,
// cuda/ops_cuda.cu) adds its device's own checks and launches. Each struct owns the contiguous
// tensors whose pointers its OpArgs holds, so they live as long as the launch needs them.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "op_checks.h"

namespace berdiff {
namespace setup {

inline at::Tensor empty_like_contig(const at::Tensor& x, at::ScalarType dtype) {
  return at::empty(x.sizes(), x.options().dtype(dtype));
}

// The network output and the mask it was computed from: the inputs of the steps and the loss.
inline void set_logits_and_mask(OpArgs& a, const at::Tensor& logits, const at::Tensor& y_t) {
  a.logits = logits.data_ptr();
  a.logits_dtype = checks::storage_dtype(logits.scalar_type());
  a.y = y_t.data_ptr();
  a.y_dtype = checks::storage_dtype(y_t.scalar_type());
}

struct QSample {
  at::Tensor y0, t, table, y_t, eps;
  OpArgs a;
};

inline QSample q_sample(const at::Tensor& y0_in, const at::Tensor& t_in, const at::Tensor& table_in,
                        const at::Tensor& seed, const at::Tensor& offset) {
  const at::Device dev = y0_in.device();
  checks::mask("y0", y0_in, dev);
  checks::times("t", t_in, y0_in.size(0), dev);
  checks::table(table_in, dev, 1);
  checks::rng_key("seed", seed, dev);
  checks::rng_key("offset", offset, dev);
  QSample p{y0_in.contiguous(), t_in.contiguous(), table_in.contiguous(), {}, {}, OpArgs()};
  p.y_t = empty_like_contig(p.y0, p.y0.scalar_type());
  p.eps = empty_like_contig(p.y0, p.y0.scalar_type());
  OpArgs& a = p.a;
  a.y = p.y0.data_ptr();
  a.y_dtype = checks::storage_dtype(p.y0.scalar_type());
  a.out = p.y_t.data_ptr();
  a.out2 = p.eps.data_ptr();
  a.out_dtype = a.out2_dtype = a.y_dtype;
  a.compute = checks::storage_dtype(checks::compute_type({&p.y0}));
  a.t = p.t.data_ptr<int64_t>();
  checks::set_table(a, p.table);
  checks::set_shape(a, p.y0);
  checks::set_rng(a, seed, offset);
  return p;
}

// init_noise_ writes into `out` in place: nothing to allocate.
inline OpArgs init_noise(at::Tensor& out, const at::Tensor& seed, const at::Tensor& offset) {
  const at::Device dev = out.device();
  const auto st = out.scalar_type();
  TORCH_CHECK(checks::is_mask_dtype(st),
              "out: expected a mask dtype (bool, uint8, float16, bfloat16, float32, float64), got ", st);
  TORCH_CHECK(out.is_contiguous(), "out: expected a contiguous tensor (the draw follows its flat index)");
  checks::rng_key("seed", seed, dev);
  checks::rng_key("offset", offset, dev);
  OpArgs a;
  a.out = out.data_ptr();
  a.out_dtype = checks::storage_dtype(st);
  checks::set_rng(a, seed, offset);
  return a;
}

// Both sampling steps: DDIM when s is given, else DDPM.
struct Step {
  at::Tensor logits, y_t, t, s, table, y, y0_hat;
  OpArgs a;
};

inline Step step(const at::Tensor& logits_in, const at::Tensor& y_t_in, const at::Tensor& t_in,
                 const at::Tensor* s_in, const at::Tensor& table_in, const at::Tensor& seed,
                 const at::Tensor& offset, double eta, bool return_y0) {
  const at::Device dev = y_t_in.device();
  checks::mask("y_t", y_t_in, dev);
  checks::logits(logits_in, y_t_in);
  checks::times("t", t_in, y_t_in.size(0), dev);
  if (s_in != nullptr) checks::times("s", *s_in, y_t_in.size(0), dev);
  checks::table(table_in, dev, 2);
  checks::rng_key("seed", seed, dev);
  checks::rng_key("offset", offset, dev);
  TORCH_CHECK(eta >= 0.0 && eta <= 1.0, "eta: expected a number in [0, 1], got ", eta);
  Step p{logits_in.contiguous(), y_t_in.contiguous(), t_in.contiguous(),
         s_in != nullptr ? s_in->contiguous() : at::Tensor(), table_in.contiguous(), {}, {}, OpArgs()};
  const at::ScalarType cd = checks::compute_type({&p.logits, &p.y_t});
  p.y = empty_like_contig(p.y_t, p.y_t.scalar_type());
  p.y0_hat = return_y0 ? empty_like_contig(p.y_t, cd) : at::empty({0}, p.y_t.options().dtype(cd));
  OpArgs& a = p.a;
  set_logits_and_mask(a, p.logits, p.y_t);
  a.out = p.y.data_ptr();
  a.out_dtype = a.y_dtype;
  a.out2 = return_y0 ? p.y0_hat.data_ptr() : nullptr;
  a.out2_dtype = checks::storage_dtype(cd);
  a.compute = checks::storage_dtype(cd);
  a.t = p.t.data_ptr<int64_t>();
  a.s = s_in != nullptr ? p.s.data_ptr<int64_t>() : nullptr;
  a.eta = eta;
  checks::set_table(a, p.table);
  checks::set_shape(a, p.y_t);
  checks::set_rng(a, seed, offset);
  return p;
}

struct PredictY0 {
  at::Tensor logits, y_t, out;
  OpArgs a;
};

inline PredictY0 predict_y0(const at::Tensor& logits_in, const at::Tensor& y_t_in) {
  checks::mask("y_t", y_t_in, y_t_in.device());
  checks::logits(logits_in, y_t_in);
  PredictY0 p{logits_in.contiguous(), y_t_in.contiguous(), {}, OpArgs()};
  const at::ScalarType cd = checks::compute_type({&p.logits, &p.y_t});
  p.out = empty_like_contig(p.y_t, cd);
  OpArgs& a = p.a;
  set_logits_and_mask(a, p.logits, p.y_t);
  a.out = p.out.data_ptr();
  a.out_dtype = a.compute = checks::storage_dtype(cd);
  checks::set_shape(a, p.y_t);
  return p;
}

// The loss's inputs; loss_forward / loss_backward add the outputs.
struct Loss {
  at::Tensor logits, y_t, y0, t, table, grad;
  at::ScalarType cd;
  OpArgs a;
};

inline Loss loss(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& y0, const at::Tensor& t,
                 const at::Tensor& table) {
  const at::Device dev = y_t.device();
  checks::mask("y_t", y_t, dev);
  checks::mask("y0", y0, dev);
  checks::same_shape("y0", y0, y_t);
  checks::logits(logits, y_t);
  checks::times("t", t, y_t.size(0), dev);
  checks::table(table, dev, 2);
  Loss p{logits.contiguous(), y_t.contiguous(), y0.contiguous(), t.contiguous(), table.contiguous(), at::Tensor(),
         checks::compute_type({&logits, &y_t, &y0}), OpArgs()};
  OpArgs& a = p.a;
  set_logits_and_mask(a, p.logits, p.y_t);
  a.y0 = p.y0.data_ptr();
  a.y0_dtype = checks::storage_dtype(p.y0.scalar_type());
  a.compute = checks::storage_dtype(p.cd);
  a.t = p.t.data_ptr<int64_t>();
  checks::set_table(a, p.table);
  checks::set_shape(a, p.y_t);
  return p;
}

// The per-sample loss [B], in the compute dtype.
inline at::Tensor loss_forward(Loss& p) {
  at::Tensor out = at::empty({p.a.batch}, p.y_t.options().dtype(p.cd));
  p.a.out = out.data_ptr();
  p.a.out_dtype = checks::storage_dtype(p.cd);
  return out;
}

// dL/dlogits, shaped and typed like the logits, for the incoming gradient `grad_in` [B].
inline at::Tensor loss_backward(Loss& p, const at::Tensor& grad_in) {
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == p.a.batch, "grad: expected shape [", p.a.batch, "], got ",
              grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat || grad_in.scalar_type() == at::kDouble,
              "grad: expected float32 or float64, got ", grad_in.scalar_type());
  TORCH_CHECK(grad_in.device() == p.y_t.device(), "grad: on ", grad_in.device(), ", expected ", p.y_t.device());
  p.grad = grad_in.contiguous();
  at::Tensor out = empty_like_contig(p.logits, p.logits.scalar_type());
  p.a.grad = p.grad.data_ptr();
  p.a.grad_dtype = checks::storage_dtype(p.grad.scalar_type());
  p.a.out = out.data_ptr();
  p.a.out_dtype = p.a.logits_dtype;
  return out;
}

}  // namespace setup
}  // namespace berdiff

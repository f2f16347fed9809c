// Argument checks and OpArgs filling shared by the CPU and CUDA drivers (ATen side).
// Every failure is a TORCH_CHECK naming the argument and saying what was expected.
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>

#include "kernel_args.h"

namespace berdiff {
namespace checks {

inline Dtype storage_dtype(at::ScalarType st) {
  switch (st) {
    case at::kBool: return Dtype::Bool;
    case at::kByte: return Dtype::U8;
    case at::kHalf: return Dtype::F16;
    case at::kBFloat16: return Dtype::BF16;
    case at::kFloat: return Dtype::F32;
    case at::kDouble: return Dtype::F64;
    default: TORCH_CHECK(false, "internal: no storage dtype for ", st, " (the op's checks should have refused it)");
  }
}

inline at::ScalarType compute_type(std::initializer_list<const at::Tensor*> xs) {
  for (const at::Tensor* x : xs) {
    if (x->scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

// The dtypes a mask is stored in: bool, uint8, float16, bfloat16, float32, float64.
inline bool is_mask_dtype(at::ScalarType st) {
  return st == at::kBool || st == at::kByte || st == at::kHalf || st == at::kBFloat16 || st == at::kFloat ||
         st == at::kDouble;
}

// A mask: bool, uint8, float16, bfloat16, float32 or float64, on `device`, at least 1-D.
inline void mask(const char* name, const at::Tensor& x, const at::Device& device) {
  const auto st = x.scalar_type();
  TORCH_CHECK(is_mask_dtype(st), name,
              ": expected a mask of dtype bool, uint8, float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(x.dim() >= 1, name, ": expected shape [B, ...], got a 0-dim tensor");
  TORCH_CHECK(x.device() == device, name, ": on ", x.device(), ", expected ", device);
}

inline void logits(const at::Tensor& x, const at::Tensor& like) {
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
              "logits: expected float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(x.device() == like.device(), "logits: on ", x.device(), ", but the masks are on ", like.device());
  TORCH_CHECK(x.sizes() == like.sizes(), "logits: shape ", x.sizes(), " differs from the mask's ", like.sizes(),
              " (nothing is broadcast)");
}

inline void same_shape(const char* name, const at::Tensor& x, const at::Tensor& like) {
  TORCH_CHECK(x.sizes() == like.sizes(), name, ": shape ", x.sizes(), " differs from ", like.sizes(),
              " (nothing is broadcast)");
}

// The schedule rows: [T + 1, 4] float32 or float64 on `device`, at least `min_rows` of them (the
// steps and the loss read rows t and t - 1 with t >= 1: two; the CUDA kernels clamp t into the
// table, which needs those rows to exist).
inline void table(const at::Tensor& x, const at::Device& device, int64_t min_rows) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 4 && x.size(0) >= min_rows, "table: expected the schedule's [T + 1, 4] rows",
              min_rows > 1 ? " with T >= 1" : "", " (NoiseSchedule.table()), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "table: expected float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.device() == device, "table: on ", x.device(), ", expected ", device);
}

// Paper times: int64 [B] on `device`.
inline void times(const char* name, const at::Tensor& x, int64_t batch, const at::Device& device) {
  TORCH_CHECK(x.scalar_type() == at::kLong, name, ": expected int64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == batch, name, ": expected shape [", batch, "] (one per sample), got ",
              x.sizes());
  TORCH_CHECK(x.device() == device, name, ": on ", x.device(), ", expected ", device);
}

// A Philox seed or offset: a one-element int64 tensor on the CPU or on `device`.
inline void rng_key(const char* name, const at::Tensor& x, const at::Device& device) {
  TORCH_CHECK(x.scalar_type() == at::kLong && x.numel() == 1, name,
              ": expected a one-element int64 tensor, got ", x.scalar_type(), " of shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu() || x.device() == device, name, ": on ", x.device(), ", expected the CPU or ",
              device);
}

// Fill seed/offset: a CPU tensor's value, or (device tensors) a pointer the kernel reads.
inline void set_rng(OpArgs& a, const at::Tensor& seed, const at::Tensor& offset) {
  if (seed.device().is_cpu()) {
    a.seed = static_cast<uint64_t>(seed.item<int64_t>());
  } else {
    a.seed_ptr = seed.data_ptr<int64_t>();
  }
  if (offset.device().is_cpu()) {
    a.offset = static_cast<uint64_t>(offset.item<int64_t>());
  } else {
    a.offset_ptr = offset.data_ptr<int64_t>();
  }
}

inline void set_table(OpArgs& a, const at::Tensor& table) {
  a.table = table.data_ptr();
  a.table_dtype = storage_dtype(table.scalar_type());
  a.table_rows = table.size(0);
}

inline void set_shape(OpArgs& a, const at::Tensor& x) {
  a.batch = x.size(0);
  a.npix = a.batch == 0 ? 0 : x.numel() / a.batch;
}

}  // namespace checks
}  // namespace berdiff

// What a kernel (CPU or CUDA) receives: raw pointers, storage dtypes, schedule rows.
// Torch-free, like berdiff_math.h, so the CMake core build and the pure-CUDA kernels use it.
#pragma once

#include <stdint.h>

#include "berdiff_math.h"

namespace berdiff {

// Storage types of the tensors the ops read and write (Bool is one byte holding 0 or 1).
enum class Dtype : int32_t { Bool, U8, F16, BF16, F32, F64 };

// ---- storage conversions: bit-exact, branch-free, host and device ----------------------------

BERDIFF_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays NaN.
BERDIFF_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

// IEEE half <-> float as in the FP16 library (Marat Dukhan, MIT), which c10 uses too.
BERDIFF_HD float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_float(sign | (two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized)));
}

BERDIFF_HD uint16_t float_to_half(float f) {
  float base = (abs_(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// Element i of a tensor of storage type d, as T.
template <typename T>
BERDIFF_HD T load_as(const void* p, Dtype d, int64_t i) {
  switch (d) {
    case Dtype::Bool:
    case Dtype::U8: return static_cast<T>(static_cast<const uint8_t*>(p)[i]);
    case Dtype::F16: return static_cast<T>(half_to_float(static_cast<const uint16_t*>(p)[i]));
    case Dtype::BF16: return static_cast<T>(bf16_to_float(static_cast<const uint16_t*>(p)[i]));
    case Dtype::F32: return static_cast<T>(static_cast<const float*>(p)[i]);
    default: return static_cast<T>(static_cast<const double*>(p)[i]);
  }
}

template <typename T>
BERDIFF_HD void store_as(void* p, Dtype d, int64_t i, T v) {
  switch (d) {
    case Dtype::Bool: static_cast<uint8_t*>(p)[i] = v != T(0); break;
    case Dtype::U8: static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v); break;
    case Dtype::F16: static_cast<uint16_t*>(p)[i] = float_to_half(static_cast<float>(v)); break;
    case Dtype::BF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(static_cast<float>(v)); break;
    case Dtype::F32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    default: static_cast<double*>(p)[i] = static_cast<double>(v); break;
  }
}

// Columns of the schedule table (berdiff_fast.schedule.COL_*): one row per paper time t.
enum TableCol : int { kColAlpha = 0, kColBetaHalf = 1, kColAlphaBar = 2, kColFlip = 3 };

// Arguments of every op; a field an op does not use stays null / zero.
struct OpArgs {
  const void* logits = nullptr;  // [B, ...] network output
  Dtype logits_dtype = Dtype::F32;
  const void* y = nullptr;  // [B, ...] the mask read: y_t (steps, loss) or y_0 (q_sample)
  Dtype y_dtype = Dtype::F32;
  const void* y0 = nullptr;  // [B, ...] loss: the clean mask
  Dtype y0_dtype = Dtype::F32;
  const void* grad = nullptr;  // [B] loss backward: d(out)/d(loss[b])
  Dtype grad_dtype = Dtype::F32;
  void* out = nullptr;  // [B, ...] the mask drawn, y0_hat (predict_y0), dlogits; [B] the loss
  Dtype out_dtype = Dtype::F32;
  void* out2 = nullptr;  // [B, ...] q_sample: eps; steps: y0_hat when requested, else null
  Dtype out2_dtype = Dtype::F32;
  const void* table = nullptr;  // [T + 1, 4] schedule rows (alpha, beta/2, alpha_bar, flip)
  Dtype table_dtype = Dtype::F32;
  int64_t table_rows = 0;      // T + 1
  const int64_t* t = nullptr;  // [B] paper time of each sample
  const int64_t* s = nullptr;  // [B] DDIM target time
  Dtype compute = Dtype::F32;  // F32, or F64 when an input is float64
  int64_t batch = 0;           // B
  int64_t npix = 0;            // elements per sample
  double eta = 1.0;
  // The Philox key and first counter: read from device memory where the pointer is set (so a
  // captured CUDA graph draws fresh numbers on replay), else the value.
  const int64_t* seed_ptr = nullptr;
  const int64_t* offset_ptr = nullptr;
  uint64_t seed = 0, offset = 0;
};

template <typename T>
BERDIFF_HD T table_at(const OpArgs& a, int64_t row, int col) {
  return load_as<T>(a.table, a.table_dtype, row * 4 + col);
}

template <typename T>
BERDIFF_HD PosteriorCoef<T> posterior_coef(const OpArgs& a, int64_t t) {
  return PosteriorCoef<T>{table_at<T>(a, t, kColAlpha), table_at<T>(a, t, kColBetaHalf),
                          table_at<T>(a, t - 1, kColAlphaBar), table_at<T>(a, t - 1, kColFlip)};
}

template <typename T>
BERDIFF_HD DdimCoef<T> ddim_coef_at(const OpArgs& a, int64_t t, int64_t s) {
  return ddim_coef(table_at<T>(a, t, kColAlphaBar), table_at<T>(a, t, kColFlip),
                   table_at<T>(a, s, kColAlphaBar), table_at<T>(a, s, kColFlip), static_cast<T>(a.eta));
}

}  // namespace berdiff

// The CUDA kernels of the berdiff ops. Pure CUDA: no torch header, so the standalone CMake
// build compiles them too; ops_cuda.cu launches them on torch's current stream.
//
// One thread per element (grid-stride loops), computing in T (float, or double for float64
// inputs) with the formulas of berdiff_math.h. The Philox key and counter are read from device
// memory when OpArgs carries pointers, so a captured CUDA graph draws fresh numbers on replay
// after the caller advances the offset tensor. Paper times are clamped into the table's range
// (the CPU checks them; a device-side check would need a synchronisation).
#pragma once

#include <stdint.h>

#include "../kernel_args.h"

namespace berdiff {
namespace cuda {

constexpr int kThreads = 256;      // elementwise kernels
constexpr int kLossThreads = 512;  // the loss: one block per sample

__device__ __forceinline__ uint64_t rng_word(const int64_t* ptr, uint64_t value) {
  return ptr != nullptr ? static_cast<uint64_t>(*ptr) : value;
}

__device__ __forceinline__ int64_t clamp_time(int64_t t, int64_t lo, int64_t rows) {
  return t < lo ? lo : (t >= rows ? rows - 1 : t);
}

__device__ __forceinline__ int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// Algorithm 1: eps = u < flip[t], y_t = y0 XOR eps.
template <typename T>
__global__ void q_sample_kernel(OpArgs a, int64_t n) {
  const uint64_t seed = rng_word(a.seed_ptr, a.seed), offset = rng_word(a.offset_ptr, a.offset);
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const int64_t t = clamp_time(a.t[i / a.npix], 0, a.table_rows);
    const T eps = bernoulli(philox_uniform(seed, offset + static_cast<uint64_t>(i)), table_at<T>(a, t, kColFlip));
    store_as<T>(a.out, a.out_dtype, i, abs_(load_as<T>(a.y, a.y_dtype, i) - eps));
    store_as<T>(a.out2, a.out2_dtype, i, eps);
  }
}

// y_T = u < 1/2.
__global__ void init_noise_kernel(OpArgs a, int64_t n) {
  const uint64_t seed = rng_word(a.seed_ptr, a.seed), offset = rng_word(a.offset_ptr, a.offset);
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    store_as<float>(a.out, a.out_dtype, i, bernoulli(philox_uniform(seed, offset + static_cast<uint64_t>(i)), 0.5f));
  }
}

// Algorithm 2, one step: y = u < p(y_t, y0_hat), y0_hat = |y_t - sigmoid(l)| stored when asked.
// kDdim: the DDIM jump t -> s[b]; else the DDPM step t -> t - 1 (Eq. 7 calibration).
template <typename T, bool kDdim>
__global__ void step_kernel(OpArgs a, int64_t n) {
  const uint64_t seed = rng_word(a.seed_ptr, a.seed), offset = rng_word(a.offset_ptr, a.offset);
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const int64_t b = i / a.npix;
    const int64_t t = clamp_time(a.t[b], 1, a.table_rows);
    const T yt = load_as<T>(a.y, a.y_dtype, i);
    const Y0Hat<T> y0_hat = predict_y0(yt, sigmoids(load_as<T>(a.logits, a.logits_dtype, i)));
    T p;
    if (kDdim) {
      p = ddim_prob(ddim_coef_at<T>(a, t, clamp_time(a.s[b], 0, a.table_rows)), yt, y0_hat.v);
    } else {
      p = calibrate(posterior_coef<T>(a, t), yt, y0_hat);
    }
    store_as<T>(a.out, a.out_dtype, i, bernoulli(philox_uniform(seed, offset + static_cast<uint64_t>(i)), p));
    if (a.out2 != nullptr) store_as<T>(a.out2, a.out2_dtype, i, y0_hat.v);
  }
}

template <typename T>
__global__ void predict_y0_kernel(OpArgs a, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const T yt = load_as<T>(a.y, a.y_dtype, i);
    store_as<T>(a.out, a.out_dtype, i, predict_y0(yt, sigmoids(load_as<T>(a.logits, a.logits_dtype, i))).v);
  }
}

template <typename T>
__device__ __forceinline__ LossCoef<T> loss_coef_of(const OpArgs& a, int64_t b, bool with_entropy) {
  const int64_t t = clamp_time(a.t[b], 1, a.table_rows);
  return loss_coef(posterior_coef<T>(a, t), t == 1, with_entropy);
}

// The loss per sample, in bits: one block per sample, a fixed-order (deterministic) reduction.
template <typename T>
__global__ void __launch_bounds__(kLossThreads) loss_kernel(OpArgs a) {
  __shared__ double warp_sums[kLossThreads / 32];
  const double inv = 1.0 / (static_cast<double>(a.npix) * kLn2);
  for (int64_t b = blockIdx.x; b < a.batch; b += gridDim.x) {
    const LossCoef<T> c = loss_coef_of<T>(a, b, true);
    double acc = 0.0;
    for (int64_t j = threadIdx.x; j < a.npix; j += kLossThreads) {
      const int64_t i = b * a.npix + j;
      acc += static_cast<double>(loss_value(c, load_as<T>(a.logits, a.logits_dtype, i), load_as<T>(a.y, a.y_dtype, i),
                                            load_as<T>(a.y0, a.y0_dtype, i)));
    }
    for (int d = 16; d > 0; d /= 2) acc += __shfl_down_sync(0xFFFFFFFFu, acc, d);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
      acc = threadIdx.x < kLossThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
      for (int d = 16; d > 0; d /= 2) acc += __shfl_down_sync(0xFFFFFFFFu, acc, d);
      if (threadIdx.x == 0) store_as<double>(a.out, a.out_dtype, b, acc * inv);
    }
    __syncthreads();  // warp_sums is reused by the next sample
  }
}

// d(loss)/d(logits) = grad[b] / (npix ln 2) * d(per-pixel loss)/dl.
template <typename T>
__global__ void loss_backward_kernel(OpArgs a, int64_t n) {
  const T inv = static_cast<T>(1.0 / (static_cast<double>(a.npix) * kLn2));
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const int64_t b = i / a.npix;
    const T g = loss_grad(loss_coef_of<T>(a, b, false), load_as<T>(a.logits, a.logits_dtype, i), load_as<T>(a.y, a.y_dtype, i),
                          load_as<T>(a.y0, a.y0_dtype, i));
    store_as<T>(a.out, a.out_dtype, i, load_as<T>(a.grad, a.grad_dtype, b) * inv * g);
  }
}

// ---- launchers (stream: the caller's) -------------------------------------------------------

inline unsigned int blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned int>(b < (int64_t(1) << 20) ? b : (int64_t(1) << 20));  // grid-stride beyond
}

template <typename T>
inline void launch_q_sample(const OpArgs& a, int64_t n, cudaStream_t stream) {
  q_sample_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(a, n);
}
inline void launch_init_noise(const OpArgs& a, int64_t n, cudaStream_t stream) {
  init_noise_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(a, n);
}
template <typename T>
inline void launch_step(const OpArgs& a, int64_t n, bool ddim, cudaStream_t stream) {
  if (ddim) {
    step_kernel<T, true><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(a, n);
  } else {
    step_kernel<T, false><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(a, n);
  }
}
template <typename T>
inline void launch_predict_y0(const OpArgs& a, int64_t n, cudaStream_t stream) {
  predict_y0_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(a, n);
}
template <typename T>
inline void launch_loss(const OpArgs& a, cudaStream_t stream) {
  const unsigned int blocks = static_cast<unsigned int>(a.batch < 65535 ? a.batch : 65535);
  loss_kernel<T><<<blocks, kLossThreads, 0, stream>>>(a);
}
template <typename T>
inline void launch_loss_backward(const OpArgs& a, int64_t n, cudaStream_t stream) {
  loss_backward_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(a, n);
}

}  // namespace cuda
}  // namespace berdiff

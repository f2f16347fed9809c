// The CUDA kernels of the berdiff ops. Pure CUDA: no torch header, so the standalone CMake
// build compiles them too; ops_cuda.cu launches them on torch's current stream.
//
// Ops with per-sample schedule rows put the samples on grid y and a sample's pixels on grid x:
// the sample index needs no 64-bit division per element, and the per-sample coefficients are
// read once per thread. The others are flat grid-stride loops. Arithmetic in T (float, or double
// for float64 inputs) with the formulas of berdiff_math.h. The Philox key and counter are read
// from device memory when OpArgs carries pointers, so a captured CUDA graph draws fresh numbers
// on replay after the caller advances the offset tensor. Paper times are clamped into the
// table's range (the host checks them; a device-side check would need a synchronisation).
#pragma once

#include <stdint.h>

#include "../kernel_args.h"

namespace berdiff {
namespace cuda {

constexpr int kThreads = 256;      // elementwise kernels
constexpr int kLossThreads = 512;  // the loss's first pass

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
__global__ void q_sample_kernel(OpArgs a) {
  const uint64_t seed = rng_word(a.seed_ptr, a.seed), offset = rng_word(a.offset_ptr, a.offset);
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const T flip = table_at<T>(a, clamp_time(a.t[b], 0, a.table_rows), kColFlip);
    for (int64_t i = b * a.npix + first_index(), end = (b + 1) * a.npix; i < end; i += grid_stride()) {
      const T eps = bernoulli(philox_uniform(seed, offset + static_cast<uint64_t>(i)), flip);
      store_as<T>(a.out, a.out_dtype, i, abs_(load_as<T>(a.y, a.y_dtype, i) - eps));
      store_as<T>(a.out2, a.out2_dtype, i, eps);
    }
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
__global__ void step_kernel(OpArgs a) {
  const uint64_t seed = rng_word(a.seed_ptr, a.seed), offset = rng_word(a.offset_ptr, a.offset);
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const int64_t t = clamp_time(a.t[b], 1, a.table_rows);
    const DdimCoef<T> dc = kDdim ? ddim_coef_at<T>(a, t, clamp_time(a.s[b], 0, a.table_rows)) : DdimCoef<T>{};
    const PosteriorCoef<T> pc = kDdim ? PosteriorCoef<T>{} : posterior_coef<T>(a, t);
    for (int64_t i = b * a.npix + first_index(), end = (b + 1) * a.npix; i < end; i += grid_stride()) {
      const T yt = load_as<T>(a.y, a.y_dtype, i);
      const Y0Hat<T> y0_hat = predict_y0(yt, sigmoids(load_as<T>(a.logits, a.logits_dtype, i)));
      const T p = kDdim ? ddim_prob(dc, yt, y0_hat.v) : calibrate(pc, yt, y0_hat);
      store_as<T>(a.out, a.out_dtype, i, bernoulli(philox_uniform(seed, offset + static_cast<uint64_t>(i)), p));
      if (a.out2 != nullptr) store_as<T>(a.out2, a.out2_dtype, i, y0_hat.v);
    }
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

// The loss per sample, in two deterministic passes: block (x, b) sums its slice of sample b
// into partials[b, x] (fixed-order tree), then one warp per sample adds the partials in order.
// The number of slices depends on the image size only, so results never depend on the GPU.
template <typename T>
__global__ void __launch_bounds__(kLossThreads) loss_partial_kernel(OpArgs a, double* partials) {
  __shared__ double warp_sums[kLossThreads / 32];
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const LossCoef<T> c = loss_coef_of<T>(a, b, true);
    double acc = 0.0;
    for (int64_t i = b * a.npix + first_index(), end = (b + 1) * a.npix; i < end; i += grid_stride()) {
      acc += static_cast<double>(loss_value(c, load_as<T>(a.logits, a.logits_dtype, i), load_as<T>(a.y, a.y_dtype, i),
                                            load_as<T>(a.y0, a.y0_dtype, i)));
    }
    for (int d = 16; d > 0; d /= 2) acc += __shfl_down_sync(0xFFFFFFFFu, acc, d);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
      acc = threadIdx.x < kLossThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
      for (int d = 16; d > 0; d /= 2) acc += __shfl_down_sync(0xFFFFFFFFu, acc, d);
      if (threadIdx.x == 0) partials[b * gridDim.x + blockIdx.x] = acc;
    }
    __syncthreads();  // warp_sums is reused by the next sample
  }
}

__global__ void loss_finish_kernel(OpArgs a, const double* partials, int slices) {
  const double inv = 1.0 / (static_cast<double>(a.npix) * kLn2);
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; b < a.batch;
       b += static_cast<int64_t>(gridDim.x) * (blockDim.x / 32)) {
    double acc = 0.0;
    for (int x = threadIdx.x % 32; x < slices; x += 32) acc += partials[b * slices + x];
    for (int d = 16; d > 0; d /= 2) acc += __shfl_down_sync(0xFFFFFFFFu, acc, d);
    if (threadIdx.x % 32 == 0) store_as<double>(a.out, a.out_dtype, b, acc * inv);
  }
}

// d(loss)/d(logits) = grad[b] / (npix ln 2) * d(per-pixel loss)/dl.
template <typename T>
__global__ void loss_backward_kernel(OpArgs a) {
  const T inv = static_cast<T>(1.0 / (static_cast<double>(a.npix) * kLn2));
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const LossCoef<T> c = loss_coef_of<T>(a, b, false);
    const T scale = load_as<T>(a.grad, a.grad_dtype, b) * inv;
    for (int64_t i = b * a.npix + first_index(), end = (b + 1) * a.npix; i < end; i += grid_stride()) {
      const T g = loss_grad(c, load_as<T>(a.logits, a.logits_dtype, i), load_as<T>(a.y, a.y_dtype, i),
                            load_as<T>(a.y0, a.y0_dtype, i));
      store_as<T>(a.out, a.out_dtype, i, scale * g);
    }
  }
}

// ---- launchers (stream: the caller's) -------------------------------------------------------

inline unsigned int blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned int>(b < (int64_t(1) << 20) ? b : (int64_t(1) << 20));  // grid-stride beyond
}

// Grid of a per-sample op: x over a sample's pixels (each thread at least `per_thread` of them),
// y over the samples (grid-stride beyond CUDA's limit of 65535).
inline dim3 sample_grid(const OpArgs& a, int threads, int per_thread = 1) {
  int64_t x = (a.npix + int64_t(threads) * per_thread - 1) / (int64_t(threads) * per_thread);
  x = x < 1 ? 1 : (x < 4096 ? x : 4096);  // >= 1: the loss writes a (NaN) mean for empty samples too
  return dim3(static_cast<unsigned int>(x), static_cast<unsigned int>(a.batch < 65535 ? a.batch : 65535));
}

template <typename T>
inline void launch_q_sample(const OpArgs& a, cudaStream_t stream) {
  q_sample_kernel<T><<<sample_grid(a, kThreads), kThreads, 0, stream>>>(a);
}
inline void launch_init_noise(const OpArgs& a, int64_t n, cudaStream_t stream) {
  init_noise_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(a, n);
}
template <typename T>
inline void launch_step(const OpArgs& a, bool ddim, cudaStream_t stream) {
  if (ddim) {
    step_kernel<T, true><<<sample_grid(a, kThreads), kThreads, 0, stream>>>(a);
  } else {
    step_kernel<T, false><<<sample_grid(a, kThreads), kThreads, 0, stream>>>(a);
  }
}
template <typename T>
inline void launch_predict_y0(const OpArgs& a, int64_t n, cudaStream_t stream) {
  predict_y0_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(a, n);
}

// Slices per sample of the loss's first pass (the size of its partials buffer: batch x slices).
constexpr int kLossPerThread = 8;
inline int loss_slices(const OpArgs& a) { return static_cast<int>(sample_grid(a, kLossThreads, kLossPerThread).x); }

template <typename T>
inline void launch_loss(const OpArgs& a, double* partials, cudaStream_t stream) {
  loss_partial_kernel<T><<<sample_grid(a, kLossThreads, kLossPerThread), kLossThreads, 0, stream>>>(a, partials);
  loss_finish_kernel<<<blocks_for(a.batch * 32, kThreads), kThreads, 0, stream>>>(a, partials, loss_slices(a));
}
template <typename T>
inline void launch_loss_backward(const OpArgs& a, cudaStream_t stream) {
  loss_backward_kernel<T><<<sample_grid(a, kThreads), kThreads, 0, stream>>>(a);
}

}  // namespace cuda
}  // namespace berdiff

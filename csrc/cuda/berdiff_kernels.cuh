// The CUDA kernels of the berdiff ops. Pure CUDA: no torch header, so the standalone CMake
// build compiles them too; ops_cuda.cu launches them on torch's current stream.
//
// Ops with per-sample schedule rows put the samples on grid y and a sample's pixels on grid x:
// the sample index needs no 64-bit division per element, and the per-sample coefficients are
// read once per thread. The others are flat. Every kernel walks its range in tiles of kPerThread
// elements per thread (grid-stride beyond the grid). Arithmetic in T (float, or double for float64
// inputs) with the formulas of berdiff_math.h. The Philox key and counter are read
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
// Elements per thread and tile: each thread issues kPerThread independent loads (and Philox
// chains) before it computes. With one element per thread predict_y0 ran at 49% of an H100's
// copy bandwidth, with four at 73% (benchmarks/RESULTS.md).
constexpr int kPerThread = 4;

__device__ __forceinline__ uint64_t rng_word(const int64_t* ptr, uint64_t value) {
  return ptr != nullptr ? static_cast<uint64_t>(*ptr) : value;
}

__device__ __forceinline__ int64_t clamp_time(int64_t t, int64_t lo, int64_t rows) {
  return t < lo ? lo : (t >= rows ? rows - 1 : t);
}

// ---- tiles: a block's kBlock * kPerThread consecutive elements ---------------------------------
// Thread j of the block holds elements i0 + k * kBlock (k < kPerThread), i0 = tile start + j, so
// each of its loads is coalesced across the warp. The storage-dtype switch runs once per tile;
// inside each case D is a constant, so load_as / store_as fold to one typed access.

template <typename T>
using Regs = T[kPerThread];

// A thread's whole tile in range (all but the last tile of a range) takes unconditional accesses,
// issued back to back; a bounds check per element would put each in its own branch.
template <int kBlock>
__device__ __forceinline__ bool full_tile(int64_t i0, int64_t end) {
  return i0 + (kPerThread - 1) * kBlock < end;
}

template <int kBlock, Dtype D, typename T>
__device__ __forceinline__ void load_tile_as(const void* p, int64_t i0, int64_t end, Regs<T>& v) {
  if (full_tile<kBlock>(i0, end)) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) v[k] = load_as<T>(p, D, i0 + k * kBlock);
  } else {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t i = i0 + k * kBlock;
      v[k] = i < end ? load_as<T>(p, D, i) : T(0);
    }
  }
}
template <int kBlock, typename T>
__device__ __forceinline__ void load_tile(const void* p, Dtype d, int64_t i0, int64_t end, Regs<T>& v) {
  switch (d) {
    case Dtype::Bool:
    case Dtype::U8: load_tile_as<kBlock, Dtype::U8>(p, i0, end, v); break;
    case Dtype::F16: load_tile_as<kBlock, Dtype::F16>(p, i0, end, v); break;
    case Dtype::BF16: load_tile_as<kBlock, Dtype::BF16>(p, i0, end, v); break;
    case Dtype::F32: load_tile_as<kBlock, Dtype::F32>(p, i0, end, v); break;
    default: load_tile_as<kBlock, Dtype::F64>(p, i0, end, v); break;
  }
}

template <int kBlock, Dtype D, typename T>
__device__ __forceinline__ void store_tile_as(void* p, int64_t i0, int64_t end, const Regs<T>& v) {
  if (full_tile<kBlock>(i0, end)) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) store_as<T>(p, D, i0 + k * kBlock, v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t i = i0 + k * kBlock;
      if (i < end) store_as<T>(p, D, i, v[k]);
    }
  }
}
template <int kBlock, typename T>
__device__ __forceinline__ void store_tile(void* p, Dtype d, int64_t i0, int64_t end, const Regs<T>& v) {
  switch (d) {
    case Dtype::Bool: store_tile_as<kBlock, Dtype::Bool>(p, i0, end, v); break;
    case Dtype::U8: store_tile_as<kBlock, Dtype::U8>(p, i0, end, v); break;
    case Dtype::F16: store_tile_as<kBlock, Dtype::F16>(p, i0, end, v); break;
    case Dtype::BF16: store_tile_as<kBlock, Dtype::BF16>(p, i0, end, v); break;
    case Dtype::F32: store_tile_as<kBlock, Dtype::F32>(p, i0, end, v); break;
    default: store_tile_as<kBlock, Dtype::F64>(p, i0, end, v); break;
  }
}

// First element of this thread's first tile, and the distance to its next tile, in a range of
// elements [begin, ...) split among gridDim.x blocks.
template <int kBlock>
__device__ __forceinline__ int64_t tile_start(int64_t begin) {
  return begin + static_cast<int64_t>(blockIdx.x) * (kBlock * kPerThread) + threadIdx.x;
}
template <int kBlock>
__device__ __forceinline__ int64_t tile_stride() {
  return static_cast<int64_t>(gridDim.x) * (kBlock * kPerThread);
}

// The uniforms of a tile: element i draws philox_uniform(seed, offset + i) (DESIGN §3).
template <int kBlock>
__device__ __forceinline__ void uniforms(uint64_t seed, uint64_t offset, int64_t i0, Regs<float>& u) {
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) u[k] = philox_uniform(seed, offset + static_cast<uint64_t>(i0 + k * kBlock));
}

// ---- kernels -----------------------------------------------------------------------------------

// Algorithm 1: eps = u < flip[t], y_t = y0 XOR eps.
template <typename T>
__global__ void __launch_bounds__(kThreads) q_sample_kernel(OpArgs a) {
  const uint64_t seed = rng_word(a.seed_ptr, a.seed), offset = rng_word(a.offset_ptr, a.offset);
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const T flip = table_at<T>(a, clamp_time(a.t[b], 0, a.table_rows), kColFlip);
    const int64_t end = (b + 1) * a.npix;
    for (int64_t i0 = tile_start<kThreads>(b * a.npix); i0 < end; i0 += tile_stride<kThreads>()) {
      Regs<T> y0, yt, eps;
      Regs<float> u;
      load_tile<kThreads>(a.y, a.y_dtype, i0, end, y0);
      uniforms<kThreads>(seed, offset, i0, u);
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        eps[k] = bernoulli(u[k], flip);
        yt[k] = abs_(y0[k] - eps[k]);
      }
      store_tile<kThreads>(a.out, a.out_dtype, i0, end, yt);
      store_tile<kThreads>(a.out2, a.out2_dtype, i0, end, eps);
    }
  }
}

// y_T = u < 1/2.
__global__ void __launch_bounds__(kThreads) init_noise_kernel(OpArgs a, int64_t n) {
  const uint64_t seed = rng_word(a.seed_ptr, a.seed), offset = rng_word(a.offset_ptr, a.offset);
  for (int64_t i0 = tile_start<kThreads>(0); i0 < n; i0 += tile_stride<kThreads>()) {
    Regs<float> u, y;
    uniforms<kThreads>(seed, offset, i0, u);
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) y[k] = bernoulli(u[k], 0.5f);
    store_tile<kThreads>(a.out, a.out_dtype, i0, n, y);
  }
}

// Algorithm 2, one step: y = u < p(y_t, y0_hat), y0_hat = |y_t - sigmoid(l)| stored when asked.
// kDdim: the DDIM jump t -> s[b]; else the DDPM step t -> t - 1 (Eq. 7 calibration).
template <typename T, bool kDdim>
__global__ void __launch_bounds__(kThreads) step_kernel(OpArgs a) {
  const uint64_t seed = rng_word(a.seed_ptr, a.seed), offset = rng_word(a.offset_ptr, a.offset);
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const int64_t t = clamp_time(a.t[b], 1, a.table_rows);
    const DdimCoef<T> dc = kDdim ? ddim_coef_at<T>(a, t, clamp_time(a.s[b], 0, a.table_rows)) : DdimCoef<T>{};
    const PosteriorCoef<T> pc = kDdim ? PosteriorCoef<T>{} : posterior_coef<T>(a, t);
    const int64_t end = (b + 1) * a.npix;
    for (int64_t i0 = tile_start<kThreads>(b * a.npix); i0 < end; i0 += tile_stride<kThreads>()) {
      Regs<T> yt, l, y, y0v;
      Regs<float> u;
      load_tile<kThreads>(a.y, a.y_dtype, i0, end, yt);
      load_tile<kThreads>(a.logits, a.logits_dtype, i0, end, l);
      uniforms<kThreads>(seed, offset, i0, u);
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const Y0Hat<T> y0_hat = predict_y0(yt[k], sigmoids(l[k]));
        const T p = kDdim ? ddim_prob(dc, yt[k], y0_hat.v) : calibrate(pc, yt[k], y0_hat);
        y[k] = bernoulli(u[k], p);
        y0v[k] = y0_hat.v;
      }
      store_tile<kThreads>(a.out, a.out_dtype, i0, end, y);
      if (a.out2 != nullptr) store_tile<kThreads>(a.out2, a.out2_dtype, i0, end, y0v);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) predict_y0_kernel(OpArgs a, int64_t n) {
  for (int64_t i0 = tile_start<kThreads>(0); i0 < n; i0 += tile_stride<kThreads>()) {
    Regs<T> yt, l, y0v;
    load_tile<kThreads>(a.y, a.y_dtype, i0, n, yt);
    load_tile<kThreads>(a.logits, a.logits_dtype, i0, n, l);
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) y0v[k] = predict_y0(yt[k], sigmoids(l[k])).v;
    store_tile<kThreads>(a.out, a.out_dtype, i0, n, y0v);
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
    const int64_t end = (b + 1) * a.npix;
    double acc = 0.0;
    for (int64_t i0 = tile_start<kLossThreads>(b * a.npix); i0 < end; i0 += tile_stride<kLossThreads>()) {
      Regs<T> l, yt, y0;
      load_tile<kLossThreads>(a.logits, a.logits_dtype, i0, end, l);
      load_tile<kLossThreads>(a.y, a.y_dtype, i0, end, yt);
      load_tile<kLossThreads>(a.y0, a.y0_dtype, i0, end, y0);
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        if (i0 + k * kLossThreads < end) acc += static_cast<double>(loss_value(c, l[k], yt[k], y0[k]));
      }
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
__global__ void __launch_bounds__(kThreads) loss_backward_kernel(OpArgs a) {
  const T inv = static_cast<T>(1.0 / (static_cast<double>(a.npix) * kLn2));
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const LossCoef<T> c = loss_coef_of<T>(a, b, false);
    const T scale = load_as<T>(a.grad, a.grad_dtype, b) * inv;
    const int64_t end = (b + 1) * a.npix;
    for (int64_t i0 = tile_start<kThreads>(b * a.npix); i0 < end; i0 += tile_stride<kThreads>()) {
      Regs<T> l, yt, y0, g;
      load_tile<kThreads>(a.logits, a.logits_dtype, i0, end, l);
      load_tile<kThreads>(a.y, a.y_dtype, i0, end, yt);
      load_tile<kThreads>(a.y0, a.y0_dtype, i0, end, y0);
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) g[k] = scale * loss_grad(c, l[k], yt[k], y0[k]);
      store_tile<kThreads>(a.out, a.out_dtype, i0, end, g);
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
inline dim3 sample_grid(const OpArgs& a, int threads, int per_thread = kPerThread) {
  int64_t x = (a.npix + int64_t(threads) * per_thread - 1) / (int64_t(threads) * per_thread);
  x = x < 1 ? 1 : (x < 4096 ? x : 4096);  // >= 1: the loss writes a (NaN) mean for empty samples too
  return dim3(static_cast<unsigned int>(x), static_cast<unsigned int>(a.batch < 65535 ? a.batch : 65535));
}

template <typename T>
inline void launch_q_sample(const OpArgs& a, cudaStream_t stream) {
  q_sample_kernel<T><<<sample_grid(a, kThreads), kThreads, 0, stream>>>(a);
}
inline void launch_init_noise(const OpArgs& a, int64_t n, cudaStream_t stream) {
  init_noise_kernel<<<blocks_for(n, kThreads * kPerThread), kThreads, 0, stream>>>(a, n);
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
  predict_y0_kernel<T><<<blocks_for(n, kThreads * kPerThread), kThreads, 0, stream>>>(a, n);
}

// Slices per sample of the loss's first pass (the size of its partials buffer: batch x slices):
// each thread sums at least two tiles.
constexpr int kLossPerThread = 2 * kPerThread;
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

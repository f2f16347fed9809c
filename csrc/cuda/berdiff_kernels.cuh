// The CUDA kernels of the berdiff ops. Pure CUDA: no torch header, so the standalone CMake
// build compiles them too; ops_cuda.cu launches them on torch's current stream.
//
// Ops with per-sample schedule rows put the samples on grid y and a sample's pixels on grid x:
// the sample index needs no 64-bit division per element, and the per-sample coefficients are
// read once per thread. The others are flat. Every kernel walks its range in tiles (tile.h: a
// thread holds L::kElems consecutive elements; grid-stride beyond the grid), with storage dtypes
// fixed at compile time for the common combinations (Io below). Arithmetic in T (float, or
// double for float64 inputs) with the formulas of berdiff_math.h. The Philox key and counter
// are read from device memory when OpArgs carries pointers, so a captured CUDA graph draws fresh
// numbers on replay after the caller advances the offset tensor. Paper times are clamped into the
// table's range and not checked: the values live on the device, and a check would synchronise
// (or break a capture). The Python API checks them eagerly; the CPU ops check them always.
#pragma once

#include <stdint.h>

#include <initializer_list>
#include <type_traits>

#include "../tile.h"

namespace berdiff {
namespace cuda {

__device__ __forceinline__ uint64_t rng_word(const int64_t* ptr, uint64_t value) {
  return ptr != nullptr ? static_cast<uint64_t>(*ptr) : value;
}

__device__ __forceinline__ int64_t clamp_time(int64_t t, int64_t lo, int64_t rows) {
  return t < lo ? lo : (t >= rows ? rows - 1 : t);
}

// This thread's first tile in a range starting at `begin`, split among gridDim.x blocks, and the
// distance to its next tile.
template <class L>
__device__ __forceinline__ int64_t tile_start(int64_t begin) {
  return L::first(begin, blockIdx.x, threadIdx.x);
}
template <class L>
__device__ __forceinline__ int64_t tile_stride() {
  return static_cast<int64_t>(gridDim.x) * L::kSize;
}

// The uniforms of a tile: element i draws philox_uniform(seed, offset + i) (DESIGN §3).
template <class L>
__device__ __forceinline__ void uniforms(uint64_t seed, uint64_t offset, int64_t i0, Regs<float, L::kElems>& u) {
#pragma unroll
  for (int k = 0; k < L::kElems; ++k) u[k] = philox_uniform(seed, offset + static_cast<uint64_t>(L::at(i0, k)));
}

// ---- storage dtypes of a kernel instance ------------------------------------------------------

// The storage of an op's masks (y, y0 and mask outputs), of its logits (and dlogits) and of its
// float outputs (y0_hat), each DtypeTag<D> (fixed at compile time: a tile is then one typed
// vector access with no switch) or AnyDtype (read from OpArgs: one switch per tile and tensor).
template <class M, class Lg, class F>
struct Io {
  using Mask = M;
  using Logits = Lg;
  using Float = F;
};
using AnyIo = Io<AnyDtype, AnyDtype, AnyDtype>;
template <Dtype M, Dtype Lg>
using FixedIo = Io<DtypeTag<M>, DtypeTag<Lg>, DtypeTag<Dtype::F32>>;

// f(FixedIo<M, Lg>{}) for the combinations the sampler (float32 masks, bfloat16 or float32
// logits), training and the benchmarks (uint8 masks) run: T float, every mask stored as M (uint8
// or float32), every logits-typed tensor as Lg (float32 or bfloat16; kLogits false: the op reads
// none), every float output as float32. f(AnyIo{}) for the rest, one switch per tile: 6-10%
// slower on an H100 (benchmarks/RESULTS.md).
template <typename T, bool kLogits, class F>
inline void visit_io(std::initializer_list<Dtype> masks, std::initializer_list<Dtype> logits,
                     std::initializer_list<Dtype> floats, F&& f) {
  if constexpr (!std::is_same<T, float>::value) {
    f(AnyIo{});
  } else {
    auto all = [](std::initializer_list<Dtype> ds, Dtype d) {
      for (const Dtype x : ds) {
        if (x != d) return false;
      }
      return true;
    };
    const Dtype m = *masks.begin();
    const Dtype lg = kLogits ? *logits.begin() : Dtype::F32;
    if ((m != Dtype::U8 && m != Dtype::F32) || !all(masks, m) || (lg != Dtype::F32 && lg != Dtype::BF16) ||
        !all(logits, lg) || !all(floats, Dtype::F32)) {
      f(AnyIo{});
      return;
    }
    auto with_mask = [&](auto mask) {
      constexpr Dtype kM = decltype(mask)::value;
      if constexpr (kLogits) {
        if (lg == Dtype::BF16) return f(FixedIo<kM, Dtype::BF16>{});
      }
      f(FixedIo<kM, Dtype::F32>{});
    };
    if (m == Dtype::U8) {
      with_mask(DtypeTag<Dtype::U8>{});
    } else {
      with_mask(DtypeTag<Dtype::F32>{});
    }
  }
}

// ---- kernels -----------------------------------------------------------------------------------

// Algorithm 1: eps = u < flip[t], y_t = y0 XOR eps.
template <class L, typename T, class S>
__global__ void __launch_bounds__(L::kBlock) q_sample_kernel(OpArgs a) {
  const uint64_t seed = rng_word(a.seed_ptr, a.seed), offset = rng_word(a.offset_ptr, a.offset);
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const T flip = table_at<T>(a, clamp_time(a.t[b], 0, a.table_rows), kColFlip);
    const int64_t end = (b + 1) * a.npix;
    for (int64_t i0 = tile_start<L>(b * a.npix); i0 < end; i0 += tile_stride<L>()) {
      Regs<T, L::kElems> y0, yt, eps;
      Regs<float, L::kElems> u;
      load_tile<L, typename S::Mask>(a.y, a.y_dtype, i0, end, y0);
      uniforms<L>(seed, offset, i0, u);
#pragma unroll
      for (int k = 0; k < L::kElems; ++k) {
        eps[k] = bernoulli(u[k], flip);
        yt[k] = abs_(y0[k] - eps[k]);
      }
      store_tile<L, typename S::Mask>(a.out, a.out_dtype, i0, end, yt);
      store_tile<L, typename S::Mask>(a.out2, a.out2_dtype, i0, end, eps);
    }
  }
}

// y_T = u < 1/2.
template <class L, class S>
__global__ void __launch_bounds__(L::kBlock) init_noise_kernel(OpArgs a, int64_t n) {
  const uint64_t seed = rng_word(a.seed_ptr, a.seed), offset = rng_word(a.offset_ptr, a.offset);
  for (int64_t i0 = tile_start<L>(0); i0 < n; i0 += tile_stride<L>()) {
    Regs<float, L::kElems> u, y;
    uniforms<L>(seed, offset, i0, u);
#pragma unroll
    for (int k = 0; k < L::kElems; ++k) y[k] = bernoulli(u[k], 0.5f);
    store_tile<L, typename S::Mask>(a.out, a.out_dtype, i0, n, y);
  }
}

// Algorithm 2, one step: y = u < p(y_t, y0_hat), y0_hat = |y_t - sigmoid(l)| stored when asked.
// kDdim: the DDIM jump t -> s[b]; else the DDPM step t -> t - 1 (Eq. 7 calibration).
template <class L, typename T, class S, bool kDdim>
__global__ void __launch_bounds__(L::kBlock) step_kernel(OpArgs a) {
  const uint64_t seed = rng_word(a.seed_ptr, a.seed), offset = rng_word(a.offset_ptr, a.offset);
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const int64_t t = clamp_time(a.t[b], 1, a.table_rows);
    const DdimCoef<T> dc = kDdim ? ddim_coef_at<T>(a, t, clamp_time(a.s[b], 0, a.table_rows)) : DdimCoef<T>{};
    const PosteriorCoef<T> pc = kDdim ? PosteriorCoef<T>{} : posterior_coef<T>(a, t);
    const int64_t end = (b + 1) * a.npix;
    for (int64_t i0 = tile_start<L>(b * a.npix); i0 < end; i0 += tile_stride<L>()) {
      Regs<T, L::kElems> yt, l, y, y0v;
      Regs<float, L::kElems> u;
      load_tile<L, typename S::Mask>(a.y, a.y_dtype, i0, end, yt);
      load_tile<L, typename S::Logits>(a.logits, a.logits_dtype, i0, end, l);
      uniforms<L>(seed, offset, i0, u);
#pragma unroll
      for (int k = 0; k < L::kElems; ++k) {
        const Y0Hat<T> y0_hat = predict_y0(yt[k], sigmoids(l[k]));
        const T p = kDdim ? ddim_prob(dc, yt[k], y0_hat.v) : calibrate(pc, yt[k], y0_hat);
        y[k] = bernoulli(u[k], p);
        y0v[k] = y0_hat.v;
      }
      store_tile<L, typename S::Mask>(a.out, a.out_dtype, i0, end, y);
      if (a.out2 != nullptr) store_tile<L, typename S::Float>(a.out2, a.out2_dtype, i0, end, y0v);
    }
  }
}

template <class L, typename T, class S>
__global__ void __launch_bounds__(L::kBlock) predict_y0_kernel(OpArgs a, int64_t n) {
  for (int64_t i0 = tile_start<L>(0); i0 < n; i0 += tile_stride<L>()) {
    Regs<T, L::kElems> yt, l, y0v;
    load_tile<L, typename S::Mask>(a.y, a.y_dtype, i0, n, yt);
    load_tile<L, typename S::Logits>(a.logits, a.logits_dtype, i0, n, l);
#pragma unroll
    for (int k = 0; k < L::kElems; ++k) y0v[k] = predict_y0(yt[k], sigmoids(l[k])).v;
    store_tile<L, typename S::Float>(a.out, a.out_dtype, i0, n, y0v);
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
template <class L, typename T, class S>
__global__ void __launch_bounds__(L::kBlock) loss_partial_kernel(OpArgs a, double* partials) {
  __shared__ double warp_sums[L::kBlock / 32];
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const LossCoef<T> c = loss_coef_of<T>(a, b, true);
    const int64_t end = (b + 1) * a.npix;
    double acc = 0.0;
    for (int64_t i0 = tile_start<L>(b * a.npix); i0 < end; i0 += tile_stride<L>()) {
      Regs<T, L::kElems> l, yt, y0;
      load_tile<L, typename S::Logits>(a.logits, a.logits_dtype, i0, end, l);
      load_tile<L, typename S::Mask>(a.y, a.y_dtype, i0, end, yt);
      load_tile<L, typename S::Mask>(a.y0, a.y0_dtype, i0, end, y0);
#pragma unroll
      for (int k = 0; k < L::kElems; ++k) {
        if (L::at(i0, k) < end) acc += static_cast<double>(loss_value(c, l[k], yt[k], y0[k]));
      }
    }
    for (int d = 16; d > 0; d /= 2) acc += __shfl_down_sync(0xFFFFFFFFu, acc, d);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
      acc = threadIdx.x < L::kBlock / 32 ? warp_sums[threadIdx.x] : 0.0;
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
template <class L, typename T, class S>
__global__ void __launch_bounds__(L::kBlock) loss_backward_kernel(OpArgs a) {
  const T inv = static_cast<T>(1.0 / (static_cast<double>(a.npix) * kLn2));
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const LossCoef<T> c = loss_coef_of<T>(a, b, false);
    const T scale = load_as<T>(a.grad, a.grad_dtype, b) * inv;
    const int64_t end = (b + 1) * a.npix;
    for (int64_t i0 = tile_start<L>(b * a.npix); i0 < end; i0 += tile_stride<L>()) {
      Regs<T, L::kElems> l, yt, y0, g;
      load_tile<L, typename S::Logits>(a.logits, a.logits_dtype, i0, end, l);
      load_tile<L, typename S::Mask>(a.y, a.y_dtype, i0, end, yt);
      load_tile<L, typename S::Mask>(a.y0, a.y0_dtype, i0, end, y0);
#pragma unroll
      for (int k = 0; k < L::kElems; ++k) g[k] = scale * loss_grad(c, l[k], yt[k], y0[k]);
      store_tile<L, typename S::Logits>(a.out, a.out_dtype, i0, end, g);
    }
  }
}

// ---- launchers (stream: the caller's) ----------------------------------------------------------

// x blocks along each sample, one row of blocks per sample (grid-stride beyond 65535 samples).
inline dim3 sample_grid(const OpArgs& a, int64_t x) {
  return dim3(static_cast<unsigned int>(x), static_cast<unsigned int>(a.batch < 65535 ? a.batch : 65535));
}
template <class L>
inline dim3 elementwise_grid(const OpArgs& a) {
  return sample_grid(a, elementwise_blocks(a.batch, a.npix, L::kSize));
}

template <typename T>
inline void launch_q_sample(const OpArgs& a, cudaStream_t stream) {
  using L = OpsTile;
  visit_io<T, false>({a.y_dtype, a.out_dtype, a.out2_dtype}, {}, {}, [&](auto io) {
    q_sample_kernel<L, T, decltype(io)><<<elementwise_grid<L>(a), L::kBlock, 0, stream>>>(a);
  });
}
inline void launch_init_noise(const OpArgs& a, int64_t n, cudaStream_t stream) {
  using L = OpsTile;
  visit_io<float, false>({a.out_dtype}, {}, {}, [&](auto io) {
    init_noise_kernel<L, decltype(io)><<<blocks_for(n, L::kSize), L::kBlock, 0, stream>>>(a, n);
  });
}
template <typename T>
inline void launch_step(const OpArgs& a, bool ddim, cudaStream_t stream) {
  using L = OpsTile;
  visit_io<T, true>({a.y_dtype, a.out_dtype}, {a.logits_dtype}, {a.out2_dtype}, [&](auto io) {
    if (ddim) {
      step_kernel<L, T, decltype(io), true><<<elementwise_grid<L>(a), L::kBlock, 0, stream>>>(a);
    } else {
      step_kernel<L, T, decltype(io), false><<<elementwise_grid<L>(a), L::kBlock, 0, stream>>>(a);
    }
  });
}
template <typename T>
inline void launch_predict_y0(const OpArgs& a, int64_t n, cudaStream_t stream) {
  using L = OpsTile;
  visit_io<T, true>({a.y_dtype}, {a.logits_dtype}, {a.out_dtype}, [&](auto io) {
    predict_y0_kernel<L, T, decltype(io)><<<blocks_for(n, L::kSize), L::kBlock, 0, stream>>>(a, n);
  });
}

// Slices per sample of the loss's first pass (the size of its partials buffer: batch x slices):
// one tile per thread, so that a 128x128 sample spreads over 8 blocks.
inline int loss_slices(const OpArgs& a) { return static_cast<int>(sample_blocks(a.npix, LossTile::kSize)); }

template <typename T>
inline void launch_loss(const OpArgs& a, double* partials, cudaStream_t stream) {
  using L = LossTile;
  const int slices = loss_slices(a);
  visit_io<T, true>({a.y_dtype, a.y0_dtype}, {a.logits_dtype}, {}, [&](auto io) {
    loss_partial_kernel<L, T, decltype(io)><<<sample_grid(a, slices), L::kBlock, 0, stream>>>(a, partials);
  });
  loss_finish_kernel<<<blocks_for(a.batch * 32, 256), 256, 0, stream>>>(a, partials, slices);
}
template <typename T>
inline void launch_loss_backward(const OpArgs& a, cudaStream_t stream) {
  using L = OpsTile;
  visit_io<T, true>({a.y_dtype, a.y0_dtype}, {a.logits_dtype, a.out_dtype}, {}, [&](auto io) {
    loss_backward_kernel<L, T, decltype(io)><<<elementwise_grid<L>(a), L::kBlock, 0, stream>>>(a);
  });
}

}  // namespace cuda
}  // namespace berdiff

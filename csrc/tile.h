// A CUDA thread's tile: which elements it holds, and their loads and stores in any storage dtype.
// Host-and-device and free of CUDA headers, so ctest checks on the host the index maps and the
// vector path that the CUDA kernels (cuda/berdiff_kernels.cuh) run.
#pragma once

#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "kernel_args.h"

// Loops over a tile's elements are unrolled: constant indices keep the tile in registers.
#if defined(__CUDACC__)
#define BERDIFF_UNROLL _Pragma("unroll")
#elif defined(__GNUC__) && !defined(__clang__)
#define BERDIFF_UNROLL _Pragma("GCC unroll 16")
#else
#define BERDIFF_UNROLL
#endif

namespace berdiff {

// A block of kBlock threads walks its range in tiles of kSize = kBlock * kElems elements: thread j
// of the tile starting at s holds the kElems consecutive elements s + j * kElems + k, k < kElems
// (Triton's blocked layout). A full, aligned tile is one vector access of kElems * itemsize bytes
// per thread (up to 16 bytes per instruction). A layout giving thread j the elements
// s + j + k * kBlock (one coalesced scalar access per element) ran 1.1-1.2x slower on an H100
// (benchmarks/RESULTS.md) and was removed.
template <int kBlock_, int kElems_>
struct Tile {
  static constexpr int kBlock = kBlock_;
  static constexpr int kElems = kElems_;
  static constexpr int64_t kSize = static_cast<int64_t>(kBlock_) * kElems_;

  // First element of thread `thread` of block `block`, in a range starting at `begin`.
  BERDIFF_HD static int64_t first(int64_t begin, int64_t block, int64_t thread) {
    return begin + block * kSize + thread * kElems_;
  }
  BERDIFF_HD static int64_t at(int64_t i0, int k) { return i0 + k; }
  // All of the thread's elements lie before `end`: unconditional accesses (a bounds check per
  // element would put each access in its own branch).
  BERDIFF_HD static bool full(int64_t i0, int64_t end) { return i0 + (kElems_ - 1) < end; }
};

template <typename T, int N>
using Regs = T[N];

// ---- storage dtypes as compile-time tags -------------------------------------------------------

template <Dtype D>
struct DtypeTag {
  static constexpr Dtype value = D;
};
// A storage dtype known only at run time (load_tile, store_tile): one switch per tile.
struct AnyDtype {};

// f(DtypeTag<d>{}): one switch over the storage dtype per tile; inside f the dtype is a constant,
// so each access folds to one typed load or store.
template <class F>
BERDIFF_HD void visit_dtype(Dtype d, F&& f) {
  switch (d) {
    case Dtype::Bool: f(DtypeTag<Dtype::Bool>{}); break;
    case Dtype::U8: f(DtypeTag<Dtype::U8>{}); break;
    case Dtype::F16: f(DtypeTag<Dtype::F16>{}); break;
    case Dtype::BF16: f(DtypeTag<Dtype::BF16>{}); break;
    case Dtype::F32: f(DtypeTag<Dtype::F32>{}); break;
    default: f(DtypeTag<Dtype::F64>{}); break;
  }
}

// Bytes per element of a storage dtype.
template <Dtype D>
constexpr int kItemsize = D == Dtype::Bool || D == Dtype::U8 ? 1 : (D == Dtype::F16 || D == Dtype::BF16 ? 2 : (D == Dtype::F32 ? 4 : 8));

// ---- vector path: kElems contiguous elements as 32-bit words (little-endian, as x86 and GPUs) --

// Element k of the words w, as T (load_as's conversions).
template <typename T, Dtype D>
BERDIFF_HD T word_load(const uint32_t* w, int k) {
  if constexpr (kItemsize<D> == 1) {
    return static_cast<T>((w[k / 4] >> (8 * (k % 4))) & 0xFFu);
  } else if constexpr (D == Dtype::F16) {
    return static_cast<T>(half_to_float(static_cast<uint16_t>(w[k / 2] >> (16 * (k % 2)))));
  } else if constexpr (D == Dtype::BF16) {
    return static_cast<T>(bf16_to_float(static_cast<uint16_t>(w[k / 2] >> (16 * (k % 2)))));
  } else if constexpr (D == Dtype::F32) {
    return static_cast<T>(bits_float(w[k]));
  } else {
    return static_cast<T>(bits_double(static_cast<uint64_t>(w[2 * k + 1]) << 32 | w[2 * k]));
  }
}

// Element k of the zeroed words w set to v (store_as's conversions).
template <typename T, Dtype D>
BERDIFF_HD void word_store(uint32_t* w, int k, T v) {
  if constexpr (kItemsize<D> == 1) {
    const uint32_t b = D == Dtype::Bool ? static_cast<uint32_t>(v != T(0)) : static_cast<uint8_t>(v);
    w[k / 4] |= b << (8 * (k % 4));
  } else if constexpr (kItemsize<D> == 2) {
    const uint16_t h = D == Dtype::F16 ? float_to_half(static_cast<float>(v)) : float_to_bf16(static_cast<float>(v));
    w[k / 2] |= static_cast<uint32_t>(h) << (16 * (k % 2));
  } else if constexpr (D == Dtype::F32) {
    w[k] = float_bits(static_cast<float>(v));
  } else {
    const uint64_t b = double_bits(static_cast<double>(v));
    w[2 * k] = static_cast<uint32_t>(b);
    w[2 * k + 1] = static_cast<uint32_t>(b >> 32);
  }
}

struct alignas(16) Words4 {
  uint32_t x, y, z, w;
};
struct alignas(8) Words2 {
  uint32_t x, y;
};

// kBytes bytes at p, aligned to min(kBytes, 16): on the device as 16-, 8- or 4-byte vector
// accesses (LDG.128 / STG.128 for a 16-byte run); on the host a memcpy.
template <int kBytes>
BERDIFF_HD void load_words(const void* p, uint32_t* w) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes % 16 == 0, "a tile of 4, 8 or 16k bytes");
#if defined(__CUDA_ARCH__)
  if constexpr (kBytes % 16 == 0) {
    BERDIFF_UNROLL
    for (int j = 0; j < kBytes / 16; ++j) {
      const Words4 v = static_cast<const Words4*>(p)[j];
      w[4 * j] = v.x, w[4 * j + 1] = v.y, w[4 * j + 2] = v.z, w[4 * j + 3] = v.w;
    }
  } else if constexpr (kBytes == 8) {
    const Words2 v = *static_cast<const Words2*>(p);
    w[0] = v.x, w[1] = v.y;
  } else {
    w[0] = *static_cast<const uint32_t*>(p);
  }
#else
  memcpy(w, p, kBytes);
#endif
}

template <int kBytes>
BERDIFF_HD void store_words(void* p, const uint32_t* w) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes % 16 == 0, "a tile of 4, 8 or 16k bytes");
#if defined(__CUDA_ARCH__)
  if constexpr (kBytes % 16 == 0) {
    BERDIFF_UNROLL
    for (int j = 0; j < kBytes / 16; ++j) static_cast<Words4*>(p)[j] = Words4{w[4 * j], w[4 * j + 1], w[4 * j + 2], w[4 * j + 3]};
  } else if constexpr (kBytes == 8) {
    *static_cast<Words2*>(p) = Words2{w[0], w[1]};
  } else {
    *static_cast<uint32_t*>(p) = w[0];
  }
#else
  memcpy(p, w, kBytes);
#endif
}

// Whether the kN elements of dtype D from element i0 of p can be one vector access: their
// address is aligned to the access width. True for every tile of a tensor whose data pointer is
// 16-byte aligned (torch's allocators) when the tile boundaries fall on kN-element multiples.
template <int kN, Dtype D>
BERDIFF_HD bool vector_ok(const void* p, int64_t i0) {
  constexpr int kBytes = kN * kItemsize<D>;
  constexpr uintptr_t kAlign = kBytes < 16 ? kBytes : 16;
  return (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(i0) * kItemsize<D>) % kAlign == 0;
}

// ---- a thread's tile ---------------------------------------------------------------------------

// v[k] = element L::at(i0, k) of p (storage dtype D), 0 past `end`.
template <class L, Dtype D, typename T>
BERDIFF_HD void load_tile_as(const void* p, int64_t i0, int64_t end, Regs<T, L::kElems>& v) {
  if (L::full(i0, end)) {
    if (vector_ok<L::kElems, D>(p, i0)) {
      constexpr int kBytes = L::kElems * kItemsize<D>;
      uint32_t w[kBytes / 4];
      load_words<kBytes>(static_cast<const char*>(p) + i0 * kItemsize<D>, w);
      BERDIFF_UNROLL
      for (int k = 0; k < L::kElems; ++k) v[k] = word_load<T, D>(w, k);
      return;
    }
    BERDIFF_UNROLL
    for (int k = 0; k < L::kElems; ++k) v[k] = load_as<T>(p, D, L::at(i0, k));
  } else {
    BERDIFF_UNROLL
    for (int k = 0; k < L::kElems; ++k) {
      const int64_t i = L::at(i0, k);
      v[k] = i < end ? load_as<T>(p, D, i) : T(0);
    }
  }
}

// Element L::at(i0, k) of p (storage dtype D) = v[k], for those before `end`.
template <class L, Dtype D, typename T>
BERDIFF_HD void store_tile_as(void* p, int64_t i0, int64_t end, const Regs<T, L::kElems>& v) {
  if (L::full(i0, end)) {
    if (vector_ok<L::kElems, D>(p, i0)) {
      constexpr int kBytes = L::kElems * kItemsize<D>;
      uint32_t w[kBytes / 4] = {};
      BERDIFF_UNROLL
      for (int k = 0; k < L::kElems; ++k) word_store<T, D>(w, k, v[k]);
      store_words<kBytes>(static_cast<char*>(p) + i0 * kItemsize<D>, w);
      return;
    }
    BERDIFF_UNROLL
    for (int k = 0; k < L::kElems; ++k) store_as<T>(p, D, L::at(i0, k), v[k]);
  } else {
    BERDIFF_UNROLL
    for (int k = 0; k < L::kElems; ++k) {
      const int64_t i = L::at(i0, k);
      if (i < end) store_as<T>(p, D, i, v[k]);
    }
  }
}

// The tile of p, storage dtype S::value (S = DtypeTag<D>: no switch) or d (S = AnyDtype).
template <class L, class S = AnyDtype, typename T>
BERDIFF_HD void load_tile(const void* p, Dtype d, int64_t i0, int64_t end, Regs<T, L::kElems>& v) {
  if constexpr (std::is_same<S, AnyDtype>::value) {
    // Bool loads as U8: one case less.
    visit_dtype(d == Dtype::Bool ? Dtype::U8 : d, [&](auto tag) { load_tile_as<L, decltype(tag)::value>(p, i0, end, v); });
  } else {
    load_tile_as<L, S::value>(p, i0, end, v);
  }
}

template <class L, class S = AnyDtype, typename T>
BERDIFF_HD void store_tile(void* p, Dtype d, int64_t i0, int64_t end, const Regs<T, L::kElems>& v) {
  if constexpr (std::is_same<S, AnyDtype>::value) {
    visit_dtype(d, [&](auto tag) { store_tile_as<L, decltype(tag)::value>(p, i0, end, v); });
  } else {
    store_tile_as<L, S::value>(p, i0, end, v);
  }
}

// The tiles of the CUDA kernels: eight consecutive elements per thread, as Triton's kernels; the
// loss's first pass in blocks of 256 threads.
using OpsTile = Tile<128, 8>;
using LossTile = Tile<256, 8>;

// ---- grids -------------------------------------------------------------------------------------

// Blocks along a range of n elements, each covering at least `per_block` (grid-stride beyond 2**20).
inline int64_t blocks_for(int64_t n, int64_t per_block) {
  const int64_t b = (n + per_block - 1) / per_block;
  return b < (int64_t(1) << 20) ? b : (int64_t(1) << 20);
}

// Blocks along one sample of a per-sample op (grid x; grid y is the sample): at least one (the
// loss writes a NaN mean for empty samples too), at most 4096 (grid-stride beyond).
inline int64_t sample_blocks(int64_t npix, int64_t per_block) {
  const int64_t x = (npix + per_block - 1) / per_block;
  return x < 1 ? 1 : (x < 4096 ? x : 4096);
}

// Grid x of the elementwise per-sample ops (tiles of `tile` elements, grid y = min(batch, 65535)):
// one tile per thread while the grid is small (the sampler's 16 samples of 128x128: 256 blocks),
// else up to four. Each thread reads its sample's schedule rows, clamps its times and loads the
// Philox key once per sample: at one tile per thread that setup was about a fifth of a DDIM
// step's instructions at 64x1x512x512 (SASS and Nsight Compute, H100).
inline int64_t elementwise_blocks(int64_t batch, int64_t npix, int64_t tile) {
  const int64_t one = sample_blocks(npix, tile);
  const int64_t rows = batch < 65535 ? batch : 65535;
  return one * rows > 8192 ? sample_blocks(npix, 4 * tile) : one;
}

}  // namespace berdiff

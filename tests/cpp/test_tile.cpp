// The CUDA kernels' tiles (csrc/tile.h) on the host: every element of a range is visited exactly
// once under every grid the launchers choose, and a tile's loads and stores (the vector path
// included, with the dtype fixed at compile time or read at run time) equal load_as / store_as
// element by element in every storage dtype, at every alignment, for full and partial tiles,
// touching nothing outside the tile.
#include <cstdio>
#include <cstring>
#include <vector>

#include "check.h"
#include "tile.h"

using namespace berdiff;

namespace {

uint64_t mix(uint64_t x) {  // splitmix64: the test's deterministic fill
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Every element of B samples of npix (per-sample grid: `grid` blocks along each sample) or of one
// flat range is visited once.
template <class L>
void check_cover(const char* name, int64_t batch, int64_t npix, bool per_sample, int64_t grid) {
  const int64_t n = batch * npix;
  std::vector<uint8_t> seen(static_cast<size_t>(n), 0);
  const int64_t ranges = per_sample ? batch : 1, len = per_sample ? npix : n;
  int64_t bad = 0;
  for (int64_t r = 0; r < ranges; ++r) {
    const int64_t begin = r * len, end = begin + len;
    for (int64_t block = 0; block < grid; ++block) {
      for (int64_t thread = 0; thread < L::kBlock; ++thread) {
        for (int64_t i0 = L::first(begin, block, thread); i0 < end; i0 += grid * L::kSize) {
          const bool full = L::full(i0, end);
          for (int k = 0; k < L::kElems; ++k) {
            const int64_t i = L::at(i0, k);
            if (i >= end) {
              bad += full;  // a full tile lies inside the range
              continue;
            }
            bad += i < begin;
            if (i >= begin) ++seen[static_cast<size_t>(i)];
          }
        }
      }
    }
  }
  int64_t wrong = 0;
  for (uint8_t s : seen) wrong += s != 1;
  CHECK(bad == 0 && wrong == 0, "%s B=%lld npix=%lld grid %lld %s: %lld out of range, %lld not visited exactly once",
        name, static_cast<long long>(batch), static_cast<long long>(npix), static_cast<long long>(grid),
        per_sample ? "per-sample" : "flat", static_cast<long long>(bad), static_cast<long long>(wrong));
}

template <class L>
void check_covers(const char* name) {
  const int64_t shapes[][2] = {{1, 1}, {3, 1}, {1, 7}, {5, 1031}, {2, 4096}, {3, 16384}, {1, 2053 * 2053},
                               // beyond the 4096-block cap of a sample's grid: grid-stride
                               {1, 4096 * L::kSize + 1031},
                               // grids of more than 8192 blocks: up to four tiles per thread
                               {9000, 1031}, {40, 262144}, {64, 262144 + 13}};
  for (const auto& s : shapes) {
    // the grids of the launchers: the loss's first pass, the elementwise ops, the flat ops
    check_cover<L>(name, s[0], s[1], true, sample_blocks(s[1], L::kSize));
    check_cover<L>(name, s[0], s[1], true, elementwise_blocks(s[0], s[1], L::kSize));
    check_cover<L>(name, s[0], s[1], false, blocks_for(s[0] * s[1], L::kSize));
  }
}

// A buffer of `bytes` bytes, `shift` bytes past a 16-byte boundary, with 32 random guard bytes on
// each side; two buffers made with the same seed hold the same bytes.
struct Buffer {
  std::vector<unsigned char> raw;
  size_t start;
  size_t bytes;
  Buffer(size_t n, int shift, uint64_t seed) : raw(n + 96), bytes(n) {
    const size_t base = (16 - reinterpret_cast<uintptr_t>(raw.data()) % 16) % 16;
    start = base + 32 + static_cast<size_t>(shift);
    for (size_t i = 0; i < raw.size(); ++i) raw[i] = static_cast<unsigned char>(mix(seed + i + 64 - start));
  }
  void* data() { return raw.data() + start; }
  bool same(const Buffer& o) const { return std::memcmp(&raw[start - 32], &o.raw[o.start - 32], bytes + 64) == 0; }
};

// Storage bits that convert to the same value in every dtype: masks hold 0/1; floats any finite value.
template <Dtype D>
void fill(void* p, int64_t len, uint64_t seed) {
  for (int64_t i = 0; i < len; ++i) {
    const uint64_t r = mix(seed ^ static_cast<uint64_t>(i));
    const double v = kItemsize<D> == 1 ? static_cast<double>(r & 1u) : (static_cast<double>(r % 20001) - 10000.0) / 997.0;
    store_as<double>(p, D, i, v);
  }
}

template <class L, Dtype D>
void check_access(const char* name) {
  constexpr int64_t kSpan = L::kElems;  // first to last element of a tile
  constexpr int64_t kLen = kSpan + 2 * L::kElems + 5;
  for (int shift = 0; shift < 16; shift += kItemsize<D>) {  // torch never misaligns an element
    for (int64_t i0 = 0; i0 + kSpan <= kLen; ++i0) {
      for (int64_t end = i0 + 1; end <= i0 + kSpan + 1 && end <= kLen; ++end) {
        // load: v[k] = element at(i0, k), 0 past end
        Buffer src(kLen * kItemsize<D>, shift, 17 + i0);
        fill<D>(src.data(), kLen, 99 + static_cast<uint64_t>(shift));
        Regs<double, L::kElems> got;
        load_tile<L>(src.data(), D, i0, end, got);
        int bad = 0;
        for (int k = 0; k < L::kElems; ++k) {
          const int64_t i = L::at(i0, k);
          const double want = i < end ? load_as<double>(src.data(), D, i) : 0.0;
          bad += std::memcmp(&got[k], &want, sizeof want) != 0;
        }
        // store: the tile's in-range elements get store_as's bits; no other byte changes
        Buffer dst(kLen * kItemsize<D>, shift, 5 + end), ref(kLen * kItemsize<D>, shift, 5 + end);
        Regs<double, L::kElems> v;
        for (int k = 0; k < L::kElems; ++k) v[k] = (k % 3 == 0 ? 1.0 : 0.0) + (kItemsize<D> == 1 ? 0.0 : 0.37 * k - 1.0);
        store_tile<L>(dst.data(), D, i0, end, v);
        for (int k = 0; k < L::kElems; ++k) {
          if (L::at(i0, k) < end) store_as<double>(ref.data(), D, L::at(i0, k), v[k]);
        }
        bad += !dst.same(ref);
        CHECK(bad == 0, "%s dtype %d shift %d i0 %lld end %lld: %d mismatches (vector path %s)", name,
              static_cast<int>(D), shift, static_cast<long long>(i0), static_cast<long long>(end), bad,
              L::full(i0, end) && vector_ok<L::kElems, D>(src.data(), i0) ? "taken" : "not taken");
      }
    }
  }
}

template <class L>
void check_accesses(const char* name) {
  check_access<L, Dtype::Bool>(name);
  check_access<L, Dtype::U8>(name);
  check_access<L, Dtype::F16>(name);
  check_access<L, Dtype::BF16>(name);
  check_access<L, Dtype::F32>(name);
  check_access<L, Dtype::F64>(name);
}

// The vector path is taken for every full tile of a 16-byte aligned tensor whose samples are a
// multiple of kElems long: the case the layout exists for.
template <class L, Dtype D>
void check_vector_taken(const char* name) {
  Buffer buf(4 * L::kSize * kItemsize<D>, 0, 3);
  int64_t missed = 0;
  for (int64_t i0 = 0; i0 + L::kElems <= 4 * L::kSize; i0 += L::kElems) missed += !vector_ok<L::kElems, D>(buf.data(), i0);
  CHECK(missed == 0, "%s dtype %d: %lld aligned tiles would not take the vector path", name, static_cast<int>(D),
        static_cast<long long>(missed));
}

// The fixed-dtype tiles (load_tile<L, DtypeTag<D>>, the CUDA kernels' common instances) equal
// the run-time dispatch on every alignment and end.
template <class L, Dtype D>
void check_fixed(const char* name) {
  constexpr int64_t kLen = 3 * L::kElems + 5;
  for (int shift = 0; shift < 16; shift += kItemsize<D>) {
    for (int64_t i0 = 0; i0 + L::kElems <= kLen; ++i0) {
      for (int64_t end = i0 + 1; end <= i0 + L::kElems + 1 && end <= kLen; ++end) {
        Buffer src(kLen * kItemsize<D>, shift, 41 + i0);
        fill<D>(src.data(), kLen, 7 + static_cast<uint64_t>(shift));
        Regs<float, L::kElems> any, fixed;
        load_tile<L>(src.data(), D, i0, end, any);
        load_tile<L, DtypeTag<D>>(src.data(), Dtype::F64, i0, end, fixed);  // the run-time dtype is ignored
        Buffer a(kLen * kItemsize<D>, shift, 3 + end), b(kLen * kItemsize<D>, shift, 3 + end);
        store_tile<L>(a.data(), D, i0, end, any);
        store_tile<L, DtypeTag<D>>(b.data(), Dtype::F64, i0, end, fixed);
        CHECK(std::memcmp(any, fixed, sizeof any) == 0 && a.same(b),
              "%s dtype %d shift %d i0 %lld end %lld: fixed != run-time", name, static_cast<int>(D), shift,
              static_cast<long long>(i0), static_cast<long long>(end));
      }
    }
  }
}

}  // namespace

int main() {
  check_covers<OpsTile>("ops");
  check_covers<LossTile>("loss");

  check_accesses<OpsTile>("ops");
  check_accesses<Tile<32, 4>>("x4");

  check_fixed<OpsTile, Dtype::U8>("ops");
  check_fixed<OpsTile, Dtype::BF16>("ops");
  check_fixed<OpsTile, Dtype::F32>("ops");

  check_vector_taken<OpsTile, Dtype::U8>("ops");
  check_vector_taken<OpsTile, Dtype::BF16>("ops");
  check_vector_taken<OpsTile, Dtype::F32>("ops");
  check_vector_taken<OpsTile, Dtype::F64>("ops");
  return berdiff_test::finish("test_tile");
}

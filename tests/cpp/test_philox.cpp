// Philox4x32-10 against the Random123 known-answer vectors, and the Triton stream (uniforms of
// berdiff_fast.rng, tests/cpp/vectors.h) bit for bit.
#include <string.h>

#include "berdiff_math.h"
#include "check.h"
#include "vectors.h"

using berdiff::Philox4x32;

static void known_answer(Philox4x32 ctr, uint32_t k0, uint32_t k1, Philox4x32 want) {
  const Philox4x32 got = berdiff::philox4x32_10(ctr, k0, k1);
  CHECK(got.x == want.x && got.y == want.y && got.z == want.z && got.w == want.w,
        "ctr %08x %08x %08x %08x key %08x %08x: got %08x %08x %08x %08x", ctr.x, ctr.y, ctr.z, ctr.w, k0, k1, got.x,
        got.y, got.z, got.w);
}

int main() {
  // Random123 kat_vectors, philox4x32 with 10 rounds.
  known_answer({0u, 0u, 0u, 0u}, 0u, 0u, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u});
  known_answer({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, 0xffffffffu, 0xffffffffu,
               {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu});
  known_answer({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, 0xa4093822u, 0x299f31d0u,
               {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u});

  // Triton's uniform map at its edges: 0 -> 0, 2**31 - 1 and its complement -> just below 1.
  CHECK(berdiff::uint_to_uniform(0u) == 0.0f, "u(0)");
  CHECK(berdiff::uint_to_uniform(0xffffffffu) == 0.0f, "u(~0) folds to 0");
  CHECK(berdiff::uint_to_uniform(0x7fffffffu) < 1.0f, "u(2**31 - 1) < 1");
  CHECK(berdiff::uint_to_uniform(0x80000000u) == berdiff::uint_to_uniform(0x7fffffffu), "fold symmetry");

  // philox_uniform (64-bit-lane rounds on the host) is the first word of philox4x32_10.
  int differ = 0;
  for (uint64_t i = 0; i < 100000; ++i) {
    const uint64_t seed = i * 0x9E3779B97F4A7C15ull, counter = ~i * 0xD1B54A32D192ED03ull;
    const Philox4x32 c{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u};
    const float want = berdiff::uint_to_uniform(
        berdiff::philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)).x);
    differ += berdiff::philox_uniform(seed, counter) != want;
  }
  CHECK(differ == 0, "philox_uniform differs from philox4x32_10 for %d keys/counters", differ);

  // The stream of berdiff_fast.rng (== Triton's tl.rand), counters wrapping modulo 2**64.
  for (const auto& v : berdiff_vectors::kUniformVectors) {
    for (int i = 0; i < berdiff_vectors::kUniformCount; ++i) {
      const float u = berdiff::philox_uniform(v.seed, v.offset + static_cast<uint64_t>(i));
      uint32_t bits;
      memcpy(&bits, &u, sizeof bits);
      CHECK(bits == v.bits[i], "seed %llu offset %llu + %d: got %08x want %08x", (unsigned long long)v.seed,
            (unsigned long long)v.offset, i, bits, v.bits[i]);
    }
  }
  return berdiff_test::finish("test_philox");
}

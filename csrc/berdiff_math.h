// The scalar mathematics of BerDiff and the Philox stream, for host C++ and CUDA device code.
//
// This header is the one C++ source of these formulas (DESIGN §1, §3); the CPU kernels, the
// CUDA kernels and the standalone ctest build all include it. It depends on nothing but the C++
// standard library (no torch), so it compiles in the CMake core build too.
//
// Notation (as in berdiff_fast/reference.py): a = alpha_t, bh = beta_t / 2, ab = alpha_bar,
// ab_prev = alpha_bar_{t-1}, flip = (1 - alpha_bar) / 2, e1 = sigmoid(l) = eps_hat,
// e0 = sigmoid(-l) = 1 - eps_hat.
//
// Every formula is a template over the compute type T (float, or double for float64 inputs).
// On the host the float elementary functions (exp_, log_, log1p_) are branch-free polynomial
// versions so that the CPU kernels' inner loops vectorise without -ffast-math; on the device
// they are CUDA's __expf (Triton's exp), logf and log1pf, and float quotients are div.approx
// (div_).
#pragma once

#include <stdint.h>
#include <string.h>

#include <cmath>

#if defined(__CUDACC__)
#define BERDIFF_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define BERDIFF_HD inline __attribute__((always_inline))
#else
#define BERDIFF_HD inline
#endif

namespace berdiff {

// ---- bit casts --------------------------------------------------------------------------------

BERDIFF_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
#endif
}

BERDIFF_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// The float64 tiles' bit casts: a 64-bit memcpy is a register move on the host and the device.
BERDIFF_HD uint64_t double_bits(double x) {
  uint64_t u;
  memcpy(&u, &x, sizeof u);
  return u;
}
BERDIFF_HD double bits_double(uint64_t u) {
  double x;
  memcpy(&x, &u, sizeof x);
  return x;
}

// ---- Philox4x32-10 and Triton's uniform map (DESIGN §3) ----------------------------------------

namespace philox {
constexpr uint32_t kKeyA = 0x9E3779B9u;    // golden ratio
constexpr uint32_t kKeyB = 0xBB67AE85u;    // sqrt(3) - 1
constexpr uint32_t kRoundA = 0xD2511F53u;  // multiplier of word 0
constexpr uint32_t kRoundB = 0xCD9E8D57u;  // multiplier of word 2
constexpr int kRounds = 10;
// Largest float32 scale with (2**31 - 1) * scale < 1 after rounding: Triton's constant.
constexpr float kUniformScale = 4.6566127342e-10f;
}  // namespace philox

struct Philox4x32 {
  uint32_t x, y, z, w;
};

// (hi, lo) words of the 64-bit product a * b.
BERDIFF_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// The Random123 Philox4x32 bijection with 10 rounds: counter c, key (k0, k1).
BERDIFF_HD Philox4x32 philox4x32_10(Philox4x32 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
  for (int r = 0; r < philox::kRounds; ++r) {
    uint32_t hi_a, hi_b;
    const uint32_t lo_a = mulhilo32(philox::kRoundA, c.x, &hi_a);
    const uint32_t lo_b = mulhilo32(philox::kRoundB, c.z, &hi_b);
    c = Philox4x32{hi_b ^ c.y ^ k0, lo_b, hi_a ^ c.w ^ k1, lo_a};
    k0 += philox::kKeyA;
    k1 += philox::kKeyB;
  }
  return c;
}

// Triton's uint_to_uniform_float: view as int32, fold negatives with ~x, scale into [0, 1).
BERDIFF_HD float uint_to_uniform(uint32_t x) {
  int32_t i = static_cast<int32_t>(x);
  i ^= (i >> 31);  // ~i for negative i: a value in [0, 2**31)
  return static_cast<float>(i) * philox::kUniformScale;
}

// tl.rand(seed, counter): counter (lo, hi, 0, 0), key (seed_lo, seed_hi), first output word.
BERDIFF_HD float philox_uniform(uint64_t seed, uint64_t counter) {
#if defined(__CUDA_ARCH__)
  const Philox4x32 c{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u};
  return uint_to_uniform(
      philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)).x);
#else
  // The same rounds as philox4x32_10, with each 32-bit word held in a 64-bit variable: a CPU
  // loop over counters then vectorises into one 32x32->64 multiply (vpmuludq) per word and round
  // with no packing between widths: 1.5-1.8x faster CPU ops with AVX-512, whose build of the CPU
  // kernels uses it (cpu/kernels_impl.h, uniform_chunk). Only the low 32 bits of x0..x3 are
  // meaningful; every multiply masks its operand, and the result keeps the low word of x0.
  const uint64_t kLo = 0xFFFFFFFFull;
  uint64_t x0 = counter & kLo, x1 = counter >> 32, x2 = 0, x3 = 0;
  uint64_t k0 = seed & kLo, k1 = seed >> 32;
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
  for (int r = 0; r < philox::kRounds; ++r) {
    const uint64_t pa = (x0 & kLo) * philox::kRoundA, pb = (x2 & kLo) * philox::kRoundB;
    x0 = (pb >> 32) ^ x1 ^ k0;
    x1 = pb;
    x2 = (pa >> 32) ^ x3 ^ k1;
    x3 = pa;
    k0 = (k0 + philox::kKeyA) & kLo;
    k1 = (k1 + philox::kKeyB) & kLo;
  }
  return uint_to_uniform(static_cast<uint32_t>(x0));
#endif
}

// ---- elementary functions --------------------------------------------------------------------

#if !defined(__CUDA_ARCH__)
namespace detail {
// exp for x in [-87, 88] (clamped there), Cephes expf: about 1 ulp, branch-free.
BERDIFF_HD float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x / ln 2) by the 1.5 * 2**23 trick (needs strict IEEE arithmetic, the default).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * (r * r) + r) + 1.0f;
  return y * bits_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// log for positive normal x (smaller inputs are clamped to FLT_MIN), Cephes logf: about 1 ulp.
BERDIFF_HD float log_poly(float x) {
  x = x < 1.17549435e-38f ? 1.17549435e-38f : x;
  const uint32_t u = float_bits(x);
  float e = static_cast<float>(static_cast<int32_t>(u >> 23) - 126);
  float m = bits_float((u & 0x007FFFFFu) | 0x3F000000u);  // x = m * 2**e, m in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? (m + m) - 1.0f : m - 1.0f;  // log(1 + m), m in [sqrt(1/2) - 1, sqrt(2) - 1)
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (m + y) + e * 0.693359375f;
}
}  // namespace detail
#endif

BERDIFF_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);  // ex2.approx(x log2 e) as Triton's tl.exp: no branch (see div_); 0 below e**-87
#else
  return detail::exp_poly(x);
#endif
}
BERDIFF_HD double exp_(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
BERDIFF_HD float log_(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return detail::log_poly(x);
#endif
}
BERDIFF_HD double log_(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}
// log(1 + z) for z >= 0.
BERDIFF_HD float log1p_(float z) {
#if defined(__CUDA_ARCH__)
  return log1pf(z);
#else
  // log(w) corrected by the rounding error of w = 1 + z (Goldberg's trick, without its branch:
  // when w == 1 the correction alone gives z).
  const float w = 1.0f + z;
  const float d = w - 1.0f;
  return d == 0.0f ? z : detail::log_poly(w) * (z / d);
#endif
}
BERDIFF_HD double log1p_(double z) {
#if defined(__CUDA_ARCH__)
  return ::log1p(z);
#else
  return std::log1p(z);
#endif
}
// a / b in the per-element formulas. On the device a float quotient is div.approx, as Triton's
// fp32 division: 2 ulp for |b| < 2**126, and every denominator here lies between
// min(beta_t, flip_{t-1}) / 2 and 2. IEEE division's slow-path branch would split a kernel's
// unrolled elements into blocks the compiler cannot interleave. Elsewhere IEEE division.
BERDIFF_HD float div_(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#else
  return a / b;
#endif
}
BERDIFF_HD double div_(double a, double b) { return a / b; }

template <typename T>
BERDIFF_HD T abs_(T x) {
  return x < T(0) ? -x : x;
}

// ---- BerDiff formulas ------------------------------------------------------------------------

// e1 = sigmoid(l), e0 = sigmoid(-l), both accurate in their tails, and z = exp(-|l|).
template <typename T>
struct Sigmoids {
  T e1, e0, z;
};
template <typename T>
BERDIFF_HD Sigmoids<T> sigmoids(T l) {
  const T z = exp_(-abs_(l));
  const T big = div_(T(1), T(1) + z);
  const T small = z * big;
  const bool pos = l >= T(0);
  return Sigmoids<T>{pos ? big : small, pos ? small : big, z};
}

// Eq. 7, inner part: y0_hat = |y_t - eps_hat| and its complement 1 - y0_hat, for a binary y_t,
// each taken from sigmoid(l) or sigmoid(-l) directly: exact in both tails, where 1 - sigmoid(l)
// would round to 0 and zero out the posterior's small channel.
template <typename T>
struct Y0Hat {
  T v, c;
};
template <typename T>
BERDIFF_HD Y0Hat<T> predict_y0(T y_t, const Sigmoids<T>& s) {
  return Y0Hat<T>{y_t * s.e0 + (T(1) - y_t) * s.e1, y_t * s.e1 + (T(1) - y_t) * s.e0};
}

// The coefficients of one posterior step t -> t-1, read from the schedule table.
template <typename T>
struct PosteriorCoef {
  T a, bh, ab_prev, flip_prev;
};

// Eq. 4's unnormalised channels (with beta_t / 2, DESIGN §1):
// n0 = (a (1 - y_t) + bh) (ab_prev y0_c + flip_prev), n1 = (a y_t + bh) (ab_prev y0 + flip_prev),
// y0_c = 1 - y0 (passed separately when known more accurately than the subtraction).
template <typename T>
struct Channels {
  T n0, n1;
};
template <typename T>
BERDIFF_HD Channels<T> posterior_channels(const PosteriorCoef<T>& c, T y_t, T y0, T y0_c) {
  return Channels<T>{(c.a * (T(1) - y_t) + c.bh) * (c.ab_prev * y0_c + c.flip_prev),
                     (c.a * y_t + c.bh) * (c.ab_prev * y0 + c.flip_prev)};
}

// Eq. 4: theta_post(y_t, y0) = n1 / (n0 + n1), with y0_c = 1 - y0.
template <typename T>
BERDIFF_HD T theta_post(const PosteriorCoef<T>& c, T y_t, T y0, T y0_c) {
  const Channels<T> n = posterior_channels(c, y_t, y0, y0_c);
  return div_(n.n1, n.n0 + n.n1);
}

// Eq. 7: mu_hat = theta_post(y_t, y0_hat), the DDPM step's Bernoulli parameter.
template <typename T>
BERDIFF_HD T calibrate(const PosteriorCoef<T>& c, T y_t, const Y0Hat<T>& y0_hat) {
  return theta_post(c, y_t, y0_hat.v, y0_hat.c);
}

// Algorithm 2, DDIM jump t -> s: p = sigma y_t + (ab_s - sigma ab_t) y0_hat + (flip_s - flip_t sigma),
// sigma = eta flip_s / flip_t.
template <typename T>
struct DdimCoef {
  T c_yt, c_y0, c_1;
};
template <typename T>
BERDIFF_HD DdimCoef<T> ddim_coef(T ab_t, T flip_t, T ab_s, T flip_s, T eta) {
  const T sigma = eta * flip_s / flip_t;
  return DdimCoef<T>{sigma, ab_s - sigma * ab_t, flip_s - flip_t * sigma};
}
template <typename T>
BERDIFF_HD T ddim_prob(const DdimCoef<T>& c, T y_t, T y0_hat) {
  const T p = c.c_yt * y_t + c.c_y0 * y0_hat + c.c_1;
  const T lo = p < T(0) ? T(0) : p;  // rounding can leave p one ulp outside [0, 1]
  return lo > T(1) ? T(1) : lo;
}

// A Bernoulli draw with parameter p from the uniform u: 1 if u < p (DESIGN §3).
template <typename T>
BERDIFF_HD T bernoulli(float u, T p) {
  return static_cast<T>(u) < p ? T(1) : T(0);
}

template <typename T>
BERDIFF_HD T xlogx(T x) {
  return x > T(0) ? x * log_(x) : T(0);
}

// KL(B(q) || B(p)) = q (log q - log p) + (1 - q)(log(1 - q) - log(1 - p)), in nats, given
// negent_q = q log q + (1 - q) log(1 - q) and both channels of p.
template <typename T>
BERDIFF_HD T bernoulli_kl(T q, T q_c, T negent_q, T p, T p_c) {
  return negent_q - q * log_(p) - q_c * log_(p_c);
}

// BCE from logits: softplus(l) - target * l, with softplus(l) = max(l, 0) + log1p(exp(-|l|)).
template <typename T>
BERDIFF_HD T bce_with_logits(T l, T target, T z) {
  return ((l > T(0) ? l : T(0)) + log1p_(z)) - target * l;
}

// d BCE(l, eps) / dl = e1 - eps for a hard eps: -e0 when eps = 1 (exact in the tail where
// e1 rounds to 1), e1 when eps = 0.
template <typename T>
BERDIFF_HD T bce_grad(const Sigmoids<T>& s, T eps) {
  return eps > T(0.5) ? -s.e0 : s.e1;
}

// Per-sample constants of the loss: the posterior coefficients of t and the true posterior
// q = theta_post(y_t, y0) for each hard (y_t, y0), with its negative entropy.
template <typename T>
struct LossCoef {
  PosteriorCoef<T> pc;
  T q[2][2], q_c[2][2], negent[2][2];  // [y_t][y0]
  bool first;                          // t == 1: the KL term is the decoder NLL
};
// with_entropy = false skips negent (4 logarithms), which only the loss value needs.
template <typename T>
BERDIFF_HD LossCoef<T> loss_coef(const PosteriorCoef<T>& pc, bool first, bool with_entropy = true) {
  LossCoef<T> c;
  c.pc = pc;
  c.first = first;
  for (int yt = 0; yt < 2; ++yt) {
    for (int y0 = 0; y0 < 2; ++y0) {
      const Channels<T> n = posterior_channels(pc, T(yt), T(y0), T(1 - y0));
      const T q = n.n1 / (n.n0 + n.n1), q_c = n.n0 / (n.n0 + n.n1);
      c.q[yt][y0] = q;
      c.q_c[yt][y0] = q_c;
      c.negent[yt][y0] = with_entropy ? xlogx(q) + xlogx(q_c) : T(0);
    }
  }
  return c;
}

// The quantities of one pixel that both the loss and its derivative use.
template <typename T>
struct LossPixel {
  Sigmoids<T> s;
  T eps;          // y_t XOR y0: the flip the network predicts
  T B0, B1;       // ab_prev [1 - y0_hat, y0_hat] + flip_prev
  T p, p_c;       // mu_hat = theta_post(y_t, y0_hat) and 1 - mu_hat
  T q, q_c, negent;
};
template <typename T>
BERDIFF_HD LossPixel<T> loss_pixel(const LossCoef<T>& c, T l, T y_t, T y0) {
  LossPixel<T> px;
  px.s = sigmoids(l);
  px.eps = abs_(y_t - y0);
  const Y0Hat<T> y0_hat = predict_y0(y_t, px.s);
  const PosteriorCoef<T>& pc = c.pc;
  const T A0 = pc.a * (T(1) - y_t) + pc.bh, A1 = pc.a * y_t + pc.bh;
  px.B0 = pc.ab_prev * y0_hat.c + pc.flip_prev;
  px.B1 = pc.ab_prev * y0_hat.v + pc.flip_prev;
  const T n0 = A0 * px.B0, n1 = A1 * px.B1, S = n0 + n1;
  px.p = div_(n1, S);
  px.p_c = div_(n0, S);
  // Hard masks: select the per-sample constants of (y_t, y0) without branching.
  const bool yt1 = y_t > T(0.5), y01 = y0 > T(0.5);
  px.q = yt1 ? (y01 ? c.q[1][1] : c.q[1][0]) : (y01 ? c.q[0][1] : c.q[0][0]);
  px.q_c = yt1 ? (y01 ? c.q_c[1][1] : c.q_c[1][0]) : (y01 ? c.q_c[0][1] : c.q_c[0][0]);
  px.negent = yt1 ? (y01 ? c.negent[1][1] : c.negent[1][0]) : (y01 ? c.negent[0][1] : c.negent[0][0]);
  return px;
}

// The per-pixel loss in nats: KL(q || mu_hat) + BCE(l, eps) for t > 1 ...
template <typename T>
BERDIFF_HD T loss_value_kl(const LossCoef<T>& c, T l, T y_t, T y0) {
  const LossPixel<T> px = loss_pixel(c, l, y_t, y0);
  return bernoulli_kl(px.q, px.q_c, px.negent, px.p, px.p_c) + bce_with_logits(l, px.eps, px.s.z);
}
// ... and at t = 1, where the KL term is the decoder NLL -log B(y0; y0_hat) = BCE(l, eps): 2 BCE.
template <typename T>
BERDIFF_HD T loss_value_nll(T l, T y_t, T y0) {
  const T bce = bce_with_logits(l, abs_(y_t - y0), exp_(-abs_(l)));
  return bce + bce;
}
template <typename T>
BERDIFF_HD T loss_value(const LossCoef<T>& c, T l, T y_t, T y0) {
  return c.first ? loss_value_nll(l, y_t, y0) : loss_value_kl(c, l, y_t, y0);
}

// d(loss_value)/dl. For t > 1: (e1 - eps) + (p - q) ab_prev (1 - 2 y_t) e1 e0 / (B0 B1)
// (dKL/dp = (p - q) / (p (1 - p)), and B0 + B1 = 1 cancels one factor of dp/dl) ...
template <typename T>
BERDIFF_HD T loss_grad_kl(const LossCoef<T>& c, T l, T y_t, T y0) {
  const LossPixel<T> px = loss_pixel(c, l, y_t, y0);
  const T dkl = (px.p - px.q) * c.pc.ab_prev * (T(1) - T(2) * y_t) * div_(px.s.e1 * px.s.e0, px.B0 * px.B1);
  return dkl + bce_grad(px.s, px.eps);
}
// ... and 2 (e1 - eps) at t = 1.
template <typename T>
BERDIFF_HD T loss_grad_nll(T l, T y_t, T y0) {
  const T d = bce_grad(sigmoids(l), abs_(y_t - y0));
  return d + d;
}
template <typename T>
BERDIFF_HD T loss_grad(const LossCoef<T>& c, T l, T y_t, T y0) {
  return c.first ? loss_grad_nll(l, y_t, y0) : loss_grad_kl(c, l, y_t, y0);
}

constexpr double kLn2 = 0.693147180559945309417232121458176568;

}  // namespace berdiff

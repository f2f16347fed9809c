// The scalar formulas of berdiff_math.h against berdiff_fast.reference (float64, vectors.h),
// in double (to rounding) and in float (to float accuracy); the elementary functions and the
// storage conversions over wide ranges.
#include <cfloat>
#include <initializer_list>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "berdiff_math.h"
#include "check.h"
#include "kernel_args.h"
#include "vectors.h"

using namespace berdiff;

template <typename T>
static void math_case(const berdiff_vectors::MathCase& c, double rtol, double atol, const char* type) {
  const PosteriorCoef<T> pc{T(c.row_t[0]), T(c.row_t[1]), T(c.row_tm1[2]), T(c.row_tm1[3])};
  const T l = T(c.logit), yt = T(c.y_t), y0 = T(c.y0);
  const Y0Hat<T> y0_hat = predict_y0(yt, sigmoids(l));
  char what[96];
  snprintf(what, sizeof what, "%s t=%lld y_t=%g y0=%g l=%g", type, (long long)c.t, c.y_t, c.y0, c.logit);
  CHECK_CLOSE(y0_hat.v, c.y0_hat, rtol, atol, what);
  CHECK_CLOSE(y0_hat.c, 1.0 - c.y0_hat, rtol, atol, what);
  CHECK_CLOSE(theta_post(pc, yt, y0, T(1) - y0), c.theta_post, rtol, atol, what);
  CHECK_CLOSE(calibrate(pc, yt, y0_hat), c.calibrate, rtol, atol, what);
  const DdimCoef<T> dc = ddim_coef(T(c.row_t[2]), T(c.row_t[3]), T(c.row_s[2]), T(c.row_s[3]), T(c.eta));
  CHECK_CLOSE(ddim_prob(dc, yt, y0_hat.v), c.ddim_prob, rtol, atol, what);
  const LossCoef<T> lc = loss_coef(pc, c.t == 1);
  CHECK_CLOSE(loss_value(lc, l, yt, y0), c.loss, rtol, atol, what);
  CHECK_CLOSE(loss_grad(lc, l, yt, y0), c.dloss, rtol, atol, what);
  CHECK_CLOSE(loss_grad(loss_coef(pc, c.t == 1, false), l, yt, y0), c.dloss, rtol, atol, what);
}

static uint32_t bits_of(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
}

int main() {
  for (const auto& c : berdiff_vectors::kMathCases) {
    math_case<double>(c, 1e-12, 1e-14, "double");
    math_case<float>(c, 2e-5, 2e-6, "float");
  }

  // Host float elementary functions: within a few ulp of libm over their working ranges.
  double worst_exp = 0, worst_log = 0, worst_log1p = 0;
  for (int i = 0; i <= 200000; ++i) {
    const float x = -87.0f + 175.0f * static_cast<float>(i) / 200000.0f;
    const double want = std::exp(static_cast<double>(x));
    worst_exp = std::fmax(worst_exp, std::fabs(exp_(x) - want) / want);
    const float p = std::ldexp(1.0f + static_cast<float>(i % 1000) / 1000.0f, i / 1000 - 120);  // 2**-120 .. 2**80
    worst_log = std::fmax(worst_log, std::fabs(log_(p) - std::log(static_cast<double>(p))) /
                                         std::fmax(std::fabs(std::log(static_cast<double>(p))), 1e-30));
    const float z = static_cast<float>(i) / 200000.0f * (i % 2 ? 1.0f : 1e-6f);
    const double want1p = std::log1p(static_cast<double>(z));
    if (z > 0) worst_log1p = std::fmax(worst_log1p, std::fabs(log1p_(z) - want1p) / want1p);
  }
  CHECK(worst_exp < 4 * FLT_EPSILON, "exp_ relative error %g", worst_exp);
  CHECK(worst_log < 4 * FLT_EPSILON, "log_ relative error %g", worst_log);
  CHECK(worst_log1p < 4 * FLT_EPSILON, "log1p_ relative error %g", worst_log1p);
  CHECK(log1p_(0.0f) == 0.0f, "log1p_(0)");
  CHECK(exp_(-1000.0f) >= 0.0f && exp_(-1000.0f) < 1e-37f, "exp_ underflow clamps");

  // Sigmoids: both tails exact, e1 + e0 = 1.
  for (float l : {-100.0f, -30.0f, -1.0f, 0.0f, 2.5f, 30.0f, 100.0f}) {
    const Sigmoids<float> s = sigmoids(l);
    CHECK_CLOSE(s.e1, 1.0 / (1.0 + std::exp(-static_cast<double>(l))), 4 * FLT_EPSILON, 1e-37, "sigmoid");
    CHECK_CLOSE(s.e0, 1.0 / (1.0 + std::exp(static_cast<double>(l))), 4 * FLT_EPSILON, 1e-37, "sigmoid(-l)");
  }

  // Storage conversions: every half and bfloat16 round-trips; rounding to nearest even.
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = half_to_float(static_cast<uint16_t>(h));
    if (f == f) CHECK(float_to_half(f) == h, "half %04x", h);
    const float g = bf16_to_float(static_cast<uint16_t>(h));
    if (g == g) CHECK(float_to_bf16(g) == h, "bf16 %04x", h);
  }
  CHECK(half_to_float(0x3c00u) == 1.0f && half_to_float(0x0001u) == std::ldexp(1.0f, -24), "half values");
  CHECK(float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80u, "bf16 ties to even (down)");
  CHECK(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82u, "bf16 ties to even (up)");
  CHECK(bits_of(bf16_to_float(float_to_bf16(NAN))) != bits_of(INFINITY), "bf16 NaN stays NaN");
  return berdiff_test::finish("test_math");
}

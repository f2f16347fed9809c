// The CPU kernels (every instruction set this CPU runs) against the scalar formulas of
// berdiff_math.h evaluated element by element, and against each other: the vectorised loops must
// draw the same uniforms, the same masks and the same values, bit for bit.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <random>
#include <vector>

#include "berdiff_math.h"
#include "check.h"
#include "cpu/kernels.h"

using namespace berdiff;

namespace {

struct Problem {
  int64_t batch = 3, npix = 1031;  // a prime: chunks end mid-vector and mid-sample
  std::vector<float> logits, y_t, y0;
  std::vector<uint16_t> logits_bf16;
  std::vector<uint8_t> mask_u8;
  std::vector<float> table;  // [T + 1, 4]
  std::vector<int64_t> t, s;
  int64_t T = 50;

  Problem() {
    std::mt19937 gen(7);
    std::normal_distribution<float> normal(0.0f, 4.0f);
    std::bernoulli_distribution coin(0.4);
    const int64_t n = batch * npix;
    for (int64_t i = 0; i < n; ++i) {
      logits.push_back(normal(gen));
      logits_bf16.push_back(float_to_bf16(logits.back()));
      y_t.push_back(coin(gen) ? 1.0f : 0.0f);
      y0.push_back(coin(gen) ? 1.0f : 0.0f);
      mask_u8.push_back(static_cast<uint8_t>(y_t.back()));
    }
    // A linear schedule of T steps, rows (alpha, beta/2, alpha_bar, flip).
    double ab = 1.0;
    table = {1.0f, 0.0f, 1.0f, 0.0f};
    for (int64_t k = 1; k <= T; ++k) {
      const double beta = 1e-4 * 20 + (0.02 * 20 - 1e-4 * 20) * (k - 1) / (T - 1);
      ab *= 1.0 - beta;
      table.insert(table.end(), {float(1.0 - beta), float(beta / 2), float(ab), float((1.0 - ab) / 2)});
    }
    t = {1, 17, T};
    s = {0, 3, 0};
  }

  OpArgs args() const {
    OpArgs a;
    a.logits = logits.data();
    a.y = y_t.data();
    a.y0 = y0.data();
    a.table = table.data();
    a.table_rows = T + 1;
    a.t = t.data();
    a.s = s.data();
    a.batch = batch;
    a.npix = npix;
    a.eta = 0.6;
    a.seed = 0x1234567890ull;
    a.offset = (1ull << 32) - 100;  // the counter's high word changes mid-draw
    return a;
  }
  int64_t n() const { return batch * npix; }
};

float uniform_at(const OpArgs& a, int64_t i) { return philox_uniform(a.seed, a.offset + static_cast<uint64_t>(i)); }

// Masks drawn by kernel k equal the scalar draw u < p, except where u is within rounding of p.
template <typename P>
void check_masks(const char* what, const OpArgs& a, const std::vector<float>& got, P prob) {
  int mismatches = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(got.size()); ++i) {
    const float p = prob(i / a.npix, i), u = uniform_at(a, i);
    if (std::fabs(u - p) > 1e-6f && got[i] != (u < p ? 1.0f : 0.0f)) ++mismatches;
  }
  CHECK(mismatches == 0, "%s: %d masks differ from u < p", what, mismatches);
}

void run(const cpu::KernelTable& k, const Problem& pb, const cpu::KernelTable& base) {
  const int64_t n = pb.n();
  const std::string isa = k.isa;
  OpArgs a = pb.args();

  // init_noise: y_T = u < 1/2, in uint8.
  std::vector<uint8_t> noise(n);
  a.out = noise.data();
  a.out_dtype = Dtype::U8;
  k.init_noise(a, 0, n);
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += noise[i] != (uniform_at(a, i) < 0.5f ? 1 : 0);
  CHECK(bad == 0, "%s init_noise: %d draws differ from the Philox stream", isa.c_str(), bad);

  // q_sample on float masks, split into two ranges (as two threads would).
  std::vector<float> yt(n), eps(n);
  a = pb.args();
  a.y = pb.y0.data();
  a.out = yt.data();
  a.out2 = eps.data();
  k.q_sample(a, 0, 1500);
  k.q_sample(a, 1500, n);
  bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float e = uniform_at(a, i) < pb.table[pb.t[i / pb.npix] * 4 + kColFlip] ? 1.0f : 0.0f;
    bad += eps[i] != e || yt[i] != std::fabs(pb.y0[i] - e);
  }
  CHECK(bad == 0, "%s q_sample: %d elements differ", isa.c_str(), bad);

  // DDPM and DDIM steps with y0_hat, bf16 logits and uint8 masks for DDIM.
  std::vector<float> y(n), y0_hat(n), y_base(n), y0_hat_base(n);
  for (int ddim = 0; ddim < 2; ++ddim) {
    a = pb.args();
    if (ddim) {
      a.logits = pb.logits_bf16.data();
      a.logits_dtype = Dtype::BF16;
    }
    a.out = y.data();
    a.out2 = y0_hat.data();
    (ddim ? k.ddim_step : k.ddpm_step)(a, 0, n);
    OpArgs b = a;
    b.out = y_base.data();
    b.out2 = y0_hat_base.data();
    (ddim ? base.ddim_step : base.ddpm_step)(b, 0, n);
    CHECK(memcmp(y.data(), y_base.data(), n * sizeof(float)) == 0 &&
              memcmp(y0_hat.data(), y0_hat_base.data(), n * sizeof(float)) == 0,
          "%s %s: differs from the %s kernels", isa.c_str(), ddim ? "ddim" : "ddpm", base.isa);
    const auto logit = [&](int64_t i) { return ddim ? bf16_to_float(pb.logits_bf16[i]) : pb.logits[i]; };
    bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double want = std::fabs(pb.y_t[i] - 1.0 / (1.0 + std::exp(-static_cast<double>(logit(i)))));
      bad += std::fabs(y0_hat[i] - want) > 1e-6;
    }
    CHECK(bad == 0, "%s y0_hat: %d values off", isa.c_str(), bad);
    check_masks(ddim ? "ddim" : "ddpm", a, y, [&](int64_t b_, int64_t i) {
      const Y0Hat<float> y0 = predict_y0(pb.y_t[i], sigmoids(logit(i)));
      if (ddim) {
        const DdimCoef<float> c = ddim_coef_at<float>(a, pb.t[b_], pb.s[b_]);
        return ddim_prob(c, pb.y_t[i], y0.v);
      }
      return calibrate(posterior_coef<float>(a, pb.t[b_]), pb.y_t[i], y0);
    });
  }

  // The loss: block sums against a double-precision scalar sum; the gradient bit-identical
  // across instruction sets and close to the scalar formula.
  a = pb.args();
  a.y = pb.mask_u8.data();
  a.y_dtype = Dtype::U8;
  for (int64_t b = 0; b < pb.batch; ++b) {
    const double got = k.loss_sum(a, b, b * pb.npix, (b + 1) * pb.npix);
    const LossCoef<double> c = loss_coef(posterior_coef<double>(a, pb.t[b]), pb.t[b] == 1);
    double want = 0.0;
    for (int64_t i = b * pb.npix; i < (b + 1) * pb.npix; ++i) want += loss_value<double>(c, pb.logits[i], pb.y_t[i], pb.y0[i]);
    CHECK_CLOSE(got, want, 1e-5, 1e-6, (isa + " loss_sum").c_str());
  }
  std::vector<double> grad_out = {1.0, -0.5, 2.0};
  std::vector<float> g(n), g_base(n);
  a.grad = grad_out.data();
  a.grad_dtype = Dtype::F64;
  a.out = g.data();
  k.loss_backward(a, 0, n);
  OpArgs b = a;
  b.out = g_base.data();
  base.loss_backward(b, 0, n);
  CHECK(memcmp(g.data(), g_base.data(), n * sizeof(float)) == 0, "%s loss_backward: differs from %s", isa.c_str(),
        base.isa);
  bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t bi = i / pb.npix;
    const LossCoef<double> c = loss_coef(posterior_coef<double>(a, pb.t[bi]), pb.t[bi] == 1);
    const double want = grad_out[bi] / (pb.npix * kLn2) * loss_grad<double>(c, pb.logits[i], pb.y_t[i], pb.y0[i]);
    bad += !berdiff_test::close(g[i], want, 1e-4, 1e-9);
  }
  CHECK(bad == 0, "%s loss_backward: %d gradients off", isa.c_str(), bad);
}

}  // namespace

int main() {
  const Problem pb;
  const cpu::KernelTable& base = cpu::kernels_default();
  int ran = 0;
  for (const char* isa : {"default", "avx2", "avx512"}) {
    const cpu::KernelTable* k = cpu::select_kernels(isa);
    if (k == nullptr) {
      std::printf("test_kernels: %s not supported by this CPU, skipped\n", isa);
      continue;
    }
    run(*k, pb, base);
    ++ran;
  }
  CHECK(ran >= 1 && cpu::select_kernels(nullptr) != nullptr, "no kernel table");
  CHECK(cpu::select_kernels("sse9") == nullptr, "unknown names are refused");
  return berdiff_test::finish("test_kernels");
}

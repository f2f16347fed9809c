// The CPU kernels' bodies. Included once per instruction set by kernels_<isa>.cpp, inside that
// file's target region, with BERDIFF_CPU_ISA naming the namespace and BERDIFF_CPU_TABLE the
// accessor (e.g. avx2 / kernels_avx2). No include guard on purpose.
//
// Work is cut into chunks of kChunk elements kept in stack buffers: load (dtype -> T),
// uniforms (Philox), compute (the formulas of berdiff_math.h), store (T -> dtype). Each stage is
// a branch-free loop over the chunk that the compiler vectorises; no tensor is allocated.

namespace berdiff {
namespace cpu {
namespace BERDIFF_CPU_ISA {

constexpr int kChunk = 256;

template <typename T, typename S, typename F>
inline void convert_in(const void* p, int64_t start, int n, T* dst, F f) {
  const S* src = static_cast<const S*>(p) + start;
  for (int i = 0; i < n; ++i) dst[i] = static_cast<T>(f(src[i]));
}

// dst[i] = element start + i of p (storage dtype d) as T.
template <typename T>
inline void load_chunk(const void* p, Dtype d, int64_t start, int n, T* dst) {
  switch (d) {
    case Dtype::Bool:
    case Dtype::U8: convert_in<T, uint8_t>(p, start, n, dst, [](uint8_t v) { return v; }); break;
    case Dtype::F16: convert_in<T, uint16_t>(p, start, n, dst, [](uint16_t v) { return half_to_float(v); }); break;
    case Dtype::BF16: convert_in<T, uint16_t>(p, start, n, dst, [](uint16_t v) { return bf16_to_float(v); }); break;
    case Dtype::F32: convert_in<T, float>(p, start, n, dst, [](float v) { return v; }); break;
    case Dtype::F64: convert_in<T, double>(p, start, n, dst, [](double v) { return v; }); break;
  }
}

// Element start + i of p (storage dtype d) = src[i].
template <typename T>
inline void store_chunk(void* p, Dtype d, int64_t start, int n, const T* src) {
  switch (d) {
    case Dtype::Bool: {  // a bool byte must be 0 or 1, whatever the value (store_as does the same)
      uint8_t* o = static_cast<uint8_t*>(p) + start;
      for (int i = 0; i < n; ++i) o[i] = src[i] != T(0);
      break;
    }
    case Dtype::U8: {
      uint8_t* o = static_cast<uint8_t*>(p) + start;
      for (int i = 0; i < n; ++i) o[i] = static_cast<uint8_t>(src[i]);  // masks: 0 or 1
      break;
    }
    case Dtype::F16: {
      uint16_t* o = static_cast<uint16_t*>(p) + start;
      for (int i = 0; i < n; ++i) o[i] = float_to_half(static_cast<float>(src[i]));
      break;
    }
    case Dtype::BF16: {
      uint16_t* o = static_cast<uint16_t*>(p) + start;
      for (int i = 0; i < n; ++i) o[i] = float_to_bf16(static_cast<float>(src[i]));
      break;
    }
    case Dtype::F32: {
      float* o = static_cast<float*>(p) + start;
      for (int i = 0; i < n; ++i) o[i] = static_cast<float>(src[i]);
      break;
    }
    case Dtype::F64: {
      double* o = static_cast<double*>(p) + start;
      for (int i = 0; i < n; ++i) o[i] = static_cast<double>(src[i]);
      break;
    }
  }
}

// u[i] = tl.rand(seed, counter + i). The AVX-512 build takes philox_uniform's 64-bit-lane rounds
// (one vpmuludq per word and round); with SSE2 or AVX2 the 32-bit rounds are as fast or faster.
inline void uniform_chunk(uint64_t seed, uint64_t counter, int n, float* u) {
#if defined(BERDIFF_CPU_WIDE_PHILOX)
  for (int i = 0; i < n; ++i) u[i] = philox_uniform(seed, counter + static_cast<uint64_t>(i));
#else
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int i = 0; i < n; ++i) {
    const uint64_t c = counter + static_cast<uint64_t>(i);
    const Philox4x32 ctr{static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0u, 0u};
    u[i] = uint_to_uniform(philox4x32_10(ctr, k0, k1).x);
  }
#endif
}

// f(b, start, n) for each chunk of [begin, end), chunks never straddling two samples.
template <typename F>
inline void for_each_chunk(const OpArgs& a, int64_t begin, int64_t end, F f) {
  int64_t i = begin;
  while (i < end) {
    const int64_t b = i / a.npix;
    const int64_t sample_end = (b + 1) * a.npix < end ? (b + 1) * a.npix : end;
    while (i < sample_end) {
      const int n = static_cast<int>(sample_end - i < kChunk ? sample_end - i : kChunk);
      f(b, i, n);
      i += n;
    }
  }
}

// ---- noising (Algorithm 1): eps = u < flip_t, y_t = y0 XOR eps --------------------------------

template <typename T>
void q_sample_t(const OpArgs& a, int64_t begin, int64_t end) {
  for_each_chunk(a, begin, end, [&](int64_t b, int64_t start, int n) {
    const T flip = table_at<T>(a, a.t[b], kColFlip);
    T y0[kChunk], yt[kChunk], eps[kChunk];
    float u[kChunk];
    load_chunk(a.y, a.y_dtype, start, n, y0);
    uniform_chunk(a.seed, a.offset + static_cast<uint64_t>(start), n, u);
    for (int i = 0; i < n; ++i) {
      eps[i] = bernoulli(u[i], flip);
      yt[i] = abs_(y0[i] - eps[i]);
    }
    store_chunk(a.out, a.out_dtype, start, n, yt);
    store_chunk(a.out2, a.out2_dtype, start, n, eps);
  });
}

void q_sample(const OpArgs& a, int64_t begin, int64_t end) {
  a.compute == Dtype::F64 ? q_sample_t<double>(a, begin, end) : q_sample_t<float>(a, begin, end);
}

// ---- the start of sampling: y_T = u < 1/2 ----------------------------------------------------

void init_noise(const OpArgs& a, int64_t begin, int64_t end) {
  for (int64_t start = begin; start < end; start += kChunk) {
    const int n = static_cast<int>(end - start < kChunk ? end - start : kChunk);
    float u[kChunk], y[kChunk];
    uniform_chunk(a.seed, a.offset + static_cast<uint64_t>(start), n, u);
    for (int i = 0; i < n; ++i) y[i] = bernoulli(u[i], 0.5f);
    store_chunk(a.out, a.out_dtype, start, n, y);
  }
}

// ---- sampling steps (Algorithm 2) ------------------------------------------------------------

// Shared body of both steps: p = prob(y_t, y0_hat) per pixel, y = u < p, y0_hat stored if asked.
template <typename T, typename Coef, typename Prob>
void step_t(const OpArgs& a, int64_t begin, int64_t end, Coef coef_of_sample, Prob prob) {
  for_each_chunk(a, begin, end, [&](int64_t b, int64_t start, int n) {
    const auto coef = coef_of_sample(b);
    T l[kChunk], yt[kChunk], y[kChunk], y0_hat[kChunk];
    float u[kChunk];
    load_chunk(a.logits, a.logits_dtype, start, n, l);
    load_chunk(a.y, a.y_dtype, start, n, yt);
    uniform_chunk(a.seed, a.offset + static_cast<uint64_t>(start), n, u);
    for (int i = 0; i < n; ++i) {
      const Y0Hat<T> y0 = predict_y0(yt[i], sigmoids(l[i]));  // Eq. 7
      y0_hat[i] = y0.v;
      y[i] = bernoulli(u[i], prob(coef, yt[i], y0));
    }
    store_chunk(a.out, a.out_dtype, start, n, y);
    if (a.out2 != nullptr) store_chunk(a.out2, a.out2_dtype, start, n, y0_hat);
  });
}

template <typename T>
void ddpm_step_t(const OpArgs& a, int64_t begin, int64_t end) {
  step_t<T>(
      a, begin, end, [&](int64_t b) { return posterior_coef<T>(a, a.t[b]); },
      [](const PosteriorCoef<T>& c, T yt, const Y0Hat<T>& y0) { return calibrate(c, yt, y0); });
}

template <typename T>
void ddim_step_t(const OpArgs& a, int64_t begin, int64_t end) {
  step_t<T>(
      a, begin, end, [&](int64_t b) { return ddim_coef_at<T>(a, a.t[b], a.s[b]); },
      [](const DdimCoef<T>& c, T yt, const Y0Hat<T>& y0) { return ddim_prob(c, yt, y0.v); });
}

void ddpm_step(const OpArgs& a, int64_t begin, int64_t end) {
  a.compute == Dtype::F64 ? ddpm_step_t<double>(a, begin, end) : ddpm_step_t<float>(a, begin, end);
}

void ddim_step(const OpArgs& a, int64_t begin, int64_t end) {
  a.compute == Dtype::F64 ? ddim_step_t<double>(a, begin, end) : ddim_step_t<float>(a, begin, end);
}

template <typename T>
void predict_y0_t(const OpArgs& a, int64_t begin, int64_t end) {
  for (int64_t start = begin; start < end; start += kChunk) {
    const int n = static_cast<int>(end - start < kChunk ? end - start : kChunk);
    T l[kChunk], yt[kChunk], y0_hat[kChunk];
    load_chunk(a.logits, a.logits_dtype, start, n, l);
    load_chunk(a.y, a.y_dtype, start, n, yt);
    for (int i = 0; i < n; ++i) y0_hat[i] = predict_y0(yt[i], sigmoids(l[i])).v;
    store_chunk(a.out, a.out_dtype, start, n, y0_hat);
  }
}

void predict_y0(const OpArgs& a, int64_t begin, int64_t end) {
  a.compute == Dtype::F64 ? predict_y0_t<double>(a, begin, end) : predict_y0_t<float>(a, begin, end);
}

// ---- the loss (Eqs. 8, 9) and its derivative --------------------------------------------------

template <typename T>
LossCoef<T> loss_coef_of(const OpArgs& a, int64_t b, bool with_entropy) {
  const int64_t t = a.t[b];
  return loss_coef(posterior_coef<T>(a, t), t == 1, with_entropy);
}

template <typename T>
double loss_sum_t(const OpArgs& a, int64_t b, int64_t begin, int64_t end) {
  constexpr int kLanes = 16;  // independent partial sums: a reduction the compiler vectorises
  const LossCoef<T> c = loss_coef_of<T>(a, b, true);
  double total = 0.0;
  for (int64_t start = begin; start < end; start += kChunk) {
    const int n = static_cast<int>(end - start < kChunk ? end - start : kChunk);
    T l[kChunk], yt[kChunk], y0[kChunk], v[kChunk];
    load_chunk(a.logits, a.logits_dtype, start, n, l);
    load_chunk(a.y, a.y_dtype, start, n, yt);
    load_chunk(a.y0, a.y0_dtype, start, n, y0);
    if (c.first) {
      for (int i = 0; i < n; ++i) v[i] = loss_value_nll(l[i], yt[i], y0[i]);
    } else {
      for (int i = 0; i < n; ++i) v[i] = loss_value_kl(c, l[i], yt[i], y0[i]);
    }
    const int padded = (n + kLanes - 1) / kLanes * kLanes;
    for (int i = n; i < padded; ++i) v[i] = T(0);
    T acc[kLanes] = {};
    for (int j = 0; j < padded; j += kLanes) {
      for (int k = 0; k < kLanes; ++k) acc[k] += v[j + k];
    }
    for (int k = 0; k < kLanes; ++k) total += static_cast<double>(acc[k]);
  }
  return total;
}

double loss_sum(const OpArgs& a, int64_t b, int64_t begin, int64_t end) {
  return a.compute == Dtype::F64 ? loss_sum_t<double>(a, b, begin, end) : loss_sum_t<float>(a, b, begin, end);
}

template <typename T>
void loss_backward_t(const OpArgs& a, int64_t begin, int64_t end) {
  const T inv = static_cast<T>(1.0 / (static_cast<double>(a.npix) * kLn2));
  for_each_chunk(a, begin, end, [&](int64_t b, int64_t start, int n) {
    const LossCoef<T> c = loss_coef_of<T>(a, b, false);
    const T scale = load_as<T>(a.grad, a.grad_dtype, b) * inv;  // d(mean / ln 2) = 1 / (npix ln 2)
    T l[kChunk], yt[kChunk], y0[kChunk], g[kChunk];
    load_chunk(a.logits, a.logits_dtype, start, n, l);
    load_chunk(a.y, a.y_dtype, start, n, yt);
    load_chunk(a.y0, a.y0_dtype, start, n, y0);
    if (c.first) {
      for (int i = 0; i < n; ++i) g[i] = scale * loss_grad_nll(l[i], yt[i], y0[i]);
    } else {
      for (int i = 0; i < n; ++i) g[i] = scale * loss_grad_kl(c, l[i], yt[i], y0[i]);
    }
    store_chunk(a.out, a.out_dtype, start, n, g);
  });
}

void loss_backward(const OpArgs& a, int64_t begin, int64_t end) {
  a.compute == Dtype::F64 ? loss_backward_t<double>(a, begin, end) : loss_backward_t<float>(a, begin, end);
}

}  // namespace BERDIFF_CPU_ISA

const KernelTable& BERDIFF_CPU_TABLE() {
  static const KernelTable table{BERDIFF_CPU_ISA_NAME,
                                 BERDIFF_CPU_ISA::q_sample,
                                 BERDIFF_CPU_ISA::init_noise,
                                 BERDIFF_CPU_ISA::ddpm_step,
                                 BERDIFF_CPU_ISA::ddim_step,
                                 BERDIFF_CPU_ISA::predict_y0,
                                 BERDIFF_CPU_ISA::loss_sum,
                                 BERDIFF_CPU_ISA::loss_backward};
  return table;
}

}  // namespace cpu
}  // namespace berdiff

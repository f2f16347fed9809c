// CPU drivers of the berdiff ops: the shared host setup (op_setup.h), the paper times checked
// against the table (readable here without a synchronisation), then the elements split over
// threads with at::parallel_for (contiguous blocks) and each block handed to kernels.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdlib>
#include <vector>

#include "../op_setup.h"
#include "../ops.h"
#include "kernels.h"

namespace berdiff {
namespace {

// Elements per parallel task: below this an op runs on the calling thread alone.
constexpr int64_t kGrain = 32768;

std::atomic<const cpu::KernelTable*> g_kernels{nullptr};

const cpu::KernelTable& kernels() {
  const cpu::KernelTable* k = g_kernels.load(std::memory_order_acquire);
  if (k == nullptr) {
    // BERDIFF_CPU_ISA=default|avx2|avx512 pins an instruction set; unknown or unsupported names
    // fall back to the best one this CPU has.
    const char* env = std::getenv("BERDIFF_CPU_ISA");
    k = cpu::select_kernels(env);
    if (k == nullptr) k = cpu::select_kernels(nullptr);
    g_kernels.store(k, std::memory_order_release);
  }
  return *k;
}

// Paper times must index the table: lo <= t[b] <= T = rows - 1.
void check_time_values(const char* name, const at::Tensor& t, int64_t lo, int64_t rows) {
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t b = 0; b < t.numel(); ++b) {
    TORCH_CHECK(p[b] >= lo && p[b] < rows, name, "[", b, "] = ", p[b], " is outside ", lo, "..", rows - 1,
                " (paper time; the table has T = ", rows - 1, ")");
  }
}

// A DDIM jump goes back in time: s[b] < t[b].
void check_jump_targets(const at::Tensor& t, const at::Tensor& s) {
  const int64_t *pt = t.data_ptr<int64_t>(), *ps = s.data_ptr<int64_t>();
  for (int64_t b = 0; b < t.numel(); ++b) {
    TORCH_CHECK(ps[b] < pt[b], "s[", b, "] = ", ps[b], " is not smaller than t[", b, "] = ", pt[b],
                " (a DDIM jump goes back in time)");
  }
}

template <typename F>
void parallel_elements(const OpArgs& a, int64_t n, F kernel) {
  if (n == 0) return;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
}

}  // namespace

std::string cpu_isa(const std::string& isa) {
  if (!isa.empty()) {
    const cpu::KernelTable* k = cpu::select_kernels(isa.c_str());
    TORCH_CHECK(k != nullptr, "cpu_isa: '", isa,
                "' is unknown or unsupported by this CPU; expected one of default, avx2, avx512");
    g_kernels.store(k, std::memory_order_release);
  }
  return kernels().isa;
}

std::tuple<at::Tensor, at::Tensor> q_sample_cpu(const at::Tensor& y0, const at::Tensor& t, const at::Tensor& table,
                                                const at::Tensor& seed, const at::Tensor& offset) {
  setup::QSample p = setup::q_sample(y0, t, table, seed, offset);
  check_time_values("t", p.t, 0, p.table.size(0));
  parallel_elements(p.a, p.y0.numel(), kernels().q_sample);
  return {p.y_t, p.eps};
}

void init_noise_cpu(at::Tensor& out, const at::Tensor& seed, const at::Tensor& offset) {
  parallel_elements(setup::init_noise(out, seed, offset), out.numel(), kernels().init_noise);
}

namespace {

std::tuple<at::Tensor, at::Tensor> step_cpu(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& t,
                                            const at::Tensor* s, const at::Tensor& table, const at::Tensor& seed,
                                            const at::Tensor& offset, double eta, bool return_y0) {
  setup::Step p = setup::step(logits, y_t, t, s, table, seed, offset, eta, return_y0);
  check_time_values("t", p.t, 1, p.table.size(0));
  if (s != nullptr) {
    check_time_values("s", p.s, 0, p.table.size(0));
    check_jump_targets(p.t, p.s);
  }
  parallel_elements(p.a, p.y_t.numel(), s != nullptr ? kernels().ddim_step : kernels().ddpm_step);
  return {p.y, p.y0_hat};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ddpm_step_cpu(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& t,
                                                 const at::Tensor& table, const at::Tensor& seed,
                                                 const at::Tensor& offset, bool return_y0) {
  return step_cpu(logits, y_t, t, nullptr, table, seed, offset, 1.0, return_y0);
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& t,
                                                 const at::Tensor& s, const at::Tensor& table, const at::Tensor& seed,
                                                 const at::Tensor& offset, double eta, bool return_y0) {
  return step_cpu(logits, y_t, t, &s, table, seed, offset, eta, return_y0);
}

at::Tensor predict_y0_cpu(const at::Tensor& logits, const at::Tensor& y_t) {
  setup::PredictY0 p = setup::predict_y0(logits, y_t);
  parallel_elements(p.a, p.y_t.numel(), kernels().predict_y0);
  return p.out;
}

at::Tensor loss_cpu(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& y0, const at::Tensor& t,
                    const at::Tensor& table) {
  setup::Loss in = setup::loss(logits, y_t, y0, t, table);
  check_time_values("t", in.t, 1, in.table.size(0));
  at::Tensor out = setup::loss_forward(in);
  const OpArgs& a = in.a;
  // Fixed blocks per sample, summed in a fixed order: the same bits for any thread count.
  const int64_t blocks = a.npix == 0 ? 0 : (a.npix + cpu::kLossBlock - 1) / cpu::kLossBlock;
  std::vector<double> partial(static_cast<size_t>(a.batch * blocks), 0.0);
  const cpu::KernelTable& k = kernels();
  const int64_t grain = blocks == 0 ? 1 : (kGrain + cpu::kLossBlock - 1) / cpu::kLossBlock;
  if (a.batch * blocks > 0) {
    at::parallel_for(0, a.batch * blocks, grain, [&](int64_t first, int64_t last) {
      for (int64_t j = first; j < last; ++j) {
        const int64_t b = j / blocks, begin = b * a.npix + (j % blocks) * cpu::kLossBlock;
        const int64_t end = begin + cpu::kLossBlock < (b + 1) * a.npix ? begin + cpu::kLossBlock : (b + 1) * a.npix;
        partial[static_cast<size_t>(j)] = k.loss_sum(a, b, begin, end);
      }
    });
  }
  const double inv = 1.0 / (static_cast<double>(a.npix) * kLn2);  // mean over pixels, in bits
  for (int64_t b = 0; b < a.batch; ++b) {
    double sum = 0.0;
    for (int64_t j = 0; j < blocks; ++j) sum += partial[static_cast<size_t>(b * blocks + j)];
    store_as<double>(a.out, a.out_dtype, b, sum * inv);
  }
  return out;
}

at::Tensor loss_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& y_t,
                             const at::Tensor& y0, const at::Tensor& t, const at::Tensor& table) {
  setup::Loss in = setup::loss(logits, y_t, y0, t, table);
  check_time_values("t", in.t, 1, in.table.size(0));
  at::Tensor out = setup::loss_backward(in, grad);
  parallel_elements(in.a, in.logits.numel(), kernels().loss_backward);
  return out;
}

}  // namespace berdiff

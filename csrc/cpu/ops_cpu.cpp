// CPU drivers of the berdiff ops: check, allocate, split the elements over threads with
// at::parallel_for (contiguous blocks), and hand each block to the kernels of kernels.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <atomic>
#include <cstdlib>
#include <vector>

#include "../op_checks.h"
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

// Paper times must index the table: lo <= t[b] <= T.
void check_time_values(const char* name, const at::Tensor& t, int64_t lo, int64_t rows) {
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t b = 0; b < t.numel(); ++b) {
    TORCH_CHECK(p[b] >= lo && p[b] < rows, name, "[", b, "] = ", p[b], " is outside ", lo, "..", rows - 1,
                " (paper time, 0..T of the schedule table)");
  }
}

at::Tensor empty_like_contig(const at::Tensor& x, at::ScalarType dtype) {
  return at::empty(x.sizes(), x.options().dtype(dtype));
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

std::tuple<at::Tensor, at::Tensor> q_sample_cpu(const at::Tensor& y0_in, const at::Tensor& t_in,
                                                const at::Tensor& table_in, const at::Tensor& seed,
                                                const at::Tensor& offset) {
  const at::Device dev = y0_in.device();
  checks::mask("y0", y0_in, dev);
  checks::times("t", t_in, y0_in.size(0), dev);
  checks::table(table_in, dev);
  checks::rng_key("seed", seed, dev);
  checks::rng_key("offset", offset, dev);
  const at::Tensor y0 = y0_in.contiguous(), t = t_in.contiguous(), table = table_in.contiguous();
  check_time_values("t", t, 0, table.size(0));
  at::Tensor y_t = empty_like_contig(y0, y0.scalar_type()), eps = empty_like_contig(y0, y0.scalar_type());

  OpArgs a;
  a.y = y0.data_ptr();
  a.y_dtype = checks::storage_dtype(y0.scalar_type());
  a.out = y_t.data_ptr();
  a.out2 = eps.data_ptr();
  a.out_dtype = a.out2_dtype = a.y_dtype;
  a.compute = checks::storage_dtype(checks::compute_type({&y0}));
  a.t = t.data_ptr<int64_t>();
  checks::set_table(a, table);
  checks::set_shape(a, y0);
  checks::set_rng(a, seed, offset);
  parallel_elements(a, y0.numel(), kernels().q_sample);
  return {y_t, eps};
}

void init_noise_cpu(at::Tensor& out, const at::Tensor& seed, const at::Tensor& offset) {
  const at::Device dev = out.device();
  const auto st = out.scalar_type();
  TORCH_CHECK(st == at::kBool || st == at::kByte || st == at::kHalf || st == at::kBFloat16 || st == at::kFloat ||
                  st == at::kDouble,
              "out: expected a mask dtype (bool, uint8, float16, bfloat16, float32, float64), got ", st);
  TORCH_CHECK(out.is_contiguous(), "out: expected a contiguous tensor (the draw follows its flat index)");
  checks::rng_key("seed", seed, dev);
  checks::rng_key("offset", offset, dev);
  OpArgs a;
  a.out = out.data_ptr();
  a.out_dtype = checks::storage_dtype(st);
  checks::set_rng(a, seed, offset);
  parallel_elements(a, out.numel(), kernels().init_noise);
}

namespace {

// Shared driver of both sampling steps.
std::tuple<at::Tensor, at::Tensor> step_cpu(const at::Tensor& logits_in, const at::Tensor& y_t_in,
                                            const at::Tensor& t_in, const at::Tensor* s_in,
                                            const at::Tensor& table_in, const at::Tensor& seed,
                                            const at::Tensor& offset, double eta, bool return_y0) {
  const at::Device dev = y_t_in.device();
  checks::mask("y_t", y_t_in, dev);
  checks::logits(logits_in, y_t_in);
  checks::times("t", t_in, y_t_in.size(0), dev);
  if (s_in != nullptr) checks::times("s", *s_in, y_t_in.size(0), dev);
  checks::table(table_in, dev);
  checks::rng_key("seed", seed, dev);
  checks::rng_key("offset", offset, dev);
  TORCH_CHECK(eta >= 0.0 && eta <= 1.0, "eta: expected a number in [0, 1], got ", eta);
  const at::Tensor logits = logits_in.contiguous(), y_t = y_t_in.contiguous(), t = t_in.contiguous(),
                   table = table_in.contiguous();
  const at::Tensor s = s_in != nullptr ? s_in->contiguous() : at::Tensor();
  check_time_values("t", t, 1, table.size(0));
  if (s_in != nullptr) check_time_values("s", s, 0, table.size(0));

  const at::ScalarType cd = checks::compute_type({&logits, &y_t});
  at::Tensor y = empty_like_contig(y_t, y_t.scalar_type());
  at::Tensor y0_hat = return_y0 ? empty_like_contig(y_t, cd) : at::empty({0}, y_t.options().dtype(cd));

  OpArgs a;
  a.logits = logits.data_ptr();
  a.logits_dtype = checks::storage_dtype(logits.scalar_type());
  a.y = y_t.data_ptr();
  a.y_dtype = checks::storage_dtype(y_t.scalar_type());
  a.out = y.data_ptr();
  a.out_dtype = a.y_dtype;
  a.out2 = return_y0 ? y0_hat.data_ptr() : nullptr;
  a.out2_dtype = checks::storage_dtype(cd);
  a.compute = checks::storage_dtype(cd);
  a.t = t.data_ptr<int64_t>();
  a.s = s_in != nullptr ? s.data_ptr<int64_t>() : nullptr;
  a.eta = eta;
  checks::set_table(a, table);
  checks::set_shape(a, y_t);
  checks::set_rng(a, seed, offset);
  parallel_elements(a, y_t.numel(), s_in != nullptr ? kernels().ddim_step : kernels().ddpm_step);
  return {y, y0_hat};
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

at::Tensor predict_y0_cpu(const at::Tensor& logits_in, const at::Tensor& y_t_in) {
  checks::mask("y_t", y_t_in, y_t_in.device());
  checks::logits(logits_in, y_t_in);
  const at::Tensor logits = logits_in.contiguous(), y_t = y_t_in.contiguous();
  const at::ScalarType cd = checks::compute_type({&logits, &y_t});
  at::Tensor out = empty_like_contig(y_t, cd);
  OpArgs a;
  a.logits = logits.data_ptr();
  a.logits_dtype = checks::storage_dtype(logits.scalar_type());
  a.y = y_t.data_ptr();
  a.y_dtype = checks::storage_dtype(y_t.scalar_type());
  a.out = out.data_ptr();
  a.out_dtype = a.compute = checks::storage_dtype(cd);
  checks::set_shape(a, y_t);
  parallel_elements(a, y_t.numel(), kernels().predict_y0);
  return out;
}

namespace {

struct LossInputs {
  at::Tensor logits, y_t, y0, t, table;
  at::ScalarType cd;
  OpArgs a;
};

LossInputs loss_inputs(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& y0, const at::Tensor& t,
                       const at::Tensor& table) {
  const at::Device dev = y_t.device();
  checks::mask("y_t", y_t, dev);
  checks::mask("y0", y0, dev);
  checks::same_shape("y0", y0, y_t);
  checks::logits(logits, y_t);
  checks::times("t", t, y_t.size(0), dev);
  checks::table(table, dev);
  LossInputs in{logits.contiguous(), y_t.contiguous(), y0.contiguous(), t.contiguous(), table.contiguous(),
                checks::compute_type({&logits, &y_t, &y0}), OpArgs()};
  check_time_values("t", in.t, 1, in.table.size(0));
  OpArgs& a = in.a;
  a.logits = in.logits.data_ptr();
  a.logits_dtype = checks::storage_dtype(in.logits.scalar_type());
  a.y = in.y_t.data_ptr();
  a.y_dtype = checks::storage_dtype(in.y_t.scalar_type());
  a.y0 = in.y0.data_ptr();
  a.y0_dtype = checks::storage_dtype(in.y0.scalar_type());
  a.compute = checks::storage_dtype(in.cd);
  a.t = in.t.data_ptr<int64_t>();
  checks::set_table(a, in.table);
  checks::set_shape(a, in.y_t);
  return in;
}

}  // namespace

at::Tensor loss_cpu(const at::Tensor& logits, const at::Tensor& y_t, const at::Tensor& y0, const at::Tensor& t,
                    const at::Tensor& table) {
  LossInputs in = loss_inputs(logits, y_t, y0, t, table);
  const OpArgs& a = in.a;
  at::Tensor out = at::empty({a.batch}, in.y_t.options().dtype(in.cd));
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
    store_as<double>(out.data_ptr(), checks::storage_dtype(in.cd), b, sum * inv);
  }
  return out;
}

at::Tensor loss_backward_cpu(const at::Tensor& grad_in, const at::Tensor& logits, const at::Tensor& y_t,
                             const at::Tensor& y0, const at::Tensor& t, const at::Tensor& table) {
  LossInputs in = loss_inputs(logits, y_t, y0, t, table);
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == in.a.batch, "grad: expected shape [", in.a.batch,
              "], got ", grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat || grad_in.scalar_type() == at::kDouble,
              "grad: expected float32 or float64, got ", grad_in.scalar_type());
  TORCH_CHECK(grad_in.device() == in.y_t.device(), "grad: on ", grad_in.device(), ", expected ", in.y_t.device());
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor out = empty_like_contig(in.logits, in.logits.scalar_type());
  OpArgs& a = in.a;
  a.grad = grad.data_ptr();
  a.grad_dtype = checks::storage_dtype(grad.scalar_type());
  a.out = out.data_ptr();
  a.out_dtype = a.logits_dtype;
  parallel_elements(a, in.logits.numel(), kernels().loss_backward);
  return out;
}

}  // namespace berdiff

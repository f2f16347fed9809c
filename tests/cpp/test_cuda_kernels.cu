// The CUDA kernels (csrc/cuda/berdiff_kernels.cuh) without torch: compiled by every CMake build
// that finds a CUDA compiler, run where a GPU is present (else skipped, exit code 77). On a GPU:
// the device draws the host's Philox stream and the CPU kernels' masks, seed and offset read
// from device memory.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "check.h"
#include "cpu/kernels.h"
#include "cuda/berdiff_kernels.cuh"

using namespace berdiff;

// Every launcher instantiated, so a kernel that does not compile fails this build.
template void cuda::launch_q_sample<float>(const OpArgs&, cudaStream_t);
template void cuda::launch_q_sample<double>(const OpArgs&, cudaStream_t);
template void cuda::launch_step<float>(const OpArgs&, bool, cudaStream_t);
template void cuda::launch_step<double>(const OpArgs&, bool, cudaStream_t);
template void cuda::launch_predict_y0<float>(const OpArgs&, int64_t, cudaStream_t);
template void cuda::launch_predict_y0<double>(const OpArgs&, int64_t, cudaStream_t);
template void cuda::launch_loss<float>(const OpArgs&, double*, cudaStream_t);
template void cuda::launch_loss<double>(const OpArgs&, double*, cudaStream_t);
template void cuda::launch_loss_backward<float>(const OpArgs&, cudaStream_t);
template void cuda::launch_loss_backward<double>(const OpArgs&, cudaStream_t);

#define CUDA_OK(expr)                                                                    \
  do {                                                                                   \
    cudaError_t err_ = (expr);                                                           \
    if (err_ != cudaSuccess) {                                                           \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(err_), __FILE__, __LINE__); \
      return 1;                                                                          \
    }                                                                                    \
  } while (0)

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("test_cuda_kernels: no CUDA device, skipped (compiled only)\n");
    return 77;
  }
  const int64_t batch = 2, npix = 1009, n = batch * npix;
  std::vector<float> logits(n), y_t(n), table = {1.0f, 0.0f, 1.0f, 0.0f, 0.99f, 0.005f, 0.99f, 0.005f,
                                                 0.98f, 0.01f, 0.9702f, 0.0149f};
  for (int64_t i = 0; i < n; ++i) {
    logits[i] = std::sin(0.37f * i) * 5.0f;
    y_t[i] = (i * 7919) % 3 == 0 ? 1.0f : 0.0f;
  }
  std::vector<int64_t> t = {2, 1}, s = {0, 0}, key = {0x5eedll, (1ll << 32) - 17};

  float *d_logits, *d_y, *d_out, *d_y0_hat, *d_table;
  int64_t *d_t, *d_s, *d_key;
  CUDA_OK(cudaMalloc(&d_logits, n * 4));
  CUDA_OK(cudaMalloc(&d_y, n * 4));
  CUDA_OK(cudaMalloc(&d_out, n * 4));
  CUDA_OK(cudaMalloc(&d_y0_hat, n * 4));
  CUDA_OK(cudaMalloc(&d_table, table.size() * 4));
  CUDA_OK(cudaMalloc(&d_t, 16));
  CUDA_OK(cudaMalloc(&d_s, 16));
  CUDA_OK(cudaMalloc(&d_key, 16));
  CUDA_OK(cudaMemcpy(d_logits, logits.data(), n * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_y, y_t.data(), n * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_table, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_t, t.data(), 16, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_s, s.data(), 16, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_key, key.data(), 16, cudaMemcpyHostToDevice));

  OpArgs host;
  host.logits = logits.data();
  host.y = y_t.data();
  host.table = table.data();
  host.table_rows = 3;
  host.t = t.data();
  host.s = s.data();
  host.batch = batch;
  host.npix = npix;
  host.eta = 1.0;
  host.seed = static_cast<uint64_t>(key[0]);
  host.offset = static_cast<uint64_t>(key[1]);
  OpArgs dev = host;
  dev.logits = d_logits;
  dev.y = d_y;
  dev.table = d_table;
  dev.t = d_t;
  dev.s = d_s;
  dev.seed = dev.offset = 0;  // must come from device memory
  dev.seed_ptr = d_key;
  dev.offset_ptr = d_key + 1;

  // The launcher picks the instance with float32 dtypes fixed at compile time; the one reading
  // them from OpArgs (every other combination) is launched directly.
  for (int any = 0; any < 2; ++any) {
    const char* io = any ? "AnyIo" : "FixedIo";
    for (int ddim = 0; ddim < 2; ++ddim) {
      std::vector<float> want(n), want_y0(n), got(n), got_y0(n);
      host.out = want.data();
      host.out2 = want_y0.data();
      (ddim ? cpu::kernels_default().ddim_step : cpu::kernels_default().ddpm_step)(host, 0, n);
      dev.out = d_out;
      dev.out2 = d_y0_hat;
      CUDA_OK(cudaMemset(d_out, 0xFF, n * 4));  // NaN: an element left unwritten cannot pass
      CUDA_OK(cudaMemset(d_y0_hat, 0xFF, n * 4));
      if (!any) {
        cuda::launch_step<float>(dev, ddim != 0, 0);
      } else if (ddim) {
        cuda::step_kernel<OpsTile, float, cuda::AnyIo, true><<<cuda::elementwise_grid<OpsTile>(dev), OpsTile::kBlock>>>(dev);
      } else {
        cuda::step_kernel<OpsTile, float, cuda::AnyIo, false><<<cuda::elementwise_grid<OpsTile>(dev), OpsTile::kBlock>>>(dev);
      }
      CUDA_OK(cudaGetLastError());
      CUDA_OK(cudaMemcpy(got.data(), d_out, n * 4, cudaMemcpyDeviceToHost));
      CUDA_OK(cudaMemcpy(got_y0.data(), d_y0_hat, n * 4, cudaMemcpyDeviceToHost));
      int bad_mask = 0, bad_y0 = 0;
      for (int64_t i = 0; i < n; ++i) {
        bad_y0 += !(std::fabs(got_y0[i] - want_y0[i]) <= 1e-6f);
        bad_mask += got[i] != want[i];
      }
      CHECK(bad_y0 == 0, "%s %s: %d y0_hat values differ from the CPU kernels", io, ddim ? "ddim" : "ddpm", bad_y0);
      CHECK(bad_mask <= 2, "%s %s: %d masks differ from the CPU kernels", io, ddim ? "ddim" : "ddpm", bad_mask);
    }
  }
  return berdiff_test::finish("test_cuda_kernels");
}

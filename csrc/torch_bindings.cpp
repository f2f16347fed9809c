// torch.ops.berdiff: the schemas and their CPU and CUDA implementations, in one place.
//
// Compiled into two modules: berdiff_fast._C (the schemas and the CPU kernels) and, where CUDA
// is built, berdiff_fast._C_cuda (BERDIFF_CUDA_MODULE: the CUDA kernels only). Fakes and the
// loss's autograd formula are registered in Python (berdiff_fast/backends/cpp.py).
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

#ifndef BERDIFF_CUDA_MODULE

TORCH_LIBRARY(berdiff, m) {
  // Algorithm 1: (y_t, eps), eps = tl.rand(seed, offset + i) < flip[t], y_t = y0 XOR eps.
  m.def("q_sample(Tensor y0, Tensor t, Tensor table, Tensor seed, Tensor offset) -> (Tensor, Tensor)");
  // y_T ~ B(1/2) written into out, element i from tl.rand(seed, offset + i).
  m.def("init_noise_(Tensor(a!) out, Tensor seed, Tensor offset) -> ()");
  // Algorithm 2, DDPM: (y_{t-1}, y0_hat); y0_hat is empty unless return_y0.
  m.def("ddpm_step(Tensor logits, Tensor y_t, Tensor t, Tensor table, Tensor seed, Tensor offset, "
        "bool return_y0) -> (Tensor, Tensor)");
  // Algorithm 2, DDIM jump t -> s: (y_s, y0_hat); y0_hat is empty unless return_y0.
  m.def("ddim_step(Tensor logits, Tensor y_t, Tensor t, Tensor s, Tensor table, Tensor seed, Tensor offset, "
        "float eta, bool return_y0) -> (Tensor, Tensor)");
  // Eq. 7, inner part: |y_t - sigmoid(logits)|.
  m.def("predict_y0(Tensor logits, Tensor y_t) -> Tensor");
  // The training loss per sample [B], in bits, and its derivative in logits.
  m.def("loss(Tensor logits, Tensor y_t, Tensor y0, Tensor t, Tensor table) -> Tensor");
  m.def("loss_backward(Tensor grad, Tensor logits, Tensor y_t, Tensor y0, Tensor t, Tensor table) -> Tensor");
  // The CPU kernels' instruction set; a non-empty name switches to it.
  m.def("cpu_isa(str isa='') -> str", &berdiff::cpu_isa);
}

TORCH_LIBRARY_IMPL(berdiff, CPU, m) {
  m.impl("q_sample", &berdiff::q_sample_cpu);
  m.impl("init_noise_", &berdiff::init_noise_cpu);
  m.impl("ddpm_step", &berdiff::ddpm_step_cpu);
  m.impl("ddim_step", &berdiff::ddim_step_cpu);
  m.impl("predict_y0", &berdiff::predict_y0_cpu);
  m.impl("loss", &berdiff::loss_cpu);
  m.impl("loss_backward", &berdiff::loss_backward_cpu);
}

#define BERDIFF_MODULE_INIT PyInit__C
#define BERDIFF_MODULE_NAME "_C"

#else  // BERDIFF_CUDA_MODULE

TORCH_LIBRARY_IMPL(berdiff, CUDA, m) {
  m.impl("q_sample", &berdiff::q_sample_cuda);
  m.impl("init_noise_", &berdiff::init_noise_cuda);
  m.impl("ddpm_step", &berdiff::ddpm_step_cuda);
  m.impl("ddim_step", &berdiff::ddim_step_cuda);
  m.impl("predict_y0", &berdiff::predict_y0_cuda);
  m.impl("loss", &berdiff::loss_cuda);
  m.impl("loss_backward", &berdiff::loss_backward_cuda);
}

#define BERDIFF_MODULE_INIT PyInit__C_cuda
#define BERDIFF_MODULE_NAME "_C_cuda"

#endif  // BERDIFF_CUDA_MODULE

// An empty Python module: importing it runs the registrations above.
extern "C" PyMODINIT_FUNC BERDIFF_MODULE_INIT(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, BERDIFF_MODULE_NAME, nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

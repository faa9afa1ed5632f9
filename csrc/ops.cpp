// Registration of the galsim_vqvae ops: the schemas (once) and the CPU kernels. The CUDA kernels
// are registered in cuda/register.cpp (the separate module galsim_vqvae._C_cuda).
#include <Python.h>
#include <torch/library.h>

#include "nearest_code.h"
#include "pixelcnn_sample.h"

// Importing galsim_vqvae._C runs the static registrations below; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(galsim_vqvae, m) {
  m.def("nearest_code(Tensor z, Tensor codebook) -> (Tensor, Tensor)");
  m.def(
      "pixelcnn_sample(Tensor[] weights, Tensor? bias, Tensor seeds, int height, int width, "
      "float temperature, int kernel_size) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(galsim_vqvae, CPU, m) {
  m.impl("nearest_code", &galsim_vqvae::nearest_code_cpu);
  m.impl("pixelcnn_sample", &galsim_vqvae::pixelcnn_sample_cpu);
}

// The one registration place of the CUDA kernels (module galsim_vqvae._C_cuda); the schemas are
// defined once, in ../ops.cpp (module galsim_vqvae._C, imported first).
#include <Python.h>
#include <torch/library.h>

#include "../nearest_code.h"
#include "../pixelcnn_sample.h"

// Importing galsim_vqvae._C_cuda runs the registration below; the module itself is empty.
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY_IMPL(galsim_vqvae, CUDA, m) {
  m.impl("nearest_code", &galsim_vqvae::nearest_code_cuda);
  m.impl("pixelcnn_sample", &galsim_vqvae::pixelcnn_sample_cuda);
}

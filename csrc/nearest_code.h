// Shared declarations and input checks of the galsim_vqvae::nearest_code op (CPU and CUDA).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace galsim_vqvae {

// Checks shapes, dtypes and devices; returns z and codebook as contiguous float32 tensors.
inline std::tuple<at::Tensor, at::Tensor> prepare_nearest_code_inputs(const at::Tensor& z,
                                                                    const at::Tensor& codebook) {
  TORCH_CHECK_VALUE(z.dim() == 2, "nearest_code: z must be 2-D [N, D], got shape ", z.sizes());
  TORCH_CHECK_VALUE(codebook.dim() == 2, "nearest_code: codebook must be 2-D [K, D], got shape ",
                    codebook.sizes());
  TORCH_CHECK_VALUE(z.size(1) == codebook.size(1), "nearest_code: z has D=", z.size(1),
                    " but the codebook has D=", codebook.size(1));
  TORCH_CHECK_VALUE(codebook.size(0) >= 1, "nearest_code: the codebook is empty (K=0)");
  TORCH_CHECK_VALUE(z.size(1) >= 1, "nearest_code: D must be at least 1");
  TORCH_CHECK_VALUE(at::isFloatingType(z.scalar_type()) && at::isFloatingType(codebook.scalar_type()),
                    "nearest_code: z and codebook must be floating point, got ", z.scalar_type(),
                    " and ", codebook.scalar_type());
  TORCH_CHECK_VALUE(z.device() == codebook.device(), "nearest_code: z is on ", z.device(),
                    " but the codebook is on ", codebook.device());
  return {z.to(at::kFloat).contiguous(), codebook.to(at::kFloat).contiguous()};
}

std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& z, const at::Tensor& codebook);
std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook);

}  // namespace galsim_vqvae

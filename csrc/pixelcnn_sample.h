// Shared declarations and input checks of the galsim_vqvae::pixelcnn_sample op (CPU and CUDA):
// the cached (incremental) sampler of a Gated PixelCNN, in float64.
//
// Weights come as one Tensor[] in the order of SamplerWeight below, in the layout of
// galsim_vqvae/nn/fast_sampling.py::flat_weights (p = k // 2, C channels, K codes, L layers; every
// matrix [inputs, outputs] for x @ W):
//   embedding [K, C]; v_w [L, (p+1)*k*C, 2C] (row (dr*k + dc)*C + c); v_b [L, 2C];
//   h_w [L, (p+1)*C, 2C] (row t*C + c; layer 0 reads its first p*C rows only); h_b [L, 2C];
//   vh_w [L, 2C, 2C]; vh_b [L, 2C]; out_w [L, C, C]; out_b [L, C];
//   head1_w [C, C]; head1_b [C]; head2_w [C, K]; head2_b [K].
// bias: [B, L, 2C] conditioning bias of every gate, or undefined. seeds: [B] int64, each map's
// 64-bit seed (two's complement). The draw at (i, j) is the first index of the maximum of
// logits / temperature + g(seed, i, j, k) (the Gumbel noise of philox.h, computed in the kernel;
// NaN counting as the maximum, as torch.argmax). Returns codes [B, H, W] int64 and, per map, the
// smallest gap between the two best scores of its draws [B] float64.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include "philox.h"

namespace galsim_vqvae {

struct SamplerDims {
  int64_t batch, height, width, codes, channels, layers, pad, kernel;
  double temperature;
  bool has_bias;
};

// Buffers of the cached sampler (elements per map), shared by the CPU and CUDA kernels and equal
// to nn/fast_sampling.py::cache_bytes / 8: the vertical caches (a ring of the last p+1 rows of each
// layer's vertical input, zero-padded by p at the sides), the row terms, the horizontal row
// buffers (zero-padded left by p), and the per-position buffers (pre-activation, gate with one
// spare element, head, logits).
struct SamplerLayout {
  int64_t vc_layer, row_layer, h_layer, pre, gate, head, logits;
  explicit SamplerLayout(const SamplerDims& d)
      : vc_layer((d.pad + 1) * (d.width + 2 * d.pad) * d.channels),
        row_layer(d.width * 2 * d.channels),
        h_layer((d.width + d.pad) * d.channels),
        pre(2 * d.channels),
        gate(d.channels + 1),
        head(d.channels),
        logits(d.codes) {}
};

// Error messages are built without iostreams: on the GPU machine (g++ 13.3 from /opt/gcc, torch
// 2.11), inserting an integer into a std::ostream from this extension crashed the process, so
// c10::str (an ostringstream) only ever gets one finished std::string from here.
inline void msg_part(std::string& s, const char* v) { s += v; }
inline void msg_part(std::string& s, const std::string& v) { s += v; }
inline void msg_part(std::string& s, int64_t v) { s += std::to_string(v); }
inline void msg_part(std::string& s, int v) { s += std::to_string(v); }
inline void msg_part(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  s += buf;
}
inline void msg_part(std::string& s, at::ScalarType v) { s += c10::toString(v); }

template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  (msg_part(s, args), ...);
  return s;
}

// "[a, b, c]"
inline std::string shape_string(const int64_t* v, size_t n) {
  std::string s = "[";
  for (size_t q = 0; q < n; ++q) s += (q ? ", " : "") + std::to_string(v[q]);
  return s + "]";
}

inline std::string shape_string(const at::Tensor& t) {
  if (!t.defined()) return "(undefined)";
  std::vector<int64_t> v(t.dim());
  for (int64_t q = 0; q < t.dim(); ++q) v[q] = t.size(q);
  return shape_string(v.data(), v.size());
}

// The expected shape is copied into a local array and both shapes are formatted here, so that no
// ArrayRef into a temporary is compared or printed.
inline void check_sampler_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                                 const std::vector<int64_t>& expected,
                                 const at::Device& device) {
  TORCH_CHECK_VALUE(t.defined(), msg("pixelcnn_sample: ", name, " is missing"));
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, msg("pixelcnn_sample: ", name, " must be ",
                                                  dtype, ", got ", t.scalar_type()));
  int64_t want[8] = {0};
  const size_t n = std::min<size_t>(expected.size(), 8);
  std::copy(expected.begin(), expected.begin() + n, want);
  bool same = t.dim() == (int64_t)n;
  for (size_t q = 0; same && q < n; ++q) same = t.size((int64_t)q) == want[q];
  if (!same) {
    const std::string text = std::string("pixelcnn_sample: ") + name + " must have shape " +
                            shape_string(want, n) + ", got " + shape_string(t);
    TORCH_CHECK_VALUE(false, text);
  }
  TORCH_CHECK_VALUE(t.device() == device, msg("pixelcnn_sample: ", name, " is on ",
                    t.device().str(), " but seeds is on ", device.str()));
}

// The layer weights, passed to the op as one Tensor[] in this order (ops.py::SAMPLER_WEIGHTS
// names them in the same order; the layout of each is described at the top of this file).
enum SamplerWeight {
  kEmbedding, kVW, kVB, kHW, kHB, kVhW, kVhB, kOutW, kOutB, kHead1W, kHead1B, kHead2W, kHead2B,
  kNumSamplerWeights
};
constexpr const char* kSamplerWeightNames[kNumSamplerWeights] = {
    "embedding", "v_w", "v_b", "h_w", "h_b", "vh_w", "vh_b", "out_w", "out_b",
    "head1_w", "head1_b", "head2_w", "head2_b"};

// Checks every argument (names the one at fault) and returns the problem's dimensions.
inline SamplerDims check_sampler_inputs(at::TensorList weights, const c10::optional<at::Tensor>& bias,
                                        const at::Tensor& seeds, int64_t height, int64_t width,
                                        double temperature, int64_t kernel_size) {
  TORCH_CHECK_VALUE(weights.size() == kNumSamplerWeights,
                    msg("pixelcnn_sample: weights must be ", (int64_t)kNumSamplerWeights,
                        " tensors (embedding, v_w, ..., head2_b), got ", (int64_t)weights.size()));
  const at::Tensor& embedding = weights[kEmbedding];
  const at::Tensor& v_w = weights[kVW];
  TORCH_CHECK_VALUE(seeds.defined() && seeds.dim() == 1,
                    msg("pixelcnn_sample: seeds must be [B], got shape ", shape_string(seeds)));
  TORCH_CHECK_VALUE(seeds.scalar_type() == at::kLong,
                    msg("pixelcnn_sample: seeds must be int64, got ", seeds.scalar_type()));
  TORCH_CHECK_VALUE(height >= 1 && width >= 1,
                    msg("pixelcnn_sample: the map must be at least 1x1, got ", height, "x", width));
  TORCH_CHECK_VALUE(kernel_size >= 3 && kernel_size % 2 == 1,
                    msg("pixelcnn_sample: kernel_size must be odd and >= 3, got ", kernel_size));
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    msg("pixelcnn_sample: temperature must be finite and > 0, got ", temperature));
  TORCH_CHECK_VALUE(embedding.defined() && embedding.dim() == 2,
                    msg("pixelcnn_sample: embedding must be [K, C], got shape ",
                    shape_string(embedding)));
  TORCH_CHECK_VALUE(v_w.defined() && v_w.dim() == 3,
                    msg("pixelcnn_sample: v_w must be [L, (p+1)*k*C, 2C], got shape ",
                    shape_string(v_w)));
  SamplerDims d;
  d.batch = seeds.size(0);
  d.height = height;
  d.width = width;
  d.codes = embedding.size(0);
  d.channels = embedding.size(1);
  d.layers = v_w.size(0);
  d.kernel = kernel_size;
  d.pad = kernel_size / 2;
  d.temperature = temperature;
  d.has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK_VALUE(d.codes >= 1 && d.channels >= 1 && d.layers >= 1,
                    msg("pixelcnn_sample: empty embedding [K=", d.codes, ", C=", d.channels,
                    "] or no layers (L=", d.layers, ")"));
  const int64_t b = d.batch, l = d.layers, c = d.channels, k = d.codes, p = d.pad;
  const at::Device dev = seeds.device();
  const std::vector<int64_t> shapes[kNumSamplerWeights] = {
      {k, c}, {l, (p + 1) * kernel_size * c, 2 * c}, {l, 2 * c}, {l, (p + 1) * c, 2 * c},
      {l, 2 * c}, {l, 2 * c, 2 * c}, {l, 2 * c}, {l, c, c}, {l, c}, {c, c}, {c}, {c, k}, {k}};
  for (int q = 0; q < kNumSamplerWeights; ++q)
    check_sampler_tensor(weights[q], kSamplerWeightNames[q], at::kDouble, shapes[q], dev);
  if (d.has_bias) check_sampler_tensor(*bias, "bias", at::kDouble, {b, l, 2 * c}, dev);
  return d;
}

// The weights as contiguous tensors (kept alive by the caller for the whole call).
inline std::vector<at::Tensor> contiguous_weights(at::TensorList weights) {
  std::vector<at::Tensor> out;
  for (const auto& w : weights) out.push_back(w.contiguous());
  return out;
}

std::tuple<at::Tensor, at::Tensor> pixelcnn_sample_cpu(
    at::TensorList weights, const c10::optional<at::Tensor>& bias, const at::Tensor& seeds,
    int64_t height, int64_t width, double temperature, int64_t kernel_size);
std::tuple<at::Tensor, at::Tensor> pixelcnn_sample_cuda(
    at::TensorList weights, const c10::optional<at::Tensor>& bias, const at::Tensor& seeds,
    int64_t height, int64_t width, double temperature, int64_t kernel_size);

}  // namespace galsim_vqvae

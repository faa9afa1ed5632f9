// CPU kernel of galsim_vqvae::pixelcnn_sample: the cached sampler of a Gated PixelCNN in float64
// (the scheme of galsim_vqvae/nn/fast_sampling.py and docs/sampling.md).
//
// The batch is split into one contiguous chunk of maps per thread (at::parallel_for); each thread
// samples its chunk from start to end with its own caches, so threads never wait on each other.
// Per chunk, every row runs the vertical step (per layer: the (p+1) x k convolution of the cached
// rows, read in place, as one matrix product, then v_to_h for the row terms and the gate into the
// next layer's cache) and every position the horizontal stack (per layer: the h_conv product of
// the window of the row buffer, the gate, the h_out product plus residual), the head and the draw.
// The draw's Gumbel noise is computed at the draw (../philox.h). All products go through one
// register-blocked kernel (`gemm`: 4 rows x 16 columns of float64
// accumulators, weights packed once per call in panels of 16 columns), compiled for AVX-512,
// AVX2+FMA and the baseline (function multiversioning, csrc/cpu/multiversion.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../pixelcnn_sample.h"

#include "multiversion.h"

namespace galsim_vqvae {
namespace {

typedef double v8d __attribute__((vector_size(64)));
constexpr int kNR = 16;      // columns per panel (two vectors of 8 doubles)
constexpr int kMR = 4;       // rows per register tile
constexpr int64_t kMB = 32;  // rows sharing each panel while it sits in L1/L2

// A weight matrix W [k, n] (row-major, for x @ W) packed as panels of 16 columns: [np][k][16],
// zero-padded past column n.
struct Panels {
  int64_t k = 0, n = 0, np = 0;
  std::vector<double> data;
  Panels() = default;
  Panels(const double* w, int64_t k_, int64_t n_)
      : k(k_), n(n_), np((n_ + kNR - 1) / kNR), data(np * k_ * kNR, 0.0) {
    for (int64_t r = 0; r < k; ++r)
      for (int64_t c = 0; c < n; ++c) data[(c / kNR) * k * kNR + r * kNR + c % kNR] = w[r * n + c];
  }
};

// One register tile: rows r0 .. r0+MR-1 of out, columns n0 .. n0+nv-1.
template <int MR>
inline __attribute__((always_inline)) void tile(const double* const* a, int64_t r0, int64_t segs,
                                                int64_t kseg, const double* panel, double* out,
                                                int64_t ldo, int64_t n0, int nv,
                                                bool accumulate) {
  v8d acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    double init[kNR] = {};
    if (accumulate) {
      const double* o = out + (r0 + r) * ldo + n0;
      for (int c = 0; c < nv; ++c) init[c] = o[c];
    }
    std::memcpy(&acc[r][0], init, sizeof(v8d));
    std::memcpy(&acc[r][1], init + 8, sizeof(v8d));
  }
  for (int64_t s = 0; s < segs; ++s) {
    const double* ar[MR];
    for (int r = 0; r < MR; ++r) ar[r] = a[(r0 + r) * segs + s];
    const double* p = panel + s * kseg * kNR;
    for (int64_t t = 0; t < kseg; ++t) {
      v8d b0, b1;
      std::memcpy(&b0, p + t * kNR, sizeof(v8d));
      std::memcpy(&b1, p + t * kNR + 8, sizeof(v8d));
      for (int r = 0; r < MR; ++r) {
        const v8d x = v8d{} + ar[r][t];
        acc[r][0] += x * b0;
        acc[r][1] += x * b1;
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    double res[kNR];
    std::memcpy(res, &acc[r][0], sizeof(v8d));
    std::memcpy(res + 8, &acc[r][1], sizeof(v8d));
    double* o = out + (r0 + r) * ldo + n0;
    for (int c = 0; c < nv; ++c) o[c] = res[c];
  }
}

// out[m][:n] (row m at out + m * ldo) = (accumulate ? out[m][:n] : 0)
//     + sum_s sum_{t < kseg} a[m * segs + s][t] * W[s * kseg + t][:n]
// for m < rows: each row of the left operand is `segs` contiguous segments of kseg values (the
// p+1 cached rows of a vertical window, or one contiguous window), given by pointer.
GVQ_MULTIVERSION
void gemm(int64_t rows, int64_t segs, int64_t kseg, const double* const* a, const Panels& w,
          double* out, int64_t ldo, bool accumulate) {
  for (int64_t m0 = 0; m0 < rows; m0 += kMB) {
    const int64_t m1 = std::min(rows, m0 + kMB);
    for (int64_t q = 0; q < w.np; ++q) {
      const double* panel = w.data.data() + q * w.k * kNR;
      const int64_t n0 = q * kNR;
      const int nv = (int)std::min<int64_t>(kNR, w.n - n0);
      int64_t r0 = m0;
      for (; r0 + kMR <= m1; r0 += kMR)
        tile<kMR>(a, r0, segs, kseg, panel, out, ldo, n0, nv, accumulate);
      switch (m1 - r0) {
        case 3: tile<3>(a, r0, segs, kseg, panel, out, ldo, n0, nv, accumulate); break;
        case 2: tile<2>(a, r0, segs, kseg, panel, out, ldo, n0, nv, accumulate); break;
        case 1: tile<1>(a, r0, segs, kseg, panel, out, ldo, n0, nv, accumulate); break;
        default: break;
      }
    }
  }
}

inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double elu(double x) { return x > 0.0 ? x : std::expm1(x); }

// gate(x) = tanh(x[:C]) * sigmoid(x[C:]) (+ bias[:2C] first, when given).
inline void gate(const double* x, const double* bias, int64_t c, double* out) {
  for (int64_t q = 0; q < c; ++q) {
    double a = x[q], b = x[c + q];
    if (bias) {
      a += bias[q];
      b += bias[c + q];
    }
    out[q] = std::tanh(a) * sigmoid(b);
  }
}

// The weights, packed once per call and shared read-only by every thread.
struct Model {
  SamplerDims d;
  const double *embedding, *v_b, *h_b, *vh_b, *out_b, *head1_b, *head2_b, *bias;
  std::vector<Panels> v_w, h_w, vh_w, out_w;
  Panels head1_w, head2_w;
};

// Samples maps b0 .. b0+nb-1 from start to end: codes [B, H, W], gap [B].
void sample_chunk(const Model& m, int64_t b0, int64_t nb, const int64_t* seeds, int64_t* codes,
                  double* gap) {
  const SamplerDims& d = m.d;
  const int64_t H = d.height, W = d.width, K = d.codes, C = d.channels, L = d.layers, p = d.pad;
  const int64_t C2 = 2 * C, R = p + 1, WP = W + 2 * p, WH = W + p;
  const SamplerLayout lay(d);
  std::vector<double> vc(L * nb * lay.vc_layer, 0.0), rowt(L * nb * lay.row_layer);
  std::vector<double> hb((L + 1) * nb * lay.h_layer, 0.0), pre(nb * lay.pre),
      gbuf(nb * lay.gate), head(nb * lay.head), logits(nb * lay.logits), vpre(nb * W * C2),
      noise((K + 3) / 4 * 4);
  std::vector<const double*> ptr(nb * W * R);
  auto VC = [&](int64_t l, int64_t b, int64_t slot, int64_t x) {
    return vc.data() + ((l * nb + b) * R + slot) * WP * C + x * C;
  };
  auto ROW = [&](int64_t l, int64_t b, int64_t w) {
    return rowt.data() + ((l * nb + b) * W + w) * C2;
  };
  auto HB = [&](int64_t l, int64_t b, int64_t x) {
    return hb.data() + ((l * nb + b) * WH + x) * C;
  };
  auto BIAS = [&](int64_t b, int64_t l) -> const double* {
    return m.bias ? m.bias + ((b0 + b) * L + l) * C2 : nullptr;
  };
  for (int64_t b = 0; b < nb; ++b) gap[b0 + b] = std::numeric_limits<double>::infinity();
  std::vector<bool> gap_nan(nb, false);

  for (int64_t i = 0; i < H; ++i) {
    // ---- vertical step: row terms of row i from rows < i
    for (int64_t l = 0; l < L; ++l) {
      const double *vh_b = m.vh_b + l * C2, *h_b = m.h_b + l * C2;
      for (int64_t b = 0; b < nb; ++b) {
        const double* bias = BIAS(b, l);
        for (int64_t w = 0; w < W; ++w) {
          double* r = ROW(l, b, w);
          for (int64_t n = 0; n < C2; ++n) r[n] = vh_b[n] + h_b[n] + (bias ? bias[n] : 0.0);
        }
      }
    }
    if (i > 0) {  // row 0 sees the zero padding above: v_to_h's bias alone
      const int64_t slot = (i - 1) % R;
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t w = 0; w < W; ++w) {
          const int64_t code = codes[((b0 + b) * H + i - 1) * W + w];
          std::memcpy(VC(0, b, slot, p + w), m.embedding + code * C, C * sizeof(double));
        }
      for (int64_t l = 0; l < L; ++l) {
        // window of output (b, w): cached rows i-1-p .. i-1 (ring slots), columns w .. w+2p
        for (int64_t b = 0; b < nb; ++b)
          for (int64_t w = 0; w < W; ++w)
            for (int64_t dr = 0; dr < R; ++dr) {
              const int64_t row = i - 1 - p + dr;
              ptr[(b * W + w) * R + dr] = VC(l, b, ((row % R) + R) % R, w);
            }
        const double* v_b = m.v_b + l * C2;
        for (int64_t q = 0; q < nb * W; ++q) std::memcpy(vpre.data() + q * C2, v_b, C2 * 8);
        gemm(nb * W, R, d.kernel * C, ptr.data(), m.v_w[l], vpre.data(), C2, true);
        for (int64_t q = 0; q < nb * W; ++q) ptr[q] = vpre.data() + q * C2;
        gemm(nb * W, 1, C2, ptr.data(), m.vh_w[l], ROW(l, 0, 0), C2, true);
        if (l + 1 < L)
          for (int64_t b = 0; b < nb; ++b)
            for (int64_t w = 0; w < W; ++w)
              gate(vpre.data() + (b * W + w) * C2, BIAS(b, l), C, VC(l + 1, b, slot, p + w));
      }
    }
    // ---- horizontal stack, head and draw at each position of row i
    for (int64_t j = 0; j < W; ++j) {
      for (int64_t l = 0; l < L; ++l) {
        const int64_t taps = l == 0 ? p : p + 1;
        for (int64_t b = 0; b < nb; ++b) {
          ptr[b] = HB(l, b, j);  // columns j-p .. j-p+taps-1 of the map
          std::memcpy(pre.data() + b * lay.pre, ROW(l, b, j), C2 * sizeof(double));
        }
        gemm(nb, 1, taps * C, ptr.data(), m.h_w[l], pre.data(), lay.pre, true);
        const double* out_b = m.out_b + l * C;
        for (int64_t b = 0; b < nb; ++b) {
          gate(pre.data() + b * lay.pre, nullptr, C, gbuf.data() + b * lay.gate);
          ptr[b] = gbuf.data() + b * lay.gate;
          double* o = HB(l + 1, b, p + j);
          const double* resid = HB(l, b, p + j);
          for (int64_t c = 0; c < C; ++c) o[c] = out_b[c] + (l > 0 ? resid[c] : 0.0);
        }
        gemm(nb, 1, C, ptr.data(), m.out_w[l], HB(l + 1, 0, p + j), WH * C, true);
      }
      for (int64_t b = 0; b < nb; ++b) {
        double* x = HB(L, b, p + j);  // read by the head only: ELU in place
        for (int64_t c = 0; c < C; ++c) x[c] = elu(x[c]);
        ptr[b] = x;
        std::memcpy(head.data() + b * C, m.head1_b, C * sizeof(double));
        std::memcpy(logits.data() + b * K, m.head2_b, K * sizeof(double));
      }
      gemm(nb, 1, C, ptr.data(), m.head1_w, head.data(), C, true);
      for (int64_t b = 0; b < nb; ++b) {
        double* x = head.data() + b * C;
        for (int64_t c = 0; c < C; ++c) x[c] = elu(x[c]);
        ptr[b] = x;
      }
      gemm(nb, 1, C, ptr.data(), m.head2_w, logits.data(), K, true);
      for (int64_t b = 0; b < nb; ++b) {
        const double* lg = logits.data() + b * K;
        const uint64_t seed = (uint64_t)seeds[b0 + b];
        for (int64_t q = 0; 4 * q < K; ++q) gumbel4(seed, i, j, q, noise.data() + 4 * q);
        const double* g = noise.data();
        int64_t best = 0;
        double s1 = -std::numeric_limits<double>::infinity(), s2 = s1, best_s = 0.0;
        bool nan = false;
        for (int64_t k = 0; k < K; ++k) {
          const double s = lg[k] / d.temperature + g[k];
          if (k == 0) {
            best_s = s;
          } else if (std::isnan(s) ? !std::isnan(best_s) : s > best_s) {
            best = k;
            best_s = s;
          }
          if (std::isnan(s)) {
            nan = true;
          } else if (s > s1) {
            s2 = s1;
            s1 = s;
          } else if (s > s2) {
            s2 = s;
          }
        }
        codes[((b0 + b) * H + i) * W + j] = best;
        std::memcpy(HB(0, b, p + j), m.embedding + best * C, C * sizeof(double));
        gap_nan[b] = gap_nan[b] || nan;
        if (K > 1) gap[b0 + b] = std::min(gap[b0 + b], s1 - s2);
      }
    }
  }
  for (int64_t b = 0; b < nb; ++b)
    if (gap_nan[b]) gap[b0 + b] = std::numeric_limits<double>::quiet_NaN();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pixelcnn_sample_cpu(
    at::TensorList weights, const c10::optional<at::Tensor>& bias, const at::Tensor& seeds,
    int64_t height, int64_t width, double temperature, int64_t kernel_size) {
  const SamplerDims d =
      check_sampler_inputs(weights, bias, seeds, height, width, temperature, kernel_size);
  TORCH_CHECK(seeds.device().is_cpu(), "pixelcnn_sample_cpu: tensors must be on the CPU");
  auto codes = at::empty({d.batch, d.height, d.width}, seeds.options().dtype(at::kLong));
  auto gap = at::empty({d.batch}, seeds.options().dtype(at::kDouble));
  if (d.batch == 0) return {codes, gap};

  // Contiguous inputs, kept alive for the whole call.
  const std::vector<at::Tensor> w = contiguous_weights(weights);
  const at::Tensor sd = seeds.contiguous();
  const at::Tensor bs = d.has_bias ? bias->contiguous() : at::Tensor();
  auto ptr = [&](SamplerWeight q) { return w[q].data_ptr<double>(); };
  const int64_t C = d.channels, C2 = 2 * C, L = d.layers, p = d.pad;
  Model m;
  m.d = d;
  m.embedding = ptr(kEmbedding);
  m.v_b = ptr(kVB);
  m.h_b = ptr(kHB);
  m.vh_b = ptr(kVhB);
  m.out_b = ptr(kOutB);
  m.head1_b = ptr(kHead1B);
  m.head2_b = ptr(kHead2B);
  m.bias = d.has_bias ? bs.data_ptr<double>() : nullptr;
  const int64_t kv = (p + 1) * d.kernel * C, kh = (p + 1) * C;
  for (int64_t l = 0; l < L; ++l) {
    m.v_w.emplace_back(ptr(kVW) + l * kv * C2, kv, C2);
    m.h_w.emplace_back(ptr(kHW) + l * kh * C2, kh, C2);
    m.vh_w.emplace_back(ptr(kVhW) + l * C2 * C2, C2, C2);
    m.out_w.emplace_back(ptr(kOutW) + l * C * C, C, C);
  }
  m.head1_w = Panels(ptr(kHead1W), C, C);
  m.head2_w = Panels(ptr(kHead2W), C, d.codes);

  const int64_t* seeds_p = sd.data_ptr<int64_t>();
  int64_t* codes_p = codes.data_ptr<int64_t>();
  double* gap_p = gap.data_ptr<double>();
  // One contiguous chunk of maps per thread; the maps never interact, so no barrier is needed.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), d.batch));
  const int64_t grain = (d.batch + threads - 1) / threads;
  at::parallel_for(0, d.batch, grain, [&](int64_t b0, int64_t b1) {
    sample_chunk(m, b0, b1 - b0, seeds_p, codes_p, gap_p);
  });
  return {codes, gap};
}

}  // namespace galsim_vqvae

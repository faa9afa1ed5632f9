// CUDA kernels of galsim_vqvae::pixelcnn_sample: the cached sampler of a Gated PixelCNN in float64
// (the scheme of galsim_vqvae/nn/fast_sampling.py and docs/sampling.md; layout and contract in
// ../pixelcnn_sample.h). Every map of the batch advances together, batch-parallel.
//
// Once per row (the vertical step), per layer: an im2col of the layer's p+1 cached rows and one
// cuBLAS DGEMM for the (p+1) x k convolution of the whole row, a kernel that adds the bias and
// writes the gate into the next layer's cache, one DGEMM for v_to_h and a kernel for the row
// terms' biases. Once per position, 2L + 3 fused kernels: per layer the h_conv product of the
// window fused with the row term and the gate (each thread holds both halves of its gate
// channels), the h_out product fused with bias and residual; the head's two products with their
// ELUs, the second one forming logits / T; and the draw (one warp per map: the Gumbel noise of
// ../philox.h, argmax, the top-2 gap, the code, the drawn code's embedding into the first row
// buffer).
// The kernels read the row index from device memory, so the vertical step and the W positions of a
// row are captured once as two CUDA graphs and replayed for every row (GALSIM_VQVAE_CUDA_GRAPHS=0
// launches them one by one instead).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>

#include "../pixelcnn_sample.h"

namespace galsim_vqvae {
namespace {

#define GVQ_SAMPLE_CHECK(expr)                                                              \
  do {                                                                                      \
    cudaError_t err_ = (expr);                                                              \
    TORCH_CHECK(err_ == cudaSuccess, "pixelcnn_sample (CUDA): ", cudaGetErrorString(err_)); \
  } while (0)

// Everything a kernel needs, passed by value: sizes, weights, buffers (all float64 but the seeds,
// the codes and the row index).
struct Net {
  int B, H, W, K, C, L, p, k;
  double temperature;
  const double *embedding, *v_w, *v_b, *h_w, *h_b, *vh_w, *vh_b, *out_w, *out_b, *head1_w,
      *head1_b, *head2_w, *head2_b, *bias;
  const int64_t* seeds;
  double *vc, *rowt, *hb, *gate, *head, *scores, *im2col, *vpre, *gap;
  int64_t* codes;
  int* row;  // the row being sampled

  // vertical cache of layer l: ring of the last p+1 rows of its input, padded by p at the sides
  __device__ double* VC(int l, int64_t b, int slot, int x) const {
    return vc + (((int64_t)l * B + b) * (p + 1) + slot) * (int64_t)(W + 2 * p) * C + (int64_t)x * C;
  }
  // row term of layer l at column w: [2C]
  __device__ double* ROW(int l, int64_t b, int w) const {
    return rowt + (((int64_t)l * B + b) * W + w) * 2 * (int64_t)C;
  }
  // horizontal row buffer l (input of layer l; l = L: the head's input), padded left by p
  __device__ double* HB(int l, int64_t b, int x) const {
    return hb + (((int64_t)l * B + b) * (W + p) + x) * (int64_t)C;
  }
  __device__ const double* BIAS(int64_t b, int l) const {
    return bias ? bias + ((int64_t)b * L + l) * 2 * (int64_t)C : nullptr;
  }
};

__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ double elu(double x) { return x > 0.0 ? x : expm1(x); }

// ------------------------------------------------------------------ once per row

__global__ void advance_row_kernel(int* row) { *row += 1; }

// Row 0 sees the zero padding above: its row terms are v_to_h's bias, h_conv's and the
// conditioning bias.
__global__ void row0_kernel(Net n) {
  const int64_t total = (int64_t)n.L * n.B * n.W * 2 * n.C;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int q = (int)(e % (2 * n.C));
    int64_t r = e / (2 * n.C);
    const int w = (int)(r % n.W);
    r /= n.W;
    const int64_t b = r % n.B;
    const int l = (int)(r / n.B);
    const double* bias = n.BIAS(b, l);
    n.ROW(l, b, w)[q] = n.vh_b[l * 2 * n.C + q] + n.h_b[l * 2 * n.C + q] + (bias ? bias[q] : 0.0);
  }
}

// The embeddings of the codes of row i-1 into layer 0's vertical cache.
__global__ void push_row_kernel(Net n) {
  const int i = *n.row, slot = (i - 1) % (n.p + 1);
  const int64_t total = (int64_t)n.B * n.W * n.C;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int c = (int)(e % n.C);
    const int w = (int)((e / n.C) % n.W);
    const int64_t b = e / ((int64_t)n.C * n.W);
    const int64_t code = n.codes[(b * n.H + i - 1) * n.W + w];
    n.VC(0, b, slot, n.p + w)[c] = n.embedding[code * n.C + c];
  }
}

// im2col [B*W, (p+1)*k*C] of layer l's cached rows i-1-p .. i-1 (rows above the map are zero).
__global__ void im2col_kernel(Net n, int l) {
  const int i = *n.row, R = n.p + 1;
  const int64_t span = (int64_t)R * n.k * n.C;
  const int64_t total = (int64_t)n.B * n.W * span;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t m = e / span;
    const int t = (int)(e % span);
    const int dr = t / (n.k * n.C), dc = (t / n.C) % n.k, c = t % n.C;
    const int w = (int)(m % n.W);
    const int64_t b = m / n.W;
    const int r = i - 1 - n.p + dr;
    n.im2col[e] = r >= 0 ? n.VC(l, b, r % R, w + dc)[c] : 0.0;
  }
}

// vpre += v_b (the pre-activation v_to_h reads), and the gate of vpre + bias into layer l+1's
// cache at row i-1.
__global__ void vertical_epilogue_kernel(Net n, int l) {
  const int i = *n.row, slot = (i - 1) % (n.p + 1), C = n.C;
  const int64_t total = (int64_t)n.B * n.W * C;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int c = (int)(e % C);
    const int64_t m = e / C;
    double* v = n.vpre + m * 2 * C;
    const double a = v[c] + n.v_b[l * 2 * C + c];
    const double g = v[C + c] + n.v_b[l * 2 * C + C + c];
    v[c] = a;
    v[C + c] = g;
    if (l + 1 < n.L) {
      const int64_t b = m / n.W;
      const int w = (int)(m % n.W);
      const double* bias = n.BIAS(b, l);
      const double ab = bias ? a + bias[c] : a, gb = bias ? g + bias[C + c] : g;
      n.VC(l + 1, b, slot, n.p + w)[c] = tanh(ab) * sigmoid(gb);
    }
  }
}

// Row terms: v_to_h(vpre) (already in rowt by the DGEMM) + its bias + h_conv's + conditioning.
__global__ void row_epilogue_kernel(Net n, int l) {
  const int C2 = 2 * n.C;
  const int64_t total = (int64_t)n.B * n.W * C2;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int q = (int)(e % C2);
    const int64_t m = e / C2;
    const double* bias = n.BIAS(m / n.W, l);
    n.ROW(l, m / n.W, (int)(m % n.W))[q] += n.vh_b[l * C2 + q] + n.h_b[l * C2 + q] +
                                             (bias ? bias[q] : 0.0);
  }
}

// ------------------------------------------------------------------ once per position

enum Mode { kHConvGate = 0, kHOut = 1, kHead1 = 2, kHead2 = 3 };
constexpr int kTM = 16;       // maps per tile
constexpr int kTN = 32;       // columns per tile (kHConvGate: 16 gate channels, both halves)
constexpr int kTK = 64;       // reduction step
constexpr int kThreads = 128; // 16 rows x 8 column groups; each thread: 1 map x 4 columns
constexpr int kLoadA = kTM * kTK / kThreads, kLoadB = kTK * kTN / kThreads;

// The operands of one per-position product, by MODE: the weight matrix [kdim, ldw] and the left
// operand's row of map b (h_conv: the window of columns j-p .. j of row buffer l, .. j-1 for layer
// 0; h_out: the gate; head1: the last row buffer at j, before its ELU; head2: the head).
struct Operands {
  int kdim, ldw;
  const double* w;
};

template <int MODE>
__device__ __forceinline__ Operands operands(const Net& n, int l) {
  const int C = n.C, p = n.p;
  if (MODE == kHConvGate)
    return {(l == 0 ? p : p + 1) * C, 2 * C, n.h_w + (int64_t)l * (p + 1) * C * 2 * C};
  if (MODE == kHOut) return {C, C, n.out_w + (int64_t)l * C * C};
  if (MODE == kHead1) return {C, C, n.head1_w};
  return {C, n.K, n.head2_w};
}

template <int MODE>
__device__ __forceinline__ const double* left_row(const Net& n, int l, int j, int64_t b) {
  if (MODE == kHConvGate) return n.HB(l, b, j);
  if (MODE == kHOut) return n.gate + b * n.C;
  if (MODE == kHead1) return n.HB(n.L, b, n.p + j);
  return n.head + b * n.C;
}

// The weight column that tile column q (of 32) reads, from column c0 on; false past the matrix.
// h_conv: q < 16 the first halves of 16 gate channels c0 + q, q >= 16 their second halves.
template <int MODE>
__device__ __forceinline__ bool weight_column(const Net& n, const Operands& op, int c0, int q,
                                              int* col) {
  if (MODE == kHConvGate) {
    const int ch = c0 + (q & 15);
    *col = q < 16 ? ch : n.C + ch;
    return ch < n.C;
  }
  *col = c0 + q;
  return *col < op.ldw;
}

// out[b][cols] = A[b][:] @ Wt[:, cols] for the maps of one tile, with the mode's operands and
// epilogue. Thread (ty, tx) accumulates tile columns tx, tx+8, tx+16, tx+24. The next step's
// operands are loaded into registers while the current one is multiplied from shared memory.
template <int MODE>
__global__ void __launch_bounds__(kThreads) position_kernel(Net n, int l, int j) {
  __shared__ double As[kTM][kTK + 1];
  __shared__ double Bs[kTK][kTN];
  const int tid = threadIdx.x, ty = tid / 8, tx = tid % 8;
  const int C = n.C, p = n.p;
  const int64_t m0 = (int64_t)blockIdx.x * kTM;
  const int c0 = blockIdx.y * (MODE == kHConvGate ? kTN / 2 : kTN);
  const Operands op = operands<MODE>(n, l);
  const int kdim = op.kdim, ldw = op.ldw;
  const double* wmat = op.w;
  // Row pointers of this thread's A loads and column of its B loads (fixed over the k steps).
  const double* arow[kLoadA];
#pragma unroll
  for (int t = 0; t < kLoadA; ++t) {
    const int64_t b = m0 + (tid + t * kThreads) / kTK;
    arow[t] = b < n.B ? left_row<MODE>(n, l, j, b) : nullptr;
  }
  int bcol;  // every B load of this thread is in tile column tid % kTN
  const bool bok = weight_column<MODE>(n, op, c0, tid % kTN, &bcol);
  double ra[kLoadA], rb[kLoadB];
  auto load = [&](int k0) {
#pragma unroll
    for (int t = 0; t < kLoadA; ++t) {
      const int kg = k0 + (tid + t * kThreads) % kTK;
      double v = 0.0;
      if (arow[t] && kg < kdim) {
        v = arow[t][kg];
        if (MODE == kHead1) v = elu(v);
      }
      ra[t] = v;
    }
#pragma unroll
    for (int t = 0; t < kLoadB; ++t) {
      const int kg = k0 + (tid + t * kThreads) / kTN;
      rb[t] = (bok && kg < kdim) ? wmat[(int64_t)kg * ldw + bcol] : 0.0;
    }
  };
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  load(0);
  for (int k0 = 0; k0 < kdim; k0 += kTK) {
#pragma unroll
    for (int t = 0; t < kLoadA; ++t) {
      const int e = tid + t * kThreads;
      As[e / kTK][e % kTK] = ra[t];
    }
#pragma unroll
    for (int t = 0; t < kLoadB; ++t) {
      const int e = tid + t * kThreads;
      Bs[e / kTN][e % kTN] = rb[t];
    }
    __syncthreads();
    if (k0 + kTK < kdim) load(k0 + kTK);
#pragma unroll 8
    for (int kk = 0; kk < kTK; ++kk) {
      const double a = As[ty][kk];
      acc[0] = fma(a, Bs[kk][tx], acc[0]);
      acc[1] = fma(a, Bs[kk][tx + 8], acc[1]);
      acc[2] = fma(a, Bs[kk][tx + 16], acc[2]);
      acc[3] = fma(a, Bs[kk][tx + 24], acc[3]);
    }
    __syncthreads();
  }
  const int64_t b = m0 + ty;
  if (b >= n.B) return;
  if (MODE == kHConvGate) {  // pairs (acc[0], acc[2]) and (acc[1], acc[3]): channels c, C + c
    const double* rt = n.ROW(l, b, j);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = c0 + tx + 8 * h;
      if (c < C) n.gate[b * C + c] = tanh(acc[h] + rt[c]) * sigmoid(acc[h + 2] + rt[C + c]);
    }
  } else if (MODE == kHOut) {
    double* o = n.HB(l + 1, b, p + j);
    const double* resid = n.HB(l, b, p + j);
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int c = c0 + tx + 8 * h;
      if (c < C) o[c] = acc[h] + n.out_b[l * C + c] + (l > 0 ? resid[c] : 0.0);
    }
  } else if (MODE == kHead1) {
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int c = c0 + tx + 8 * h;
      if (c < C) n.head[b * C + c] = elu(acc[h] + n.head1_b[c]);
    }
  } else {
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int k = c0 + tx + 8 * h;
      if (k < n.K) n.scores[b * n.K + k] = (acc[h] + n.head2_b[k]) / n.temperature;
    }
  }
}

// The same products and epilogues as position_kernel for small batches: kGM maps per block, the
// inner dimension split into kGS slices (one warp each: a warp reads 32 consecutive weight
// columns of a row, coalesced, with every load of its slice independent of the others), the
// slices' partial sums added in a fixed order (deterministic). More blocks, shorter dependency
// chains: position_kernel's 16-map tiles leave most of the GPU idle and wait on one serial
// reduction per block when the batch is a few maps.
constexpr int kGM = 4;  // maps per block
constexpr int kGS = 8;  // slices of the inner dimension, one warp each

template <int MODE>
__global__ void __launch_bounds__(32 * kGS) position_gemv_kernel(Net n, int l, int j) {
  __shared__ double part[kGS][kGM][32];
  const int lane = threadIdx.x % 32, slice = threadIdx.x / 32;
  const int C = n.C, p = n.p;
  const int64_t m0 = (int64_t)blockIdx.x * kGM;
  const int c0 = blockIdx.y * (MODE == kHConvGate ? 16 : 32);
  const Operands op = operands<MODE>(n, l);
  const int kdim = op.kdim, ldw = op.ldw;
  const double* wmat = op.w;
  // Rows of the left operand; a map past the batch reads map m0's row (its sums are dropped).
  const double* arow[kGM];
#pragma unroll
  for (int m = 0; m < kGM; ++m) arow[m] = left_row<MODE>(n, l, j, m0 + m < n.B ? m0 + m : m0);
  int bcol;
  const bool bok = weight_column<MODE>(n, op, c0, lane, &bcol);
  const int per = (kdim + kGS - 1) / kGS;
  const int k0 = slice * per, k1 = min(kdim, k0 + per);
  double acc[kGM];
#pragma unroll
  for (int m = 0; m < kGM; ++m) acc[m] = 0.0;
  if (bok) {
#pragma unroll 4
    for (int k = k0; k < k1; ++k) {
      const double w = wmat[(int64_t)k * ldw + bcol];
#pragma unroll
      for (int m = 0; m < kGM; ++m) {
        double a = arow[m][k];
        if (MODE == kHead1) a = elu(a);
        acc[m] = fma(a, w, acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kGM; ++m) part[slice][m][lane] = acc[m];
  __syncthreads();
  const int t = threadIdx.x;
  if (t >= kGM * 32) return;
  const int m = t / 32, q = t % 32;
  const int64_t b = m0 + m;
  if (b >= n.B) return;
  if (MODE == kHConvGate) {
    const int c = c0 + q;
    if (q >= 16 || c >= C) return;
    double sa = 0.0, sg = 0.0;
#pragma unroll
    for (int s = 0; s < kGS; ++s) {
      sa += part[s][m][q];
      sg += part[s][m][q + 16];
    }
    const double* rt = n.ROW(l, b, j);
    n.gate[b * C + c] = tanh(sa + rt[c]) * sigmoid(sg + rt[C + c]);
    return;
  }
  double sum = 0.0;
#pragma unroll
  for (int s = 0; s < kGS; ++s) sum += part[s][m][q];
  const int c = c0 + q;
  if (MODE == kHOut) {
    if (c < C) {
      const double resid = l > 0 ? n.HB(l, b, p + j)[c] : 0.0;
      n.HB(l + 1, b, p + j)[c] = sum + n.out_b[l * C + c] + resid;
    }
  } else if (MODE == kHead1) {
    if (c < C) n.head[b * C + c] = elu(sum + n.head1_b[c]);
  } else if (c < n.K) {
    n.scores[b * n.K + c] = (sum + n.head2_b[c]) / n.temperature;
  }
}

// Is (sa, ka) the better draw than (sb, kb)? torch.argmax's order: NaN first, then the larger
// score, then the lower index.
__device__ __forceinline__ bool better(double sa, int ka, double sb, int kb) {
  const bool na = isnan(sa), nb = isnan(sb);
  if (na != nb) return na;
  if (!na && sa != sb) return sa > sb;
  return ka < kb;
}

// One warp per map: the draw at (i, j) (scores: logits / T, plus the Gumbel noise of philox.h
// computed here, four codes per lane and Philox call), the top-2 gap, the code's embedding into
// row buffer 0.
__global__ void draw_kernel(Net n, int j) {
  const int64_t b = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (b >= n.B) return;
  const int i = *n.row;
  const uint64_t seed = (uint64_t)n.seeds[b];
  const double* s = n.scores + b * n.K;
  double best_s = -INFINITY, s1 = -INFINITY, s2 = -INFINITY;
  int best_k = 0x7fffffff;
  bool nan = false;
  for (int k = 4 * lane; k < n.K; k += 128) {
    double g[4];
    gumbel4(seed, i, j, k / 4, g);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      if (k + w >= n.K) break;
      const double v = s[k + w] + g[w];
      if (better(v, k + w, best_s, best_k)) {
        best_s = v;
        best_k = k + w;
      }
      if (isnan(v)) {
        nan = true;
      } else if (v > s1) {
        s2 = s1;
        s1 = v;
      } else if (v > s2) {
        s2 = v;
      }
    }
  }
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) {
    const double os = __shfl_xor_sync(0xffffffffu, best_s, off);
    const int ok = __shfl_xor_sync(0xffffffffu, best_k, off);
    if (better(os, ok, best_s, best_k)) {
      best_s = os;
      best_k = ok;
    }
    const double o1 = __shfl_xor_sync(0xffffffffu, s1, off);
    const double o2 = __shfl_xor_sync(0xffffffffu, s2, off);
    s2 = fmax(fmin(s1, o1), fmax(s2, o2));
    s1 = fmax(s1, o1);
  }
  nan = __any_sync(0xffffffffu, nan);
  if (lane == 0) {
    n.codes[(b * n.H + i) * n.W + j] = best_k;
    double& gap = n.gap[b];
    if (nan) gap = NAN;
    else if (n.K > 1 && !isnan(gap)) gap = fmin(gap, s1 - s2);
  }
  double* e = n.HB(0, b, n.p + j);
  for (int c = lane; c < n.C; c += 32) e[c] = n.embedding[(int64_t)best_k * n.C + c];
}

// ------------------------------------------------------------------ host side

unsigned blocks_for(int64_t total, int threads = 256) {
  const int64_t b = (total + threads - 1) / threads;
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>(b, 65536 * 8));
}

struct Launcher {
  Net n;
  at::Tensor im2col, vpre, rowt, v_w, vh_w;
  int64_t gemv_max_batch = 0;  // position_gemv_kernel up to this batch, position_kernel above

  void positions(cudaStream_t s) {
    if (n.B <= gemv_max_batch) {
      positions_gemv(s);
      return;
    }
    const unsigned mt = (unsigned)((n.B + kTM - 1) / kTM);
    for (int j = 0; j < n.W; ++j) {
      for (int l = 0; l < n.L; ++l) {
        position_kernel<kHConvGate><<<dim3(mt, (n.C + 15) / 16), kThreads, 0, s>>>(n, l, j);
        position_kernel<kHOut><<<dim3(mt, (n.C + kTN - 1) / kTN), kThreads, 0, s>>>(n, l, j);
      }
      position_kernel<kHead1><<<dim3(mt, (n.C + kTN - 1) / kTN), kThreads, 0, s>>>(n, 0, j);
      position_kernel<kHead2><<<dim3(mt, (n.K + kTN - 1) / kTN), kThreads, 0, s>>>(n, 0, j);
      draw_kernel<<<(unsigned)((n.B + 3) / 4), 128, 0, s>>>(n, j);
    }
    GVQ_SAMPLE_CHECK(cudaGetLastError());
  }

  void positions_gemv(cudaStream_t s) {
    const unsigned mg = (unsigned)((n.B + kGM - 1) / kGM), th = 32 * kGS;
    const unsigned gc = (unsigned)((n.C + 15) / 16), oc = (unsigned)((n.C + 31) / 32),
                   kc = (unsigned)((n.K + 31) / 32);
    for (int j = 0; j < n.W; ++j) {
      for (int l = 0; l < n.L; ++l) {
        position_gemv_kernel<kHConvGate><<<dim3(mg, gc), th, 0, s>>>(n, l, j);
        position_gemv_kernel<kHOut><<<dim3(mg, oc), th, 0, s>>>(n, l, j);
      }
      position_gemv_kernel<kHead1><<<dim3(mg, oc), th, 0, s>>>(n, 0, j);
      position_gemv_kernel<kHead2><<<dim3(mg, kc), th, 0, s>>>(n, 0, j);
      draw_kernel<<<(unsigned)((n.B + 3) / 4), 128, 0, s>>>(n, j);
    }
    GVQ_SAMPLE_CHECK(cudaGetLastError());
  }

  // Rows i >= 1 (i is advanced on the device first). The DGEMMs run on the current stream.
  void vertical(cudaStream_t s) {
    const int64_t bw = (int64_t)n.B * n.W;
    advance_row_kernel<<<1, 1, 0, s>>>(n.row);
    push_row_kernel<<<blocks_for(bw * n.C), 256, 0, s>>>(n);
    for (int l = 0; l < n.L; ++l) {
      im2col_kernel<<<blocks_for(bw * (n.p + 1) * n.k * n.C), 256, 0, s>>>(n, l);
      at::mm_out(vpre, im2col, v_w.select(0, l));
      vertical_epilogue_kernel<<<blocks_for(bw * n.C), 256, 0, s>>>(n, l);
      at::Tensor out = rowt.select(0, l);
      at::mm_out(out, vpre, vh_w.select(0, l));
      row_epilogue_kernel<<<blocks_for(bw * 2 * n.C), 256, 0, s>>>(n, l);
    }
    GVQ_SAMPLE_CHECK(cudaGetLastError());
  }
};

// Largest batch that runs the per-position products with position_gemv_kernel
// (GALSIM_VQVAE_CUDA_GEMV_MAX_BATCH, default kGemvMaxBatch). H100, 21x21, K=512: 1.4x the tiled
// kernel's maps/s at batch 1 and 16, 0.97x (15x128) to 1.24x (10x64) at batch 256.
constexpr int64_t kGemvMaxBatch = 64;
int64_t gemv_max_batch() {
  const char* env = std::getenv("GALSIM_VQVAE_CUDA_GEMV_MAX_BATCH");
  return env && env[0] ? std::atoll(env) : kGemvMaxBatch;
}

bool graphs_wanted() {
  const char* env = std::getenv("GALSIM_VQVAE_CUDA_GRAPHS");
  return !(env && env[0] == '0');
}

// Work queued on `later` from now on runs after what `earlier` has queued so far.
void order_after(cudaStream_t later, cudaStream_t earlier) {
  cudaEvent_t ev;
  GVQ_SAMPLE_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  GVQ_SAMPLE_CHECK(cudaEventRecord(ev, earlier));
  GVQ_SAMPLE_CHECK(cudaStreamWaitEvent(later, ev, 0));
  GVQ_SAMPLE_CHECK(cudaEventDestroy(ev));
}

// One side stream per device for every call (the pool hands out a different stream each time,
// and cuBLAS keeps a workspace per stream: a fixed stream keeps that to one).
c10::cuda::CUDAStream side_stream(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::map<c10::DeviceIndex, c10::cuda::CUDAStream> streams;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = streams.find(device);
  if (it == streams.end())
    it = streams.emplace(device, c10::cuda::getStreamFromPool(false, device)).first;
  return it->second;
}

// Ends a capture left open by an exception, so the stream can be used again.
void abandon_capture(cudaStream_t s) {
  cudaStreamCaptureStatus status;
  if (cudaStreamIsCapturing(s, &status) == cudaSuccess && status != cudaStreamCaptureStatusNone) {
    cudaGraph_t g = nullptr;
    cudaStreamEndCapture(s, &g);
    if (g) cudaGraphDestroy(g);
  }
  cudaGetLastError();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pixelcnn_sample_cuda(
    at::TensorList weights, const c10::optional<at::Tensor>& bias, const at::Tensor& seeds,
    int64_t height, int64_t width, double temperature, int64_t kernel_size) {
  const SamplerDims d =
      check_sampler_inputs(weights, bias, seeds, height, width, temperature, kernel_size);
  TORCH_CHECK(seeds.is_cuda(), "pixelcnn_sample_cuda: tensors must be on a CUDA device");
  TORCH_CHECK_VALUE(d.batch < (1 << 24) && d.height < (1 << 20) && d.width < (1 << 20) &&
                        d.codes < (1 << 24) && d.channels < (1 << 16) && d.layers < (1 << 16),
                    msg("pixelcnn_sample (CUDA): sizes out of range: B=", d.batch,
                        " H=", d.height, " W=", d.width, " K=", d.codes, " C=", d.channels,
                        " L=", d.layers));
  const at::cuda::CUDAGuard guard(seeds.device());
  const auto f64 = seeds.options().dtype(at::kDouble);
  auto codes = at::empty({d.batch, d.height, d.width}, seeds.options().dtype(at::kLong));
  auto gap = at::full({d.batch}, INFINITY, f64);
  if (d.batch == 0) return {codes, gap};

  const int64_t B = d.batch, W = d.width, C = d.channels, L = d.layers, p = d.pad, R = p + 1;
  const std::vector<at::Tensor> w = contiguous_weights(weights);
  const at::Tensor sd = seeds.contiguous();
  const at::Tensor &vw = w[kVW], &vhw = w[kVhW];
  const at::Tensor bs = d.has_bias ? bias->contiguous() : at::Tensor();
  const SamplerLayout lay(d);
  // The caches (nn/fast_sampling.py::cache_bytes, less the pre-activations, kept in registers),
  // and the row step's scratch (row_step_bytes with the im2col).
  auto vc = at::zeros({L, B, lay.vc_layer}, f64);
  auto rowt = at::empty({L, B * W, 2 * C}, f64);
  auto hbuf = at::zeros({L + 1, B, lay.h_layer}, f64);
  auto gate = at::empty({B, lay.gate}, f64);  // the kernels use its first B*C entries, [B][C]
  auto head = at::empty({B, lay.head}, f64);
  auto scores = at::empty({B, lay.logits}, f64);
  auto im2col = at::empty({B * W, R * d.kernel * C}, f64);
  auto vpre = at::empty({B * W, 2 * C}, f64);
  auto row = at::zeros({1}, seeds.options().dtype(at::kInt));

  Launcher run;
  Net& n = run.n;
  n.B = (int)B;
  n.H = (int)d.height;
  n.W = (int)W;
  n.K = (int)d.codes;
  n.C = (int)C;
  n.L = (int)L;
  n.p = (int)p;
  n.k = (int)d.kernel;
  n.temperature = d.temperature;
  n.embedding = w[kEmbedding].data_ptr<double>();
  n.v_w = w[kVW].data_ptr<double>();
  n.v_b = w[kVB].data_ptr<double>();
  n.h_w = w[kHW].data_ptr<double>();
  n.h_b = w[kHB].data_ptr<double>();
  n.vh_w = w[kVhW].data_ptr<double>();
  n.vh_b = w[kVhB].data_ptr<double>();
  n.out_w = w[kOutW].data_ptr<double>();
  n.out_b = w[kOutB].data_ptr<double>();
  n.head1_w = w[kHead1W].data_ptr<double>();
  n.head1_b = w[kHead1B].data_ptr<double>();
  n.head2_w = w[kHead2W].data_ptr<double>();
  n.head2_b = w[kHead2B].data_ptr<double>();
  n.bias = d.has_bias ? bs.data_ptr<double>() : nullptr;
  n.seeds = sd.data_ptr<int64_t>();
  n.vc = vc.data_ptr<double>();
  n.rowt = rowt.data_ptr<double>();
  n.hb = hbuf.data_ptr<double>();
  n.gate = gate.data_ptr<double>();
  n.head = head.data_ptr<double>();
  n.scores = scores.data_ptr<double>();
  n.im2col = im2col.data_ptr<double>();
  n.vpre = vpre.data_ptr<double>();
  n.gap = gap.data_ptr<double>();
  n.codes = codes.data_ptr<int64_t>();
  n.row = row.data_ptr<int>();
  run.im2col = im2col;
  run.vpre = vpre;
  run.rowt = rowt;
  run.v_w = vw;
  run.vh_w = vhw;
  run.gemv_max_batch = gemv_max_batch();

  // All work on a side stream (graph capture needs a non-default stream), ordered after what the
  // caller's stream has queued, and the caller's stream ordered after it.
  const auto origin = c10::cuda::getCurrentCUDAStream();
  const auto side = side_stream(seeds.device().index());
  order_after(side.stream(), origin.stream());
  {
    const c10::cuda::CUDAStreamGuard stream_guard(side);
    const cudaStream_t s = side.stream();
    row0_kernel<<<blocks_for(L * B * W * 2 * C), 256, 0, s>>>(n);
    GVQ_SAMPLE_CHECK(cudaGetLastError());
    run.positions(s);
    if (d.height > 1) {
      std::unique_ptr<at::cuda::CUDAGraph> gv, gp;
      if (graphs_wanted()) {
        try {
          // cuBLAS handle and workspace set up on s with the very products captured below. Both
          // outputs are scratch that the vertical step overwrites in full before reading them.
          at::mm_out(vpre, im2col, vw.select(0, 0));
          at::Tensor first = rowt.select(0, 0);
          at::mm_out(first, vpre, vhw.select(0, 0));
          gv = std::make_unique<at::cuda::CUDAGraph>();
          gv->capture_begin();
          run.vertical(s);
          gv->capture_end();
          gp = std::make_unique<at::cuda::CUDAGraph>();
          gp->capture_begin();
          run.positions(s);
          gp->capture_end();
        } catch (const std::exception& exc) {
          abandon_capture(s);
          gv.reset();
          gp.reset();
          TORCH_WARN_ONCE("pixelcnn_sample (CUDA): CUDA-graph capture failed (", exc.what(),
                          "); launching the kernels one by one");
        }
      }
      for (int64_t i = 1; i < d.height; ++i) {
        if (gv && gp) {
          gv->replay();
          gp->replay();
        } else {
          run.vertical(s);
          run.positions(s);
        }
      }
      if (gv) {  // the graphs (and their memory pool) must outlive their last replay
        GVQ_SAMPLE_CHECK(cudaStreamSynchronize(s));
      }
    }
  }
  order_after(origin.stream(), side.stream());
  return {codes, gap};
}

}  // namespace galsim_vqvae

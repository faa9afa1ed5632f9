// CUDA kernel of galsim_vqvae::nearest_code: fused, exact nearest-codebook search.
//
// Same method as the CPU kernel (see csrc/cpu/nearest_code.cpp and csrc/exact.h), never
// materialising the N x K distances:
//   prep     codebook norms |c_k|^2 (float64 -> float32), max_k |c_k|^2, and the codebook
//            transposed to [D][Kp] (padding codes score +inf);
//   search   (CUDA cores, default for D <= 128; the 3xTF32 tensor-core variant below is the
//            default for larger D)
//            one block per 128 rows of z, z tile held in shared memory, codebook streamed through
//            shared memory 64 codes at a time; each thread scores 8 rows x 4 codes in float32 and
//            keeps, per row, the best score, its code and the second-best score. A row is settled
//            when its second-best score exceeds the best by more than twice the proven error bound
//            E of the scores; otherwise (near-ties, duplicates, huge values) its index is
//            appended to a list;
//   recheck  one warp per listed row scans every code with the exact order of exact.h (float64
//            distance with its bound, exact fixed-point arithmetic where that cannot decide).
// Extra memory: O(N + K D). No host synchronisation: the recheck grid reads the list's length
// from device memory.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cfloat>
#include <cstdio>
#include <cstdlib>

#include "../exact.h"
#include "../nearest_code.h"

namespace galsim_vqvae {
namespace {

constexpr int kBM = 128;          // rows per block
constexpr int kBN = 64;           // codes per shared-memory tile
constexpr int kTM = 8;            // rows per thread
constexpr int kTN = 4;            // codes per thread (strided by 16)
constexpr int kThreads = 256;     // 16 x 16
constexpr int kZStride = kBM + 4; // padded row of the transposed z tile
constexpr double kSafe = (double)FLT_MAX / 8.0;

// Round to TF32 (nearest, ties away), as a float with the low 13 mantissa bits zero.
__device__ __forceinline__ float tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
}

// Codebook preparation. ct: [D][Kp] transposed (CUDA-core kernel); cg/cl: [Kp][D] TF32 splits,
// big = tf32(c) and small = tf32(c - big) (tensor-core kernel); cn: |c|^2; padding codes are zero
// with |c|^2 = +inf.
__global__ void prep_kernel(const float* __restrict__ cb, int64_t k, int64_t kp, int64_t d,
                            float* __restrict__ ct, float* __restrict__ cg, float* __restrict__ cl,
                            float* __restrict__ cn, unsigned long long* __restrict__ cmax2_bits) {
  int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= kp) return;
  if (c < k) {
    double s = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      float x = cb[c * d + j];
      s += (double)x * (double)x;
      ct[j * kp + c] = x;
      float big = tf32(x);
      cg[c * d + j] = big;
      cl[c * d + j] = tf32(x - big);
    }
    cn[c] = (float)s;
    // Non-negative doubles order like their bit patterns; NaN (0x7ff8...) sorts above inf.
    atomicMax(cmax2_bits, (unsigned long long)__double_as_longlong(s));
  } else {
    for (int64_t j = 0; j < d; ++j) ct[j * kp + c] = cg[c * d + j] = cl[c * d + j] = 0.0f;
    cn[c] = INFINITY;
  }
}

struct Top2 {
  float s1, s2;
  int k1;
};

__device__ __forceinline__ void merge(Top2& a, float s1, int k1, float s2) {
  float hi = fmaxf(a.s1, s1);
  if (s1 < a.s1 || (s1 == a.s1 && k1 < a.k1)) {
    a.k1 = k1;
  }
  a.s1 = fminf(a.s1, s1);
  a.s2 = fminf(fminf(a.s2, s2), hi);
}


__device__ __forceinline__ double group_distance64(const float* zr, const float* c, int d, int sub) {
  double acc = exact::distance64_part(zr, c, d, sub);
  // xor tree 4, 2, 1: every lane ends with ((p0+p4) + (p2+p6)) + ((p1+p5) + (p3+p7)), the order
  // of exact::distance64 (addition is commutative, so each lane's operand order does not matter).
#pragma unroll
  for (int off = 4; off >= 1; off >>= 1) acc = __dadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, off));
  return acc;
}


// Settles one row from its best score (code t.k1), second-best score t.s2 and the proven bound E
// of the scores: the code is final when t.s2 > t.s1 + 2E (no other code can be as near); otherwise
// the row is appended to the list for the exact re-check. `tensor_cores`: the scores came from
// 3xTF32 tensor-core products (see search_tc_kernel), whose bound is wider.
__device__ __forceinline__ void settle(const float* __restrict__ z, const float* __restrict__ cb,
                                       int d, int64_t k, int64_t row, const Top2& t,
                                       unsigned long long cmax2_bits, bool tensor_cores, int sub,
                                       bool live, int64_t* __restrict__ index, float* __restrict__ dist,
                                       int* __restrict__ list, int* __restrict__ list_len) {
  // Called by the 8 lanes (sub = 0..7) of a group, all with the same row and t; writes nothing
  // unless `live` (row < n).
  const float* zr = z + row * d;
  double zn2 = 0.0;
  for (int j = sub; j < d; j += 8) zn2 += (double)zr[j] * (double)zr[j];
#pragma unroll
  for (int off = 4; off >= 1; off >>= 1) zn2 += __shfl_xor_sync(0xffffffffu, zn2, off);
  const double cmax2 = __longlong_as_double((long long)cmax2_bits);
  double e;
  if (tensor_cores) {
    // z.c from 3xTF32 (see search_tc_kernel): splitting and the dropped small*small product
    // cost at most 3 * 2^-22 sum_j |z_j c_j|; each block of 8 d's (24 exact products, three chained
    // mma) is summed by the tensor core with at most 32 * 2^-23 = 2^-18 of its absolute sum
    // (truncation, per Fasi et al. 2021; generous), and the D/8 blocks are added in float32
    // (gamma_{D/8+1}). With sum |z_j c_j| <= (|z|^2 + |c|^2) / 2, the |c|^2 rounding and the last
    // subtraction as for the float32 kernel, twice all that, plus flushed subnormal parts.
    const double coef = 3.0 * 2.384185791015625e-07 + 3.814697265625e-06 +
                        exact::gamma(d / 8 + 2, 1.0 / 16777216.0) + 1.1920928955078125e-07;
    e = 2.0 * coef * (2.0 * zn2 + 4.0 * cmax2) +
        8.0 * (3.0 * d + 4.0) * 1.1754943508222875e-38 * (1.0 + zn2 + cmax2);
  } else {
    e = 2.0 * exact::gamma(d + 4, 1.0 / 16777216.0) * (2.0 * zn2 + 4.0 * cmax2) +
        (2.0 * d + 8.0) * 1.401298464324817e-45;
  }
  const bool settled = zn2 <= kSafe && cmax2 <= kSafe && t.k1 < k &&
                       (double)t.s2 > (double)t.s1 + 2.0 * e;
  const double dk = group_distance64(zr, cb + (int64_t)(t.k1 < k ? t.k1 : 0) * d, d, sub);
  if (live && sub == 0) {
    if (settled) {
      index[row] = t.k1;
      dist[row] = (float)dk;
    } else {
      list[atomicAdd(list_len, 1)] = (int)row;
    }
  }
}

// The block's 128 rows, with their merged Top2 in shared memory, settled by 32 groups of 8 lanes.
__device__ __forceinline__ void settle_block(const Top2* rows_best, int64_t r0, const float* z,
                                             const float* cb, int d, int64_t n, int64_t k,
                                             unsigned long long cmax2_bits, bool tensor_cores,
                                             int64_t* index, float* dist, int* list, int* list_len) {
  const int grp = threadIdx.x >> 3, sub = threadIdx.x & 7;
  for (int rl = grp; rl < 128; rl += 32) {
    // Rows past n stay in step (clamped to row r0, writing nothing): the shuffles need all lanes.
    const bool live = r0 + rl < n;
    const int64_t row = live ? r0 + rl : r0;
    settle(z, cb, d, k, row, rows_best[rl], cmax2_bits, tensor_cores, sub, live, index, dist,
           list, list_len);
  }
}

__device__ __forceinline__ void push(Top2& t, float s, int c) {
  if (s < t.s1) {
    t.s2 = t.s1;
    t.s1 = s;
    t.k1 = c;
  } else if (s < t.s2) {
    t.s2 = s;
  }
}

__global__ void __launch_bounds__(kThreads)
search_kernel(const float* __restrict__ z, const float* __restrict__ ct,
              const float* __restrict__ cn, const float* __restrict__ cb,
              const unsigned long long* __restrict__ cmax2_bits, int64_t n, int64_t k,
              int64_t kp, int d, int64_t* __restrict__ index, float* __restrict__ dist,
              int* __restrict__ list, int* __restrict__ list_len) {
  extern __shared__ float smem[];
  float* zs = smem;                   // [d][kZStride]
  float* cs = smem + d * kZStride;    // [d][kBN]
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t r0 = (int64_t)blockIdx.x * kBM;

  for (int i = tid; i < kBM * d; i += kThreads) {
    int r = i / d, j = i - r * d;
    zs[j * kZStride + r] = (r0 + r < n) ? z[(r0 + r) * d + j] : 0.0f;
  }

  Top2 best[kTM];
#pragma unroll
  for (int i = 0; i < kTM; ++i) best[i] = {INFINITY, INFINITY, 0};

  for (int64_t c0 = 0; c0 < kp; c0 += kBN) {
    __syncthreads();
    for (int i = tid; i < d * (kBN / 4); i += kThreads) {
      int j = i / (kBN / 4), q = i - j * (kBN / 4);
      reinterpret_cast<float4*>(cs + j * kBN)[q] =
          reinterpret_cast<const float4*>(ct + j * kp + c0)[q];
    }
    __syncthreads();
    float acc[kTM][kTN];
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int jn = 0; jn < kTN; ++jn) acc[i][jn] = 0.0f;
#pragma unroll 4
    for (int j = 0; j < d; ++j) {
      float4 a0 = *reinterpret_cast<const float4*>(zs + j * kZStride + ty * kTM);
      float4 a1 = *reinterpret_cast<const float4*>(zs + j * kZStride + ty * kTM + 4);
      float a[kTM] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      float b[kTN];
#pragma unroll
      for (int jn = 0; jn < kTN; ++jn) b[jn] = cs[j * kBN + tx + 16 * jn];
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int jn = 0; jn < kTN; ++jn) acc[i][jn] = fmaf(a[i], b[jn], acc[i][jn]);
    }
#pragma unroll
    for (int jn = 0; jn < kTN; ++jn) {
      int c = (int)c0 + tx + 16 * jn;
      float cnc = cn[c];
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
        push(best[i], cnc - 2.0f * acc[i][jn], c);
      }
    }
  }

  // Combine the 16 threads that share these rows (lanes of one half-warp).
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
#pragma unroll
    for (int off = 8; off >= 1; off >>= 1) {
      float s1 = __shfl_xor_sync(0xffffffffu, best[i].s1, off);
      float s2 = __shfl_xor_sync(0xffffffffu, best[i].s2, off);
      int k1 = __shfl_xor_sync(0xffffffffu, best[i].k1, off);
      merge(best[i], s1, k1, s2);
    }
  }

  // Lane tx < kTM records row ty * kTM + tx; then groups of 8 lanes settle the rows.
  __shared__ Top2 rows_best[kBM];
  if (tx < kTM) {
    Top2 t = best[0];
#pragma unroll
    for (int i = 1; i < kTM; ++i)
      if (tx == i) t = best[i];
    rows_best[ty * kTM + tx] = t;
  }
  __syncthreads();
  settle_block(rows_best, r0, z, cb, d, n, k, *cmax2_bits, false, index, dist, list, list_len);
}

// ---- Tensor-core search (sm_80+): 3xTF32 products, same settle / re-check as above. ----
// Each float32 x is split into big = tf32(x) and small = tf32(x - big); z.c is accumulated as
// big*big + big*small + small*big with mma.sync m16n8k8 (float32 accumulation). Block: 128 rows x
// 128 codes per tile, D in chunks of 32 through shared memory; 8 warps of 32 rows x 64 codes.
// Rows of the shared tiles are padded to 40 floats: conflict-free 8-byte fragment loads. Within
// each block of 8 columns, physical columns 2t and 2t+1 serve as the mma's k = t and k = t + 4
// (the same permutation for z and codes, so the dot products are unchanged), which makes each
// fragment pair one 8-byte load.
constexpr int tBM = 128, tBN = 128, tBD = 32, tStr = tBD + 8;

__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__global__ void __launch_bounds__(256, 2)
search_tc_kernel(const float* __restrict__ z, const float* __restrict__ cn,
                 const float* __restrict__ cb, const float* __restrict__ cbig,
                 const float* __restrict__ csmall, const unsigned long long* __restrict__ cmax2_bits,
                 int64_t n, int64_t k, int64_t kp, int d, int64_t* __restrict__ index,
                 float* __restrict__ dist, int* __restrict__ list, int* __restrict__ list_len) {
  extern __shared__ float smem[];
  float* zb = smem;                 // [tBM][tStr] big parts
  float* zl = zb + tBM * tStr;      // small parts
  float* cg = zl + tBM * tStr;      // [tBN][tStr]
  float* cl = cg + tBN * tStr;
  __shared__ Top2 red[tBM];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 3, wn = warp >> 2, g = lane >> 2, t4 = lane & 3;
  const int64_t r0 = (int64_t)blockIdx.x * tBM;

  Top2 best[2][2];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) best[mi][h] = {INFINITY, INFINITY, 0};

  for (int64_t c0 = 0; c0 < kp; c0 += tBN) {
    float acc[2][8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 8; ++ni)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.0f;
    for (int d0 = 0; d0 < d; d0 += tBD) {
      __syncthreads();
      for (int i = tid; i < tBM * tBD; i += 256) {
        const int r = i / tBD, j = i % tBD;
        float x = (r0 + r < n && d0 + j < d) ? z[(r0 + r) * d + d0 + j] : 0.0f;
        float big = tf32(x);
        zb[r * tStr + j] = big;
        zl[r * tStr + j] = tf32(x - big);
        const bool in = d0 + j < d;  // c0 + r < kp always
        cg[r * tStr + j] = in ? cbig[(c0 + r) * d + d0 + j] : 0.0f;
        cl[r * tStr + j] = in ? csmall[(c0 + r) * d + d0 + j] : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < tBD; kk += 8) {
        uint32_t ab[2][4], al[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const int rb = wm * 32 + mi * 16 + g;
          const float2 b0 = *reinterpret_cast<const float2*>(zb + rb * tStr + kk + 2 * t4);
          const float2 b8 = *reinterpret_cast<const float2*>(zb + (rb + 8) * tStr + kk + 2 * t4);
          const float2 l0 = *reinterpret_cast<const float2*>(zl + rb * tStr + kk + 2 * t4);
          const float2 l8 = *reinterpret_cast<const float2*>(zl + (rb + 8) * tStr + kk + 2 * t4);
          ab[mi][0] = __float_as_uint(b0.x);  // (row g, k = t4)
          ab[mi][1] = __float_as_uint(b8.x);  // (row g + 8, k = t4)
          ab[mi][2] = __float_as_uint(b0.y);  // (row g, k = t4 + 4)
          ab[mi][3] = __float_as_uint(b8.y);  // (row g + 8, k = t4 + 4)
          al[mi][0] = __float_as_uint(l0.x);
          al[mi][1] = __float_as_uint(l8.x);
          al[mi][2] = __float_as_uint(l0.y);
          al[mi][3] = __float_as_uint(l8.y);
        }
#pragma unroll
        for (int ni = 0; ni < 8; ++ni) {
          const int cbase = (wn * 64 + ni * 8 + g) * tStr + kk + 2 * t4;
          const float2 cbv = *reinterpret_cast<const float2*>(cg + cbase);
          const float2 clv = *reinterpret_cast<const float2*>(cl + cbase);
          const uint32_t bb[2] = {__float_as_uint(cbv.x), __float_as_uint(cbv.y)};  // k = t4, t4 + 4
          const uint32_t bl[2] = {__float_as_uint(clv.x), __float_as_uint(clv.y)};
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            // One block of 8 d's from zero, then a rounded float32 add: the tensor core's
            // truncating accumulation only ever sees these 24 exact products.
            float tmp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            mma_tf32(tmp, al[mi], bb);
            mma_tf32(tmp, ab[mi], bl);
            mma_tf32(tmp, ab[mi], bb);
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[mi][ni][q] += tmp[q];
          }
        }
      }
    }
#pragma unroll
    for (int ni = 0; ni < 8; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = (int)c0 + wn * 64 + ni * 8 + 2 * t4 + e;
        const float cnc = cn[c];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) push(best[mi][h], cnc - 2.0f * acc[mi][ni][h * 2 + e], c);
      }
  }

  // Merge the 4 lanes of a quad, then the two warps (wn = 0, 1) that share rows.
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        float s1 = __shfl_xor_sync(0xffffffffu, best[mi][h].s1, off);
        float s2 = __shfl_xor_sync(0xffffffffu, best[mi][h].s2, off);
        int k1 = __shfl_xor_sync(0xffffffffu, best[mi][h].k1, off);
        merge(best[mi][h], s1, k1, s2);
      }
  if (wn == 1 && t4 == 0) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) red[wm * 32 + mi * 16 + h * 8 + g] = best[mi][h];
  }
  __syncthreads();
  if (wn == 0 && t4 == 0) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rl = wm * 32 + mi * 16 + h * 8 + g;
        Top2 t = best[mi][h];
        merge(t, red[rl].s1, red[rl].k1, red[rl].s2);
        red[rl] = t;
      }
  }
  __syncthreads();
  settle_block(red, r0, z, cb, d, n, k, *cmax2_bits, true, index, dist, list, list_len);
}

__global__ void recheck_kernel(const float* __restrict__ z, const float* __restrict__ cb,
                               int64_t k, int d, const int* __restrict__ list,
                               const int* __restrict__ list_len, int64_t* __restrict__ index,
                               float* __restrict__ dist) {
  const int lane = threadIdx.x & 31, grp = lane >> 3, sub = lane & 7;
  const int warps = (gridDim.x * blockDim.x) >> 5;
  const double rel = exact::distance64_bound(d);
  const int len = *list_len;
  for (int w = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; w < len; w += warps) {
    const int64_t row = list[w];
    const float* zr = z + row * d;
    int64_t bk = -1;
    double bd = 0.0;
    for (int64_t c0 = 0; c0 < k; c0 += 4) {
      const int64_t c = c0 + grp;
      const bool valid = c < k;
      const double dc = group_distance64(zr, cb + (valid ? c : 0) * d, d, sub);
      if (valid && (bk < 0 || exact::better(zr, cb, d, c, dc, bk, bd, rel))) {
        bk = c;
        bd = dc;
      }
    }
    for (int off = 8; off <= 16; off <<= 1) {
      int64_t ok = __shfl_xor_sync(0xffffffffu, bk, off);
      double od = __shfl_xor_sync(0xffffffffu, bd, off);
      if (ok >= 0 && (bk < 0 || exact::better(zr, cb, d, ok, od, bk, bd, rel))) {
        bk = ok;
        bd = od;
      }
    }
    if (lane == 0) {
      index[row] = bk;
      dist[row] = (float)bd;
    }
  }
}

#define GVQ_CUDA_CHECK(expr)                                                            \
  do {                                                                                  \
    cudaError_t err_ = (expr);                                                          \
    TORCH_CHECK(err_ == cudaSuccess, "nearest_code (CUDA): ", cudaGetErrorString(err_)); \
  } while (0)

}  // namespace

std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(const at::Tensor& z_in,
                                                     const at::Tensor& codebook_in) {
  auto [z, codebook] = prepare_nearest_code_inputs(z_in, codebook_in);
  TORCH_CHECK(z.is_cuda(), "nearest_code_cuda: tensors must be on a CUDA device");
  const at::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.size(0), d = z.size(1), k = codebook.size(0);
  TORCH_CHECK_VALUE(n < (int64_t)INT32_MAX && k < (int64_t)INT32_MAX && d < 65536,
                    "nearest_code (CUDA): N and K must be below 2^31 and D below 65536");
  auto index = at::empty({n}, z.options().dtype(at::kLong));
  auto dist = at::empty({n}, z.options().dtype(at::kFloat));
  if (n == 0) return {index, dist};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int64_t kp = (k + tBN - 1) / tBN * tBN;  // a multiple of both tiles
  auto ct = at::empty({d, kp}, z.options());
  auto cbig = at::empty({kp, d}, z.options());
  auto csmall = at::empty({kp, d}, z.options());
  auto cn = at::empty({kp}, z.options());
  auto scratch = at::zeros({n + 3}, z.options().dtype(at::kInt));  // [len, pad, cmax2 (8 B), list]
  int* list_len = scratch.data_ptr<int>();
  auto* cmax2_bits = reinterpret_cast<unsigned long long*>(list_len + 2);  // 8-byte aligned
  auto list_t = at::empty({n}, z.options().dtype(at::kInt));
  int* list = list_t.data_ptr<int>();

  prep_kernel<<<(unsigned)((kp + 255) / 256), 256, 0, stream>>>(
      codebook.data_ptr<float>(), k, kp, d, ct.data_ptr<float>(), cbig.data_ptr<float>(),
      csmall.data_ptr<float>(), cn.data_ptr<float>(), cmax2_bits);
  GVQ_CUDA_CHECK(cudaGetLastError());

  const size_t smem = (size_t)d * (kZStride + kBN) * sizeof(float);
  int dev = z.device().index(), smem_max = 0, major = 0;
  GVQ_CUDA_CHECK(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  GVQ_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  const unsigned blocks = (unsigned)((n + kBM - 1) / kBM);
  // Kernel choice. Measured on an H100 (benchmarks/README.md): the CUDA-core kernel is faster at
  // D = 64, the 3xTF32 tensor-core kernel at D = 256 (and it needs no D-sized shared tiles).
  // GALSIM_VQVAE_CUDA_FP32=1 forces the CUDA-core kernel, =0 the tensor-core kernel (sm_80+).
  const char* fp32_env = std::getenv("GALSIM_VQVAE_CUDA_FP32");
  bool use_tc = d > 128;
  if (fp32_env && fp32_env[0] == '1') use_tc = false;
  if (fp32_env && fp32_env[0] == '0') use_tc = true;
  use_tc = use_tc && major >= 8;
  if (use_tc) {
    const size_t tsmem = (size_t)4 * tBM * tStr * sizeof(float);
    GVQ_CUDA_CHECK(cudaFuncSetAttribute(search_tc_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)tsmem));
    search_tc_kernel<<<(unsigned)((n + tBM - 1) / tBM), 256, tsmem, stream>>>(
        z.data_ptr<float>(), cn.data_ptr<float>(), codebook.data_ptr<float>(),
        cbig.data_ptr<float>(), csmall.data_ptr<float>(), cmax2_bits, n, k,
        kp, (int)d, index.data_ptr<int64_t>(), dist.data_ptr<float>(), list, list_len);
    GVQ_CUDA_CHECK(cudaGetLastError());
  } else if (smem <= (size_t)smem_max) {
    GVQ_CUDA_CHECK(cudaFuncSetAttribute(search_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)smem));
    search_kernel<<<blocks, kThreads, smem, stream>>>(
        z.data_ptr<float>(), ct.data_ptr<float>(), cn.data_ptr<float>(),
        codebook.data_ptr<float>(), cmax2_bits, n, k, kp, (int)d, index.data_ptr<int64_t>(),
        dist.data_ptr<float>(), list, list_len);
    GVQ_CUDA_CHECK(cudaGetLastError());
  } else {  // D too large for the shared-memory tiles: every row takes the exact scan
    auto all = at::arange(n, z.options().dtype(at::kInt));
    list_t.copy_(all);
    scratch.narrow(0, 0, 1).fill_(n);
  }
  int sms = 0;
  GVQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  recheck_kernel<<<(unsigned)(sms * 8), 128, 0, stream>>>(
      z.data_ptr<float>(), codebook.data_ptr<float>(), k, (int)d, list, list_len,
      index.data_ptr<int64_t>(), dist.data_ptr<float>());
  GVQ_CUDA_CHECK(cudaGetLastError());
  const char* stats_env = std::getenv("GALSIM_VQVAE_CUDA_STATS");
  if (stats_env && stats_env[0] == '1') {  // diagnostics: how many rows took the exact re-check
    int len = 0;
    GVQ_CUDA_CHECK(cudaMemcpyAsync(&len, list_len, sizeof(int), cudaMemcpyDeviceToHost, stream));
    GVQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    fprintf(stderr, "galsim_vqvae nearest_code (CUDA, %s): N=%lld D=%lld K=%lld, %d rows re-checked\n",
            use_tc ? "3xTF32" : "fp32", (long long)n, (long long)d, (long long)k, len);
  }
  return {index, dist};
}

}  // namespace galsim_vqvae

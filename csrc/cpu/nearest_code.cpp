// CPU kernel of galsim_vqvae::nearest_code: exact nearest-codebook search.
//
// 1. Fast pass (float32, register-blocked 6 rows x 16 codes, codebook chunks reused from L1 by
//    up to 48 rows, vectorised, threaded over row blocks): the
//    score s_k = |c_k|^2 - 2 z.c_k of every code, whose error is at most E (see `score_bound`).
// 2. Candidates: every k with s_k <= min_k s_k + 2E. The true argmin is always among them; on
//    typical data there is exactly one and the row is done.
// 3. Re-check of the candidates with the exact order of exact.h (float64 distance with its
//    bound, and exact fixed-point arithmetic where that bound cannot separate two codes). Rows
//    whose norms could overflow float32 skip the fast pass and scan every code this way.
// The returned distance is the float64 distance of the chosen code rounded to float32.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cfloat>
#include <vector>

#include "../exact.h"
#include "../nearest_code.h"

#include "multiversion.h"

namespace galsim_vqvae {
namespace {

constexpr int kRows = 6;    // rows of z per micro-tile
constexpr int kCodes = 16;  // codes per panel
constexpr int kMaxTiles = 8;  // tiles of kRows rows sharing each L1-resident chunk of panels
typedef float v8 __attribute__((vector_size(32)));

// Scores of `tiles` tiles of kRows rows of z (zt: [tiles][kRows][d], zero-padded) against every
// code: out[(t * kRows + r) * kp + k] = cn[k] - 2 z.c_k, and each row's minimum score in
// row_min[t * kRows + r]. panels: [kp / 16][d][16], the codebook transposed panel by panel. The
// panels are visited in chunks of `chunk` that stay in L1 while every tile uses them.
GVQ_MULTIVERSION
void score_block(const float* zt, int64_t tiles, int64_t d, const float* panels, const float* cn,
                 int64_t kp, int64_t chunk, float* out, float* row_min) {
  v8 mins[kMaxTiles][kRows];
  for (int64_t t = 0; t < tiles; ++t)
    for (int r = 0; r < kRows; ++r) mins[t][r] = v8{} + INFINITY;
  const int64_t np = kp / kCodes;
  for (int64_t kb0 = 0; kb0 < np; kb0 += chunk) {
    const int64_t kb1 = std::min(np, kb0 + chunk);
    for (int64_t t = 0; t < tiles; ++t) {
      const float* z = zt + t * kRows * d;
      float* o = out + t * kRows * kp;
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const float* p = panels + kb * d * kCodes;
        v8 acc[kRows][2];
#pragma GCC unroll 6
        for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = v8{};
        for (int64_t j = 0; j < d; ++j) {
          v8 b0, b1;
          __builtin_memcpy(&b0, p + j * kCodes, sizeof(v8));
          __builtin_memcpy(&b1, p + j * kCodes + 8, sizeof(v8));
#pragma GCC unroll 6
          for (int r = 0; r < kRows; ++r) {
            float x = z[r * d + j];
            v8 a = {x, x, x, x, x, x, x, x};
            acc[r][0] += a * b0;
            acc[r][1] += a * b1;
          }
        }
        v8 c0, c1;
        __builtin_memcpy(&c0, cn + kb * kCodes, sizeof(v8));
        __builtin_memcpy(&c1, cn + kb * kCodes + 8, sizeof(v8));
#pragma GCC unroll 6
        for (int r = 0; r < kRows; ++r) {
          v8 s0 = c0 - 2.0f * acc[r][0];
          v8 s1 = c1 - 2.0f * acc[r][1];
          __builtin_memcpy(o + r * kp + kb * kCodes, &s0, sizeof(v8));
          __builtin_memcpy(o + r * kp + kb * kCodes + 8, &s1, sizeof(v8));
          v8 m = s0 < s1 ? s0 : s1;
          mins[t][r] = m < mins[t][r] ? m : mins[t][r];
        }
      }
    }
  }
  for (int64_t t = 0; t < tiles; ++t)
    for (int r = 0; r < kRows; ++r) {
      float m = INFINITY;
      for (int i = 0; i < 8; ++i) m = mins[t][r][i] < m ? mins[t][r][i] : m;
      row_min[t * kRows + r] = m;
    }
}

// Appends to cand the indices k < k_end with s[k] <= thr (s has kp entries, a multiple of 16).
GVQ_MULTIVERSION
void find_candidates(const float* s, int64_t kp, int64_t k_end, float thr,
                     std::vector<int64_t>& cand) {
  const v8 t = v8{} + thr;
  for (int64_t c = 0; c < kp; c += 8) {
    v8 x;
    __builtin_memcpy(&x, s + c, sizeof(v8));
    auto hit = x <= t;
    bool any = false;
    for (int i = 0; i < 8; ++i) any |= hit[i] != 0;
    if (!any) continue;
    for (int i = 0; i < 8; ++i)
      if (hit[i] && c + i < k_end) cand.push_back(c + i);
  }
}

// Bound on |s_k - (|c_k|^2 - 2 z.c_k)| for every code, given |z|^2 and max_k |c_k|^2, for the
// float32 fast pass: u |c|^2 (rounding of the norm) + 2 gamma_D sum_j |z_j c_kj| (dot product in
// any order, FMA or not) + u |s| (last subtraction) <= gamma_{D+2} (|z|^2 + 3 |c|^2); we take twice
// gamma_{D+4} (2 |z|^2 + 4 max |c|^2), plus an absolute term for float32 underflow.
inline double score_bound(double zn2, double cmax2, int64_t d) {
  return 2.0 * exact::gamma((int)d + 4, 1.0 / 16777216.0) * (2.0 * zn2 + 4.0 * cmax2) +
         (2.0 * d + 8.0) * 1.401298464324817e-45;
}

// Exact argmin over an explicit list of codes (all codes when `cand` is null), in index order.
inline int64_t exact_argmin(const float* zr, const float* cb, int64_t d, const int64_t* cand,
                            int64_t count, double* best_d) {
  const double rel = exact::distance64_bound(d);
  int64_t best = cand ? cand[0] : 0;
  double db = exact::distance64(zr, cb + best * d, d);
  for (int64_t i = 1; i < count; ++i) {
    int64_t k = cand ? cand[i] : i;
    double dk = exact::distance64(zr, cb + k * d, d);
    if (exact::better(zr, cb, d, k, dk, best, db, rel)) {
      best = k;
      db = dk;
    }
  }
  *best_d = db;
  return best;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& z_in,
                                                    const at::Tensor& codebook_in) {
  auto [z, codebook] = prepare_nearest_code_inputs(z_in, codebook_in);
  TORCH_CHECK(z.device().is_cpu(), "nearest_code_cpu: tensors must be on the CPU");
  const int64_t n = z.size(0), d = z.size(1), k = codebook.size(0);
  auto index = at::empty({n}, z.options().dtype(at::kLong));
  auto dist = at::empty({n}, z.options().dtype(at::kFloat));
  if (n == 0) return {index, dist};

  const float* zp = z.data_ptr<float>();
  const float* cb = codebook.data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  float* dp = dist.data_ptr<float>();

  // Codebook norms (float64, then float32) and panels; padding codes score +inf.
  const int64_t kp = (k + kCodes - 1) / kCodes * kCodes;
  std::vector<float> cn(kp, INFINITY);
  double cmax2 = 0.0;
  for (int64_t c = 0; c < k; ++c) {
    double s = 0.0;
    for (int64_t j = 0; j < d; ++j) s += (double)cb[c * d + j] * (double)cb[c * d + j];
    cn[c] = (float)s;
    cmax2 = std::max(cmax2, s);
    if (!(s <= cmax2)) cmax2 = s;  // keeps NaN
  }
  const double kSafe = (double)FLT_MAX / 8.0;  // no float32 overflow in the fast pass below this
  const bool codebook_fast = cmax2 <= kSafe;
  std::vector<float> panels;
  if (codebook_fast) {
    panels.assign(kp * d, 0.0f);
    for (int64_t c = 0; c < k; ++c)
      for (int64_t j = 0; j < d; ++j)
        panels[(c / kCodes) * d * kCodes + j * kCodes + (c % kCodes)] = cb[c * d + j];
  }

  const int64_t tiles = (n + kRows - 1) / kRows;
  // Tiles per block: up to kMaxTiles while their scores stay within ~256 KB; panels per chunk:
  // ~16 KB of codebook, reused from L1 by every tile of the block.
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(kMaxTiles, 65536 / (kRows * kp)));
  const int64_t chunk = std::max<int64_t>(1, 16384 / (int64_t)(d * kCodes * sizeof(float)));
  const int64_t blocks = (tiles + block - 1) / block;
  // At least ~1,024 rows per thread: below that, waking a second thread costs more than it saves
  // (and far more on a loaded machine).
  const int64_t grain = std::max<int64_t>(1, 1024 / (block * kRows));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> zt(block * kRows * d), row_min(block * kRows);
    std::vector<float> scores(codebook_fast ? block * kRows * kp : 0);
    std::vector<int64_t> cand;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block * kRows, rows = std::min<int64_t>(block * kRows, n - r0);
      const int64_t nt = (rows + kRows - 1) / kRows;
      if (codebook_fast) {
        std::fill(zt.begin(), zt.begin() + nt * kRows * d, 0.0f);
        std::copy(zp + r0 * d, zp + (r0 + rows) * d, zt.begin());
        score_block(zt.data(), nt, d, panels.data(), cn.data(), kp, chunk, scores.data(),
                    row_min.data());
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float* zr = zp + (r0 + r) * d;
        double zn2 = 0.0;
        for (int64_t j = 0; j < d; ++j) zn2 += (double)zr[j] * (double)zr[j];
        double best_d;
        int64_t best;
        if (codebook_fast && zn2 <= kSafe) {
          const double thr = (double)row_min[r] + 2.0 * score_bound(zn2, cmax2, d);
          // The largest float <= thr: s <= thr_f exactly when (double)s <= thr.
          float thr_f = (float)thr;
          if ((double)thr_f > thr) thr_f = std::nextafter(thr_f, -INFINITY);
          cand.clear();
          find_candidates(scores.data() + r * kp, kp, k, thr_f, cand);
          if (cand.size() == 1) {
            best = cand[0];
            best_d = exact::distance64(zr, cb + best * d, d);
          } else {
            best = exact_argmin(zr, cb, d, cand.data(), (int64_t)cand.size(), &best_d);
          }
        } else {
          best = exact_argmin(zr, cb, d, nullptr, k, &best_d);
        }
        ip[r0 + r] = best;
        dp[r0 + r] = (float)best_d;
      }
    }
  });
  return {index, dist};
}

}  // namespace galsim_vqvae

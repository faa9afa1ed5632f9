// The sampler's Gumbel noise, computed where it is used (CPU and CUDA kernels) from a
// counter-based generator: Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy
// as 1, 2, 3"; the generator of cuRAND and of torch on CUDA). Mirrored in Python by
// galsim_vqvae/nn/sampling.py::philox4x32_10 and gumbel_noise, which the tests check against the
// published known-answer vectors.
//
// The noise of code k at position (i, j) of the map with per-sample seed s (64 bits) is
//   x = word k % 4 of Philox4x32-10(counter = (k / 4, j, i, 0), key = (s & 0xffffffff, s >> 32))
//   u = (x + 0.5) * 2^-32                  (exact in float64; 0 < u < 1)
//   g = -log(-log(u))                      (float64)
// so a map's noise depends on its seed and the position alone: not on the batch, the map's
// shape, the device or the implementation. This is noise version 2
// (galsim_vqvae/nn/sampling.py::SAMPLER_NOISE_VERSION).
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace galsim_vqvae {

// Philox4x32-10: ten rounds on the counter c with the key (k0, k1) bumped between rounds.
GVQ_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = (uint64_t)0xD2511F53u * c[0], p1 = (uint64_t)0xCD9E8D57u * c[2];
    const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Every noise value lies in [kGumbelMin, kGumbelMax] (u ranges over [2^-33, 1 - 2^-33]:
// g from -log(33 log 2) = -3.1300 to -log(-log(1 - 2^-33)) = 22.874, with margin). So the score
// a_k + g_k of code k (a_k = logit / T) lies in [a_k + kGumbelMin, a_k + kGumbelMax]: a code with
// fl(a_k + kGumbelMax) < fl(a_m + kGumbelMin) for two other codes m scores below both of them
// (rounding is monotone), can be neither the draw nor the runner-up, and its noise need not be
// computed (`gumbel_cut`). The draws and the top-2 gaps are the same as with every code scored.
constexpr double kGumbelMin = -3.2, kGumbelMax = 23.0;

// The second largest of a_k + kGumbelMin over the K codes (the cut above; -inf for K = 1).
GVQ_HD double gumbel_cut(const double* a, int64_t count, int64_t stride = 1) {
  double lo1 = -INFINITY, lo2 = -INFINITY;
  for (int64_t k = 0; k < count; ++k) {
    const double lo = a[k * stride] + kGumbelMin;
    if (lo > lo1) {
      lo2 = lo1;
      lo1 = lo;
    } else if (lo > lo2) {
      lo2 = lo;
    }
  }
  return lo2;
}

// The Gumbel noise of codes 4q .. 4q+3 at (i, j) of the map with seed `seed`.
GVQ_HD void gumbel4(uint64_t seed, int64_t i, int64_t j, int64_t q, double g[4]) {
  uint32_t c[4] = {(uint32_t)q, (uint32_t)j, (uint32_t)i, 0u};
  philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
  for (int w = 0; w < 4; ++w) {
    const double u = ((double)c[w] + 0.5) * 2.3283064365386963e-10;  // 2^-32
    g[w] = -log(-log(u));
  }
}

}  // namespace galsim_vqvae

// Exact arithmetic shared by the CPU and CUDA kernels of galsim_vqvae::nearest_code.
//
// "Exact" means: for float32 inputs z [D] and codes c_k [D], the chosen index is the lowest k
// that minimises the real-valued squared distance d(k) = sum_j (z_j - c_kj)^2 of the float32
// values (no rounding anywhere). The kernels find candidates with a fast float32 pass and a proven
// error bound, order the candidates by a float64 evaluation with a proven error bound, and settle
// what the float64 bound cannot separate with `exact_compare`, which is exact for every finite
// float32 input (it sums into a fixed-point accumulator wide enough for any such input).
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#include "host_device.h"

namespace galsim_vqvae {
namespace exact {

// gamma_n = n u / (1 - n u): the classic bound on the relative error of n floating-point steps.
GVQ_HD double gamma(int n, double u) { return n * u / (1.0 - n * u); }

// Float64 squared distance in a fixed order that the CPU and a group of 8 GPU lanes both follow
// (so both return the same bits): 8 partial sums p_s = sum over j = s, s+8, ... in order, then
// ((p0+p4) + (p2+p6)) + ((p1+p5) + (p3+p7)); no FMA contraction. Its relative error is at most
// gamma(D + 3, 2^-53) for any finite float32 inputs: the difference of two float32 values rounds
// once, its square once, the sum of D non-negative terms at most D - 1 times, and nothing can
// overflow or underflow (every term is a multiple of 2^-298 and below 2^259).
GVQ_HD double dmul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

GVQ_HD double dadd(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// Partial sum p_s of distance64 (lane `s` of a group of 8).
GVQ_HD double distance64_part(const float* z, const float* c, int64_t d, int s) {
  double acc = 0.0;
  for (int64_t j = s; j < d; j += 8) {
    double t = (double)z[j] - (double)c[j];
    acc = dadd(acc, dmul(t, t));
  }
  return acc;
}

GVQ_HD double distance64(const float* z, const float* c, int64_t d) {
  double p[8];
  for (int s = 0; s < 8; ++s) p[s] = distance64_part(z, c, d, s);
  return dadd(dadd(dadd(p[0], p[4]), dadd(p[2], p[6])), dadd(dadd(p[1], p[5]), dadd(p[3], p[7])));
}

// Relative error bound of distance64, with a factor 2 of safety.
GVQ_HD double distance64_bound(int64_t d) { return 2.0 * gamma((int)d + 3, 1.0 / 9007199254740992.0); }

// A signed fixed-point accumulator with its least significant bit worth 2^-298 (every product
// of two float32 differences is a multiple of that) and 11 limbs of 64 bits (704 bits: room for
// sums of 2^100 terms below 2^260).
struct Accumulator {
  static constexpr int kLimbs = 11;
  static constexpr int kOffset = 298;
  uint64_t limb[kLimbs];

  GVQ_HD void clear() {
    for (int i = 0; i < kLimbs; ++i) limb[i] = 0;
  }

  // Adds (sign > 0) or subtracts a double that is a multiple of 2^-298.
  GVQ_HD void add(double x, int sign) {
    if (x == 0.0) return;
    uint64_t bits;
#if defined(__CUDA_ARCH__)
    bits = (uint64_t)__double_as_longlong(x);
#else
    std::memcpy(&bits, &x, sizeof(bits));
#endif
    if (bits >> 63) sign = -sign;
    int e = (int)((bits >> 52) & 0x7ff);
    uint64_t m = bits & ((uint64_t(1) << 52) - 1);
    if (e == 0) {
      e = 1;
    } else {
      m |= uint64_t(1) << 52;
    }
    int p = e - 1075 + kOffset;  // bit position of m's least significant bit
    if (p < 0) {                  // the low bits are zero for multiples of 2^-298
      m >>= -p;
      p = 0;
    }
    int i = p >> 6, s = p & 63;
    uint64_t lo = m << s;
    uint64_t hi = s ? (m >> (64 - s)) : 0;
    if (sign > 0) {
      uint64_t old = limb[i];
      limb[i] = old + lo;
      uint64_t carry = limb[i] < old;
      uint64_t add = hi + carry;  // hi < 2^53: no overflow
      for (int k = i + 1; k < kLimbs && add; ++k) {
        old = limb[k];
        limb[k] = old + add;
        add = limb[k] < old;
      }
    } else {
      uint64_t old = limb[i];
      limb[i] = old - lo;
      uint64_t borrow = old < lo;
      uint64_t sub = hi + borrow;
      for (int k = i + 1; k < kLimbs && sub; ++k) {
        old = limb[k];
        limb[k] = old - sub;
        sub = old < sub;
      }
    }
  }

  GVQ_HD int sign() const {
    if ((int64_t)limb[kLimbs - 1] < 0) return -1;
    for (int i = 0; i < kLimbs; ++i)
      if (limb[i]) return 1;
    return 0;
  }
};

// Error-free transformations (Knuth's TwoSum, and the FMA product).
GVQ_HD void two_sum(double a, double b, double& s, double& e) {
#if defined(__CUDA_ARCH__)
  s = __dadd_rn(a, b);
  double bb = __dsub_rn(s, a);
  e = __dadd_rn(__dsub_rn(a, __dsub_rn(s, bb)), __dsub_rn(b, bb));
#else
  s = a + b;
  double bb = s - a;
  e = (a - (s - bb)) + (b - bb);
#endif
}

GVQ_HD void two_prod(double a, double b, double& p, double& e) {
#if defined(__CUDA_ARCH__)
  p = __dmul_rn(a, b);
  e = __fma_rn(a, b, -p);
#else
  p = a * b;
  e = std::fma(a, b, -p);
#endif
}

// Adds sign * (x - y)^2 exactly to acc, for float32 x, y.
GVQ_HD void add_square_diff(Accumulator& acc, float x, float y, int sign) {
  double h, l, p, e;
  two_sum((double)x, -(double)y, h, l);  // h + l == x - y exactly
  two_prod(h, h, p, e);
  acc.add(p, sign);
  acc.add(e, sign);
  if (l != 0.0) {
    two_prod(2.0 * h, l, p, e);
    acc.add(p, sign);
    acc.add(e, sign);
    two_prod(l, l, p, e);
    acc.add(p, sign);
    acc.add(e, sign);
  }
}

// Exact sign of d(a) - d(b) for float32 rows z, a, b of length d (all finite).
GVQ_HD int exact_compare(const float* z, const float* a, const float* b, int64_t d) {
  Accumulator acc;
  acc.clear();
  for (int64_t j = 0; j < d; ++j) {
    add_square_diff(acc, z[j], a[j], +1);
    add_square_diff(acc, z[j], b[j], -1);
  }
  return acc.sign();
}

GVQ_HD bool same_bits(const float* a, const float* b, int64_t d) {
  for (int64_t j = 0; j < d; ++j) {
    float x = a[j], y = b[j];
    uint32_t bx, by;
#if defined(__CUDA_ARCH__)
    bx = __float_as_uint(x);
    by = __float_as_uint(y);
#else
    std::memcpy(&bx, &x, 4);
    std::memcpy(&by, &y, 4);
#endif
    if (bx != by) return false;
  }
  return true;
}

// The exact order of codes: is code `k` (float64 distance `dk`) better than code `b` (float64
// distance `db`), i.e. strictly nearer, or exactly as near with a lower index? `rel` is the relative
// error bound of the float64 distances (distance64_bound). Exact for finite inputs; non-finite
// distances (from non-finite inputs) rank after every finite one, ties by index.
GVQ_HD bool better(const float* z, const float* codebook, int64_t d, int64_t k, double dk,
                   int64_t b, double db, double rel) {
  bool fk = dk <= 1.0e300, fb = db <= 1.0e300;  // false for inf and NaN
  if (fk != fb) return fk;
  if (!fk) return k < b;
  double slack = rel * (dk + db);
  if (dk < db - slack) return true;
  if (dk > db + slack) return false;
  const float* ck = codebook + k * d;
  const float* cb = codebook + b * d;
  int s = same_bits(ck, cb, d) ? 0 : exact_compare(z, ck, cb, d);
  return s < 0 || (s == 0 && k < b);
}

}  // namespace exact
}  // namespace galsim_vqvae

// GVQ_MULTIVERSION: function multiversioning of the CPU kernels. The hot loops are compiled for
// AVX-512, AVX2+FMA and the baseline, and the loader picks the best the machine supports (no
// -march=native, so the wheel runs anywhere).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define GVQ_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GVQ_MULTIVERSION
#endif

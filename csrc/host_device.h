// GVQ_HD: a function both the C++ (CPU) and the CUDA kernels call, inlined in both.
#pragma once

#if defined(__CUDACC__)
#define GVQ_HD __host__ __device__ __forceinline__
#else
#define GVQ_HD inline
#endif

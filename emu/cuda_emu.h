// cuda_emu.h: just enough of CUDA C++ for the kernels in kernels/ to compile as ordinary C++ and run on
// the CPU, thread by thread, for tests on machines without a GPU (cargo feature "emu").
//
// Each CUDA thread of a block is a fiber (its own stack, switched by the runtime); blocks run one after
// another. __syncthreads is a barrier over the block's threads, warp shuffles exchange values through a
// per-warp buffer between two barriers over the warp's 32 lanes, and __shared__ variables are statics (one
// block runs at a time, so a static is that block's shared memory). Dynamic shared memory is filled with
// NaN before each block, so a read of memory no thread wrote shows up. What this cannot show: timing, memory
// ordering between blocks, and anything about performance. Not part of the product: the kernels are
// compiled by nvcc for the GPU, unchanged.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __grid_constant__

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct float2 {
    float x, y;
};
struct float4 {
    float x, y, z, w;
};
struct uint2 {
    unsigned x, y;
};
struct uint4 {
    unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace emu {
extern thread_local dim3 thread_idx;
extern thread_local dim3 block_idx;
extern dim3 block_dim;
extern dim3 grid_dim;
void syncthreads();
void syncwarp();
float shfl_xor(float v, int lane_mask);
double shfl_xor(double v, int lane_mask);
// The calling thread's lane in its warp, and a collective exchange over the warp: every lane gives
// `bytes` (at most WARP_SHARE_BYTES) and receives all 32 lanes' in lane order, `bytes` apart, in `all`.
constexpr unsigned WARP_SHARE_BYTES = 64;
unsigned lane_id();
void warp_allgather(const void* mine, unsigned bytes, void* all);
float* dynamic_shared();
// A thread that polls for something another thread or an asynchronous copy must do first lets the other
// threads run (spin), and whatever completes counts as progress for the deadlock check (progressed).
void spin();
void progressed();
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
inline float __shfl_xor_sync(unsigned, float v, int m) { return emu::shfl_xor(v, m); }
inline double __shfl_xor_sync(unsigned, double v, int m) { return emu::shfl_xor(v, m); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
// sin(pi x) and cos(pi x) with the argument reduced exactly (x - 2 round(x / 2) is exact in binary).
inline void sincospi(double x, double* s, double* c) {
    const double r = x - 2.0 * nearbyint(x / 2.0);
    *s = sin(M_PI * r);
    *c = cos(M_PI * r);
}
using std::isfinite;
template <class T>
inline T min(T a, T b) {
    return a < b ? a : b;
}
template <class T>
inline T max(T a, T b) {
    return a < b ? b : a;
}

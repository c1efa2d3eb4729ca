// common.cuh: what every kernel file shares.
//   - Philox4x32-10, the counter-based generator (Salmon et al., SC'11), and the uniform and normal
//     draws built on it, bit-for-bit the same as src/rng.rs so CPU and GPU runs of a seed draw the
//     same numbers.
//   - warp and block reductions (fp32 and fp64), sigmoid and the SiLU derivative.
//   - reading and writing an activation stored in fp32 or bf16 (to_f32, store_f32).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace ddpm {

// An element of an activation as fp32, whether it is stored in fp32 or in bf16 (exact: every bf16 value
// is an fp32 one).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// Writes v to an fp32 element as it is, to a bf16 one rounded to nearest, ties to even.
__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f32(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// ---------------------------------------------------------------------------------------------------
// Philox4x32-10. Key = the run's seed (64 bits); counter = (block, stream), 64 bits each. A draw is
// addressed by (seed, stream, element): element e lives in lane e % 4 of block e / 4, so what an
// element gets does not depend on the launch shape or on which thread computes it.
// ---------------------------------------------------------------------------------------------------
constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;

__device__ __forceinline__ uint4 philox_round(uint4 c, uint2 k) {
    const uint32_t lo0 = PHILOX_M0 * c.x, hi0 = __umulhi(PHILOX_M0, c.x);
    const uint32_t lo1 = PHILOX_M1 * c.z, hi1 = __umulhi(PHILOX_M1, c.z);
    return make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
}

__device__ __forceinline__ uint4 philox4x32_10(uint4 counter, uint2 key) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            key.x += PHILOX_W0;
            key.y += PHILOX_W1;
        }
        counter = philox_round(counter, key);
    }
    return counter;
}

// The four 32-bit words of block `block` in stream `stream` for run `seed`.
__device__ __forceinline__ uint4 philox_block(uint64_t seed, uint64_t stream, uint64_t block) {
    const uint4 counter = make_uint4(uint32_t(block), uint32_t(block >> 32), uint32_t(stream), uint32_t(stream >> 32));
    return philox4x32_10(counter, make_uint2(uint32_t(seed), uint32_t(seed >> 32)));
}

// 23 random bits to a float in (0, 1): (k + 0.5) * 2^-23. Exact in fp32, never 0 or 1.
__device__ __forceinline__ float uniform_from_bits(uint32_t bits) {
    return (float(bits >> 9) + 0.5f) * 1.1920928955078125e-7f;
}

// Box-Muller on two words, computed in fp64 and rounded once, so the CPU (Rust's f64 ln/sin/cos) and
// the GPU agree to the last bit except in the vanishingly rare case of a result within 1e-16 of a
// rounding boundary.
__device__ __forceinline__ float2 box_muller(uint32_t a, uint32_t b) {
    const double u1 = double(uniform_from_bits(a));
    const double u2 = double(uniform_from_bits(b));
    const double radius = sqrt(-2.0 * log(u1));
    double s, c;
    sincospi(2.0 * u2, &s, &c);
    return make_float2(float(radius * c), float(radius * s));
}

// Standard normal draw for element `element` of (seed, stream).
__device__ __forceinline__ float philox_normal(uint64_t seed, uint64_t stream, uint64_t element) {
    const uint4 r = philox_block(seed, stream, element >> 2);
    const uint32_t lane = uint32_t(element & 3);
    const float2 z = lane < 2 ? box_muller(r.x, r.y) : box_muller(r.z, r.w);
    return (lane & 1) ? z.y : z.x;
}

// The four normal draws of block `block` (elements 4 * block .. 4 * block + 3).
__device__ __forceinline__ float4 philox_normal4(uint64_t seed, uint64_t stream, uint64_t block) {
    const uint4 r = philox_block(seed, stream, block);
    const float2 z01 = box_muller(r.x, r.y);
    const float2 z23 = box_muller(r.z, r.w);
    return make_float4(z01.x, z01.y, z23.x, z23.y);
}

// Uniform (0, 1) draw for element `element` of (seed, stream).
__device__ __forceinline__ float philox_uniform(uint64_t seed, uint64_t stream, uint64_t element) {
    const uint4 r = philox_block(seed, stream, element >> 2);
    const uint32_t lane = uint32_t(element & 3);
    const uint32_t bits = lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
    return uniform_from_bits(bits);
}

// ---------------------------------------------------------------------------------------------------
// Reductions.
// ---------------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds one float per warp (<= 32).
// The block size must be a multiple of 32. Safe to call repeatedly with the same scratch.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // an earlier call's readers are done with scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// The same for doubles (the deterministic two-stage reductions of the loss and the gradient norm).
__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum_f64(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0;
    return warp_sum_f64(v);
}

// A column sum over a block of 256 threads (8 warps), the pattern of every bias-like gradient: lane l of
// each warp takes column `col` (the block's 32 consecutive columns, lanes on neighbours so loads coalesce),
// warp w the rows begin + w, begin + w + 8, ... below end, of a matrix with `ld` elements a row; then warp
// 0 adds the 8 warps' sums in warp order, so the result depends on the rows only, never on timing. It is
// returned in warp 0 (0 elsewhere). `part` is 8 x 32 floats of shared memory; every thread of the block
// calls this once (it has one barrier; a second call would need another first).
__device__ __forceinline__ float column_sum_8warps(const float* src, int64_t begin, int64_t end, int64_t ld, int col,
                                                   bool valid, float (*part)[32]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float s = 0.0f;
    if (valid)
        for (int64_t r = begin + warp; r < end; r += 8) s += src[r * ld + col];
    part[warp][lane] = s;
    __syncthreads();
    float total = 0.0f;
    if (warp == 0)
        for (int w = 0; w < 8; ++w) total += part[w][lane];
    return total;
}

// Attention's score scale 1 / sqrt(c), in fp64 rounded once (the CPU twin does the same): every attention
// kernel, fp32 or bf16, scales by exactly this float.
__device__ __forceinline__ float attention_scale(int c) { return float(1.0 / sqrt(double(c))); }

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// d silu(z) / dz = s (1 + z (1 - s)), s = sigmoid(z).
__device__ __forceinline__ float silu_grad(float z) {
    const float s = sigmoid(z);
    return s * (1.0f + z * (1.0f - s));
}

// Grid-stride loop helpers: 64-bit indices, since activations of a large batch pass 2^31 elements.
__device__ __forceinline__ int64_t global_thread() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_threads() { return int64_t(gridDim.x) * blockDim.x; }

}  // namespace ddpm

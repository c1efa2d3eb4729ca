// peak.cu: the arithmetic ceilings `ddpm-cuda bench` measures on the device it runs on, so every kernel's
// rate is reported against what this device reaches with the same instructions, at its clocks today.
//   peak_fma_f32   fp32 fused multiply-adds on the SIMT lanes (the ceiling of the _f32 GEMM core)
//   peak_mma_bf16  bf16 m16n16k16 WMMA with fp32 accumulators (the ceiling of the _bf16 core, gemm_tc.cuh,
//                  and of mma.sync's, gemm_mma.cuh). Not the device's: on sm_90 wgmma issues more per
//                  clock than mma.sync, so MFU (scripts/gpu-check.sh) is taken against a large bf16
//                  matmul on random data that benches/peer_pytorch.py measures in the same run.
// Both keep everything in registers (no memory traffic in the loop) and run enough independent chains per
// warp to hide the pipelines' latency. Each thread (each warp, for the mma) writes one result to `out`,
// so nothing is optimised away.
//   FLOPs: peak_fma_f32 2 * 8 * iters per thread; peak_mma_bf16 2 * 4 * 16^3 * iters per warp.
// Launch: block 256; grid a few times the SM count. out: 256 floats per block (fma), 2048 (mma).
#include <cuda_bf16.h>
#include <mma.h>

#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) peak_fma_f32(float* __restrict__ out, float seed, int iters) {
    float a[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) a[i] = seed * float(threadIdx.x + i);
    const float m = 1.0f - seed * 1e-3f, c = seed * 1e-2f;  // |m| < 1: the chains stay finite
    for (int it = 0; it < iters; ++it)
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] = fmaf(a[i], m, c);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s += a[i];
    out[ddpm::global_thread()] = s;
}

extern "C" __global__ void __launch_bounds__(256) peak_mma_bf16(float* __restrict__ out, float seed, int iters) {
    namespace wmma = nvcuda::wmma;
    __shared__ __align__(32) __nv_bfloat16 tile[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) tile[i] = __float2bfloat16_rn(seed * float(i % 17));
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
    wmma::load_matrix_sync(a, tile, 16);
    wmma::load_matrix_sync(b, tile, 16);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[j], 0.0f);
    for (int it = 0; it < iters; ++it)
#pragma unroll
        for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[j], a, b, acc[j]);
#pragma unroll
    for (int j = 1; j < 4; ++j)
        for (int i = 0; i < acc[0].num_elements; ++i) acc[0].x[i] += acc[j].x[i];
    // One 16 x 16 result per warp: 8 warps x 256 = the block's 256 floats x 8, so out holds 2048 per block.
    const int64_t warp = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    wmma::store_matrix_sync(out + warp * 256, acc[0], 16, wmma::mem_row_major);
}

// gemm_tc.cuh: the bf16 tensor-core GEMM core (version 2 of the convolution ladder, dev/conv/).
//
//   C[m, n] = sum_k bf16(A(m, k)) bf16(B(k, n)), products exact, sums in fp32
//
// Same loaders, epilogue and launch contract as the fp32 core of gemm.cuh. Version 3 (gemm_mma.cuh) has
// replaced it under the `_bf16` kernels; it stays in the build under the conv2d_*_wmma kernels, so the
// bench times each rung of the ladder on the same device in the same run. Storage stays fp32: each
// operand is rounded to bf16 (nearest even) as it is staged in shared memory, which is where this version
// gets its speed (the multiply-adds on the tensor cores) and where it loses accuracy (8 significant bits
// per operand; see the tolerance derivation in tests/gpu.rs).
//
// Tiling: a block of 256 threads = 8 warps computes a 128 x 128 tile of C, stepping through K 32 at a
// time. Each step stages a 128 x 32 slice of A and a 32 x 128 slice of B in shared memory as bf16 (16
// elements of each per thread, consecutive threads along the operand's contiguous index so global
// loads coalesce). The warps form a 2 x 4 grid; each owns a 64 x 32 patch of C as 4 x 2 accumulator
// fragments of 16 x 16 (WMMA, m16n16k16, fp32 accumulate) and per step issues 2 x 8 mma_sync. While the
// tensor cores work on slice s, the thread's loads of slice s + 1 are already in flight into registers
// (register prefetch), so global latency hides behind the math. Arithmetic intensity per staged slice:
// 128 * 128 * 32 multiply-adds per 2 * 128 * 32 elements loaded, 64 per element (twice version 1's).
//
// WMMA keeps the fragment layout opaque: the epilogue stores each accumulator fragment to a per-warp
// shared-memory patch and the warp's lanes apply the epilogue from there (8 elements each).
//
// What version 2 leaves on the table, and version 3 takes: scalar loader calls with their index
// arithmetic per element instead of 16-byte vector loads; one shared-memory stage and two barriers per
// slice; WMMA's opaque fragments, which send the epilogue through shared memory.
#pragma once

#include <cuda_bf16.h>
#include <mma.h>

#include "gemm.cuh"

namespace ddpm {

constexpr int TC_BM = 128;
constexpr int TC_BN = 128;
constexpr int TC_BK = 32;
constexpr int TC_THREADS = 256;
// Row strides in shared memory, in elements: multiples of 8 (16 bytes, as WMMA loads require) and padded
// by 8 so consecutive rows start in different banks.
constexpr int TC_LDA = TC_BK + 8;
constexpr int TC_LDB = TC_BN + 8;
constexpr int TC_LDS = 16 + 4;  // the fp32 epilogue patch
// Elements of each operand a thread stages per step.
constexpr int TC_PER_THREAD = TC_BM * TC_BK / TC_THREADS;
static_assert(TC_BN * TC_BK / TC_THREADS == TC_PER_THREAD, "A and B slices have the same size");

// Where element i of this thread's share of the A slice lies: (row, k) in the 128 x 32 slice. Along k
// when k is contiguous in memory (32 threads cover one row's 32 k), else along m.
template <bool KFast>
__device__ __forceinline__ void tc_a_index(int tid, int i, int& r, int& kk) {
    const int e = tid + i * TC_THREADS;
    r = KFast ? e / TC_BK : e % TC_BM;
    kk = KFast ? e % TC_BK : e / TC_BM;
}

// The same for the B slice: (k, column) in the 32 x 128 slice.
template <bool NFast>
__device__ __forceinline__ void tc_b_index(int tid, int i, int& kk, int& cc) {
    const int e = tid + i * TC_THREADS;
    cc = NFast ? e % TC_BN : e / TC_BK;
    kk = NFast ? e / TC_BN : e % TC_BK;
}

// One launch: grid (ceil(rows / 128), ceil(cols / 128), splits), block 256; slice z of a split launch
// covers k in [z * chunk, (z + 1) * chunk), chunk a multiple of 32, and writes raw partial sums to the
// workspace (gemm_reduce_f32 adds them).
template <class LoadA, class LoadB>
__device__ __forceinline__ void gemm_run_tc(const LoadA& a, const LoadB& b, int rows, int cols, int kdim, int chunk,
                                            const Epilogue& e) {
    namespace wmma = nvcuda::wmma;
    __shared__ __align__(32) __nv_bfloat16 As[TC_BM * TC_LDA];     // [m][k]
    __shared__ __align__(32) __nv_bfloat16 Bs[TC_BK * TC_LDB];     // [k][n]
    __shared__ __align__(32) float stage[TC_THREADS / 32][16 * TC_LDS];  // one fragment per warp

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = warp / 4, wn = warp % 4;  // the warp's 64 x 32 patch: rows 64 wm.., columns 32 wn..
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    const int k_begin = blockIdx.z * chunk, k_end = min(kdim, k_begin + chunk);

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    // This thread's share of the next slice, fetched a step ahead.
    float ra[TC_PER_THREAD], rb[TC_PER_THREAD];
    auto fetch = [&](int k0) {
#pragma unroll
        for (int i = 0; i < TC_PER_THREAD; ++i) {
            int r, kk, cc;
            tc_a_index<LoadA::k_fast>(tid, i, r, kk);
            ra[i] = k0 + kk < k_end ? a(m0 + r, k0 + kk) : 0.0f;
            tc_b_index<LoadB::n_fast>(tid, i, kk, cc);
            rb[i] = k0 + kk < k_end ? b(k0 + kk, n0 + cc) : 0.0f;
        }
    };

    if (k_begin < k_end) fetch(k_begin);
    for (int k0 = k_begin; k0 < k_end; k0 += TC_BK) {
#pragma unroll
        for (int i = 0; i < TC_PER_THREAD; ++i) {
            int r, kk, cc;
            tc_a_index<LoadA::k_fast>(tid, i, r, kk);
            As[r * TC_LDA + kk] = __float2bfloat16_rn(ra[i]);
            tc_b_index<LoadB::n_fast>(tid, i, kk, cc);
            Bs[kk * TC_LDB + cc] = __float2bfloat16_rn(rb[i]);
        }
        __syncthreads();
        if (k0 + TC_BK < k_end) fetch(k0 + TC_BK);
#pragma unroll
        for (int ks = 0; ks < TC_BK; ks += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[4];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb[2];
#pragma unroll
            for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], &As[(64 * wm + 16 * i) * TC_LDA + ks], TC_LDA);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bs[ks * TC_LDB + 32 * wn + 16 * j], TC_LDB);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();  // every warp is done reading the slice before it is overwritten
    }

    float* patch = stage[warp];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            wmma::store_matrix_sync(patch, acc[i][j], TC_LDS, wmma::mem_row_major);
            __syncwarp();
#pragma unroll
            for (int t = 0; t < 8; ++t) {
                const int idx = lane + 32 * t, r = idx / 16, cc = idx % 16;
                const int m = m0 + 64 * wm + 16 * i + r, n = n0 + 32 * wn + 16 * j + cc;
                if (m < rows && n < cols) e.store(rows, cols, m, n, patch[r * TC_LDS + cc]);
            }
            __syncwarp();  // the patch is read before the next fragment overwrites it
        }
}

}  // namespace ddpm

// gemm_wgmma.cuh: version 4 of the convolution ladder (dev/conv/): the bf16 GEMM core on Hopper's
// warpgroup MMA (sm_90a only).
//
//   C[m, n] = sum_k bf16(A(m, k)) bf16(B(k, n)), products exact, sums in fp32
//
// The loaders, the epilogue, the 128 x 128 x 32 tiles of 256 threads and the register path of version 3
// (gemm_mma.cuh: runs of 8 fetched a slice ahead, rounded to bf16 in registers, one 16-byte store each)
// stay; what changes is the multiply. Version 3's warps each issue 32 mma.sync per slice, every one fed
// by ldmatrix through the registers; here each of the two warpgroups (128 threads) issues 2 wgmma
// m64n128k16 per slice, which read A (its 64 rows) and B (all 128 columns) straight from shared memory
// through descriptors and run asynchronously: the next slice's stores overlap the multiply.
//
// Shared memory holds each slice in wgmma's no-swizzle layout: 8 x 8 "core matrices" of 128 contiguous
// bytes (wgmma.cuh). An operand whose contiguous index is k (the im2col gather, a weight read along k) is
// staged K-major, its core matrices along k 128 bytes apart (LBO) and its 8-row groups 512 bytes apart
// (SBO); one whose contiguous index is m or n is staged MN-major and read transposed (imm-trans 1), its
// 8-column groups 128 bytes apart (SBO) and its 8-k groups 2048 bytes apart (LBO). Either way a thread's
// run of 8 is one 16-byte row of one core matrix, and the threads are assigned runs so that 8 consecutive
// threads fill the 8 rows of one core matrix: stores without bank conflicts.
//
// Per slice: wgmma on this stage, commit; fetch the next slice into registers; wait until only this
// slice's wgmma is in flight (the previous one, which read the other stage, is done) and barrier; store
// into the other stage, fence the async proxy, barrier. 64 fp32 accumulators per thread (thread
// 32 w + 4 g + t of warpgroup h holds rows 64 h + 16 w + g and + 8, columns 8 j + 2 t and + 1).
// Shared memory: 2 stages x 2 operands x 8 KiB = 32 KiB, static.
//
// What it leaves on the table: the register path for the weights, which are bf16 in memory and could be
// copied by the tensor-memory accelerator (versions 5 and 6, gemm_run_wgmma_tma below); the register
// path for the activations (fp32 storage, converted by the threads), which TMA could copy once they are
// stored in bf16; and more stages.
#pragma once

#include "gemm_mma.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace ddpm {

// One stage of one operand's 128 x 32 slice (element (outer, k), outer being m for A and n for B) in
// wgmma's no-swizzle layout. MnMajor: the operand's contiguous index is outer.
template <bool MnMajor>
struct WgmmaSlice {
    static constexpr int size = MMA_BM * MMA_BK;
    // Byte steps between core matrices: along k (LBO) and along outer (SBO).
    static constexpr int lbo = MnMajor ? 2048 : 128;
    static constexpr int sbo = MnMajor ? 128 : 512;
    __device__ static int offset(int outer, int k) {
        const int in_core = MnMajor ? outer % 8 + 8 * (k % 8) : 8 * (outer % 8) + k % 8;
        return in_core + (lbo / 2) * (k / 8) + (sbo / 2) * (outer / 8);
    }
    // The thread's run i (i < 2) along the contiguous index, (outer, k) of its first element: consecutive
    // threads take consecutive rows of a core matrix (k for MN-major, outer for K-major).
    __device__ static void run(int tid, int i, int& outer, int& k) {
        const int v = tid + i * MMA_THREADS;
        if (MnMajor) {
            k = v % MMA_BK;
            outer = 8 * (v / MMA_BK);
        } else {
            outer = v % MMA_BM;
            k = 8 * (v / MMA_BM);
        }
    }
    // The descriptor of the 16 k from `ks` of `rows` outer from `outer`.
    __device__ static uint64_t desc(const __nv_bfloat16* stage, int outer, int ks) {
        return smem_desc(stage + offset(outer, ks), lbo, sbo);
    }
};

// The epilogue of a 128 x 128 tile held as wgmma accumulators: `value(i)` is this thread's element i,
// which goes to row 64 h + 16 w + g (+ 8) and column 8 j + 2 t (+ 1) of the tile (thread 32 w + 4 g + t
// of warpgroup h).
template <class Value>
__device__ __forceinline__ void wgmma_store_tile(const Epilogue& e, int rows, int cols, int m0, int n0, int tid,
                                                 Value value) {
    const int group = tid / 128, w = (tid / 32) % 4, g = (tid % 32) / 4, t = tid % 4;
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int x = 0; x < 4; ++x) {
            const int m = m0 + 64 * group + 16 * w + g + 8 * (x / 2), n = n0 + 8 * j + 2 * t + x % 2;
            if (m < rows && n < cols) e.store(rows, cols, m, n, value(4 * j + x));
        }
}

// One launch: grid (ceil(rows / 128), ceil(cols / 128), splits), block 256; slice z of a split launch
// covers k in [z * chunk, (z + 1) * chunk), chunk a multiple of 32, and writes raw partial sums to the
// workspace (gemm_reduce_f32 adds them).
template <class LoadA, class LoadB>
__device__ __forceinline__ void gemm_run_wgmma(const LoadA& a, const LoadB& b, int rows, int cols, int kdim,
                                               int chunk, const Epilogue& e) {
    constexpr bool mn_a = mma_k_rows<0, LoadA>(), mn_b = mma_k_rows<1, LoadB>();
    using SliceA = WgmmaSlice<mn_a>;
    using SliceB = WgmmaSlice<mn_b>;
    __shared__ __align__(128) __nv_bfloat16 As[2][SliceA::size];
    __shared__ __align__(128) __nv_bfloat16 Bs[2][SliceB::size];

    const int tid = threadIdx.x, group = tid / 128;  // the warpgroup's 64 rows: 64 group..
    const int m0 = blockIdx.x * MMA_BM, n0 = blockIdx.y * MMA_BN;
    const int k_begin = blockIdx.z * chunk, k_end = min(kdim, k_begin + chunk);

    auto store_tile = [&](auto value) { wgmma_store_tile(e, rows, cols, m0, n0, tid, value); };
    if (k_begin >= k_end) {  // no k at all (split_k never launches one): the sums are 0
        store_tile([](int) { return 0.0f; });
        return;
    }

    // Written first by a wgmma that does not accumulate: no other instruction may define them while
    // wgmma is in flight (ptxas serialises the wgmma if one does, C7515).
    float acc[64];

    MmaOperand<0, LoadA, SliceA> opa;
    MmaOperand<1, LoadB, SliceB> opb;
    opa.start(a, tid, m0, k_begin);
    opb.start(b, tid, n0, k_begin);
    opa.fetch(a, rows, k_end);
    opb.fetch(b, cols, k_end);
    opa.next(a);
    opb.next(b);
    opa.store(As[0], tid);
    opb.store(Bs[0], tid);
    fence_proxy_async();
    __syncthreads();
    int stage = 0;
    for (int k0 = k_begin; k0 < k_end; k0 += MMA_BK) {
        const bool more = k0 + MMA_BK < k_end;
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < MMA_BK; ks += 16)
            wgmma_m64n128k16<mn_a, mn_b>(acc, SliceA::desc(As[stage], 64 * group, ks),
                                         SliceB::desc(Bs[stage], 0, ks), k0 > k_begin || ks > 0);
        wgmma_commit();
        if (more) {  // in flight while the tensor cores work on this slice
            opa.fetch(a, rows, k_end);
            opb.fetch(b, cols, k_end);
            opa.next(a);
            opb.next(b);
        }
        wgmma_wait<1>();  // the previous slice's wgmma, which read the other stage, is done...
        __syncthreads();  // ...in both warpgroups
        if (more) {
            opa.store(As[stage ^ 1], tid);
            opb.store(Bs[stage ^ 1], tid);
            fence_proxy_async();
        }
        __syncthreads();
        stage ^= 1;
    }
    wgmma_wait<0>();
    fence_operands(acc);
    store_tile([&](int i) { return acc[i]; });
}

// Version 5: version 4 with the weight operand B copied by the tensor-memory accelerator, a tensor map
// of the weights' bf16 copy describing it. The weights come in two orientations, and the policy (TmaB)
// says how a slice of B (32 k x 128 n, 8 KiB) is copied and where wgmma finds it:
//   TmaWeightRows  B(k, n) = W[n, k] for W [cols, kdim] (the forward convolution's [o, taps, taps, c], a
//                  linear layer's [out, in]): K-major, four copies of 8 k x 128 rows n (2-D boxes of
//                  16 bytes x 128 rows) landing densely in wgmma's no-swizzle layout: core matrices
//                  (8 x 16 bytes) 128 bytes apart along n (SBO) and 2048 bytes apart along k (LBO),
//                  element (n, k) at byte 16 n + 2 (k % 8) + 2048 (k / 8) of the stage
//   TmaWeightTaps  B(k = tap o + oc, n = ci) = W[oc, tap, ci] for W [o, taps^2, c] (the input gradient):
//                  MN-major, read transposed; the map views W as [taps^2][c / 8][o][8] (extents innermost
//                  first: 8, o, c / 8, taps^2; byte strides 2 taps^2 c, 16, 2 c) and each of the four
//                  copies is the box 8 x 8 oc x 16 x 1 tap, element (n, k) at byte 2 (n % 8) + 16 (k % 8)
//                  + 128 (n / 8) + 2048 (k / 8); c and o multiples of 8, so 8 k never straddle two taps
// Version 6 is version 5 in the 64-byte swizzle, each slice of B one copy of 128 box rows of 64 bytes
// instead of four copies of 128 rows of 16 (a quarter of the copy engine's row requests, one copy to
// queue instead of four), which TMA writes with CU_TENSOR_MAP_SWIZZLE_64B: the 16-byte chunk j of the
// row at byte 64 r moved to chunk j ^ ((r / 2) % 4), the permutation wgmma's 64-byte swizzle mode
// undoes (smem_desc_sw64, wgmma.cuh):
//   TmaWeightRowsSw64  B(k, n) = W[n, k] as TmaWeightRows: the 2-D box of all 32 k (64 bytes) x 128 rows
//                  n; K-major, row n at byte 64 n, SBO 512 bytes between 8-row groups, the second 16 k
//                  starting 32 bytes into each row
//   TmaWeightTapsSw64  B(k = tap o + oc, n = ci) = W[oc, tap, ci] as TmaWeightTaps: the map views W as
//                  [taps^2][c / 32][o][32] (extents innermost first: 32, o, c / 32, taps^2; byte strides
//                  2 taps^2 c, 64, 2 c) and each slice is the box 32 ci x 32 oc x 4 x 1 tap: MN-major,
//                  rows of 32 n along k, element (n, k) at byte 2 (n % 32) + 64 (k % 32) + 2048 (n / 32)
//                  (LBO 2048 between 32-wide column groups, SBO 512 between 8-k groups); c and o
//                  multiples of 32, so a slice's 32 k are 32 output channels of one tap
// Where B leaves the weights (n past the columns, k past the reduction) the copies bring zeros.
//
// Three stages of B, each with a barrier that completes when its 8 KiB have landed. Thread 0 queues
// slice i + 2 as soon as the barrier after wait_group shows slice i - 1's wgmma done (which read the
// stage slice i + 2 goes to), so each copy has a whole slice of math to land in. The activation operand
// keeps version 4's register path (the normalisation is applied as it is loaded): two stages, stored
// after the same barrier. Shared memory: 2 x 8 KiB (A) + 3 x 8 KiB (B, each stage 1024-byte aligned, as
// the swizzle's pattern must start with it) + 3 barriers, static.
constexpr int TMA_SLICE_B = MMA_BN * MMA_BK;  // elements of one stage of B

// The no-swizzle stage of version 5's two policies: four copies of 8 k x 128 n, one after the other.
struct TmaCoresB {
    static constexpr int copy_k = 8;                        // k per copy
    static constexpr int copy_size = copy_k * MMA_BN;       // elements per copy
    static constexpr int lbo = copy_size * 2, sbo = 128;    // bytes, in either orientation
    __device__ static uint64_t desc(const __nv_bfloat16* stage, int ks) {
        return smem_desc(stage + (ks / copy_k) * copy_size, lbo, sbo);
    }
};
static_assert((MMA_BK / TmaCoresB::copy_k) * TmaCoresB::copy_size == TMA_SLICE_B, "a slice is its four copies");

// B(k, n) = W[n, k]: the slice of k from `k0`, rows n from `n0`.
struct TmaWeightRows {
    using Stage = TmaCoresB;
    static constexpr int trans = 0;
    __device__ void queue(__nv_bfloat16* stage, const TensorMap& map, uint64_t* bar, int k0, int n0) const {
#pragma unroll
        for (int c = 0; c < MMA_BK / Stage::copy_k; ++c)
            tma_load_2d(stage + c * Stage::copy_size, &map, bar, k0 + c * Stage::copy_k, n0);
    }
};

// B(k = tap o + oc, n = ci) = W[oc, tap, ci]: the slice of k from `k0` (a multiple of 8), ci from `n0`.
struct TmaWeightTaps {
    using Stage = TmaCoresB;
    int o;
    static constexpr int trans = 1;
    __device__ void queue(__nv_bfloat16* stage, const TensorMap& map, uint64_t* bar, int k0, int n0) const {
#pragma unroll
        for (int c = 0; c < MMA_BK / Stage::copy_k; ++c) {
            const int k = k0 + c * Stage::copy_k;
            tma_load_4d(stage + c * Stage::copy_size, &map, bar, 0, k % o, n0 / 8, k / o);
        }
    }
};

// The K-major stage in the 64-byte swizzle: rows n of 64 bytes (32 k).
struct TmaSwizzledRowsB {
    static constexpr int sbo = 8 * 64;  // bytes from one 8-row group to the next
    __device__ static uint64_t desc(const __nv_bfloat16* stage, int ks) {
        return smem_desc_sw64(stage + ks, 16, sbo);
    }
};

// The MN-major stage in the 64-byte swizzle: rows k of 64 bytes (32 n), four groups of 32 n.
struct TmaSwizzledColsB {
    static constexpr int lbo = MMA_BK * 64, sbo = 8 * 64;  // bytes between 32-n groups, 8-k groups
    __device__ static uint64_t desc(const __nv_bfloat16* stage, int ks) {
        return smem_desc_sw64(stage + ks * 32, lbo, sbo);
    }
};

// B(k, n) = W[n, k] in the 64-byte swizzle: the slice of k from `k0`, rows n from `n0`, in one copy.
struct TmaWeightRowsSw64 {
    using Stage = TmaSwizzledRowsB;
    static constexpr int trans = 0;
    __device__ void queue(__nv_bfloat16* stage, const TensorMap& map, uint64_t* bar, int k0, int n0) const {
        tma_load_2d(stage, &map, bar, k0, n0);
    }
};

// B(k = tap o + oc, n = ci) = W[oc, tap, ci] in the 64-byte swizzle: the slice of k from `k0` (a multiple
// of 32), ci from `n0`, in one copy.
struct TmaWeightTapsSw64 {
    using Stage = TmaSwizzledColsB;
    int o;
    static constexpr int trans = 1;
    __device__ void queue(__nv_bfloat16* stage, const TensorMap& map, uint64_t* bar, int k0, int n0) const {
        tma_load_4d(stage, &map, bar, 0, k0 % o, n0 / 32, k0 / o);
    }
};
static_assert(MMA_BK * 2 == 64, "a slice's k are one row of the 64-byte swizzle");

template <class LoadA, class TmaB>
__device__ __forceinline__ void gemm_run_wgmma_tma(const LoadA& a, const TmaB& b, const TensorMap& wmap, int rows,
                                                   int cols, int kdim, int chunk, const Epilogue& e) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
    __trap();  // only sm_90a has TMA and wgmma together; the launchers never run this elsewhere
#else
    constexpr bool mn_a = mma_k_rows<0, LoadA>();
    using SliceA = WgmmaSlice<mn_a>;
    constexpr int STAGES_B = 3;
    __shared__ __align__(128) __nv_bfloat16 As[2][SliceA::size];
    __shared__ __align__(1024) __nv_bfloat16 Bs[STAGES_B][TMA_SLICE_B];
    __shared__ __align__(8) uint64_t landed[STAGES_B];

    const int tid = threadIdx.x, group = tid / 128;
    const int m0 = blockIdx.x * MMA_BM, n0 = blockIdx.y * MMA_BN;
    const int k_begin = blockIdx.z * chunk, k_end = min(kdim, k_begin + chunk);

    auto store_tile = [&](auto value) { wgmma_store_tile(e, rows, cols, m0, n0, tid, value); };
    if (k_begin >= k_end) {
        store_tile([](int) { return 0.0f; });
        return;
    }
    const int slices = (k_end - k_begin + MMA_BK - 1) / MMA_BK;

    // Thread 0 only: slice i of B into its stage, announced to the stage's barrier.
    auto queue_b = [&](int i) {
        const int s = i % STAGES_B;
        mbar_arrive_expect_tx(&landed[s], TMA_SLICE_B * 2);
        b.queue(Bs[s], wmap, &landed[s], k_begin + i * MMA_BK, n0);
    };
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < STAGES_B; ++s) mbar_init(&landed[s], 1);
        fence_mbar_init();
    }
    __syncthreads();
    if (tid == 0) {
        queue_b(0);
        if (slices > 1) queue_b(1);
    }

    float acc[64];
    MmaOperand<0, LoadA, SliceA> opa;
    opa.start(a, tid, m0, k_begin);
    opa.fetch(a, rows, k_end);
    opa.next(a);
    opa.store(As[0], tid);
    fence_proxy_async();
    __syncthreads();
    int stage = 0;
    for (int i = 0; i < slices; ++i) {
        const bool more = i + 1 < slices;
        mbar_wait(&landed[i % STAGES_B], (i / STAGES_B) & 1);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < MMA_BK; ks += 16)
            wgmma_m64n128k16<mn_a, TmaB::trans>(acc, SliceA::desc(As[stage], 64 * group, ks),
                                                TmaB::Stage::desc(Bs[i % STAGES_B], ks),
                                                i > 0 || ks > 0);
        wgmma_commit();
        if (more) {
            opa.fetch(a, rows, k_end);
            opa.next(a);
        }
        wgmma_wait<1>();  // slice i - 1's wgmma, which read A's other stage and B's stage (i + 2) % 3...
        __syncthreads();  // ...is done in both warpgroups
        if (tid == 0 && i + 2 < slices) queue_b(i + 2);
        if (more) {
            opa.store(As[stage ^ 1], tid);
            fence_proxy_async();
        }
        __syncthreads();
        stage ^= 1;
    }
    wgmma_wait<0>();
    fence_operands(acc);
    store_tile([&](int i) { return acc[i]; });
#endif
}

}  // namespace ddpm

// gemm_mma.cuh: version 3 of the convolution ladder (dev/conv/): the bf16 tensor-core GEMM core behind
// every `_bf16` convolution and linear layer.
//
//   C[m, n] = sum_k bf16(A(m, k)) bf16(B(k, n)), products exact, sums in fp32
//
// The same loaders, epilogue, tiles and launch contract as version 2 (gemm_tc.cuh: 128 x 128 x 32 tiles,
// 256 threads, split-K through the workspace), so the launchers do not change. What it does differently:
//
// - Vector loads. Each thread fetches its share of a slice as runs of 8 consecutive elements along the
//   operand's contiguous index (the loaders' load8, gemm.cuh): two 16-byte loads and one im2col index
//   computation per 8 elements, where version 2 called the loader, with its divisions, for each element.
//   The 8 are rounded to bf16 in registers and stored with one 16-byte store.
// - Shared-memory layouts that follow the operand. A slice keeps its contiguous index contiguous in
//   shared memory: A as [m][k] when k is contiguous (the im2col gather) and [k][m] when m is (the output
//   gradient in the weight gradient); B as [n][k] or [k][n] the same way. mma.sync wants A by rows and B by
//   columns, both k-contiguous; ldmatrix delivers the [m][k] and [n][k] slices as they are and the others
//   transposed (.trans), so no layout needs a transposing store. Rows are padded by 8 elements (16 bytes):
//   the 8 row addresses of one ldmatrix phase then fall in 8 different 16-byte bank groups (rows of 80 or
//   272 bytes), so the fragment loads have no bank conflicts.
// - Explicit fragments: ldmatrix.x4 and mma.sync m16n8k16 (mma_sync.cuh). A warp's 64 x 32 patch of C is
//   4 x 4 tiles of 16 x 8, 64 fp32 accumulators per lane in registers; the epilogue reads them where they
//   are (lane 4 g + t holds rows g and g + 8, columns 2t and 2t + 1 of each tile), with no pass through
//   shared memory.
// - Two shared-memory stages. While the tensor cores work on slice s, the thread's loads of slice s + 1
//   are in flight into registers, and they are stored into the other stage after the math: one barrier
//   per slice instead of two. An operand read from bf16 storage (a weight's bf16 copy) skips the
//   registers: its runs are copied into the other stage by cp.async (cp_async.cuh), queued before the
//   math and waited for before the barrier.
//
// Per slice and warp: 2 x 4 ldmatrix.x4 for A, 2 x 2 for B, 2 x 16 mma.sync (32 x 2048 multiply-adds).
// Shared memory: 2 stages x (A + B) <= 2 x 2 x 10 KiB = 40 KiB, static.
//
// A weight operand comes from the weights' bf16 copy (loaders over bf16, `packed`): its runs go to shared
// memory unconverted, by cp.async.
//
// What it leaves on the table (the next rungs): activations are stored in fp32, so every activation
// operand element crosses the memory bus in 4 bytes and is converted by the threads; with bf16
// activations the slices could go straight to shared memory with cp.async in 3-4 stages. And on sm_90,
// wgmma fed by TMA.
#pragma once

#include "cp_async.cuh"
#include "gemm_tc.cuh"
#include "mma_sync.cuh"

namespace ddpm {

constexpr int MMA_BM = 128;
constexpr int MMA_BN = 128;
constexpr int MMA_BK = 32;
constexpr int MMA_THREADS = 256;
static_assert(MMA_BM == MMA_BN, "one slice shape serves both operands");

// One stage of one operand's 128 x 32 slice in shared memory, as bf16: element (outer, k), outer being m
// for A and n for B. KRows: rows are k (32 of them, the 128 m or n contiguous), else rows are m or n (128
// of them, the 32 k contiguous). Padded by 8.
template <bool KRows>
struct MmaSlice {
    static constexpr int rows = KRows ? MMA_BK : MMA_BM;
    static constexpr int ld = (KRows ? MMA_BM : MMA_BK) + 8;
    static constexpr int size = rows * ld;
    __device__ static int offset(int outer, int k) { return KRows ? k * ld + outer : outer * ld + k; }
    // The thread's run i of 8 elements (i < 2) along the contiguous index: (outer, k) of its first. Each
    // 8 consecutive threads store 8 distinct 16-byte bank groups: with k on the rows, 8 neighbouring runs
    // of one row (272-byte rows); else one run in each of 8 consecutive rows (80-byte rows: 16-byte
    // groups 5 r mod 8, all different), where 4 runs of one row would put two stores in one group.
    __device__ static void run(int tid, int i, int& outer, int& k) {
        const int v = tid + i * MMA_THREADS;
        if (KRows) {
            k = v / (MMA_BM / 8);
            outer = 8 * (v % (MMA_BM / 8));
        } else {
            outer = v % MMA_BM;
            k = 8 * (v / MMA_BM);
        }
    }
};
static_assert(MMA_BM * MMA_BK / 8 == 2 * MMA_THREADS, "each thread stages two runs of each operand");

// Whether operand A (Use = 0) or B (Use = 1) is staged with k on the rows: A as [k][m] when m is its
// contiguous index, B as [k][n] when n is.
template <int Use, class Load>
__host__ __device__ constexpr bool mma_k_rows() {
    if constexpr (Use == 0)
        return !Load::k_fast;
    else
        return Load::n_fast;
}

// Operand A (Use = 0) or B (Use = 1) of a tensor-core core staged through registers: the thread's two
// runs of the next slice, and where they go in a stage laid out by Slice (MmaSlice here; the wgmma core
// has its own).
// A loader over bf16 storage (`packed`, gemm.cuh: the weights' bf16 copy) fills `raw` with its runs as
// they are stored, which go to shared memory unconverted; the others fill `v` with floats.
template <int Use, class Load, class Slice = MmaSlice<mma_k_rows<Use, Load>()>>
struct MmaOperand {
    static constexpr bool k_rows = mma_k_rows<Use, Load>();
    static constexpr bool packed = packed_runs<Load>(0);
    float v[2][8];
    uint4 raw[2];
    // The thread's two runs: their place in a stage (dm, dk), their indices in the operand (outer is m
    // for A, n for B; k moves by a slice each slice) and the loader's cursor there (gemm.cuh), made
    // once, so the main loop decodes no index.
    typename Load::Cursor cur[2];
    int outer[2], k[2];

    // The runs of the slice at (outer0, k0), the block's first.
    __device__ __forceinline__ void start(const Load& load, int tid, int outer0, int k0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            int dm, dk;
            Slice::run(tid, i, dm, dk);
            outer[i] = outer0 + dm, k[i] = k0 + dk;
            if constexpr (Use == 0)
                cur[i] = load.cursor(outer[i], k[i], MMA_BK);
            else
                cur[i] = load.cursor(k[i], outer[i], MMA_BK);
        }
    }
    // The runs of the next slice.
    __device__ __forceinline__ void next(const Load& load) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            load.advance(cur[i], MMA_BK);
            k[i] += MMA_BK;
        }
    }
    // How many of run i's 8 elements are inside the operand (outer below `outer_end`, k below
    // `k_end`; 0: none, the run is all zeros).
    __device__ __forceinline__ int valid(int i, int outer_end, int k_end) const {
        const bool inside = k_rows ? k[i] < k_end : outer[i] < outer_end;
        return inside ? max(0, k_rows ? min(8, outer_end - outer[i]) : min(8, k_end - k[i])) : 0;
    }

    // Fetches the thread's runs of the current slice into registers (`raw` for a packed operand, else
    // `v`). Elements outside the operand are 0.
    __device__ __forceinline__ void fetch(const Load& load, int outer_end, int k_end) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int n = valid(i, outer_end, k_end);
            const auto get = [&](auto& dst) {
                if (n == 0)
                    zero8(dst);
                else
                    load.load8(cur[i], n, dst);
            };
            if constexpr (packed)
                get(raw[i]);
            else
                get(v[i]);
        }
    }

    // A packed operand's runs of the current slice straight into `stage` (free: its last reads were
    // before the caller's last barrier): cp.async for each run of 8 valid elements aligned to 16 bytes,
    // the others through the registers now. cp_async_wait_all and a barrier make them visible.
    __device__ __forceinline__ void fetch_async(const Load& load, __nv_bfloat16* stage, int tid, int outer_end,
                                                int k_end) {
        static_assert(packed, "only bf16 storage is copied as it is");
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            int dm, dk;
            Slice::run(tid, i, dm, dk);
            uint4* dst = reinterpret_cast<uint4*>(stage + Slice::offset(dm, dk));
            const int n = valid(i, outer_end, k_end);
            if (n == 0) {
                *dst = make_uint4(0, 0, 0, 0);
                continue;
            }
            const auto* src = load.at(cur[i]);
            if (n == 8 && (reinterpret_cast<uintptr_t>(src) & 15) == 0) {
                cp_async16(dst, src);
            } else {
                uint4 run;
                load_run8(src, n, run);
                *dst = run;
            }
        }
    }

    // Stores the fetched runs into a stage, rounded to bf16 unless they are bf16 already: one 16-byte
    // store per run.
    __device__ __forceinline__ void store(__nv_bfloat16* stage, int tid) const {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            int dm, dk;
            Slice::run(tid, i, dm, dk);
            uint4 run;
            if constexpr (packed)
                run = raw[i];
            else
                run = make_uint4(pack_bf16x2(v[i][0], v[i][1]), pack_bf16x2(v[i][2], v[i][3]),
                                 pack_bf16x2(v[i][4], v[i][5]), pack_bf16x2(v[i][6], v[i][7]));
            *reinterpret_cast<uint4*>(stage + Slice::offset(dm, dk)) = run;
        }
    }
};

// The A fragments of a warp's m16 tile at row `m` and k step `ks` of a stage: lane l addresses row l % 8
// of matrix q = l / 8, the matrices being (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
// (rows 8-15, k 8-15), which is the order of mma's a[0..3].
template <bool KRows>
__device__ __forceinline__ void mma_load_a(uint32_t (&a)[4], const __nv_bfloat16* stage, int m, int ks, int lane) {
    constexpr int ld = MmaSlice<KRows>::ld;
    const int q = lane / 8, r = lane % 8;
    if constexpr (KRows)  // [k][m]: matrix q's rows are k = ks + 8 (q / 2) + r, from column m + 8 (q % 2)
        ldmatrix_x4_trans(a, stage + (ks + 8 * (q / 2) + r) * ld + m + 8 * (q % 2));
    else  // [m][k]: row m + 8 (q % 2) + r, from column ks + 8 (q / 2)
        ldmatrix_x4(a, stage + (m + 8 * (q % 2) + r) * ld + ks + 8 * (q / 2));
}

// The B fragments of two n8 tiles at column `n` and k step `ks`: b[0..1] of the tile at n, then b[0..1] of
// the tile at n + 8; lane l addresses row l % 8 of matrix q = l / 8, the matrices being (n 0-7, k 0-7),
// (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
template <bool KRows>
__device__ __forceinline__ void mma_load_b(uint32_t (&b)[4], const __nv_bfloat16* stage, int n, int ks, int lane) {
    constexpr int ld = MmaSlice<KRows>::ld;
    const int q = lane / 8, r = lane % 8;
    if constexpr (KRows)  // [k][n]: rows k = ks + 8 (q % 2) + r, from column n + 8 (q / 2)
        ldmatrix_x4_trans(b, stage + (ks + 8 * (q % 2) + r) * ld + n + 8 * (q / 2));
    else  // [n][k]: row n + 8 (q / 2) + r, from column ks + 8 (q % 2)
        ldmatrix_x4(b, stage + (n + 8 * (q / 2) + r) * ld + ks + 8 * (q % 2));
}

// Writes results v0 and v1 of C[m, n] and C[m, n + 1] (m and n in range, n even: the two columns an
// accumulator register pair holds): where the epilogue writes bf16 (an activation stored in bf16, Epilogue::c_bf16)
// and the pair is 4-byte aligned, one 4-byte store of both rounded; otherwise Epilogue::store for each.
__device__ __forceinline__ void store_pair(const Epilogue& e, int rows, int cols, int m, int n, float v0,
                                           float v1) {
    if (e.c_bf16 && gridDim.z == 1 && n + 1 < cols) {
        __nv_bfloat16* dst = e.c_bf16 + int64_t(m) * e.ldc + n;
        if ((reinterpret_cast<uintptr_t>(dst) & 3) == 0) {
            *reinterpret_cast<uint32_t*>(dst) = pack_bf16x2(e.finish(cols, m, n, v0), e.finish(cols, m, n + 1, v1));
            return;
        }
    }
    e.store(rows, cols, m, n, v0);
    if (n + 1 < cols) e.store(rows, cols, m, n + 1, v1);
}

// One launch: grid (ceil(rows / 128), ceil(cols / 128), splits), block 256; slice z of a split launch
// covers k in [z * chunk, (z + 1) * chunk), chunk a multiple of 32, and writes raw partial sums to the
// workspace (gemm_reduce_f32 adds them).
template <class LoadA, class LoadB>
__device__ __forceinline__ void gemm_run_mma(const LoadA& a, const LoadB& b, int rows, int cols, int kdim, int chunk,
                                             const Epilogue& e) {
    using OpA = MmaOperand<0, LoadA>;
    using OpB = MmaOperand<1, LoadB>;
    __shared__ __align__(16) __nv_bfloat16 As[2][MmaSlice<OpA::k_rows>::size];
    __shared__ __align__(16) __nv_bfloat16 Bs[2][MmaSlice<OpB::k_rows>::size];

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = 64 * (warp / 4), wn = 32 * (warp % 4);  // the warp's 64 x 32 patch of the tile
    const int m0 = blockIdx.x * MMA_BM, n0 = blockIdx.y * MMA_BN;
    const int k_begin = blockIdx.z * chunk, k_end = min(kdim, k_begin + chunk);

    float acc[4][4][4];  // [m16 tile][n8 tile][element]
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int t = 0; t < 4; ++t) acc[i][j][t] = 0.0f;

    // An operand in bf16 storage (a weight's bf16 copy) is copied to shared memory by cp.async, in
    // flight during the math (its partial or unaligned runs, at the edges, are stored before it); the
    // other goes through the registers (fetched before the math, converted and stored after it).
    OpA opa;
    OpB opb;
    opa.start(a, tid, m0, k_begin);
    opb.start(b, tid, n0, k_begin);
    // The next slice's runs (each fetch moves the cursors on by a slice).
    const auto fetch = [&](int stage) {
        if constexpr (OpA::packed)
            opa.fetch_async(a, As[stage], tid, rows, k_end);
        else
            opa.fetch(a, rows, k_end);
        if constexpr (OpB::packed)
            opb.fetch_async(b, Bs[stage], tid, cols, k_end);
        else
            opb.fetch(b, cols, k_end);
        opa.next(a);
        opb.next(b);
    };
    const auto store = [&](int stage) {
        if constexpr (!OpA::packed) opa.store(As[stage], tid);
        if constexpr (!OpB::packed) opb.store(Bs[stage], tid);
        if constexpr (OpA::packed || OpB::packed) cp_async_wait_all();
    };
    if (k_begin < k_end) {
        fetch(0);
        store(0);
    }
    __syncthreads();
    int stage = 0;
    for (int k0 = k_begin; k0 < k_end; k0 += MMA_BK) {
        const bool more = k0 + MMA_BK < k_end;
        if (more) fetch(stage ^ 1);  // in flight while the tensor cores work on this slice
#pragma unroll
        for (int ks = 0; ks < MMA_BK; ks += 16) {
            uint32_t fa[4][4], fb[2][4];
#pragma unroll
            for (int i = 0; i < 4; ++i) mma_load_a<OpA::k_rows>(fa[i], As[stage], wm + 16 * i, ks, lane);
#pragma unroll
            for (int j = 0; j < 2; ++j) mma_load_b<OpB::k_rows>(fb[j], Bs[stage], wn + 16 * j, ks, lane);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const uint32_t bj[2] = {fb[j / 2][2 * (j % 2)], fb[j / 2][2 * (j % 2) + 1]};
                    mma_bf16_16816(acc[i][j], fa[i], bj);
                }
        }
        if (more) store(stage ^ 1);  // the other stage was last read before the previous barrier
        __syncthreads();
        stage ^= 1;
    }

    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int x = 0; x < 4; x += 2) {
                const int m = m0 + wm + 16 * i + g + 8 * (x / 2), n = n0 + wn + 8 * j + 2 * t;
                if (m < rows && n < cols) store_pair(e, rows, cols, m, n, acc[i][j][x], acc[i][j][x + 1]);
            }
}

}  // namespace ddpm

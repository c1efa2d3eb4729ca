// gemm_hopper.cuh: version 8 of the convolution ladder (dev/conv/): the bf16 GEMMs of the convolutions and
// the attention projection on Hopper's asynchronous machinery, fed by the tensor-memory accelerator alone
// (sm_90a only).
//
//   C[m, n] = sum_k bf16(A(m, k)) bf16(B(k, n)), products exact, sums in fp32
//
// Versions 3-6 keep a register path for the activation operand (runs of 8 gathered by every thread,
// converted, stored), so their main loops spend most of their issue slots on loads and address arithmetic
// (the static model: scripts/sass-model). Here no thread of the main loop touches global memory:
//
// - Both operands by TMA. Every operand of these GEMMs is a box of a tensor in global memory: the weights
//   (their bf16 copy) in either orientation; a linear layer's rows; and the convolution's im2col gather,
//   which for a stride-1 convolution is, per tap, the input shifted by the tap: a 4-D box (channels,
//   columns, rows, images) of a rectangle of output pixels moved by (ky - pad, kx - pad), whose part
//   outside the image the copy engine fills with zeros (the padding, for free). So a tile of M is a
//   rectangle of pixels (PixelTiles: wt x ht x nt = 128), and a slice of K one tap's 64 channels.
// - A pipeline of stages in shared memory, each guarded by two mbarriers: `full` (the producer announces
//   the stage's bytes, the copies complete it) and `empty` (each consumer warp arrives when the wgmma that
//   read the stage is done). 3 to 7 stages, as many as fit.
// - Warp specialisation: warpgroup 0 is the producer (one thread queues the copies; the warpgroup gives
//   its registers back, setmaxnreg 40), warpgroups 1 and 2 consume (setmaxnreg 232): each owns 64 rows of
//   the 128-row tile and all BN (128 or 256) columns, 4 wgmma m64nBNk16 per stage, their accumulators in
//   registers, and issues the next stage's wgmma while the previous one runs (wait_group 1).
// - The 128-byte swizzle on both sides: every box row is 128 bytes (64 bf16 or 32 fp32), which the copy
//   engine writes with CU_TENSOR_MAP_SWIZZLE_128B and wgmma reads through descriptors in the same mode, so
//   neither side has bank conflicts (wgmma.cuh: smem_desc_sw128).
// - fp32 operands. The gradient of a layer's output (dy) is fp32 in memory, and wgmma takes only 16-bit
//   operands from shared memory; TMA cannot convert. So an fp32 A operand is copied as fp32 and the
//   consumers build wgmma's register fragments from it (A from registers, wgmma_rs_*): each thread reads
//   its 8 values per 16 k from the swizzled stage, rounds them to bf16 pairs (as version 3 rounds dy as it
//   stages it: the same values) and issues. Two fragment sets alternate, so a stage's fragments are never
//   rewritten while the wgmma reading them may still run.
//
// What each GEMM reads (P: the problem; A K-major "rows" or MN-major "cols", B K-major or MN-major):
//   conv forward       A = x window (bf16, rows), B = W [o, taps c] (K-major)
//   conv forward (T)   A = W [o, taps c] (rows), B = x window (K-major): C^T, for o < 256
//   conv input grad.   A = dy window (fp32, rows), B = W as [taps, c] per output channel (MN-major)
//   conv weight grad.  A = dy^T (fp32, cols: M = o, K = pixels), B = x window per tap (MN-major)
//   linear forward     A = x [m, k] (bf16, rows), B = W [n, k] (K-major)
//   linear input grad. A = dy [m, n] (fp32, rows), B = W [n, k] (MN-major)
//   linear weight grad A = dy^T (fp32, cols), B = x [m, k] (MN-major)
// The weight gradients split K (blockIdx.z) into the workspace like the other cores (gemm_reduce_f32).
//
// Per stage and consumer warp, the main loop issues 4 HGMMA, its two barrier operations and, for an fp32
// A, 16 (rows) or 32 (cols) shared-memory loads and 16 conversions. The bound it is designed to hit is the
// tensor pipe; the model's shared-memory bound (wgmma's operand reads plus the copies landing) is the next
// (scripts/sass-model prints both).
#pragma once

#include "gemm_mma.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace ddpm {

// The block's dynamic shared memory from its first 1024-byte boundary (the launch asks for 1024 bytes
// more), where the 128-byte swizzle's pattern starts; the emulator's buffer there. The pointer is formed
// by arithmetic on the shared array itself, so the compiler keeps it in the shared window (LDS, not
// generic loads).
#if defined(__CUDACC__)
__device__ __forceinline__ unsigned char* dynamic_shared_1024() {
    extern __shared__ float smem[];
    const uint32_t at = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    return reinterpret_cast<unsigned char*>(smem) + ((1024u - at % 1024u) % 1024u);
}
#else
inline unsigned char* dynamic_shared_1024() {
    unsigned char* p = reinterpret_cast<unsigned char*>(emu::dynamic_shared());
    const auto at = reinterpret_cast<uintptr_t>(p);
    return p + (1024 - at % 1024) % 1024;
}
#endif

namespace hop {

constexpr int BM = 128;  // rows of a tile: two consumer warpgroups of 64
constexpr int BK = 64;   // k per stage: one 128-byte row of bf16
constexpr int THREADS = 384;
constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = 232;

// How a problem's A operand reaches wgmma: from shared memory in bf16 (K-major), or fp32 staged and turned
// into register fragments, read along rows (the stage is [row m][32 k] x 2 boxes) or along columns (the
// stage is [row k][32 m] x 4 boxes: dy^T).
enum class AKind { Smem, RegRows, RegCols };

template <AKind K>
__host__ __device__ constexpr int a_bytes() {
    return K == AKind::Smem ? BM * BK * 2 : BM * BK * 4;
}

// A pixel of a batch of images, and a grid of them cut into rectangles (patches) of wt x ht x nt.
struct Pixel {
    int n, y, x;
};
struct PixelTiles {
    int n, h, w;     // the grid
    int wt, ht, nt;  // one patch
    int across, down;
    // The first pixel of patch t.
    __device__ __forceinline__ Pixel origin(int t) const {
        const int px = t % across, rest = t / across;
        return {(rest / down) * nt, (rest % down) * ht, px * wt};
    }
    // The next patch after the one at `p` (along rows, then down, then images).
    __device__ __forceinline__ void next(Pixel& p) const {
        p.x += wt;
        if (p.x < w) return;
        p.x = 0;
        p.y += ht;
        if (p.y < h) return;
        p.y = 0;
        p.n += nt;
    }
    // The linear index (n h w order) of row r of the patch at `o`, or -1 where it is off the grid.
    __device__ __forceinline__ int64_t row(Pixel o, int r) const {
        const int x = o.x + r % wt, y = o.y + (r / wt) % ht, n = o.n + r / (wt * ht);
        if (x >= w || y >= h || n >= this->n) return -1;
        return (int64_t(n) * h + y) * w + x;
    }
    __device__ __forceinline__ int patches() const { return across * down * ((n + nt - 1) / nt); }
};

__device__ __forceinline__ PixelTiles pixel_tiles(int n, int h, int w, int wt, int ht, int nt) {
    return {n, h, w, wt, ht, nt, (w + wt - 1) / wt, (h + ht - 1) / ht};
}

// Element (r, c) of a swizzled stage of 128-byte rows of fp32 (32 a row): byte 128 r + 16 ((c / 4) ^ (r % 8))
// + 4 (c % 4).
__device__ __forceinline__ const float* sw128_f32(const unsigned char* stage, int r, int c) {
    return reinterpret_cast<const float*>(stage + 128 * r + (((c >> 2) ^ (r & 7)) << 4) + ((c & 3) << 2));
}

// The thread's A fragment of 16 k step `ks` (0-3) of a stage for rows `r0` and `r0 + 8` of the tile (the
// warp's 16, consumer group included): bf16 pairs (k, k + 1) at k = 2 t and 2 t + 8.
template <AKind K>
__device__ __forceinline__ void a_fragment(uint32_t (&f)[4], const unsigned char* stage, int ks, int r0, int t) {
    if constexpr (K == AKind::RegRows) {
        // Two boxes of [128 rows][32 k]: k step ks in box ks / 2, from column 16 (ks % 2).
        const unsigned char* box = stage + (ks >> 1) * (BM * 128);
        const int c = 16 * (ks & 1) + 2 * t;
        const float2 a0 = *reinterpret_cast<const float2*>(sw128_f32(box, r0, c));
        const float2 a1 = *reinterpret_cast<const float2*>(sw128_f32(box, r0 + 8, c));
        const float2 a2 = *reinterpret_cast<const float2*>(sw128_f32(box, r0, c + 8));
        const float2 a3 = *reinterpret_cast<const float2*>(sw128_f32(box, r0 + 8, c + 8));
        f[0] = pack_bf16x2(a0.x, a0.y);
        f[1] = pack_bf16x2(a1.x, a1.y);
        f[2] = pack_bf16x2(a2.x, a2.y);
        f[3] = pack_bf16x2(a3.x, a3.y);
    } else {
        // Four boxes of [64 k rows][32 m]: row m in box m / 32, column m % 32.
        const int k = 16 * ks + 2 * t;
        const auto at = [&](int m, int kk) {
            return *sw128_f32(stage + (m >> 5) * (BK * 128), kk, m & 31);
        };
        f[0] = pack_bf16x2(at(r0, k), at(r0, k + 1));
        f[1] = pack_bf16x2(at(r0 + 8, k), at(r0 + 8, k + 1));
        f[2] = pack_bf16x2(at(r0, k + 8), at(r0, k + 9));
        f[3] = pack_bf16x2(at(r0 + 8, k + 8), at(r0 + 8, k + 9));
    }
}

// The descriptor of B's 16 k step `ks` of a stage: K-major rows of 64 k (the step 32 bytes into each row),
// or MN-major rows of 64 n along k in groups of 64 n 8 KiB apart (the step 16 rows down).
template <bool MN>
__device__ __forceinline__ uint64_t b_desc(const unsigned char* stage, int ks) {
    if constexpr (MN)
        return smem_desc_sw128(stage + 2048 * ks, BK * 128, 1024);
    else
        return smem_desc_sw128(stage + 32 * ks, 16, 1024);
}

// One stage's 4 wgmma for consumer group `cg` (rows 64 cg ..), A's fragments into `f` where A comes from
// registers.
template <class P>
__device__ __forceinline__ void mma_stage(float (&acc)[P::BN / 2], uint32_t (&f)[4][4], const unsigned char* a,
                                          const unsigned char* b, int cg, int warp, int lane, bool accumulate) {
    if constexpr (P::A != AKind::Smem) {
        const int r0 = 64 * cg + 16 * warp + lane / 4, t = lane % 4;
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) a_fragment<P::A>(f[ks], a, ks, r0, t);
    }
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
        const uint64_t bd = b_desc<P::B_MN>(b, ks);
        const int acc_on = accumulate || ks > 0;
        if constexpr (P::A == AKind::Smem) {
            const uint64_t ad = smem_desc_sw128(a + cg * (64 * 128) + 32 * ks, 16, 1024);
            if constexpr (P::BN == 256)
                wgmma_ss_m64n256k16<0, P::B_MN>(acc, ad, bd, acc_on);
            else
                wgmma_ss_m64n128k16<0, P::B_MN>(acc, ad, bd, acc_on);
        } else {
            if constexpr (P::BN == 256)
                wgmma_rs_m64n256k16<P::B_MN>(acc, f[ks], bd, acc_on);
            else
                wgmma_rs_m64n128k16<P::B_MN>(acc, f[ks], bd, acc_on);
        }
    }
    wgmma_commit();
}

// The whole GEMM of problem `p` with `stages` stages, the results through `e` (tile row r to the output
// row p.row(r)). Launch: block 384, dynamic shared memory stages x (A + B bytes) + 1024 (alignment) +
// 16 stages (barriers).
template <class P>
__device__ __forceinline__ void gemm(const P& p, int stages, const Epilogue& e) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
    __trap();  // only sm_90a has TMA and wgmma together; the launchers never run this elsewhere
#else
    constexpr int A_BYTES = a_bytes<P::A>(), STAGE = A_BYTES + P::BN * BK * 2;
    unsigned char* base = dynamic_shared_1024();
    uint64_t* full = reinterpret_cast<uint64_t*>(base + stages * STAGE);
    uint64_t* empty = full + stages;
    const int tid = threadIdx.x, group = tid / 128;
    if (tid == 0) {
        for (int s = 0; s < stages; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 8);  // each consumer warp, when its wgmma on the stage is done
        }
        fence_mbar_init();
    }
    __syncthreads();
    const int slices = p.slices();
    if (group == 0) {
        setmaxnreg_dec<PRODUCER_REGS>();
        if (tid == 0) {
            auto at = p.start();
            int s = 0;
            unsigned phase = 0;
            for (int i = 0; i < slices; ++i) {
                if (i >= stages) mbar_wait(&empty[s], phase ^ 1);  // the consumers are done with it
                mbar_arrive_expect_tx(&full[s], STAGE);
                p.issue(at, base + s * STAGE, base + s * STAGE + A_BYTES, &full[s]);
                p.advance(at);
                if (++s == stages) s = 0, phase ^= 1;
            }
        }
        return;
    }
    setmaxnreg_inc<CONSUMER_REGS>();
    const int cg = group - 1, warp = (tid / 32) % 4, lane = tid % 32;
    const auto store = [&](auto value) {
        const int g = lane / 4, t = lane % 4;
#pragma unroll
        for (int j = 0; j < P::BN / 8; ++j)
#pragma unroll
            for (int x = 0; x < 4; x += 2) {
                const int r = 64 * cg + 16 * warp + g + 4 * x;
                if constexpr (P::TRANSPOSED) {
                    // C^T: tile row r is output channel m0 + r, column i the patch's pixel i.
                    const int ch = p.m0 + r;
#pragma unroll
                    for (int q = 0; q < 2; ++q) {
                        const int64_t px = p.col(8 * j + 2 * t + q);
                        if (px >= 0 && ch < p.cols) e.store(p.rows, p.cols, int(px), ch, value(4 * j + x + q));
                    }
                } else {
                    const int n = p.n0 + 8 * j + 2 * t;
                    const int64_t m = p.row(r);
                    if (m >= 0 && n < p.cols)
                        store_pair(e, p.rows, p.cols, int(m), n, value(4 * j + x), value(4 * j + x + 1));
                }
            }
    };
    if (slices == 0) {  // an empty split of K: its partial sums are 0
        store([](int) { return 0.0f; });
        return;
    }
    float acc[P::BN / 2];
    uint32_t f0[4][4], f1[4][4];  // A's fragments of even and odd stages (register A only)
    int s = 0, prev = -1;
    unsigned phase = 0;
    const auto step = [&](int i, uint32_t (&f)[4][4]) {
        mbar_wait(&full[s], phase);
        const unsigned char* a = base + s * STAGE;
        mma_stage<P>(acc, f, a, a + A_BYTES, cg, warp, lane, i > 0);
        wgmma_wait<1>();  // the previous stage's wgmma is done: release it
        if (prev >= 0 && lane == 0) mbar_arrive(&empty[prev]);
        prev = s;
        if (++s == stages) s = 0, phase ^= 1;
    };
    for (int i = 0; i < slices; i += 2) {
        step(i, f0);
        if (i + 1 < slices) step(i + 1, f1);
    }
    wgmma_wait<0>();
    fence_operands(acc);
    store([&](int i) { return acc[i]; });
#endif
}

// ---- the problems ----------------------------------------------------------------------------------
//
// Each says: BN, how A comes (A) and whether B is MN-major (B_MN); this block's slices of K (slices());
// a cursor over them (start(), advance()); the copies of one slice into a stage (issue(), thread 0 of the
// producer); and where tile row r goes (row(r)), with n0, rows and cols of the output, or, for a problem
// computed transposed (TRANSPOSED), where column i goes (col(i)), with m0.

// The slices of K of a stride-1 convolution's GEMMs: taps^2 taps of `ch / BK` blocks of 64 channels (the
// forward's input channels, the input gradient's output channels), the channel block fastest, then kx,
// then ky: a cursor stepped by additions.
struct TapCursor {
    int cb, ky, kx;
};
__device__ __forceinline__ int tap_slices(int taps, int ch) { return taps * taps * (ch / BK); }
__device__ __forceinline__ void tap_advance(TapCursor& k, int taps, int ch) {
    if (++k.cb * BK < ch) return;
    k.cb = 0;
    if (++k.kx < taps) return;
    k.kx = 0;
    ++k.ky;
}

// The convolution forward, stride 1: M = the output pixels in patches of 128, N = o, K = taps^2 c in
// slices of one tap's 64 channels. ma: x [n, h, w, c] bf16 as (c, w, h, n), boxes (64, wt, ht, nt);
// mb: W [o, taps^2 c] bf16 as (taps^2 c, o), boxes (64, BN).
template <int BN_>
struct ConvForward {
    static constexpr int BN = BN_;
    static constexpr AKind A = AKind::Smem;
    static constexpr bool B_MN = false;
    static constexpr bool TRANSPOSED = false;
    const TensorMap* ma;
    const TensorMap* mb;
    PixelTiles tiles;
    Pixel at;
    int n0, c, taps, pad, rows, cols;
    using Cursor = TapCursor;
    __device__ int slices() const { return tap_slices(taps, c); }
    __device__ Cursor start() const { return {0, 0, 0}; }
    __device__ void advance(Cursor& k) const { tap_advance(k, taps, c); }
    __device__ void issue(const Cursor& k, unsigned char* a, unsigned char* b, uint64_t* bar) const {
        tma_load_4d(a, ma, bar, k.cb * BK, at.x + k.kx - pad, at.y + k.ky - pad, at.n);
        tma_load_2d(b, mb, bar, (k.ky * taps + k.kx) * c + k.cb * BK, n0);
    }
    __device__ int64_t row(int r) const { return tiles.row(at, r); }
};

// The convolution forward computed transposed, for outputs of fewer than 256 channels: C^T = W x^T, so the
// tile is 128 output channels (M) by a patch of 256 pixels (N) and each stage's wgmma is m64n256, whose
// shared-memory reads per multiply-add are those of ConvForward<256> (ConvForward<128> re-reads its B for
// every 64 rows: the model puts it at 80% of the peak by shared memory). K is ConvForward's. ma: W
// [o, taps^2 c] bf16 as (taps^2 c, o), boxes (64, 128); mb: x [n, h, w, c] bf16 as (c, w, h, n), boxes
// (64, wt, ht, nt) with wt ht nt = 256. The epilogue writes column i (pixel) of row r (channel) to
// y[pixel, channel] one value at a time (an epilogue's share of the time; the main loop is the point).
template <int BN_>
struct ConvForwardT {
    static constexpr int BN = BN_;
    static constexpr AKind A = AKind::Smem;
    static constexpr bool B_MN = false;
    static constexpr bool TRANSPOSED = true;
    const TensorMap* ma;
    const TensorMap* mb;
    PixelTiles tiles;
    Pixel at;
    int m0, c, taps, pad, rows, cols;
    using Cursor = TapCursor;
    __device__ int slices() const { return tap_slices(taps, c); }
    __device__ Cursor start() const { return {0, 0, 0}; }
    __device__ void advance(Cursor& k) const { tap_advance(k, taps, c); }
    __device__ void issue(const Cursor& k, unsigned char* a, unsigned char* b, uint64_t* bar) const {
        tma_load_2d(a, ma, bar, (k.ky * taps + k.kx) * c + k.cb * BK, m0);
        tma_load_4d(b, mb, bar, k.cb * BK, at.x + k.kx - pad, at.y + k.ky - pad, at.n);
    }
    __device__ int64_t col(int i) const { return tiles.row(at, i); }
};

// The convolution's input gradient, stride 1: M = the input pixels, N = c, K = taps^2 o in slices of one
// tap's 64 output channels; dy at (y + pad - ky, x + pad - kx). ma: dy [n, h, w, o] fp32 as (o, w, h, n),
// boxes (32, wt, ht, nt), two a slice; mb: W [o, taps^2, c] bf16 as (c, taps^2, o), boxes (64, 1, 64),
// BN / 64 a slice.
template <int BN_>
struct ConvInputGrad {
    static constexpr int BN = BN_;
    static constexpr AKind A = AKind::RegRows;
    static constexpr bool B_MN = true;
    static constexpr bool TRANSPOSED = false;
    const TensorMap* ma;
    const TensorMap* mb;
    PixelTiles tiles;
    Pixel at;
    int n0, o, taps, pad, rows, cols;
    using Cursor = TapCursor;  // cb: the block of 64 output channels
    __device__ int slices() const { return tap_slices(taps, o); }
    __device__ Cursor start() const { return {0, 0, 0}; }
    __device__ void advance(Cursor& k) const { tap_advance(k, taps, o); }
    __device__ void issue(const Cursor& k, unsigned char* a, unsigned char* b, uint64_t* bar) const {
        const int x = at.x + pad - k.kx, y = at.y + pad - k.ky;
        tma_load_4d(a, ma, bar, k.cb * BK, x, y, at.n);
        tma_load_4d(a + BM * 128, ma, bar, k.cb * BK + 32, x, y, at.n);
#pragma unroll
        for (int j = 0; j < BN / 64; ++j)
            tma_load_3d(b + j * (BK * 128), mb, bar, n0 + 64 * j, k.ky * taps + k.kx, k.cb * BK);
    }
    __device__ int64_t row(int r) const { return tiles.row(at, r); }
};

// The convolution's weight gradient, stride 1: M = o (output channels m0 ..), N = taps^2 c (tap, channel),
// K = the output pixels in patches of 64 (tiles: wt x ht x nt = 64), split over blockIdx.z in runs of
// `chunk` patches. ma: dy as (o, w, h, n) fp32, boxes (32, wt, ht, nt), four a slice (A = dy^T: rows k,
// 32 m each); mb: x as (c, w, h, n) bf16, boxes (64, wt, ht, nt), one per 64 columns (the tap's shift
// fixed per column group).
template <int BN_>
struct ConvWeightGrad {
    static constexpr int BN = BN_;
    static constexpr AKind A = AKind::RegCols;
    static constexpr bool B_MN = true;
    static constexpr bool TRANSPOSED = false;
    const TensorMap* ma;
    const TensorMap* mb;
    PixelTiles tiles;
    int m0, n0, c, taps, pad, rows, cols, first, count;
    __device__ int slices() const { return count; }
    __device__ Pixel start() const { return tiles.origin(first); }
    __device__ void advance(Pixel& p) const { tiles.next(p); }
    __device__ void issue(const Pixel& p, unsigned char* a, unsigned char* b, uint64_t* bar) const {
#pragma unroll
        for (int j = 0; j < 4; ++j) tma_load_4d(a + j * (BK * 128), ma, bar, m0 + 32 * j, p.x, p.y, p.n);
#pragma unroll
        for (int j = 0; j < BN / 64; ++j) {
            const int col = n0 + 64 * j, tap = col / c, ky = tap / taps, kx = tap % taps;
            tma_load_4d(b + j * (BK * 128), mb, bar, col - tap * c, p.x + kx - pad, p.y + ky - pad, p.n);
        }
    }
    __device__ int64_t row(int r) const { return m0 + r < rows ? m0 + r : -1; }
};

// The linear layer y = x W^T: M = rows of x, N = out, K = in in slices of 64. ma: x [m, k] bf16 as (k, m),
// boxes (64, 128); mb: W [n, k] bf16 as (k, n), boxes (64, BN).
template <int BN_>
struct LinearForward {
    static constexpr int BN = BN_;
    static constexpr AKind A = AKind::Smem;
    static constexpr bool B_MN = false;
    static constexpr bool TRANSPOSED = false;
    const TensorMap* ma;
    const TensorMap* mb;
    int m0, n0, k, rows, cols;
    __device__ int slices() const { return (k + BK - 1) / BK; }
    __device__ int start() const { return 0; }
    __device__ void advance(int& kb) const { kb += BK; }
    __device__ void issue(int kb, unsigned char* a, unsigned char* b, uint64_t* bar) const {
        tma_load_2d(a, ma, bar, kb, m0);
        tma_load_2d(b, mb, bar, kb, n0);
    }
    __device__ int64_t row(int r) const { return m0 + r < rows ? m0 + r : -1; }
};

// The linear layer's input gradient dx = dy W: M = rows, N = in, K = out. ma: dy [m, out] fp32 as
// (out, m), boxes (32, 128), two a slice; mb: W [out, in] bf16 as (in, out), boxes (64, 64), BN / 64 a
// slice.
template <int BN_>
struct LinearInputGrad {
    static constexpr int BN = BN_;
    static constexpr AKind A = AKind::RegRows;
    static constexpr bool B_MN = true;
    static constexpr bool TRANSPOSED = false;
    const TensorMap* ma;
    const TensorMap* mb;
    int m0, n0, k, rows, cols;
    __device__ int slices() const { return (k + BK - 1) / BK; }
    __device__ int start() const { return 0; }
    __device__ void advance(int& kb) const { kb += BK; }
    __device__ void issue(int kb, unsigned char* a, unsigned char* b, uint64_t* bar) const {
        tma_load_2d(a, ma, bar, kb, m0);
        tma_load_2d(a + BM * 128, ma, bar, kb + 32, m0);
#pragma unroll
        for (int j = 0; j < BN / 64; ++j) tma_load_2d(b + j * (BK * 128), mb, bar, n0 + 64 * j, kb);
    }
    __device__ int64_t row(int r) const { return m0 + r < rows ? m0 + r : -1; }
};

// The linear layer's weight gradient dw = dy^T x: M = out, N = in, K = rows, split over blockIdx.z. ma: dy
// [m, out] fp32 as (out, m), boxes (32, 64), four a slice (A = dy^T); mb: x [m, in] bf16 as (in, m), boxes
// (64, 64), BN / 64 a slice.
template <int BN_>
struct LinearWeightGrad {
    static constexpr int BN = BN_;
    static constexpr AKind A = AKind::RegCols;
    static constexpr bool B_MN = true;
    static constexpr bool TRANSPOSED = false;
    const TensorMap* ma;
    const TensorMap* mb;
    int m0, n0, rows, cols, first, count;
    __device__ int slices() const { return count; }
    __device__ int start() const { return first * BK; }
    __device__ void advance(int& kb) const { kb += BK; }
    __device__ void issue(int kb, unsigned char* a, unsigned char* b, uint64_t* bar) const {
#pragma unroll
        for (int j = 0; j < 4; ++j) tma_load_2d(a + j * (BK * 128), ma, bar, m0 + 32 * j, kb);
#pragma unroll
        for (int j = 0; j < BN / 64; ++j) tma_load_2d(b + j * (BK * 128), mb, bar, n0 + 64 * j, kb);
    }
    __device__ int64_t row(int r) const { return m0 + r < rows ? m0 + r : -1; }
};

// This block's run of `total` slices when K is split over gridDim.z in runs of `chunk`.
__device__ __forceinline__ void split_run(int total, int chunk, int& first, int& count) {
    first = min(total, int(blockIdx.z) * chunk);
    count = min(total, first + chunk) - first;
}

}  // namespace hop
}  // namespace ddpm

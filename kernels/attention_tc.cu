// attention_tc.cu: the attention backward on bf16 tensor cores (version 2; version 1 is attention.cu's
// fp32 kernels, which the channel counts these do not take still use; version 2's forward was replaced by
// attention_mma.cu's, version 3). Same arguments and results as their fp32 twins:
//   attention_backward_dq_bf16    dq, and delta_i = dout_i . out_i (for the next kernel)
//   attention_backward_dkv_bf16   dk and dv
//   attention_backward_*_bf16_bf16in   the same with qkv stored in bf16 (staged as it is)
//   attention_backward_dq_bf16_bf16io  and with out stored in bf16 too
//
// The backward (P rebuilt from lse; dP = dO V^T, dS = P (dP - delta), dq = dS K / sqrt(c),
// dk = dS^T Q / sqrt(c), dv = P^T dO), as two kernels so that no gradient needs atomics (results are
// reproducible bit for bit):
//   dq: a block owns 64 queries (4 warps of 16) and streams keys and values 32 at a time: per tile, S and
//       dP by WMMA, dS in fp32 by two lanes per row, then dq += dS K, the accumulator in shared memory.
//       Shared memory: Q, dO 2 x 64 x (c + 8) bf16; K, V 2 x 32 x (c + 8) bf16; S, dP 2 x 64 x 36 fp32;
//       dS 64 x 40 bf16; dq 64 x (c + 4) fp32. Block 128, grid (ceil(l / 64), n).
//   dkv: a block owns 32 keys (2 warps of 16) and streams queries 64 at a time: S^T = K Q^T and
//       dP^T = V dO^T by WMMA, P^T and dS^T in fp32, then dv += P^T dO and dk += dS^T Q. Shared memory:
//       K, V 2 x 32 x (c + 8) bf16; Q, dO 2 x 64 x (c + 8) bf16; lse and delta 2 x 64 fp32; S^T, dP^T
//       2 x 32 x 68 fp32; P^T, dS^T 2 x 32 x 72 bf16; dk, dv 2 x 32 x (c + 4) fp32. Block 64, grid
//       (ceil(l / 32), n). FLOPs of the two: 10 n l^2 c (S is recomputed in each).
//
// Requirements (the launcher checks them and otherwise runs the fp32 kernels): c a multiple of 16, and the
// shared memory within the device's limit (c = 256: 187 and 190 KB; the backend opts in to the maximum). Every size here is mirrored by src/backend/cuda/attention.rs.
#include <cuda_bf16.h>
#include <mma.h>

#include <type_traits>

#include "common.cuh"

namespace {
constexpr int AT_Q = 64;     // queries per block of the dq kernel, per tile of the dkv kernel's stream
constexpr int AT_WARPS = 4;  // dq: 16 queries each
static_assert(AT_Q == 16 * AT_WARPS, "each warp owns 16 query rows");

__device__ __forceinline__ size_t align32(size_t bytes) { return (bytes + 31) / 32 * 32; }

// Step i (of n) of the lane pair that owns row r of a row-wise loop over 2 n columns: the pair splits the
// columns odd and even (half), and each row starts at its own offset. The row strides of S, P, dP, dS and
// (for c a multiple of 32) the accumulators are 4 words mod 32, so contiguous halves would put the 16 rows
// of a warp on 8 banks (a 4-way conflict per access); this
// order puts the warp's 32 lanes on 32 banks (the column step is 2 words for fp32 rows, and the two lanes of
// a pair share a word for bf16 ones). Over i = 0 .. n - 1 each lane visits its n columns once.
__device__ __forceinline__ int spread(int i, int r, int n, int half) { return 2 * ((i + r) % n) + half; }

// Carves the dynamic shared memory into regions, in order, each 32-byte aligned.
struct Carver {
    char* at;
    template <class T>
    __device__ __forceinline__ T* take(size_t count) {
        T* p = reinterpret_cast<T*>(at);
        at += align32(count * sizeof(T));
        return p;
    }
};

// rows x c of fp32 (or bf16) rows (stride `row`) from `src`, as bf16 rows of stride ldt; zero past row
// `valid`. A bf16 source comes through unchanged (widening and rounding back is exact).
template <class T>
__device__ __forceinline__ void stage_bf16(__nv_bfloat16* dst, int ldt, const T* src, int64_t row, int rows,
                                           int valid, int c) {
    for (int e = threadIdx.x; e < rows * c; e += blockDim.x) {
        const int r = e / c, ch = e % c;
        dst[r * ldt + ch] = __float2bfloat16_rn(r < valid ? ddpm::to_f32(src[r * row + ch]) : 0.0f);
    }
}

// Zeroes rows x c of fp32 rows of stride ld (the accumulators), the block's threads together.
__device__ __forceinline__ void zero_rows(float* dst, int ld, int rows, int c) {
    for (int e = threadIdx.x; e < rows * c; e += blockDim.x) dst[(e / c) * ld + e % c] = 0.0f;
}

// acc (a 16 x 16 fp32 tile) = sum over k < kdim of A(16 x kdim, row-major) B(kdim x 16), B column-major
// when ColB (a matrix stored [n][k], used transposed).
template <bool ColB>
__device__ __forceinline__ void mma_tile(float* dst, int ldd, const __nv_bfloat16* a, int lda,
                                         const __nv_bfloat16* b, int ldb, int kdim) {
    namespace wmma = nvcuda::wmma;
    using LayoutB = typename std::conditional<ColB, wmma::col_major, wmma::row_major>::type;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k = 0; k < kdim; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, LayoutB> fb;
        wmma::load_matrix_sync(fa, a + k, lda);
        wmma::load_matrix_sync(fb, ColB ? b + k : b + k * ldb, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(dst, acc, ldd, wmma::mem_row_major);
}

// D (16 x c fp32 in shared memory, stride ldd) += A (16 x kdim bf16, row-major) B (kdim x c bf16,
// row-major), 16 columns at a time.
__device__ __forceinline__ void mma_accumulate(float* d, int ldd, const __nv_bfloat16* a, int lda,
                                               const __nv_bfloat16* b, int ldb, int kdim, int c) {
    namespace wmma = nvcuda::wmma;
    for (int n = 0; n < c; n += 16) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::load_matrix_sync(acc, d + n, ldd, wmma::mem_row_major);
        for (int k = 0; k < kdim; k += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
            wmma::load_matrix_sync(fa, a + k, lda);
            wmma::load_matrix_sync(fb, b + k * ldb + n, ldb);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(d + n, acc, ldd, wmma::mem_row_major);
    }
}
}  // namespace

namespace {
constexpr int AB_KT = 32;  // dq: keys per tile
constexpr int AB_K = 32;   // dkv: keys per block (2 warps of 16)
constexpr int AB_QT = 64;  // dkv: queries per tile
}  // namespace

template <class T, class O = float>
__device__ __forceinline__ void attention_backward_dq_tc(const T* __restrict__ qkv, const O* __restrict__ out,
                                                         const float* __restrict__ lse,
                                                         const float* __restrict__ dout, float* __restrict__ dqkv,
                                                         float* __restrict__ delta, int l, int c) {
    extern __shared__ float smem[];
    const int ldt = c + 8, ldo = c + 4, lds = AB_KT + 4, ldp = AB_KT + 8;
    Carver carve{reinterpret_cast<char*>(smem)};
    __nv_bfloat16* qs = carve.take<__nv_bfloat16>(AT_Q * ldt);
    __nv_bfloat16* dos = carve.take<__nv_bfloat16>(AT_Q * ldt);
    __nv_bfloat16* ks = carve.take<__nv_bfloat16>(AB_KT * ldt);
    __nv_bfloat16* vs = carve.take<__nv_bfloat16>(AB_KT * ldt);
    float* ss = carve.take<float>(AT_Q * lds);
    float* dps = carve.take<float>(AT_Q * lds);
    __nv_bfloat16* dss = carve.take<__nv_bfloat16>(AT_Q * ldp);
    float* dqs = carve.take<float>(AT_Q * ldo);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int image = blockIdx.y, q0 = blockIdx.x * AT_Q;
    const int64_t row = 3 * int64_t(c), img = int64_t(image) * l;
    const T* src = qkv + img * row;
    const float scale = ddpm::attention_scale(c);
    const int valid = min(AT_Q, l - q0);
    stage_bf16(qs, ldt, src + q0 * row, row, AT_Q, valid, c);
    stage_bf16(dos, ldt, dout + (img + q0) * c, c, AT_Q, valid, c);
    zero_rows(dqs, ldo, AT_Q, c);

    // Lanes 2r' and 2r' + 1 of warp w own row r = 16 w + r': delta_r = dout_r . out_r in fp32, from memory.
    const int r = 16 * warp + lane / 2, half = lane % 2;
    const bool row_valid = r < valid;
    const int64_t pos = img + q0 + r;
    float d = 0.0f, lse_r = 0.0f;
    if (row_valid) {
        for (int ch = half * (c / 2); ch < (half + 1) * (c / 2); ++ch)
            d = fmaf(dout[pos * c + ch], ddpm::to_f32(out[pos * c + ch]), d);
        lse_r = lse[pos];
    }
    d += __shfl_xor_sync(0xffffffffu, d, 1);
    if (row_valid && half == 0) delta[pos] = d;

    for (int j0 = 0; j0 < l; j0 += AB_KT) {
        __syncthreads();
        stage_bf16(ks, ldt, src + j0 * row + c, row, AB_KT, min(AB_KT, l - j0), c);
        stage_bf16(vs, ldt, src + j0 * row + 2 * c, row, AB_KT, min(AB_KT, l - j0), c);
        __syncthreads();
        // S = Q K^T and dP = dO V^T for the warp's 16 rows (K and V stored [key][channel]: column-major B).
        for (int n = 0; n < AB_KT; n += 16) {
            mma_tile<true>(ss + 16 * warp * lds + n, lds, qs + 16 * warp * ldt, ldt, ks + n * ldt, ldt, c);
            mma_tile<true>(dps + 16 * warp * lds + n, lds, dos + 16 * warp * ldt, ldt, vs + n * ldt, ldt, c);
        }
        __syncwarp();
        for (int i = 0; i < AB_KT / 2; ++i) {
            const int j = spread(i, r, AB_KT / 2, half);
            const float p = row_valid && j0 + j < l ? expf(ss[r * lds + j] * scale - lse_r) : 0.0f;
            dss[r * ldp + j] = __float2bfloat16_rn(p * (dps[r * lds + j] - d));
        }
        __syncwarp();
        // dq += dS K (K row-major now: [key][channel] is (k, n)).
        mma_accumulate(dqs + 16 * warp * ldo, ldo, dss + 16 * warp * ldp, ldp, ks, ldt, AB_KT, c);
        __syncwarp();
    }
    if (!row_valid) return;
    float* dst = dqkv + pos * row;
    for (int ch = half * (c / 2); ch < (half + 1) * (c / 2); ++ch) dst[ch] = dqs[r * ldo + ch] * scale;
}

template <class T>
__device__ __forceinline__ void attention_backward_dkv_tc(const T* __restrict__ qkv, const float* __restrict__ lse,
                                                          const float* __restrict__ dout,
                                                          const float* __restrict__ delta, float* __restrict__ dqkv,
                                                          int l, int c) {
    extern __shared__ float smem[];
    const int ldt = c + 8, ldo = c + 4, lds = AB_QT + 4, ldp = AB_QT + 8;
    Carver carve{reinterpret_cast<char*>(smem)};
    __nv_bfloat16* ks = carve.take<__nv_bfloat16>(AB_K * ldt);
    __nv_bfloat16* vs = carve.take<__nv_bfloat16>(AB_K * ldt);
    __nv_bfloat16* qs = carve.take<__nv_bfloat16>(AB_QT * ldt);
    __nv_bfloat16* dos = carve.take<__nv_bfloat16>(AB_QT * ldt);
    float* lse_t = carve.take<float>(AB_QT);
    float* delta_t = carve.take<float>(AB_QT);
    float* st = carve.take<float>(AB_K * lds);
    float* dpt = carve.take<float>(AB_K * lds);
    __nv_bfloat16* pt = carve.take<__nv_bfloat16>(AB_K * ldp);
    __nv_bfloat16* dst_t = carve.take<__nv_bfloat16>(AB_K * ldp);
    float* dks = carve.take<float>(AB_K * ldo);
    float* dvs = carve.take<float>(AB_K * ldo);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int image = blockIdx.y, k0 = blockIdx.x * AB_K;
    const int64_t row = 3 * int64_t(c), img = int64_t(image) * l;
    const T* src = qkv + img * row;
    const float scale = ddpm::attention_scale(c);
    const int keys = min(AB_K, l - k0);
    stage_bf16(ks, ldt, src + k0 * row + c, row, AB_K, keys, c);
    stage_bf16(vs, ldt, src + k0 * row + 2 * c, row, AB_K, keys, c);
    zero_rows(dks, ldo, AB_K, c);
    zero_rows(dvs, ldo, AB_K, c);
    // Lanes 2r' and 2r' + 1 of warp w own key row r = 16 w + r' of the block: half of each tile's queries
    // each (interleaved by spread()).
    const int r = 16 * warp + lane / 2, half = lane % 2;

    for (int i0 = 0; i0 < l; i0 += AB_QT) {
        const int queries = min(AB_QT, l - i0);
        __syncthreads();
        stage_bf16(qs, ldt, src + i0 * row, row, AB_QT, queries, c);
        stage_bf16(dos, ldt, dout + (img + i0) * c, c, AB_QT, queries, c);
        for (int i = threadIdx.x; i < AB_QT; i += blockDim.x) {
            lse_t[i] = i < queries ? lse[img + i0 + i] : 0.0f;
            delta_t[i] = i < queries ? delta[img + i0 + i] : 0.0f;
        }
        __syncthreads();
        // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys (Q and dO stored [query][channel]).
        for (int n = 0; n < AB_QT; n += 16) {
            mma_tile<true>(st + 16 * warp * lds + n, lds, ks + 16 * warp * ldt, ldt, qs + n * ldt, ldt, c);
            mma_tile<true>(dpt + 16 * warp * lds + n, lds, vs + 16 * warp * ldt, ldt, dos + n * ldt, ldt, c);
        }
        __syncwarp();
        for (int ii = 0; ii < AB_QT / 2; ++ii) {
            const int i = spread(ii, r, AB_QT / 2, half);
            const float p = i < queries ? expf(st[r * lds + i] * scale - lse_t[i]) : 0.0f;
            pt[r * ldp + i] = __float2bfloat16_rn(p);
            dst_t[r * ldp + i] = __float2bfloat16_rn(p * (dpt[r * lds + i] - delta_t[i]));
        }
        __syncwarp();
        // dv += P^T dO, dk += dS^T Q (Q and dO row-major now: [query][channel] is (k, n)).
        mma_accumulate(dvs + 16 * warp * ldo, ldo, pt + 16 * warp * ldp, ldp, dos, ldt, AB_QT, c);
        mma_accumulate(dks + 16 * warp * ldo, ldo, dst_t + 16 * warp * ldp, ldp, qs, ldt, AB_QT, c);
        __syncwarp();
    }
    if (r >= keys) return;
    float* dst = dqkv + (img + k0 + r) * row;
    for (int ch = half * (c / 2); ch < (half + 1) * (c / 2); ++ch) {
        dst[c + ch] = dks[r * ldo + ch] * scale;
        dst[2 * c + ch] = dvs[r * ldo + ch];
    }
}

// The entry points: qkv in fp32, and (_bf16in) in bf16 (the projection's output stored so in bf16
// precision, Backend::stores_bf16_activations); the same arguments otherwise.
extern "C" __global__ void __launch_bounds__(128)
    attention_backward_dq_bf16(const float* __restrict__ qkv, const float* __restrict__ out,
                               const float* __restrict__ lse, const float* __restrict__ dout,
                               float* __restrict__ dqkv, float* __restrict__ delta, int l, int c) {
    attention_backward_dq_tc(qkv, out, lse, dout, dqkv, delta, l, c);
}

extern "C" __global__ void __launch_bounds__(64)
    attention_backward_dkv_bf16(const float* __restrict__ qkv, const float* __restrict__ lse,
                                const float* __restrict__ dout, const float* __restrict__ delta,
                                float* __restrict__ dqkv, int l, int c) {
    attention_backward_dkv_tc(qkv, lse, dout, delta, dqkv, l, c);
}

extern "C" __global__ void __launch_bounds__(128)
    attention_backward_dq_bf16_bf16in(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ out,
                               const float* __restrict__ lse, const float* __restrict__ dout,
                               float* __restrict__ dqkv, float* __restrict__ delta, int l, int c) {
    attention_backward_dq_tc(qkv, out, lse, dout, dqkv, delta, l, c);
}

extern "C" __global__ void __launch_bounds__(64)
    attention_backward_dkv_bf16_bf16in(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ lse,
                                const float* __restrict__ dout, const float* __restrict__ delta,
                                float* __restrict__ dqkv, int l, int c) {
    attention_backward_dkv_tc(qkv, lse, dout, delta, dqkv, l, c);
}

// _bf16io: qkv and out both stored in bf16, as in attention.cu; dkv's _bf16in twin serves it.
extern "C" __global__ void __launch_bounds__(128)
    attention_backward_dq_bf16_bf16io(const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ out,
                                      const float* __restrict__ lse, const float* __restrict__ dout,
                                      float* __restrict__ dqkv, float* __restrict__ delta, int l, int c) {
    attention_backward_dq_tc(qkv, out, lse, dout, dqkv, delta, l, c);
}

// attention_mma.cu: the bf16 attention forward on mma.sync with its accumulators in registers (version 3
// of attention: version 1 is attention.cu's fp32 kernels, version 2 attention_tc.cu's WMMA kernels, whose
// backward still runs; this forward replaces version 2's).
//   attention_forward_bf16{,_bf16in,_bf16io}   out = softmax(q k^T / sqrt(c)) v and lse = the rows'
//                                              log-sum-exp, qkv in fp32 or bf16, out in fp32 or bf16 (_io)
//
// Flash-style (Dao 2023, FlashAttention-2): a block of 8 warps owns 128 queries of one image, 16 a warp, and
// streams the keys and values through shared memory 32 at a time, double-buffered (cp.async, a block ahead,
// where qkv is bf16). Per key block each warp
//   1. S = Q K^T: its 16 x 32 scores in registers (4 n8 tiles; Q's fragments by ldmatrix from the staged
//      queries, K's by ldmatrix from the block's [key][channel] rows, which are K^T column-major);
//   2. the online softmax in registers (in the base-2 domain: the scale times log2 e folded in, one MUFU.EX2
//      a score): each thread holds two rows' 8 scores, the row maximum and sum reduced over the 4 lanes of a
//      quad by shuffles, the output rescaled by exp2(m_old - m_new);
//   3. O += P V: P's fragments are the score registers rounded to bf16 pairs (the accumulator layout of S is
//      the A layout of the next mma), V's by ldmatrix.trans; O (16 x c fp32) stays in registers, c / 8 n8
//      tiles of 4 a thread.
// At the end each row is divided by its sum; lse = (m + log2 sum) ln 2 (natural units, what the backward
// kernels read).
//
// Shared memory: Q 128 x (c + 8) and K, V 2 x 2 x 32 x (c + 8) bf16 (rows padded by 16 bytes, so no
// ldmatrix phase has a bank conflict): 256 (c + 8) x 2 bytes, 132 KiB at c = 256 (the A100's 163 KiB
// holds it; one block, 8 warps, an SM). Registers: O c / 2 fp32 a thread (128 at c = 256). Launch: block
// 256, grid (ceil(l / 128), n); c a multiple of 16, at most 256.
// Per key block and warp: 8 c / 16 + ... mma.sync (4 c / 16 for S, 2 c / 8 for P V), c / 16 + c / 16 + 2 c /
// 16 ldmatrix.x4, 16 MUFU: the tensor pipe's work with the shared-memory reads of K and V by each warp, the
// bound the design aims at (scripts/sass-model).
#include "gemm_mma.cuh"

namespace {
constexpr int AM_WARPS = 8;
constexpr int AM_Q = 16 * AM_WARPS;  // queries per block
constexpr int AM_KV = 32;            // keys per block of the stream
constexpr int AM_C = 256;            // the widest c

// The runs of 8 channels a thread stages: one channel run `ch` of rows first, first + step, ... (the
// block's threads cover c / 8 runs by 256 / (c / 8) rows a pass), decided once.
struct Share {
    int ch, first, step;
};

// `rows` rows of c channels of part `part` (0 q, 1 k, 2 v) of qkv from position `pos0` (rows past `valid`
// zero) into shared rows of stride ldt: cp.async for 16-byte runs of a bf16 source (ALIGNED: its base and
// c make every run 16-byte aligned; the caller commits and waits), the registers otherwise (a fp32
// source rounded to bf16, as the other bf16 kernels round it, or an unaligned bf16 one).
template <class T, bool ALIGNED>
__device__ __forceinline__ void stage(__nv_bfloat16* dst, int ldt, const T* src, int pos0, int rows, int valid,
                                      int part, int c, Share sh) {
    const int64_t row = 3 * int64_t(c);
    for (int r = sh.first; r < rows; r += sh.step) {
        uint4* to = reinterpret_cast<uint4*>(dst + r * ldt + sh.ch);
        if (r >= valid) {
            *to = make_uint4(0, 0, 0, 0);
            continue;
        }
        const T* from = src + (int64_t(pos0 + r)) * row + part * c + sh.ch;
        if constexpr (ALIGNED) {
            ddpm::cp_async16(to, from);
        } else if constexpr (ddpm::Storage<T>::packed) {
            uint4 v;
            ddpm::load_run8(from, 8, v);
            *to = v;
        } else {
            float v[8];
            ddpm::load_run8(from, 8, v);
            *to = make_uint4(ddpm::pack_bf16x2(v[0], v[1]), ddpm::pack_bf16x2(v[2], v[3]),
                             ddpm::pack_bf16x2(v[4], v[5]), ddpm::pack_bf16x2(v[6], v[7]));
        }
    }
}

// Writes the pair (v0, v1) of an output row at channel ch: fp32, or bf16 in one 4-byte store.
__device__ __forceinline__ void store_pair(float* p, float v0, float v1) {
    *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float v0, float v1) {
    *reinterpret_cast<uint32_t*>(p) = ddpm::pack_bf16x2(v0, v1);
}
}  // namespace

template <class T, class O, bool ALIGNED>
__device__ __forceinline__ void attention_forward_body(const T* __restrict__ qkv, O* __restrict__ out,
                                                       float* __restrict__ lse, int l, int c) {
    extern __shared__ float smem[];
    const int ldt = c + 8;
    __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem);
    __nv_bfloat16* kv = qs + AM_Q * ldt;  // [buffer][k, v][key][channel]
    const auto ks = [&](int b) { return kv + (2 * b) * AM_KV * ldt; };
    const auto vs = [&](int b) { return kv + (2 * b + 1) * AM_KV * ldt; };

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int q = lane / 8, rr = lane % 8;  // the matrix and row an ldmatrix lane addresses
    const int image = blockIdx.y, q0 = blockIdx.x * AM_Q;
    const T* src = qkv + int64_t(image) * l * 3 * c;
    const float sl2 = ddpm::attention_scale(c) * 1.4426950408889634f;  // scale x log2 e
    const int blocks = (l + AM_KV - 1) / AM_KV;
    const int runs = c / 8;
    const int step = int(blockDim.x) / runs, tid = int(threadIdx.x);
    const Share sh{8 * (tid % runs), tid < runs * step ? tid / runs : AM_Q, step};  // the rest idle

    stage<T, ALIGNED>(qs, ldt, src, q0, AM_Q, min(AM_Q, l - q0), 0, c, sh);
    stage<T, ALIGNED>(ks(0), ldt, src, 0, AM_KV, min(AM_KV, l), 1, c, sh);
    stage<T, ALIGNED>(vs(0), ldt, src, 0, AM_KV, min(AM_KV, l), 2, c, sh);
    ddpm::cp_async_commit();

    float o[AM_C / 8][4];
#pragma unroll
    for (int j = 0; j < AM_C / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, sum[2] = {0.0f, 0.0f};  // rows g and g + 8 of the warp's 16
    const __nv_bfloat16* qw = qs + 16 * warp * ldt;

    for (int jb = 0; jb < blocks; ++jb) {
        const int b = jb & 1, j0 = jb * AM_KV;
        if (jb + 1 < blocks) {  // the next block into the other buffer, read last in block jb - 1
            const int j1 = j0 + AM_KV;
            stage<T, ALIGNED>(ks(b ^ 1), ldt, src, j1, AM_KV, min(AM_KV, l - j1), 1, c, sh);
            stage<T, ALIGNED>(vs(b ^ 1), ldt, src, j1, AM_KV, min(AM_KV, l - j1), 2, c, sh);
            ddpm::cp_async_commit();
            ddpm::cp_async_wait<1>();
        } else {
            ddpm::cp_async_wait<0>();
        }
        __syncthreads();

        // 1. S = Q K^T: 4 tiles of 16 x 8 keys.
        float s[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
        const __nv_bfloat16* kb = ks(b);
        for (int kk = 0; kk < c; kk += 16) {
            uint32_t a[4], kf[2][4];
            ddpm::ldmatrix_x4(a, qw + (8 * (q % 2) + rr) * ldt + kk + 8 * (q / 2));
#pragma unroll
            for (int n = 0; n < 2; ++n)  // keys 16 n .. 16 n + 15 ([key][channel]: K^T column-major)
                ddpm::ldmatrix_x4(kf[n], kb + (16 * n + 8 * (q / 2) + rr) * ldt + kk + 8 * (q % 2));
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t bj[2] = {kf[j / 2][2 * (j % 2)], kf[j / 2][2 * (j % 2) + 1]};
                ddpm::mma_bf16_16816(s[j], a, bj);
            }
        }

        // 2. The online softmax of rows g (h = 0) and g + 8 (h = 1), keys past the end masked.
        float corr[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int x = 0; x < 2; ++x) {
                    const int key = j0 + 8 * j + 2 * t + x;
                    s[j][2 * h + x] = key < l ? s[j][2 * h + x] * sl2 : -INFINITY;
                    mx = fmaxf(mx, s[j][2 * h + x]);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[h], mx);  // finite: every block holds a key
            corr[h] = exp2f(m[h] - m_new);
            float part = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int x = 0; x < 2; ++x) {
                    const float p = exp2f(s[j][2 * h + x] - m_new);
                    s[j][2 * h + x] = p;
                    part += p;
                }
            part += __shfl_xor_sync(0xffffffffu, part, 1);
            part += __shfl_xor_sync(0xffffffffu, part, 2);
            sum[h] = sum[h] * corr[h] + part;
            m[h] = m_new;
        }
#pragma unroll
        for (int j = 0; j < AM_C / 8; ++j) {
            o[j][0] *= corr[0], o[j][1] *= corr[0];
            o[j][2] *= corr[1], o[j][3] *= corr[1];
        }

        // 3. O += P V: P's fragments from the score registers, V's by ldmatrix.trans of [key][channel].
        const __nv_bfloat16* vb = vs(b);
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            const uint32_t a[4] = {ddpm::pack_bf16x2(s[2 * kk][0], s[2 * kk][1]),
                                   ddpm::pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                                   ddpm::pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   ddpm::pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int n = 0; n < AM_C / 16; ++n) {
                if (16 * n >= c) break;
                uint32_t vf[4];
                ddpm::ldmatrix_x4_trans(vf, vb + (16 * kk + 8 * (q % 2) + rr) * ldt + 16 * n + 8 * (q / 2));
                const uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
                ddpm::mma_bf16_16816(o[2 * n], a, b0);
                ddpm::mma_bf16_16816(o[2 * n + 1], a, b1);
            }
        }
        __syncthreads();  // every warp is done with this buffer before the next block's copies into it
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = q0 + 16 * warp + g + 8 * h;
        if (r >= l) continue;
        const float inv = 1.0f / sum[h];
        O* dst = out + (int64_t(image) * l + r) * c + 2 * t;
#pragma unroll
        for (int j = 0; j < AM_C / 8; ++j)
            if (8 * j < c) store_pair(dst + 8 * j, o[j][2 * h] * inv, o[j][2 * h + 1] * inv);
        if (t == 0) lse[int64_t(image) * l + r] = (m[h] + log2f(sum[h])) * 0.6931471805599453f;
    }
}

// The body for qkv's storage: copied by cp.async where it is bf16 and every run is 16-byte aligned.
template <class T, class O>
__device__ __forceinline__ void attention_forward_mma(const T* __restrict__ qkv, O* __restrict__ out,
                                                      float* __restrict__ lse, int l, int c) {
    if constexpr (ddpm::Storage<T>::packed) {
        if ((reinterpret_cast<uintptr_t>(qkv) & 15) == 0 && c % 8 == 0)
            return attention_forward_body<T, O, true>(qkv, out, lse, l, c);
    }
    attention_forward_body<T, O, false>(qkv, out, lse, l, c);
}

extern "C" __global__ void __launch_bounds__(32 * AM_WARPS, 1)
    attention_forward_bf16(const float* __restrict__ qkv, float* __restrict__ out, float* __restrict__ lse, int l,
                           int c) {
    attention_forward_mma(qkv, out, lse, l, c);
}

extern "C" __global__ void __launch_bounds__(32 * AM_WARPS, 1)
    attention_forward_bf16_bf16in(const __nv_bfloat16* __restrict__ qkv, float* __restrict__ out,
                                  float* __restrict__ lse, int l, int c) {
    attention_forward_mma(qkv, out, lse, l, c);
}

extern "C" __global__ void __launch_bounds__(32 * AM_WARPS, 1)
    attention_forward_bf16_bf16io(const __nv_bfloat16* __restrict__ qkv, __nv_bfloat16* __restrict__ out,
                                  float* __restrict__ lse, int l, int c) {
    attention_forward_mma(qkv, out, lse, l, c);
}

// attention.cu: single-head self-attention over the h*w positions of each image (version 1, fp32),
// flash-style: the l x l score matrix is never stored, only one tile of keys (or queries) at a time.
//   attention_forward_f32        out = softmax(q k^T / sqrt(c)) v, and lse = the log-sum-exp of each row
//   attention_backward_dq_f32    dq, and delta_i = dout_i . out_i (for the next kernel)
//   attention_backward_dkv_f32   dk and dv
//   attention_*_f32_bf16in       the same with qkv stored in bf16 (the projection's output in bf16
//                                precision, Backend::stores_bf16_activations), widened as it is read
//   attention_{forward,backward_dq}_f32_bf16io
//                                and with out stored in bf16 too (rounded as written, widened as read)
//
// Shapes: qkv [n, l, 3c] (q, k, v side by side per position, as the fused projection writes them);
// out, dout [n, l, c]; lse, delta [n, l]; dqkv [n, l, 3c] (the dq kernel writes the q third, the dkv
// kernel the k and v thirds: together they overwrite all of it).
//
// Launch: block 256 = 8 warps, grid (ceil(l / 8), n). Each warp owns one query (forward, dq) or one key
// (dkv); the block stages 8 keys (or queries) at a time in shared memory, coalesced, and every warp
// consumes the tile: a dot product over c (lanes on consecutive channels, a warp sum), then an online
// softmax update (forward) or the gradient terms, each lane updating its own channels of the warp's
// accumulator in shared memory. Dynamic shared memory: forward 32 c floats, dq 40 c, dkv 48 c + 16
// (c = 256: 32, 40 and 48 KB); the backend opts in to the device's maximum at load.
// Backward math (P = softmax(S), S = q k^T / sqrt(c)): dP_ij = dout_i . v_j, dS_ij = P_ij (dP_ij - delta_i),
// dq_i = sum_j dS_ij k_j / sqrt(c), dk_j = sum_i dS_ij q_i / sqrt(c), dv_j = sum_i P_ij dout_i, with P
// rebuilt from lse. FLOPs: forward 4 n l^2 c, backward 10 n l^2 c (the scores are recomputed twice).
#include "common.cuh"

namespace {
constexpr int ATT_WARPS = 8;
constexpr int ATT_TILE = 8;


// sum_ch a[ch] b[ch] over the warp's lanes; every lane gets the result.
__device__ __forceinline__ float warp_dot(const float* a, const float* b, int c, int lane) {
    float s = 0.0f;
    for (int ch = lane; ch < c; ch += 32) s = fmaf(a[ch], b[ch], s);
    return ddpm::warp_sum(s);
}
}  // namespace

// The three kernels over qkv stored as T: float, or bf16 (the projection's output stored so in bf16
// precision, Backend::stores_bf16_activations), widened as it is read.
template <class T, class O = float>
__device__ __forceinline__ void attention_forward(const T* __restrict__ qkv, O* __restrict__ out,
                                                  float* __restrict__ lse, int l, int c) {
    extern __shared__ float smem[];
    float* ks = smem;                       // [ATT_TILE][c]
    float* vs = ks + ATT_TILE * c;          // [ATT_TILE][c]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* q = vs + ATT_TILE * c + warp * c;             // [c], this warp's query
    float* o = vs + (ATT_TILE + ATT_WARPS) * c + warp * c;  // [c], its unnormalised output
    const int image = blockIdx.y, i = blockIdx.x * ATT_WARPS + warp;
    const bool active = i < l;
    const int64_t row = 3 * int64_t(c);
    const T* base = qkv + int64_t(image) * l * row;
    const float scale = ddpm::attention_scale(c);
    if (active)
        for (int ch = lane; ch < c; ch += 32) q[ch] = ddpm::to_f32(base[i * row + ch]), o[ch] = 0.0f;
    float m = -INFINITY, sum = 0.0f;
    for (int j0 = 0; j0 < l; j0 += ATT_TILE) {
        const int tile = min(ATT_TILE, l - j0);
        __syncthreads();  // every warp is done with the previous tile
        for (int e = threadIdx.x; e < tile * c; e += blockDim.x) {
            const T* src = base + (j0 + e / c) * row + e % c;
            ks[e] = ddpm::to_f32(src[c]);
            vs[e] = ddpm::to_f32(src[2 * c]);
        }
        __syncthreads();
        if (!active) continue;
        for (int jj = 0; jj < tile; ++jj) {
            const float s = warp_dot(q, ks + jj * c, c, lane) * scale;
            const float m_new = fmaxf(m, s);
            const float corr = expf(m - m_new), p = expf(s - m_new);
            sum = sum * corr + p;
            for (int ch = lane; ch < c; ch += 32) o[ch] = o[ch] * corr + p * vs[jj * c + ch];
            m = m_new;
        }
    }
    if (!active) return;
    const float inv = 1.0f / sum;
    O* dst = out + (int64_t(image) * l + i) * c;
    for (int ch = lane; ch < c; ch += 32) ddpm::store_f32(dst + ch, o[ch] * inv);
    if (lane == 0) lse[int64_t(image) * l + i] = m + logf(sum);
}

template <class T, class O = float>
__device__ __forceinline__ void attention_backward_dq(const T* __restrict__ qkv, const O* __restrict__ out,
                                                      const float* __restrict__ lse, const float* __restrict__ dout,
                                                      float* __restrict__ dqkv, float* __restrict__ delta, int l,
                                                      int c) {
    extern __shared__ float smem[];
    float* ks = smem;
    float* vs = ks + ATT_TILE * c;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* q = vs + ATT_TILE * c + warp * c;
    float* dO = vs + (ATT_TILE + ATT_WARPS) * c + warp * c;
    float* dq = vs + (ATT_TILE + 2 * ATT_WARPS) * c + warp * c;
    const int image = blockIdx.y, i = blockIdx.x * ATT_WARPS + warp;
    const bool active = i < l;
    const int64_t row = 3 * int64_t(c), pos = int64_t(image) * l + i;
    const T* base = qkv + int64_t(image) * l * row;
    const float scale = ddpm::attention_scale(c);
    float d_i = 0.0f, lse_i = 0.0f;
    if (active) {
        float s = 0.0f;
        for (int ch = lane; ch < c; ch += 32) {
            q[ch] = ddpm::to_f32(base[i * row + ch]);
            dO[ch] = dout[pos * c + ch];
            dq[ch] = 0.0f;
            s = fmaf(dO[ch], ddpm::to_f32(out[pos * c + ch]), s);
        }
        d_i = ddpm::warp_sum(s);
        lse_i = lse[pos];
        if (lane == 0) delta[pos] = d_i;
    }
    for (int j0 = 0; j0 < l; j0 += ATT_TILE) {
        const int tile = min(ATT_TILE, l - j0);
        __syncthreads();
        for (int e = threadIdx.x; e < tile * c; e += blockDim.x) {
            const T* src = base + (j0 + e / c) * row + e % c;
            ks[e] = ddpm::to_f32(src[c]);
            vs[e] = ddpm::to_f32(src[2 * c]);
        }
        __syncthreads();
        if (!active) continue;
        for (int jj = 0; jj < tile; ++jj) {
            const float p = expf(warp_dot(q, ks + jj * c, c, lane) * scale - lse_i);
            const float ds = p * (warp_dot(dO, vs + jj * c, c, lane) - d_i);
            for (int ch = lane; ch < c; ch += 32) dq[ch] = fmaf(ds, ks[jj * c + ch], dq[ch]);
        }
    }
    if (!active) return;
    float* dst = dqkv + pos * row;
    for (int ch = lane; ch < c; ch += 32) dst[ch] = dq[ch] * scale;
}

template <class T>
__device__ __forceinline__ void attention_backward_dkv(const T* __restrict__ qkv, const float* __restrict__ lse,
                                                       const float* __restrict__ dout,
                                                       const float* __restrict__ delta, float* __restrict__ dqkv,
                                                       int l, int c) {
    extern __shared__ float smem[];
    float* qs = smem;                    // [ATT_TILE][c] queries of the tile
    float* dos = qs + ATT_TILE * c;      // [ATT_TILE][c] their output gradients
    float* lse_t = dos + ATT_TILE * c;   // [ATT_TILE]
    float* delta_t = lse_t + ATT_TILE;   // [ATT_TILE]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* own = delta_t + ATT_TILE;
    float* k = own + warp * c;
    float* v = own + (ATT_WARPS + warp) * c;
    float* dk = own + (2 * ATT_WARPS + warp) * c;
    float* dv = own + (3 * ATT_WARPS + warp) * c;
    const int image = blockIdx.y, j = blockIdx.x * ATT_WARPS + warp;
    const bool active = j < l;
    const int64_t row = 3 * int64_t(c), img = int64_t(image) * l;
    const T* base = qkv + img * row;
    const float scale = ddpm::attention_scale(c);
    if (active)
        for (int ch = lane; ch < c; ch += 32) {
            k[ch] = ddpm::to_f32(base[j * row + c + ch]);
            v[ch] = ddpm::to_f32(base[j * row + 2 * c + ch]);
            dk[ch] = 0.0f;
            dv[ch] = 0.0f;
        }
    for (int i0 = 0; i0 < l; i0 += ATT_TILE) {
        const int tile = min(ATT_TILE, l - i0);
        __syncthreads();
        for (int e = threadIdx.x; e < tile * c; e += blockDim.x) {
            const int ii = e / c, ch = e % c;
            qs[e] = ddpm::to_f32(base[(i0 + ii) * row + ch]);
            dos[e] = dout[(img + i0 + ii) * c + ch];
        }
        if (threadIdx.x < tile) {
            lse_t[threadIdx.x] = lse[img + i0 + threadIdx.x];
            delta_t[threadIdx.x] = delta[img + i0 + threadIdx.x];
        }
        __syncthreads();
        if (!active) continue;
        for (int ii = 0; ii < tile; ++ii) {
            const float* qi = qs + ii * c;
            const float* doi = dos + ii * c;
            const float p = expf(warp_dot(qi, k, c, lane) * scale - lse_t[ii]);
            const float ds = p * (warp_dot(doi, v, c, lane) - delta_t[ii]);
            for (int ch = lane; ch < c; ch += 32) {
                dv[ch] = fmaf(p, doi[ch], dv[ch]);
                dk[ch] = fmaf(ds, qi[ch], dk[ch]);
            }
        }
    }
    if (!active) return;
    float* dst = dqkv + (img + j) * row;
    for (int ch = lane; ch < c; ch += 32) {
        dst[c + ch] = dk[ch] * scale;
        dst[2 * c + ch] = dv[ch];
    }
}

// The entry points: qkv in fp32, and (_bf16in) in bf16; the same arguments otherwise.
extern "C" __global__ void __launch_bounds__(256)
    attention_forward_f32(const float* __restrict__ qkv, float* __restrict__ out, float* __restrict__ lse,
                          int l, int c) {
    attention_forward(qkv, out, lse, l, c);
}

extern "C" __global__ void __launch_bounds__(256)
    attention_backward_dq_f32(const float* __restrict__ qkv, const float* __restrict__ out,
                              const float* __restrict__ lse, const float* __restrict__ dout,
                              float* __restrict__ dqkv, float* __restrict__ delta, int l, int c) {
    attention_backward_dq(qkv, out, lse, dout, dqkv, delta, l, c);
}

extern "C" __global__ void __launch_bounds__(256)
    attention_backward_dkv_f32(const float* __restrict__ qkv, const float* __restrict__ lse,
                               const float* __restrict__ dout, const float* __restrict__ delta,
                               float* __restrict__ dqkv, int l, int c) {
    attention_backward_dkv(qkv, lse, dout, delta, dqkv, l, c);
}

extern "C" __global__ void __launch_bounds__(256)
    attention_forward_f32_bf16in(const __nv_bfloat16* __restrict__ qkv, float* __restrict__ out,
                                 float* __restrict__ lse, int l, int c) {
    attention_forward(qkv, out, lse, l, c);
}

extern "C" __global__ void __launch_bounds__(256)
    attention_backward_dq_f32_bf16in(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ out,
                              const float* __restrict__ lse, const float* __restrict__ dout,
                              float* __restrict__ dqkv, float* __restrict__ delta, int l, int c) {
    attention_backward_dq(qkv, out, lse, dout, dqkv, delta, l, c);
}

extern "C" __global__ void __launch_bounds__(256)
    attention_backward_dkv_f32_bf16in(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ lse,
                               const float* __restrict__ dout, const float* __restrict__ delta,
                               float* __restrict__ dqkv, int l, int c) {
    attention_backward_dkv(qkv, lse, dout, delta, dqkv, l, c);
}

// _bf16io: qkv and out both stored in bf16 (the attention output stored so, as the projection after it
// reads it): the forward rounds out as it writes it, dq widens it as it reads it (delta = dout . out from
// the stored, rounded out, the output the projection saw). dkv does not read out: its _bf16in twin serves.
extern "C" __global__ void __launch_bounds__(256)
    attention_forward_f32_bf16io(const __nv_bfloat16* __restrict__ qkv, __nv_bfloat16* __restrict__ out,
                                 float* __restrict__ lse, int l, int c) {
    attention_forward(qkv, out, lse, l, c);
}

extern "C" __global__ void __launch_bounds__(256)
    attention_backward_dq_f32_bf16io(const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ out,
                                     const float* __restrict__ lse, const float* __restrict__ dout,
                                     float* __restrict__ dqkv, float* __restrict__ delta, int l, int c) {
    attention_backward_dq(qkv, out, lse, dout, dqkv, delta, l, c);
}

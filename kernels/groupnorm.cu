// groupnorm.cu: group normalisation over NHWC activations, optionally fused with SiLU (version 2, fp32).
//   group_norm_forward_f32     y = GN(x) gamma + beta (then SiLU); saves mean and 1/std per (image, group)
//                              (y null: the statistics only, for a convolution that normalises its input
//                              as it loads it: conv2d_*_normed_* in conv.cu)
//   group_norm_backward_f32    dx (+)= the input gradient; per-image partial sums of dgamma and dbeta
//   group_norm_params_finish_f32   dgamma, dbeta = the partial sums added over images, in order
//   group_norm_{forward,backward}_bf16in
//                              the same with x stored in bf16 (an activation stored so, written by a
//                              conv2d_forward*_bf16_io kernel), widened to fp32 as it is read
//
// Shapes: x, y, dy, dx [n, hw, c]; gamma, beta [c]; mean, rstd [n, groups]; channels c = groups * cpg,
// group g holding channels g cpg .. (g + 1) cpg - 1 of every position.
// Launch: one block of 256 threads per (image, group): grid (groups, n). A group is hw * cpg values
// (16x16 and 8 channels in the paper's model: 2048).
//
// Passes over the group (version 1 read x three times forward and 2 + cpg times backward):
//   forward    one pass for the statistics (Welford's running mean and sum of squared deviations per
//              thread, merged across the block), one more for y when it is wanted;
//   backward   two: the first sums dn, dn xhat and, per channel, dz xhat and dz (the dgamma and dbeta
//              partials); the second writes dx.
// Each thread keeps to one channel: the block walks the group in steps of `stride`, the largest multiple
// of cpg up to 256, so element e of a thread is always channel (threadIdx.x % cpg); the threads past
// `stride` (256 % cpg of them) only join the reductions. A group of more than 256 channels (no such
// model is built here) sums its dgamma and dbeta partials one channel at a time, as version 1 did.
// Statistics in fp32 (the CPU twin accumulates two passes in fp64; they agree to ~1e-6 relative for groups
// of this size). Every sum has a fixed order, so results are reproducible run to run.
#include "common.cuh"
#include "gemm.cuh"
#include "mma_sync.cuh"

__device__ __forceinline__ int64_t gn_index(int64_t image_base, int e, int cpg, int c, int g) {
    const int p = e / cpg, ch = g * cpg + e % cpg;
    return image_base + int64_t(p) * c + ch;
}

// The step between a thread's elements: the largest multiple of cpg that is at most the block size (the
// block size itself when cpg is larger).
__device__ __forceinline__ int gn_stride(int cpg) {
    return cpg <= int(blockDim.x) ? int(blockDim.x) - int(blockDim.x) % cpg : int(blockDim.x);
}

// Welford's count, mean and sum of squared deviations of a part of the group.
struct Moments {
    float n, mean, m2;
};

__device__ __forceinline__ void moments_push(Moments& a, float x) {
    a.n += 1.0f;
    const float d = x - a.mean;
    a.mean += d / a.n;
    a.m2 += d * (x - a.mean);
}

// The moments of the union of two disjoint parts (Chan et al.). Not symmetric to the last bit (merge(a, b)
// and merge(b, a) can round apart, more so where the compiler contracts into FMAs), so the lanes of a
// butterfly can end a bit apart: moments_block hands every thread one lane's result.
__device__ __forceinline__ Moments moments_merge(Moments a, Moments b) {
    if (a.n == 0.0f) return b;
    if (b.n == 0.0f) return a;
    const float n = a.n + b.n, d = b.mean - a.mean, w = b.n / n;
    return {n, a.mean + d * w, a.m2 + b.m2 + d * d * a.n * w};
}

__device__ __forceinline__ Moments moments_warp(Moments v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const Moments o = {__shfl_xor_sync(0xffffffffu, v.n, offset), __shfl_xor_sync(0xffffffffu, v.mean, offset),
                           __shfl_xor_sync(0xffffffffu, v.m2, offset)};
        v = moments_merge(v, o);
    }
    return v;
}

// The moments over the block, the same bits in every thread: each warp's merged, the warps' merged by warp
// 0, and lane 0's result read by all (block size a multiple of 32, at most 1024; `scratch` holds 33).
// Called once per kernel: a second call would need a barrier first, as ddpm::block_sum has.
__device__ __forceinline__ Moments moments_block(Moments v, Moments* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = moments_warp(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = moments_warp(lane < warps ? scratch[lane] : Moments{0.0f, 0.0f, 0.0f});
        if (lane == 0) scratch[32] = v;
    }
    __syncthreads();
    return scratch[32];
}

template <class X>
__device__ __forceinline__ void group_norm_forward(const X* __restrict__ x, const float* __restrict__ gamma,
                                                   const float* __restrict__ beta, float* __restrict__ y,
                                                   float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                                   int hw, int c, int groups, float eps, int silu) {
    __shared__ Moments scratch[33];
    const int g = blockIdx.x, image = blockIdx.y, cpg = c / groups;
    const int count = hw * cpg, stride = gn_stride(cpg);
    const int64_t base = int64_t(image) * hw * c;
    Moments own = {0.0f, 0.0f, 0.0f};
    if (int(threadIdx.x) < stride)
        for (int e = threadIdx.x; e < count; e += stride)
            moments_push(own, ddpm::to_f32(x[gn_index(base, e, cpg, c, g)]));
    const Moments all = moments_block(own, scratch);
    const float mean = all.mean, rstd = 1.0f / sqrtf(all.m2 / float(count) + eps);
    if (threadIdx.x == 0) {
        mean_out[image * groups + g] = mean;
        rstd_out[image * groups + g] = rstd;
    }
    if (y == nullptr || int(threadIdx.x) >= stride) return;
    for (int e = threadIdx.x; e < count; e += stride) {
        const int64_t i = gn_index(base, e, cpg, c, g);
        const int ch = g * cpg + e % cpg;
        const float z = (ddpm::to_f32(x[i]) - mean) * rstd * gamma[ch] + beta[ch];
        y[i] = silu ? z * ddpm::sigmoid(z) : z;
    }
}

extern "C" __global__ void __launch_bounds__(256)
    group_norm_forward_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                           const float* __restrict__ beta, float* __restrict__ y, float* __restrict__ mean_out,
                           float* __restrict__ rstd_out, int hw, int c, int groups, float eps, int silu) {
    group_norm_forward(x, gamma, beta, y, mean_out, rstd_out, hw, c, groups, eps, silu);
}

// x stored in bf16 (Backend::stores_bf16_activations); y still fp32.
extern "C" __global__ void __launch_bounds__(256)
    group_norm_forward_bf16in(const __nv_bfloat16* __restrict__ x, const float* __restrict__ gamma,
                              const float* __restrict__ beta, float* __restrict__ y, float* __restrict__ mean_out,
                              float* __restrict__ rstd_out, int hw, int c, int groups, float eps, int silu) {
    group_norm_forward(x, gamma, beta, y, mean_out, rstd_out, hw, c, groups, eps, silu);
}

// The gradient through SiLU (when fused) and the affine part, at element i of channel ch.
template <class X>
__device__ __forceinline__ float gn_dz(const X* x, const float* dy, const float* gamma, const float* beta,
                                       int64_t i, int ch, float mean, float rstd, int silu, float* xhat_out) {
    const float xhat = (ddpm::to_f32(x[i]) - mean) * rstd;
    float d = dy[i];
    if (silu) d *= ddpm::silu_grad(xhat * gamma[ch] + beta[ch]);
    *xhat_out = xhat;
    return d;
}

// dx = rstd (dn - mean(dn) - xhat mean(dn xhat)) with dn = dz gamma, means over the group;
// partial[image, ch] of dgamma (sum of dz xhat) and dbeta (sum of dz), each channel's threads added in
// thread order so the sums are reproducible. `dgamma_part` and `dbeta_part` are [n, c].
template <class X>
__device__ __forceinline__ void group_norm_backward(const X* __restrict__ x, const float* __restrict__ gamma,
                                                    const float* __restrict__ beta,
                                                    const float* __restrict__ mean_in,
                                                    const float* __restrict__ rstd_in, const float* __restrict__ dy,
                                                    float* __restrict__ dx, float* __restrict__ dgamma_part,
                                                    float* __restrict__ dbeta_part, int hw, int c, int groups,
                                                    int silu, int accumulate) {
    __shared__ float scratch[32];
    __shared__ float part_g[256], part_b[256];
    const int g = blockIdx.x, image = blockIdx.y, cpg = c / groups;
    const int count = hw * cpg, stride = gn_stride(cpg);
    const bool active = int(threadIdx.x) < stride;
    const int64_t base = int64_t(image) * hw * c;
    const float mean = mean_in[image * groups + g], rstd = rstd_in[image * groups + g];
    const int ch_own = g * cpg + int(threadIdx.x) % cpg;  // this thread's channel, when cpg <= stride
    float sum_dn = 0.0f, sum_dn_xhat = 0.0f, sg = 0.0f, sb = 0.0f;
    if (active)
        for (int e = threadIdx.x; e < count; e += stride) {
            const int64_t i = gn_index(base, e, cpg, c, g);
            const int ch = g * cpg + e % cpg;
            float xhat;
            const float dz = gn_dz(x, dy, gamma, beta, i, ch, mean, rstd, silu, &xhat);
            const float dn = dz * gamma[ch];
            sum_dn += dn;
            sum_dn_xhat += dn * xhat;
            sg += dz * xhat;
            sb += dz;
        }
    const float mean_dn = ddpm::block_sum(sum_dn, scratch) / float(count);
    const float mean_dn_xhat = ddpm::block_sum(sum_dn_xhat, scratch) / float(count);
    if (active)
        for (int e = threadIdx.x; e < count; e += stride) {
            const int64_t i = gn_index(base, e, cpg, c, g);
            const int ch = g * cpg + e % cpg;
            float xhat;
            const float dn = gn_dz(x, dy, gamma, beta, i, ch, mean, rstd, silu, &xhat) * gamma[ch];
            const float v = rstd * (dn - mean_dn - xhat * mean_dn_xhat);
            dx[i] = accumulate ? dx[i] + v : v;
        }
    if (cpg <= stride) {
        // Thread t summed channel t % cpg: channel j's partials are those of threads j, j + cpg, ...
        part_g[threadIdx.x] = sg;
        part_b[threadIdx.x] = sb;
        __syncthreads();
        if (int(threadIdx.x) < cpg) {
            float tg = 0.0f, tb = 0.0f;
            for (int t = threadIdx.x; t < stride; t += cpg) {
                tg += part_g[t];
                tb += part_b[t];
            }
            dgamma_part[int64_t(image) * c + ch_own] = tg;
            dbeta_part[int64_t(image) * c + ch_own] = tb;
        }
        return;
    }
    // More channels than threads: one channel at a time, every thread over the positions.
    for (int j = 0; j < cpg; ++j) {
        const int ch = g * cpg + j;
        float tg = 0.0f, tb = 0.0f;
        for (int p = threadIdx.x; p < hw; p += blockDim.x) {
            const int64_t i = base + int64_t(p) * c + ch;
            float xhat;
            const float dz = gn_dz(x, dy, gamma, beta, i, ch, mean, rstd, silu, &xhat);
            tg += dz * xhat;
            tb += dz;
        }
        tg = ddpm::block_sum(tg, scratch);
        tb = ddpm::block_sum(tb, scratch);
        if (threadIdx.x == 0) {
            dgamma_part[int64_t(image) * c + ch] = tg;
            dbeta_part[int64_t(image) * c + ch] = tb;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    group_norm_backward_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                            const float* __restrict__ beta, const float* __restrict__ mean_in,
                            const float* __restrict__ rstd_in, const float* __restrict__ dy, float* __restrict__ dx,
                            float* __restrict__ dgamma_part, float* __restrict__ dbeta_part, int hw, int c,
                            int groups, int silu, int accumulate) {
    group_norm_backward(x, gamma, beta, mean_in, rstd_in, dy, dx, dgamma_part, dbeta_part, hw, c, groups, silu,
                        accumulate);
}

// x stored in bf16, as group_norm_forward_bf16in's; dy and dx fp32.
extern "C" __global__ void __launch_bounds__(256)
    group_norm_backward_bf16in(const __nv_bfloat16* __restrict__ x, const float* __restrict__ gamma,
                               const float* __restrict__ beta, const float* __restrict__ mean_in,
                               const float* __restrict__ rstd_in, const float* __restrict__ dy,
                               float* __restrict__ dx, float* __restrict__ dgamma_part,
                               float* __restrict__ dbeta_part, int hw, int c, int groups, int silu,
                               int accumulate) {
    group_norm_backward(x, gamma, beta, mean_in, rstd_in, dy, dx, dgamma_part, dbeta_part, hw, c, groups, silu,
                        accumulate);
}

// dgamma[ch] = sum over images of dgamma_part[image, ch], and dbeta alike (blockIdx.y 1). Grid
// (ceil(c / 32), 2), block 256: lanes on consecutive channels, the 8 warps taking every 8th image, then the
// warps' sums added in warp order (an order fixed by n, so results are reproducible). Version 1 gave each
// channel one thread that added the n images one after another, each addition waiting on its load: at
// batch 128, 128 memory latencies in a row in one or two blocks, for each of the network's group norms.
extern "C" __global__ void __launch_bounds__(256)
    group_norm_params_finish_f32(const float* __restrict__ dgamma_part, const float* __restrict__ dbeta_part,
                                 float* __restrict__ dgamma, float* __restrict__ dbeta, int n, int c) {
    __shared__ float part[8][32];
    const int ch = blockIdx.x * 32 + (threadIdx.x & 31);
    const float* src = blockIdx.y == 0 ? dgamma_part : dbeta_part;
    const float total = ddpm::column_sum_8warps(src, 0, n, c, ch, ch < c, part);
    if (threadIdx.x < 32 && ch < c) (blockIdx.y == 0 ? dgamma : dbeta)[ch] = total;
}

// group_norm_apply_bf16{,_bf16in}: y = dropout(silu(GN(x) gamma + beta)) stored in bf16, from statistics
// group_norm_forward_* computed without writing an output: the normalised input of a convolution in bf16
// precision, written once into a scratch region the backend reuses for every normalised input (and
// written again before the weight gradient, not kept), so the convolution reads a plain bf16 activation
// and its GEMM's main loop does no per-element work (the fused loaders, NormedIm2col in gemm.cuh, did this
// arithmetic for every element of every tile that read it: 9 taps x the column tiles). The arithmetic is
// theirs and group_norm_forward_f32's, element for element: z = (x - mean) rstd gamma + beta, then SiLU,
// then the dropout mask of element i drawn as dropout_forward_f32 draws it (Philox block i / 4, lane
// i % 4) and its scale 1 / (1 - p) rounded from fp64; then rounded to bf16, as the tensor core would
// round it. So the result is the bf16 rounding of what the fp32 path writes, bit for bit.
//
// Shapes: x [n, hw, c] (c a multiple of 8), mean and rstd [n, groups], gamma and beta [c], y [n, hw, c]
// bf16. Launch: block (c / 8, rows), each thread one run of 8 channels (fixed: its gamma, beta and group
// offsets are loaded once) of a pixel, stepping `rows * gridDim.x` pixels; grid a few per SM.
// Bytes: (4 or 2) + 2 per element, plus the statistics (n groups, cached). Per run of 8: one or two
// 16-byte loads, one 16-byte store, 8 (mean, rstd) pairs from L1, 2 Philox blocks with dropout.
template <class X>
__device__ __forceinline__ void group_norm_apply(const X* __restrict__ x, const float* __restrict__ mean,
                                                 const float* __restrict__ rstd, const float* __restrict__ gamma,
                                                 const float* __restrict__ beta, int groups, int silu, float p,
                                                 uint64_t seed, uint64_t stream, __nv_bfloat16* __restrict__ y,
                                                 int n, int hw, int c) {
    const int c0 = 8 * threadIdx.x, cpg = c / groups;
    const int first = c0 / cpg;
    float g[8], b[8];
    int off[8];  // the group of channel c0 + t, less `first`
#pragma unroll
    for (int t = 0; t < 8; ++t) {
        g[t] = gamma[c0 + t];
        b[t] = beta[c0 + t];
        off[t] = (c0 + t) / cpg - first;
    }
    const float keep = p > 0.0f ? float(1.0 / (1.0 - double(p))) : 1.0f;
    const int64_t pixels = int64_t(n) * hw, step = int64_t(blockDim.y) * gridDim.x;
    int64_t px = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
    // The image of pixel px, kept as px advances by `step` (no division per pixel).
    int image = int(px / hw);
    int64_t image_end = int64_t(image + 1) * hw;
    for (; px < pixels; px += step) {
        while (px >= image_end) {
            ++image;
            image_end += hw;
        }
        const int64_t i = px * c + c0;
        float v[8];
        ddpm::load_run8(x + i, 8, v);
        const int s = image * groups + first;
        uint4 r0 = make_uint4(0, 0, 0, 0), r1 = r0;
        if (p > 0.0f) {
            r0 = ddpm::philox_block(seed, stream, uint64_t(i) >> 2);
            r1 = ddpm::philox_block(seed, stream, (uint64_t(i) >> 2) + 1);
        }
        const uint32_t bits[8] = {r0.x, r0.y, r0.z, r0.w, r1.x, r1.y, r1.z, r1.w};
        float u[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            const float z = (v[t] - mean[s + off[t]]) * rstd[s + off[t]] * g[t] + b[t];
            const float a = silu ? z * ddpm::sigmoid(z) : z;
            u[t] = p > 0.0f ? a * (ddpm::uniform_from_bits(bits[t]) >= p ? keep : 0.0f) : a;
        }
        *reinterpret_cast<uint4*>(y + i) = make_uint4(ddpm::pack_bf16x2(u[0], u[1]), ddpm::pack_bf16x2(u[2], u[3]),
                                                      ddpm::pack_bf16x2(u[4], u[5]), ddpm::pack_bf16x2(u[6], u[7]));
    }
}

#define DDPM_APPLY_PARAMS                                                                                   \
    const float *__restrict__ mean, const float *__restrict__ rstd, const float *__restrict__ gamma,        \
        const float *__restrict__ beta, int groups, int silu, float p, uint64_t seed, uint64_t stream_base, \
        uint64_t stream_per_step, const uint64_t *__restrict__ clock, __nv_bfloat16 *__restrict__ y, int n,  \
        int hw, int c

extern "C" __global__ void __launch_bounds__(256) group_norm_apply_bf16(const float* __restrict__ x, DDPM_APPLY_PARAMS) {
    group_norm_apply(x, mean, rstd, gamma, beta, groups, silu, p, seed, stream_base + stream_per_step * *clock, y, n,
                     hw, c);
}

extern "C" __global__ void __launch_bounds__(256)
    group_norm_apply_bf16_bf16in(const __nv_bfloat16* __restrict__ x, DDPM_APPLY_PARAMS) {
    group_norm_apply(x, mean, rstd, gamma, beta, groups, silu, p, seed, stream_base + stream_per_step * *clock, y, n,
                     hw, c);
}
#undef DDPM_APPLY_PARAMS

// groupnorm.cu: group normalisation over NHWC activations, optionally fused with SiLU (version 1, fp32).
//   group_norm_forward_f32     y = GN(x) gamma + beta (then SiLU); saves mean and 1/std per (image, group)
//                              (y null: the statistics only, for a convolution that normalises its input
//                              as it loads it: conv2d_*_normed_* in conv.cu)
//   group_norm_backward_f32    dx (+)= the input gradient; per-image partial sums of dgamma and dbeta
//   group_norm_params_finish_f32   dgamma, dbeta = the partial sums added over images, in order
//
// Shapes: x, y, dy, dx [n, hw, c]; gamma, beta [c]; mean, rstd [n, groups]; channels c = groups * cpg,
// group g holding channels g cpg .. (g + 1) cpg - 1 of every position.
// Launch: one block of 256 threads per (image, group): grid (groups, n). A group is hw * cpg values
// (16x16 and 8 channels in the paper's model: 2048); the block reads it two or three times, so the
// traffic is 3 reads + 1 write per element forward and about 5 per element backward.
// Statistics: a two-pass mean and variance in fp32 with tree sums (the CPU twin accumulates in fp64;
// they agree to ~1e-6 relative for groups of this size).
#include "common.cuh"

__device__ __forceinline__ int64_t gn_index(int64_t image_base, int e, int cpg, int c, int g) {
    const int p = e / cpg, ch = g * cpg + e % cpg;
    return image_base + int64_t(p) * c + ch;
}

extern "C" __global__ void __launch_bounds__(256)
    group_norm_forward_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                           const float* __restrict__ beta, float* __restrict__ y, float* __restrict__ mean_out,
                           float* __restrict__ rstd_out, int hw, int c, int groups, float eps, int silu) {
    __shared__ float scratch[32];
    const int g = blockIdx.x, image = blockIdx.y, cpg = c / groups;
    const int count = hw * cpg;
    const int64_t base = int64_t(image) * hw * c;
    float s = 0.0f;
    for (int e = threadIdx.x; e < count; e += blockDim.x) s += x[gn_index(base, e, cpg, c, g)];
    const float mean = ddpm::block_sum(s, scratch) / float(count);
    float ss = 0.0f;
    for (int e = threadIdx.x; e < count; e += blockDim.x) {
        const float d = x[gn_index(base, e, cpg, c, g)] - mean;
        ss += d * d;
    }
    const float var = ddpm::block_sum(ss, scratch) / float(count);
    const float rstd = 1.0f / sqrtf(var + eps);
    if (threadIdx.x == 0) {
        mean_out[image * groups + g] = mean;
        rstd_out[image * groups + g] = rstd;
    }
    if (y == nullptr) return;
    for (int e = threadIdx.x; e < count; e += blockDim.x) {
        const int64_t i = gn_index(base, e, cpg, c, g);
        const int ch = g * cpg + e % cpg;
        const float z = (x[i] - mean) * rstd * gamma[ch] + beta[ch];
        y[i] = silu ? z * ddpm::sigmoid(z) : z;
    }
}

// The gradient through SiLU (when fused) and the affine part, at element i of channel ch.
__device__ __forceinline__ float gn_dz(const float* x, const float* dy, const float* gamma, const float* beta,
                                       int64_t i, int ch, float mean, float rstd, int silu, float* xhat_out) {
    const float xhat = (x[i] - mean) * rstd;
    float d = dy[i];
    if (silu) d *= ddpm::silu_grad(xhat * gamma[ch] + beta[ch]);
    *xhat_out = xhat;
    return d;
}

// dx = rstd (dn - mean(dn) - xhat mean(dn xhat)) with dn = dz gamma, means over the group;
// partial[image, ch] of dgamma (sum of dz xhat) and dbeta (sum of dz), channel by channel in a fixed
// order so the sums are reproducible. `dgamma_part` and `dbeta_part` are [n, c].
extern "C" __global__ void __launch_bounds__(256)
    group_norm_backward_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                            const float* __restrict__ beta, const float* __restrict__ mean_in,
                            const float* __restrict__ rstd_in, const float* __restrict__ dy, float* __restrict__ dx,
                            float* __restrict__ dgamma_part, float* __restrict__ dbeta_part, int hw, int c,
                            int groups, int silu, int accumulate) {
    __shared__ float scratch[32];
    const int g = blockIdx.x, image = blockIdx.y, cpg = c / groups;
    const int count = hw * cpg;
    const int64_t base = int64_t(image) * hw * c;
    const float mean = mean_in[image * groups + g], rstd = rstd_in[image * groups + g];
    float sum_dn = 0.0f, sum_dn_xhat = 0.0f;
    for (int e = threadIdx.x; e < count; e += blockDim.x) {
        const int64_t i = gn_index(base, e, cpg, c, g);
        const int ch = g * cpg + e % cpg;
        float xhat;
        const float dn = gn_dz(x, dy, gamma, beta, i, ch, mean, rstd, silu, &xhat) * gamma[ch];
        sum_dn += dn;
        sum_dn_xhat += dn * xhat;
    }
    const float mean_dn = ddpm::block_sum(sum_dn, scratch) / float(count);
    const float mean_dn_xhat = ddpm::block_sum(sum_dn_xhat, scratch) / float(count);
    for (int e = threadIdx.x; e < count; e += blockDim.x) {
        const int64_t i = gn_index(base, e, cpg, c, g);
        const int ch = g * cpg + e % cpg;
        float xhat;
        const float dn = gn_dz(x, dy, gamma, beta, i, ch, mean, rstd, silu, &xhat) * gamma[ch];
        const float v = rstd * (dn - mean_dn - xhat * mean_dn_xhat);
        dx[i] = accumulate ? dx[i] + v : v;
    }
    for (int j = 0; j < cpg; ++j) {
        const int ch = g * cpg + j;
        float sg = 0.0f, sb = 0.0f;
        for (int p = threadIdx.x; p < hw; p += blockDim.x) {
            const int64_t i = base + int64_t(p) * c + ch;
            float xhat;
            const float dz = gn_dz(x, dy, gamma, beta, i, ch, mean, rstd, silu, &xhat);
            sg += dz * xhat;
            sb += dz;
        }
        sg = ddpm::block_sum(sg, scratch);
        sb = ddpm::block_sum(sb, scratch);
        if (threadIdx.x == 0) {
            dgamma_part[int64_t(image) * c + ch] = sg;
            dbeta_part[int64_t(image) * c + ch] = sb;
        }
    }
}

// dgamma[ch] = sum over images of dgamma_part[image, ch] (and dbeta alike), images in order.
// One thread per channel.
extern "C" __global__ void group_norm_params_finish_f32(const float* __restrict__ dgamma_part,
                                                        const float* __restrict__ dbeta_part,
                                                        float* __restrict__ dgamma, float* __restrict__ dbeta,
                                                        int n, int c) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    float sg = 0.0f, sb = 0.0f;
    for (int image = 0; image < n; ++image) {
        sg += dgamma_part[int64_t(image) * c + ch];
        sb += dbeta_part[int64_t(image) * c + ch];
    }
    dgamma[ch] = sg;
    dbeta[ch] = sb;
}

// optim.cu: the optimizer over the flat parameter buffer (every parameter of the U-Net in one launch).
//   sum_squares_partial_f32, finish_sum_f64   the global gradient norm, in two deterministic stages
//   adam_step_f32                             Adam(W), clipping at a global norm, skipping non-finite steps
//   ema_update_f32                            ema = decay ema + (1 - decay) params
//   round_to_bf16_f32                         the bf16 copy of weights written by anything but Adam
// Bytes: the norm reads 4 per parameter; Adam reads 16 and writes 12 (14 with the bf16 copy); the EMA
// reads 8 and writes 4. For the paper's 35.7 M parameters that is 1.2 GB per step: ~0.4 ms at 3 TB/s.
#include <cuda_bf16.h>

#include "common.cuh"

// partial[block] = sum of x^2 over the block's grid-stride share, in fp64 (the same for any n: the grid
// size is fixed by the launcher, so the order of additions is too). Launch: block 256, fixed grid.
extern "C" __global__ void __launch_bounds__(256)
    sum_squares_partial_f32(const float* __restrict__ x, int64_t n, double* __restrict__ partial) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (int64_t i = ddpm::global_thread(); i < n; i += ddpm::grid_threads()) {
        const double v = x[i];
        s += v * v;
    }
    s = ddpm::block_sum_f64(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// out[0] = float(scale * sum(partial)), or its square root when `root`. Launch: one block of 256.
extern "C" __global__ void __launch_bounds__(256)
    finish_sum_f64(const double* __restrict__ partial, int count, double scale, int root, float* __restrict__ out) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += partial[i];
    s = ddpm::block_sum_f64(s, scratch) * scale;
    if (threadIdx.x == 0) out[0] = float(root ? sqrt(s) : s);
}

// One Adam(W) step, update number t = *clock + 1. The gradient norm and the clock are read from device
// memory, so nothing waits for the host and one recorded step replays for every step: a non-finite norm
// leaves parameters and moments untouched (the step is skipped); otherwise gradients are scaled by
// min(1, max_norm / norm) (max_norm 0: no clipping) and
//   m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,
//   p -= lr_t (m / bc1 / (sqrt(v / bc2) + eps) + wd p),
// with lr_t = lr min(t / warmup, 1), 1 - b1, 1 - b2, bc1 = 1 - b1^t, bc2 = 1 - b2^t computed in fp64 and
// rounded once, as AdamHyper::at does on the host (the betas come in fp64 for that; the moment updates
// multiply by them rounded to f32). CUDA's fp64 pow is within 2 ulp where the host's is within 1, so a
// bias correction can differ from the host's in the last f32 bit at a rounding tie: rare, and within
// every tolerance that compares the two.
// When `copy` is not null it is the parameters' bf16 copy (what the bf16 GEMMs read), and each updated
// parameter is written there too, rounded to nearest even: the copy is never stale and costs no pass of
// its own. A skipped step leaves it as it is, like the parameters.
// Bytes: 28 per parameter (read p, g, m, v; write p, m, v), 30 with the copy.
extern "C" __global__ void adam_step_f32(float* __restrict__ params, __nv_bfloat16* __restrict__ copy,
                                         const float* __restrict__ grads, float* __restrict__ m,
                                         float* __restrict__ v,
                                         const float* __restrict__ norm, int64_t n,
                                         const uint64_t* __restrict__ clock, float lr, double warmup,
                                         double beta1_d, double beta2_d, float eps, float weight_decay,
                                         float max_norm) {
    const float g_norm = *norm;
    if (!isfinite(g_norm)) return;
    const double t = double(*clock + 1);
    const float lr_t = float(double(lr) * fmin(t / warmup, 1.0));
    const float bias_correction1 = float(1.0 - pow(beta1_d, t));
    const float bias_correction2 = float(1.0 - pow(beta2_d, t));
    const float beta1 = float(beta1_d), beta2 = float(beta2_d);
    const float one_minus_beta1 = float(1.0 - beta1_d), one_minus_beta2 = float(1.0 - beta2_d);
    const float clip = (max_norm > 0.0f && g_norm > max_norm) ? max_norm / g_norm : 1.0f;
    for (int64_t i = ddpm::global_thread(); i < n; i += ddpm::grid_threads()) {
        const float g = grads[i] * clip;
        const float mi = beta1 * m[i] + one_minus_beta1 * g;
        const float vi = beta2 * v[i] + one_minus_beta2 * g * g;
        m[i] = mi;
        v[i] = vi;
        const float mhat = mi / bias_correction1, vhat = vi / bias_correction2;
        const float p = params[i] - lr_t * (mhat / (sqrtf(vhat) + eps) + weight_decay * params[i]);
        params[i] = p;
        if (copy) copy[i] = __float2bfloat16_rn(p);
    }
}

extern "C" __global__ void ema_update_f32(float* __restrict__ ema, const float* __restrict__ params, int64_t n,
                                          float decay) {
    for (int64_t i = ddpm::global_thread(); i < n; i += ddpm::grid_threads())
        ema[i] = decay * ema[i] + (1.0f - decay) * params[i];
}

// y[i] = bf16(x[i]), to nearest even: the bf16 copy of weights that something other than Adam wrote (a
// load, an upload, a copy of the EMA into a sampler's network). Bytes: 6 per element.
extern "C" __global__ void round_to_bf16_f32(const float* __restrict__ x, __nv_bfloat16* __restrict__ y, int64_t n) {
    for (int64_t i = ddpm::global_thread(); i < n; i += ddpm::grid_threads()) y[i] = __float2bfloat16_rn(x[i]);
}

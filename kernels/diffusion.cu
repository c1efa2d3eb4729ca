// diffusion.cu: the diffusion process itself, fused.
//   noise_add_f32          q(x_t | x_0) for a training batch, drawing its own eps
//   draw_timesteps_f32     the training batch's timesteps, uniform over [0, T)
//   log_at_clock_f32       a step's loss and gradient norm into the log ring, at the clock's slot
//   sampler_step_f32       one reverse step x_t -> x_{t-1} (DDPM ancestral, respaced DDPM or DDIM, guided or not),
//                          coefficients read from a device table at a device-side step index
//   sampler_timesteps_f32  fills the model's timestep input from that table and index
//   sampler_advance        moves the device-side step index to the next row
//   mse_partial_f32        L_simple's squared error (partial sums for finish_sum_f64) and its gradient
// The sampler's step index and the training clock live in device memory so that one captured graph of a
// sampling step, or of a training step, can be replayed for every step with no host work in between: the
// training step's random streams are base + per_step * clock (rng::Stream on the host).
#include "common.cuh"

// One row per sampling step, built on the host in f64 (src/sample.rs, SamplerRow) and uploaded as f32:
//   x0_hat = x0_from_xt * x_t - x0_from_eps * eps_hat, clamped to [-1, 1] when clipping
//   x_prev = c_x0 * x0_hat + c_xt * x_t + c_eps * eps_hat + sigma * z,   z ~ N(0, 1)
// DDPM (respaced or not) uses c_eps = 0; DDIM uses c_xt = 0; the last step has sigma = 0.
struct SamplerRow {
    float t;
    float x0_from_xt, x0_from_eps;
    float c_x0, c_xt, c_eps;
    float sigma;
    float unused;
};
static_assert(sizeof(SamplerRow) == 32, "SamplerRow must match src/sample.rs");

// x_t = sqrt_ab[t_n] * x0 + sqrt_1m_ab[t_n] * eps, eps = Philox normal (seed, stream, first_element + i),
// with n = i / per_image the image of element i and stream = stream_base + stream_per_step * *clock.
// Shapes: x0, x_t, eps: `total` elements, images of `per_image` (NHWC) back to back; timesteps: one per
// image (integers held as float); sqrt_ab, sqrt_1m_ab: one per diffusion timestep.
// Launch: one thread per Philox block (4 elements), grid-stride; any grid size gives the same result.
// Bytes: 12 per element (read x0, write x_t and eps); a CIFAR batch of 128 is 393k elements, 4.7 MB.
// A timestep outside [0, steps) is never used as an index: its image gets NaN (the host checks the
// timesteps it uploads; this keeps a bad one from becoming a wild read).
extern "C" __global__ void noise_add_f32(const float* __restrict__ x0, const float* __restrict__ timesteps,
                                         const float* __restrict__ sqrt_ab, const float* __restrict__ sqrt_1m_ab,
                                         float* __restrict__ x_t, float* __restrict__ eps, int64_t total,
                                         int64_t per_image, int64_t first_element, uint64_t seed,
                                         uint64_t stream_base, uint64_t stream_per_step,
                                         const uint64_t* __restrict__ clock, int64_t steps) {
    const uint64_t stream = stream_base + stream_per_step * *clock;
    const int64_t first_block = first_element >> 2;
    const int64_t blocks = ((first_element + total + 3) >> 2) - first_block;
    for (int64_t b = ddpm::global_thread(); b < blocks; b += ddpm::grid_threads()) {
        const float4 z = ddpm::philox_normal4(seed, stream, uint64_t(first_block + b));
        const float draws[4] = {z.x, z.y, z.z, z.w};
#pragma unroll
        for (int lane = 0; lane < 4; ++lane) {
            const int64_t i = ((first_block + b) << 2) + lane - first_element;
            if (i < 0 || i >= total) continue;
            const float tf = timesteps[i / per_image];
            eps[i] = draws[lane];
            if (!(tf >= 0.0f && tf < float(steps))) {
                x_t[i] = __int_as_float(0x7fc00000);  // NaN
                continue;
            }
            const int t = int(tf);
            x_t[i] = sqrt_ab[t] * x0[i] + sqrt_1m_ab[t] * draws[lane];
        }
    }
}

// timesteps[i] = the top 64 bits of (64 random bits) * steps, the random bits being words 0 and 1 of Philox
// block i of (seed, stream_base + stream_per_step * *clock): rng::below, bit for bit. Launch: any grid.
extern "C" __global__ void draw_timesteps_f32(float* __restrict__ timesteps, int64_t n, uint64_t seed,
                                              uint64_t stream_base, uint64_t stream_per_step,
                                              const uint64_t* __restrict__ clock, uint64_t steps) {
    const uint64_t stream = stream_base + stream_per_step * *clock;
    for (int64_t i = ddpm::global_thread(); i < n; i += ddpm::grid_threads()) {
        const uint4 r = ddpm::philox_block(seed, stream, uint64_t(i));
        const uint64_t bits = uint64_t(r.x) | (uint64_t(r.y) << 32);
        timesteps[i] = float(__umul64hi(bits, steps));
    }
}

// ring[(*clock % slots) * n + i] = src[i]: the host reads the ring a chunk of steps at a time.
extern "C" __global__ void log_at_clock_f32(const float* __restrict__ src, float* __restrict__ ring, int64_t n,
                                            int64_t slots, const uint64_t* __restrict__ clock) {
    const int64_t at = int64_t(*clock % uint64_t(slots)) * n;
    for (int64_t i = ddpm::global_thread(); i < n; i += ddpm::grid_threads()) ring[at + i] = src[i];
}

// One reverse step, in place or not (x_prev may be x_t: each element is read before it is written by the
// same thread). Row `*step` of `table` (`rows` rows; a step outside them, after the last advance, does
// nothing); noise from Philox (seed, stream_base + *step, first_element + i).
// Shapes: x_t, eps_hat, x_prev: `total` elements (NHWC images back to back), or with `guided` 2 * total:
// the images with their classes, then the same images with the null class. Guided, the step takes
// eps = eps_null + w (eps_class - eps_null) (classifier-free guidance, fused here so a guided step costs
// one more read of eps and one more write of x) and writes its result into both halves.
// Launch: one thread per Philox block (4 elements), grid-stride. Bytes: 12 per element (20 guided).
extern "C" __global__ void sampler_step_f32(const float* x_t, const float* __restrict__ eps_hat,
                                            const SamplerRow* __restrict__ table, const int* __restrict__ step,
                                            float* x_prev, int64_t total, int64_t first_element, int clip,
                                            uint64_t seed, uint64_t stream_base, int rows, int guided, float w) {
    const int s = *step;
    if (s < 0 || s >= rows) return;
    const SamplerRow row = table[s];
    const uint64_t stream = stream_base + uint64_t(s);
    const int64_t first_block = first_element >> 2;
    const int64_t blocks = ((first_element + total + 3) >> 2) - first_block;
    for (int64_t b = ddpm::global_thread(); b < blocks; b += ddpm::grid_threads()) {
        float draws[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (row.sigma > 0.0f) {
            const float4 z = ddpm::philox_normal4(seed, stream, uint64_t(first_block + b));
            draws[0] = z.x, draws[1] = z.y, draws[2] = z.z, draws[3] = z.w;
        }
#pragma unroll
        for (int lane = 0; lane < 4; ++lane) {
            const int64_t i = ((first_block + b) << 2) + lane - first_element;
            if (i < 0 || i >= total) continue;
            const float x = x_t[i];
            float e = eps_hat[i];
            if (guided) {
                const float null = eps_hat[total + i];
                e = null + w * (e - null);
            }
            float x0 = row.x0_from_xt * x - row.x0_from_eps * e;
            if (clip) x0 = fminf(fmaxf(x0, -1.0f), 1.0f);
            const float next = row.c_x0 * x0 + row.c_xt * x + row.c_eps * e + row.sigma * draws[lane];
            x_prev[i] = next;
            if (guided) x_prev[total + i] = next;
        }
    }
}

// timesteps[n] = table[*step].t for every image of the batch (nothing when the table is exhausted).
// Launch: any grid covering `images`.
extern "C" __global__ void sampler_timesteps_f32(const SamplerRow* __restrict__ table, const int* __restrict__ step,
                                                 float* __restrict__ timesteps, int images, int rows) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    const int s = *step;
    if (n < images && s >= 0 && s < rows) timesteps[n] = table[s].t;
}

// Steps run from the last row down to row 0, then -1 (exhausted), where the counter stays.
// Launch: one thread, after everything that reads *step.
extern "C" __global__ void sampler_advance(int* step) {
    if (threadIdx.x == 0 && blockIdx.x == 0 && *step >= 0) *step -= 1;
}

// dpred = 2 (pred - target) / n, and partial[block] = the block's share of sum (pred - target)^2 in fp64;
// finish_sum_f64 (optim.cu) with scale 1 / n writes the loss. Launch: block 256, a grid fixed by the
// launcher (so the order of additions does not depend on n). Bytes: 12 per element.
extern "C" __global__ void __launch_bounds__(256)
    mse_partial_f32(const float* __restrict__ pred, const float* __restrict__ target, float* __restrict__ dpred,
                    int64_t n, double* __restrict__ partial) {
    __shared__ double scratch[32];
    const float scale = float(2.0 / double(n));
    double s = 0.0;
    for (int64_t i = ddpm::global_thread(); i < n; i += ddpm::grid_threads()) {
        const float d = pred[i] - target[i];
        dpred[i] = scale * d;
        s += double(d) * double(d);
    }
    s = ddpm::block_sum_f64(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

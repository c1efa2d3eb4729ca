// elementwise.cu: the small memory-bound ops of the U-Net. Every tensor is NHWC, and fp32 but where a
// kernel's name says bf16.
//   fill_f32, accumulate_f32, add_f32       buffers: y = v; dst = src or dst += src; y = a + b
//   silu_forward_f32, silu_backward_f32     y = x * sigmoid(x) and its gradient
//   upsample2x_forward_f32 / _backward_f32  nearest-neighbour x2 and the sum of its 2x2 gradient block
//   concat_forward_f32 / _backward_f32      [a, b] along channels (the U-Net's skips), and the split
//   upsample2x_forward_bf16, concat_forward_bf16
//                                           the two forwards over block outputs stored in bf16 (ladder v7)
//   add_image_bias_f32, image_bias_backward_f32   y[n, p, c] += bias[n, c] (time embedding) and its sum
//   timestep_embedding_f32                  [sin(t f_i), cos(t f_i)], computed in fp64 and rounded once
//   class_embedding_add_f32 / _backward_f32 y[i, :] += table[label_i, :] (class conditioning) and its sum
//   dropout_forward_f32 / _backward_f32     inverted dropout with a Philox mask (no mask is stored)
//   normal_f32                              Philox standard normal draws
// All are grid-stride loops with 64-bit indices: any grid gives the same result. Each moves 4-12 bytes
// per element and does a few flops, so the figure of merit is bandwidth (bytes / time vs the device copy).
#include "common.cuh"

// y[i] = value. Bytes: 4 per element.
extern "C" __global__ void fill_f32(float* __restrict__ y, float value, int64_t n) {
    for (int64_t i = ddpm::global_thread(); i < n; i += ddpm::grid_threads()) y[i] = value;
}

// dst = src, or dst += src when `accumulate`. Bytes: 8 (12 accumulating) per element.
extern "C" __global__ void accumulate_f32(const float* __restrict__ src, float* __restrict__ dst, int64_t n,
                                          int accumulate) {
    for (int64_t i = ddpm::global_thread(); i < n; i += ddpm::grid_threads())
        dst[i] = accumulate ? dst[i] + src[i] : src[i];
}

// y = a + b. Bytes: 12 per element.
extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y,
                                   int64_t n) {
    for (int64_t i = ddpm::global_thread(); i < n; i += ddpm::grid_threads()) y[i] = a[i] + b[i];
}

// y = x sigmoid(x). Bytes: 8 per element.
extern "C" __global__ void silu_forward_f32(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
    for (int64_t i = ddpm::global_thread(); i < n; i += ddpm::grid_threads()) {
        const float v = x[i];
        y[i] = v * ddpm::sigmoid(v);
    }
}

// dx (+)= dy * s (1 + x (1 - s)), s = sigmoid(x). Bytes: 12 (16 accumulating) per element.
extern "C" __global__ void silu_backward_f32(const float* __restrict__ x, const float* __restrict__ dy,
                                             float* __restrict__ dx, int64_t n, int accumulate) {
    for (int64_t i = ddpm::global_thread(); i < n; i += ddpm::grid_threads()) {
        const float g = dy[i] * ddpm::silu_grad(x[i]);
        dx[i] = accumulate ? dx[i] + g : g;
    }
}

// y[b, oy, ox, c] = x[b, oy / 2, ox / 2, c]; x is [n, h, w, c], y [n, 2h, 2w, c], both stored as T (fp32,
// or bf16 where the block outputs are: a copy, so exact either way). One thread per output element, so
// reads of x are coalesced along c and each x element is read by four threads (from L1/L2).
// Bytes: 5 sizeof(T) per x element (1 read, 4 written).
namespace {
template <class T>
__device__ __forceinline__ void upsample2x(const T* __restrict__ x, T* __restrict__ y, int n, int h, int w, int c) {
    const int64_t total = int64_t(n) * 4 * h * w * c;
    for (int64_t i = ddpm::global_thread(); i < total; i += ddpm::grid_threads()) {
        const int ch = int(i % c);
        int64_t rest = i / c;
        const int ox = int(rest % (2 * w));
        rest /= 2 * w;
        const int oy = int(rest % (2 * h));
        const int64_t b = rest / (2 * h);
        y[i] = x[((b * h + oy / 2) * w + ox / 2) * c + ch];
    }
}
}  // namespace

extern "C" __global__ void upsample2x_forward_f32(const float* __restrict__ x, float* __restrict__ y, int n, int h,
                                                  int w, int c) {
    upsample2x(x, y, n, h, w, c);
}

extern "C" __global__ void upsample2x_forward_bf16(const __nv_bfloat16* __restrict__ x,
                                                   __nv_bfloat16* __restrict__ y, int n, int h, int w, int c) {
    upsample2x(x, y, n, h, w, c);
}

// dx[b, iy, ix, c] (+)= sum of dy over the 2x2 block it was copied to. One thread per dx element.
extern "C" __global__ void upsample2x_backward_f32(const float* __restrict__ dy, float* __restrict__ dx, int n,
                                                   int h, int w, int c, int accumulate) {
    const int64_t total = int64_t(n) * h * w * c;
    const int64_t row = int64_t(2 * w) * c;  // one output row of dy
    for (int64_t i = ddpm::global_thread(); i < total; i += ddpm::grid_threads()) {
        const int ch = int(i % c);
        int64_t rest = i / c;
        const int ix = int(rest % w);
        rest /= w;
        const int iy = int(rest % h);
        const int64_t b = rest / h;
        const int64_t base = ((b * 2 * h + 2 * iy) * 2 * w + 2 * ix) * c + ch;
        const float s = dy[base] + dy[base + c] + dy[base + row] + dy[base + row + c];
        dx[i] = accumulate ? dx[i] + s : s;
    }
}

// y[p] = [a[p], b[p]] over `pixels` positions: a has ca channels, b has cb; all three stored as T (fp32,
// or bf16 where the block outputs are: a copy, exact either way). One thread per y element.
// Bytes: 2 sizeof(T) per y element.
namespace {
template <class T>
__device__ __forceinline__ void concat(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
                                       int64_t pixels, int ca, int cb) {
    const int cy = ca + cb;
    const int64_t total = pixels * cy;
    for (int64_t i = ddpm::global_thread(); i < total; i += ddpm::grid_threads()) {
        const int64_t p = i / cy;
        const int ch = int(i % cy);
        y[i] = ch < ca ? a[p * ca + ch] : b[p * cb + (ch - ca)];
    }
}
}  // namespace

extern "C" __global__ void concat_forward_f32(const float* __restrict__ a, const float* __restrict__ b,
                                              float* __restrict__ y, int64_t pixels, int ca, int cb) {
    concat(a, b, y, pixels, ca, cb);
}

extern "C" __global__ void concat_forward_bf16(const __nv_bfloat16* __restrict__ a,
                                               const __nv_bfloat16* __restrict__ b, __nv_bfloat16* __restrict__ y,
                                               int64_t pixels, int ca, int cb) {
    concat(a, b, y, pixels, ca, cb);
}

// da (+)= dy[:, :ca], db (+)= dy[:, ca:], each with its own accumulate flag. One thread per dy element.
extern "C" __global__ void concat_backward_f32(const float* __restrict__ dy, float* __restrict__ da,
                                               float* __restrict__ db, int64_t pixels, int ca, int cb,
                                               int accumulate_a, int accumulate_b) {
    const int cy = ca + cb;
    const int64_t total = pixels * cy;
    for (int64_t i = ddpm::global_thread(); i < total; i += ddpm::grid_threads()) {
        const int64_t p = i / cy;
        const int ch = int(i % cy);
        const float g = dy[i];
        if (ch < ca) {
            float* d = da + p * ca + ch;
            *d = accumulate_a ? *d + g : g;
        } else {
            float* d = db + p * cb + (ch - ca);
            *d = accumulate_b ? *d + g : g;
        }
    }
}

// y[img, p, c] += bias[img, c] for `n` images of `hw` positions. Bytes: 8 per y element.
extern "C" __global__ void add_image_bias_f32(float* __restrict__ y, const float* __restrict__ bias, int n, int hw,
                                              int c) {
    const int64_t total = int64_t(n) * hw * c;
    for (int64_t i = ddpm::global_thread(); i < total; i += ddpm::grid_threads()) {
        const int64_t img = i / (int64_t(hw) * c);
        y[i] += bias[img * c + i % c];
    }
}

// dbias[img, c] = sum_p dy[img, p, c]. One block per (image, 32-channel slice): a warp's lanes own
// consecutive channels (coalesced), the block's warps split the positions, then a shared-memory sum in a
// fixed order (deterministic). Launch: grid (ceil(c / 32), n), block 256.
extern "C" __global__ void __launch_bounds__(256)
    image_bias_backward_f32(const float* __restrict__ dy, float* __restrict__ dbias, int n, int hw, int c) {
    __shared__ float part[8][32];
    const int ch = blockIdx.x * 32 + (threadIdx.x & 31);
    const int64_t img = blockIdx.y;
    const float total = ddpm::column_sum_8warps(dy, img * hw, (img + 1) * hw, c, ch, ch < c, part);
    if (threadIdx.x < 32 && ch < c) dbias[img * c + ch] = total;
}

// The row of a label stored as a float, or -1 when it is not an integer in [0, classes).
__device__ __forceinline__ int class_row(float label, int classes) {
    if (!(label >= 0.0f && label < float(classes))) return -1;  // NaN included
    const int k = int(label);
    return float(k) == label ? k : -1;
}

// y[i, j] += table[labels[i], j] for n images; a label outside [0, classes) adds nothing (the host checks
// them). One thread per element of y. Bytes: 12 per element.
extern "C" __global__ void class_embedding_add_f32(const float* __restrict__ table, const float* __restrict__ labels,
                                                   float* __restrict__ y, int n, int classes, int dim) {
    const int64_t total = int64_t(n) * dim;
    for (int64_t i = ddpm::global_thread(); i < total; i += ddpm::grid_threads()) {
        const int k = class_row(labels[i / dim], classes);
        if (k >= 0) y[i] += table[int64_t(k) * dim + i % dim];
    }
}

// dtable[k, j] = sum over the images i with labels[i] = k of dy[i, j], in image order; rows no image has are
// zero. One thread per column j: it zeroes its column, then walks the images in order (no atomics, the same
// sums as the CPU's). Work: classes * dim writes and n * dim reads, a few microseconds for any batch.
extern "C" __global__ void class_embedding_backward_f32(const float* __restrict__ labels, const float* __restrict__ dy,
                                                        float* __restrict__ dtable, int n, int classes, int dim) {
    for (int64_t j = ddpm::global_thread(); j < dim; j += ddpm::grid_threads()) {
        for (int k = 0; k < classes; ++k) dtable[int64_t(k) * dim + j] = 0.0f;
        for (int i = 0; i < n; ++i) {
            const int k = class_row(labels[i], classes);
            if (k >= 0) dtable[int64_t(k) * dim + j] += dy[int64_t(i) * dim + j];
        }
    }
}

// y[i, j] = sin(t_i f_j) and y[i, half + j] = cos(t_i f_j), f_j = exp(-ln(10000) j / (half - 1)), in fp64
// (t up to 1000 would make an fp32 argument off by ~1e-4), rounded once; an odd last column is 0.
// One thread per (image, j).
extern "C" __global__ void timestep_embedding_f32(const float* __restrict__ t, float* __restrict__ y, int n,
                                                  int dim) {
    const int half = dim / 2;
    const int64_t total = int64_t(n) * half;
    for (int64_t i = ddpm::global_thread(); i < total; i += ddpm::grid_threads()) {
        const int64_t img = i / half;
        const int j = int(i % half);
        const double f = exp(-log(10000.0) * double(j) / double(half - 1));
        // sincospi on a / pi: an exact reduction of the argument, where sincos of a large argument
        // would take the slow path through local memory. The division costs ~1e-16 relative.
        double s, co;
        sincospi(double(t[img]) * f * (1.0 / 3.141592653589793238462643383279502884), &s, &co);
        y[img * dim + j] = float(s);
        y[img * dim + half + j] = float(co);
        if ((dim & 1) && j == 0) y[img * dim + dim - 1] = 0.0f;
    }
}

// Element e is kept when its Philox uniform (seed, stream, e) is >= p, and scaled by 1 / (1 - p)
// (computed in fp64 and rounded, as the CPU backend does).
__device__ __forceinline__ float keep_scale(float p, uint64_t seed, uint64_t stream, int64_t e) {
    return ddpm::philox_uniform(seed, stream, uint64_t(e)) >= p ? float(1.0 / (1.0 - double(p))) : 0.0f;
}

// The stream of a per-step draw: base + per_step * (training clock), read from device memory so that a
// recorded training step draws fresh masks at every replay (rng::Stream on the host).
__device__ __forceinline__ uint64_t step_stream(uint64_t base, uint64_t per_step, const uint64_t* clock) {
    return base + per_step * *clock;
}

// y = x * keep_scale. Bytes: 8 per element.
extern "C" __global__ void dropout_forward_f32(const float* __restrict__ x, float* __restrict__ y, int64_t n,
                                               float p, uint64_t seed, uint64_t stream_base,
                                               uint64_t stream_per_step, const uint64_t* __restrict__ clock) {
    const uint64_t stream = step_stream(stream_base, stream_per_step, clock);
    for (int64_t i = ddpm::global_thread(); i < n; i += ddpm::grid_threads()) y[i] = x[i] * keep_scale(p, seed, stream, i);
}

// dx (+)= dy * keep_scale (the same mask, regenerated). Bytes: 8 (12 accumulating) per element.
extern "C" __global__ void dropout_backward_f32(const float* __restrict__ dy, float* __restrict__ dx, int64_t n,
                                                float p, uint64_t seed, uint64_t stream_base,
                                                uint64_t stream_per_step, const uint64_t* __restrict__ clock,
                                                int accumulate) {
    const uint64_t stream = step_stream(stream_base, stream_per_step, clock);
    for (int64_t i = ddpm::global_thread(); i < n; i += ddpm::grid_threads()) {
        const float g = dy[i] * keep_scale(p, seed, stream, i);
        dx[i] = accumulate ? dx[i] + g : g;
    }
}

// x[i] = Philox normal (seed, stream, first_element + i). One thread per Philox block of 4 elements.
extern "C" __global__ void normal_f32(float* __restrict__ x, int64_t n, int64_t first_element, uint64_t seed,
                                     uint64_t stream) {
    const int64_t first_block = first_element >> 2;
    const int64_t blocks = ((first_element + n + 3) >> 2) - first_block;
    for (int64_t b = ddpm::global_thread(); b < blocks; b += ddpm::grid_threads()) {
        const float4 z = ddpm::philox_normal4(seed, stream, uint64_t(first_block + b));
        const float draws[4] = {z.x, z.y, z.z, z.w};
#pragma unroll
        for (int lane = 0; lane < 4; ++lane) {
            const int64_t i = ((first_block + b) << 2) + lane - first_element;
            if (i >= 0 && i < n) x[i] = draws[lane];
        }
    }
}

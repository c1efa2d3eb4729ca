// gemm.cuh: the fp32 tiled GEMM core that every convolution and linear layer runs on.
//
//   C[m, n] = sum_k A(m, k) B(k, n)
//
// A and B are not matrices in memory but *loaders*: small structs whose operator() returns one element
// (zero outside the operand). A plain row-major matrix is one loader; the im2col gather of a convolution
// is another, so the convolutions are implicit GEMMs that never materialise the unfolded input.
//
// Tiling (version 1, fp32 SIMT): a block of 256 threads computes a 64 x 64 tile of C, stepping through K
// 16 at a time. Each step stages a 64 x 16 slice of A and a 16 x 64 slice of B in shared memory (4
// elements per thread each); each thread then accumulates a 4 x 4 block of C in registers, reading 4 + 4
// values from shared memory per 16 multiply-adds. A loader says which of its indices is contiguous in
// memory (`k_fast` for A, `n_fast` for B) and the staging maps consecutive threads along that index, so
// global loads are coalesced. Arithmetic intensity: 64 * 64 * 16 FMAs per 2 * 64 * 16 loads, 32 FMAs per
// element fetched.
//
// Split-K: a long reduction (a weight gradient sums over every pixel of the batch) is cut into
// gridDim.z slices; slice z writes its partial tile to a workspace, and gemm_reduce_f32 adds the slices
// in a fixed order. No atomics, so results are bitwise reproducible.
#pragma once

#include <cuda_bf16.h>

#include "common.cuh"

namespace ddpm {

constexpr int GEMM_BM = 64;
constexpr int GEMM_BN = 64;
constexpr int GEMM_BK = 16;
constexpr int GEMM_THREADS = 256;

// ---- loaders --------------------------------------------------------------------------------------
//
// Each loader also presents eight consecutive elements along its contiguous index at once, for the
// vector loads of the tensor-core core (gemm_mma.cuh): load8(i, j, valid, v) sets v[t] to the element t
// places after (i, j) along that index (k for a k_fast A, m for the others; n for an n_fast B, k for the
// others), or 0 for t >= valid. The caller keeps both indices inside the operand (valid > 0, the other
// index in range) and starts every run along k at a multiple of 8. Where the eight lie in one run of
// memory aligned to 16 bytes, that is two 16-byte loads and one index computation instead of eight.
// A loader over bf16 storage (the weights' bf16 copy, `packed`) delivers its eight as bf16 in one uint4
// instead: one 16-byte load, nothing to convert; and it says where they are (`at(i, j)`, the address of
// element (i, j)), so a core can copy them to shared memory without the registers (cp.async).
//
// The tensor-core cores (versions 3 to 6) read each run through a *cursor*: a thread's runs keep their
// place along the operand's other index from slice to slice and move along k by the slice's depth, so
// the loader decodes a run's indices once (`cursor(i, j, step)`: the pixel of an im2col row, the tap and
// channel of a column, with the divisions that takes) and then moves it by additions and compares only
// (`advance`), and loads from it (`load8(cursor, valid, v)`, `at(cursor)`): no integer division in the
// main loop. The element-wise API (operator(), load8(i, j, ..)) stays for the other cores.

// v = p[0, 8), 0 past `valid`: two 16-byte loads when all eight are valid and p is 16-byte aligned.
__device__ __forceinline__ void load_run8(const float* p, int valid, float (&v)[8]) {
    if (valid >= 8 && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
        const float4 lo = *reinterpret_cast<const float4*>(p);
        const float4 hi = *reinterpret_cast<const float4*>(p + 4);
        v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w;
        v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
        return;
    }
#pragma unroll
    for (int t = 0; t < 8; ++t) v[t] = t < valid ? p[t] : 0.0f;
}

__device__ __forceinline__ void zero8(float (&v)[8]) {
#pragma unroll
    for (int t = 0; t < 8; ++t) v[t] = 0.0f;
}
__device__ __forceinline__ void zero8(uint4& v) { v = make_uint4(0, 0, 0, 0); }

// The same from bf16 storage (the weights' bf16 copy), kept as bf16: v holds the eight as the tensor cores
// take them, element t in bits [16 (t % 2), 16 (t % 2) + 16) of word t / 2, 0 past `valid`. One 16-byte
// load when all eight are valid and p is 16-byte aligned.
__device__ __forceinline__ void load_run8(const __nv_bfloat16* p, int valid, uint4& v) {
    if (valid >= 8 && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
        v = *reinterpret_cast<const uint4*>(p);
        return;
    }
    uint32_t w[4] = {0, 0, 0, 0};
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(p);
#pragma unroll
    for (int t = 0; t < 8; ++t)
        if (t < valid) w[t / 2] |= uint32_t(bits[t]) << (16 * (t % 2));
    v = make_uint4(w[0], w[1], w[2], w[3]);
}

// The same from an activation stored in bf16 (Backend::stores_bf16_activations),
// widened to fp32 for a loader that computes on its elements (NormedIm2col normalises them): one 16-byte
// load when all eight are valid and p is 16-byte aligned.
__device__ __forceinline__ void load_run8(const __nv_bfloat16* p, int valid, float (&v)[8]) {
    if (valid >= 8 && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
        const uint4 w = *reinterpret_cast<const uint4*>(p);
        const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            v[2 * t] = __uint_as_float(words[t] << 16);
            v[2 * t + 1] = __uint_as_float(words[t] & 0xffff0000u);
        }
        return;
    }
#pragma unroll
    for (int t = 0; t < 8; ++t) v[t] = t < valid ? to_f32(p[t]) : 0.0f;
}

// Whether a loader's runs come from bf16 storage (load8 fills a uint4 of bf16 pairs, not 8 floats).
// Loaders over an element type T declare `packed`; the others are fp32.
template <class T>
struct Storage {
    static constexpr bool packed = false;
};
template <>
struct Storage<__nv_bfloat16> {
    static constexpr bool packed = true;
};
template <class L>
__host__ __device__ constexpr auto packed_runs(int) -> decltype(L::packed) {
    return L::packed;
}
template <class L>
__host__ __device__ constexpr bool packed_runs(long) {
    return false;
}

// The eight one at a time, for a loader whose run is not one run of memory: v[t] = at(t), 0 past valid.
template <class At>
__device__ __forceinline__ void gather8(const At& at, int valid, float (&v)[8]) {
#pragma unroll
    for (int t = 0; t < 8; ++t) v[t] = t < valid ? at(t) : 0.0f;
}

// A(m, k) = p[m * ld + k]: rows of length >= K, k contiguous. T is float, or bf16 for an activation
// stored so (Backend::stores_bf16_activations): packed, so the tensor-core core copies its runs to shared
// memory as they are.
template <class T>
struct RowsAOf {
    const T* p;
    int64_t ld;
    int rows;
    static constexpr bool k_fast = true;
    static constexpr bool packed = Storage<T>::packed;
    __device__ __forceinline__ const T* at(int m, int k) const { return p + int64_t(m) * ld + k; }
    __device__ float operator()(int m, int k) const { return m < rows ? to_f32(*at(m, k)) : 0.0f; }
    template <class Run>
    __device__ void load8(int m, int k, int valid, Run& v) const {
        load_run8(at(m, k), valid, v);
    }
    struct Cursor {
        const T* p;
    };
    __device__ __forceinline__ Cursor cursor(int m, int k, int) const { return {at(m, k)}; }
    __device__ __forceinline__ void advance(Cursor& c, int step) const { c.p += step; }
    __device__ __forceinline__ const T* at(const Cursor& c) const { return c.p; }
    template <class Run>
    __device__ __forceinline__ void load8(const Cursor& c, int valid, Run& v) const {
        load_run8(c.p, valid, v);
    }
};
using RowsA = RowsAOf<float>;

// A(m, k) = p[k * ld + m]: the transpose of a row-major matrix, m contiguous.
struct ColsA {
    const float* p;
    int64_t ld;
    int rows;
    static constexpr bool k_fast = false;
    __device__ float operator()(int m, int k) const { return m < rows ? p[int64_t(k) * ld + m] : 0.0f; }
    __device__ void load8(int m, int k, int valid, float (&v)[8]) const {
        load_run8(p + int64_t(k) * ld + m, valid, v);
    }
    struct Cursor {
        const float* p;
    };
    __device__ __forceinline__ Cursor cursor(int m, int k, int) const { return {p + int64_t(k) * ld + m}; }
    __device__ __forceinline__ void advance(Cursor& c, int step) const { c.p += int64_t(step) * ld; }
    __device__ __forceinline__ void load8(const Cursor& c, int valid, float (&v)[8]) const {
        load_run8(c.p, valid, v);
    }
};

// B(k, n) = p[k * ld + n]: n contiguous. T is float, or bf16 for a weight read from its bf16 copy.
template <class T>
struct RowsB {
    const T* p;
    int64_t ld;
    int cols;
    static constexpr bool n_fast = true;
    static constexpr bool packed = Storage<T>::packed;
    __device__ __forceinline__ const T* at(int k, int n) const { return p + int64_t(k) * ld + n; }
    __device__ float operator()(int k, int n) const { return n < cols ? to_f32(*at(k, n)) : 0.0f; }
    template <class Run>
    __device__ void load8(int k, int n, int valid, Run& v) const {
        load_run8(at(k, n), valid, v);
    }
    struct Cursor {
        const T* p;
    };
    __device__ __forceinline__ Cursor cursor(int k, int n, int) const { return {at(k, n)}; }
    __device__ __forceinline__ void advance(Cursor& c, int step) const { c.p += int64_t(step) * ld; }
    __device__ __forceinline__ const T* at(const Cursor& c) const { return c.p; }
    template <class Run>
    __device__ __forceinline__ void load8(const Cursor& c, int valid, Run& v) const {
        load_run8(c.p, valid, v);
    }
};

// B(k, n) = p[n * ld + k]: the transpose of a row-major matrix (a weight [out, in] used as [in, out]).
template <class T>
struct ColsB {
    const T* p;
    int64_t ld;
    int cols;
    static constexpr bool n_fast = false;
    static constexpr bool packed = Storage<T>::packed;
    __device__ __forceinline__ const T* at(int k, int n) const { return p + int64_t(n) * ld + k; }
    __device__ float operator()(int k, int n) const { return n < cols ? to_f32(*at(k, n)) : 0.0f; }
    template <class Run>
    __device__ void load8(int k, int n, int valid, Run& v) const {
        load_run8(at(k, n), valid, v);
    }
    struct Cursor {
        const T* p;
    };
    __device__ __forceinline__ Cursor cursor(int k, int n, int) const { return {at(k, n)}; }
    __device__ __forceinline__ void advance(Cursor& c, int step) const { c.p += step; }
    __device__ __forceinline__ const T* at(const Cursor& c) const { return c.p; }
    template <class Run>
    __device__ __forceinline__ void load8(const Cursor& c, int valid, Run& v) const {
        load_run8(c.p, valid, v);
    }
};

// The geometry of a convolution: NHWC input [batch, h, w, c], output [batch, oh, ow, o], a taps x taps
// kernel with the given stride and padding before the first row and column (after the last: whatever
// makes oh, ow fit, i.e. TensorFlow 'SAME' for stride 2).
struct ConvGeom {
    int h, w, c, oh, ow, o, taps, stride, pad;
};

// The im2col matrix of the input, never stored: A(m, k) with m = (image, oy, ox), k = (ky, kx, ci),
// = x[image, oy * stride + ky - pad, ox * stride + kx - pad, ci], or 0 in the padding. k runs over
// channels first, so it is contiguous within one tap. X is the input's storage: float, or bf16 for an
// activation stored so (Backend::stores_bf16_activations), widened as it is loaded.
template <class X>
struct Im2colOf {
    const X* x;
    ConvGeom g;
    int rows;  // batch * oh * ow
    int kdim;  // taps * taps * c
    static constexpr bool k_fast = true;
    // The offset of A(m, k) in x, or -1 in the padding (and outside the matrix); the image it is in.
    __device__ __forceinline__ int64_t index(int m, int k, int& image) const {
        if (m >= rows || k >= kdim) return -1;
        const int ox = m % g.ow, rest = m / g.ow;
        const int oy = rest % g.oh;
        image = rest / g.oh;
        const int ci = k % g.c, tap = k / g.c;
        const int kx = tap % g.taps, ky = tap / g.taps;
        const int iy = oy * g.stride + ky - g.pad, ix = ox * g.stride + kx - g.pad;
        if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) return -1;
        return ((int64_t(image) * g.h + iy) * g.w + ix) * g.c + ci;
    }
    __device__ float operator()(int m, int k) const {
        int image;
        const int64_t i = index(m, k, image);
        return i < 0 ? 0.0f : to_f32(x[i]);
    }
    // With c a multiple of 8, the eight k from a multiple of 8 are consecutive channels of one tap: one
    // pixel (or its padding), one run of memory.
    __device__ void load8(int m, int k, int valid, float (&v)[8]) const {
        if (g.c % 8 != 0) return gather8([&](int t) { return (*this)(m, k + t); }, valid, v);
        int image;
        const int64_t i = index(m, k, image);
        if (i < 0) return zero8(v);
        load_run8(x + i, valid, v);
    }

    // A thread's run at row m (its output pixel decoded once: the image, the input row and column of tap
    // (0, 0)) and column k (the tap and channel, kept as k advances).
    struct Cursor {
        int m, k;        // the indices, for the element-wise path (c not a multiple of 8)
        int image, iy0, ix0;
        int ci, kx, ky;
    };
    __device__ __forceinline__ Cursor cursor(int m, int k, int) const {
        Cursor c;
        c.m = m, c.k = k;
        const int ox = m % g.ow, rest = m / g.ow;
        c.image = rest / g.oh;
        c.iy0 = (rest % g.oh) * g.stride - g.pad, c.ix0 = ox * g.stride - g.pad;
        c.ci = k % g.c;
        const int tap = k / g.c;
        c.kx = tap % g.taps, c.ky = tap / g.taps;
        return c;
    }
    __device__ __forceinline__ void advance(Cursor& c, int step) const {
        c.k += step;
        c.ci += step;
        while (c.ci >= g.c) {  // once a slice where c >= step
            c.ci -= g.c;
            if (++c.kx == g.taps) c.kx = 0, ++c.ky;
        }
    }
    // The offset of the cursor's element in x, or -1 in the padding (the row is in range: the caller
    // passes only valid runs).
    __device__ __forceinline__ int64_t offset(const Cursor& c) const {
        const int iy = c.iy0 + c.ky, ix = c.ix0 + c.kx;
        if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) return -1;
        return ((int64_t(c.image) * g.h + iy) * g.w + ix) * g.c + c.ci;
    }
    __device__ __forceinline__ void load8(const Cursor& c, int valid, float (&v)[8]) const {
        if (g.c % 8 != 0) return load8(c.m, c.k, valid, v);
        const int64_t i = offset(c);
        if (i < 0) return zero8(v);
        load_run8(x + i, valid, v);
    }
};
using Im2col = Im2colOf<float>;

// The same gather of silu(group_norm(x)) (or of group_norm(x) without SiLU), then inverted dropout when
// p > 0: the input of a ResNet block's convolution, normalised as it is loaded and never stored.
// z = (x - mean) rstd gamma + beta with the statistics of the element's (image, group), the same
// arithmetic as group_norm_forward_f32, and the dropout mask of element i of the normalised tensor drawn
// as dropout_forward_f32 draws it, so the fused and the separate paths agree bit for bit; the padding
// stays 0 (it pads the normalised input). X as Im2colOf: the normalisation computes in fp32 either way.
template <class X>
struct NormedIm2colOf {
    Im2colOf<X> a;
    const float* mean;   // [batch, groups]
    const float* rstd;   // [batch, groups]
    const float* gamma;  // [c]
    const float* beta;   // [c]
    int groups;
    int silu;
    float p;             // dropout probability (0: none)
    float keep;          // 1 / (1 - p), rounded from fp64
    uint64_t seed, stream;
    static constexpr bool k_fast = true;
    __device__ float operator()(int m, int k) const {
        int image;
        const int64_t i = a.index(m, k, image);
        if (i < 0) return 0.0f;
        const int ci = k % a.g.c, s = image * groups + ci / (a.g.c / groups);
        const float z = (to_f32(a.x[i]) - mean[s]) * rstd[s] * gamma[ci] + beta[ci];
        const float v = silu ? z * sigmoid(z) : z;
        return p > 0.0f ? v * (philox_uniform(seed, stream, uint64_t(i)) >= p ? keep : 0.0f) : v;
    }
    // Eight consecutive channels of one pixel (c a multiple of 8) in two 16-byte loads, each then
    // normalised as operator() does it.
    __device__ void load8(int m, int k, int valid, float (&v)[8]) const {
        if (a.g.c % 8 != 0) return gather8([&](int t) { return (*this)(m, k + t); }, valid, v);
        int image;
        const int64_t i = a.index(m, k, image);
        if (i < 0) return zero8(v);
        load_run8(a.x + i, valid, v);
        const int c0 = k % a.g.c, per_group = a.g.c / groups;
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            if (t >= valid) break;  // load_run8 left it 0: the padding of a short run is not normalised
            const int ci = c0 + t, s = image * groups + ci / per_group;
            const float z = (v[t] - mean[s]) * rstd[s] * gamma[ci] + beta[ci];
            const float u = silu ? z * sigmoid(z) : z;
            v[t] = p > 0.0f ? u * (philox_uniform(seed, stream, uint64_t(i + t)) >= p ? keep : 0.0f) : u;
        }
    }
    // Im2colOf's cursor; the normalisation still reads its statistics and affine parameters per element
    // (these kernels run where the scratch of group_norm_apply_* does not: fp32 precision, channels not
    // in runs of 8).
    using Cursor = typename Im2colOf<X>::Cursor;
    __device__ __forceinline__ Cursor cursor(int m, int k, int step) const { return a.cursor(m, k, step); }
    __device__ __forceinline__ void advance(Cursor& c, int step) const { a.advance(c, step); }
    __device__ __forceinline__ void load8(const Cursor& c, int valid, float (&v)[8]) const {
        if (a.g.c % 8 != 0) return load8(c.m, c.k, valid, v);
        const int64_t i = a.offset(c);
        if (i < 0) return zero8(v);
        load_run8(a.x + i, valid, v);
        const int per_group = a.g.c / groups, s0 = c.image * groups;
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            if (t >= valid) break;
            const int ci = c.ci + t, s = s0 + ci / per_group;
            const float z = (v[t] - mean[s]) * rstd[s] * gamma[ci] + beta[ci];
            const float u = silu ? z * sigmoid(z) : z;
            v[t] = p > 0.0f ? u * (philox_uniform(seed, stream, uint64_t(i + t)) >= p ? keep : 0.0f) : u;
        }
    }
};

// Either gather as the B operand of the weight gradient: B(r, k) = im2col(r, k), k contiguous.
template <class Gather>
struct Im2colB {
    Gather a;
    static constexpr bool n_fast = true;
    __device__ float operator()(int r, int k) const { return a(r, k); }
    __device__ void load8(int r, int k, int valid, float (&v)[8]) const { a.load8(r, k, valid, v); }
    // The run's column (tap and channel) stays; its row, a pixel, advances by `step` pixels a slice: the
    // step's decomposition into images, rows and columns is made once, so the pixel moves by additions
    // and carries.
    struct Cursor {
        typename Gather::Cursor c;
        int oy, ox, dy, dx, dimg;  // the pixel's output row and column, and the step's parts
    };
    __device__ __forceinline__ Cursor cursor(int r, int k, int step) const {
        const ConvGeom& g = geom();
        Cursor c;
        c.c = a.cursor(r, k, step);
        c.ox = r % g.ow;
        c.oy = (r / g.ow) % g.oh;
        c.dx = step % g.ow;
        c.dy = (step / g.ow) % g.oh;
        c.dimg = step / (g.ow * g.oh);
        return c;
    }
    __device__ __forceinline__ void advance(Cursor& c, int step) const {
        const ConvGeom& g = geom();
        c.c.m += step;
        c.ox += c.dx;
        const int carry_x = c.ox >= g.ow;
        c.ox -= carry_x * g.ow;
        c.oy += c.dy + carry_x;
        const int carry_y = c.oy >= g.oh;
        c.oy -= carry_y * g.oh;
        c.c.image += c.dimg + carry_y;
        c.c.iy0 = c.oy * g.stride - g.pad, c.c.ix0 = c.ox * g.stride - g.pad;
    }
    __device__ __forceinline__ void load8(const Cursor& c, int valid, float (&v)[8]) const {
        a.load8(c.c, valid, v);
    }
    __device__ __forceinline__ const ConvGeom& geom() const;
};

// The geometry of either gather (an Im2colOf keeps it, a NormedIm2colOf its Im2colOf).
template <class X>
__device__ __forceinline__ const ConvGeom& gather_geom(const Im2colOf<X>& a) {
    return a.g;
}
template <class X>
__device__ __forceinline__ const ConvGeom& gather_geom(const NormedIm2colOf<X>& a) {
    return a.a.g;
}
template <class Gather>
__device__ __forceinline__ const ConvGeom& Im2colB<Gather>::geom() const {
    return gather_geom(a);
}

// The input gradient's gather: A(m, k) with m = (image, iy, ix) an input pixel, k = (ky, kx, oc): the
// output gradient at the position that tap (ky, kx) of input pixel (iy, ix) fed, or 0 when there is none
// (outside the output, or between the strides).
struct DyGather {
    const float* dy;
    ConvGeom g;
    int rows;  // batch * h * w
    int kdim;  // taps * taps * o
    static constexpr bool k_fast = true;
    // The offset of A(m, k) in dy, or -1 where it is 0.
    __device__ __forceinline__ int64_t index(int m, int k) const {
        if (m >= rows || k >= kdim) return -1;
        const int ix = m % g.w, rest = m / g.w;
        const int iy = rest % g.h, image = rest / g.h;
        const int oc = k % g.o, tap = k / g.o;
        const int kx = tap % g.taps, ky = tap / g.taps;
        const int ny = iy + g.pad - ky, nx = ix + g.pad - kx;
        if (ny < 0 || nx < 0 || ny % g.stride != 0 || nx % g.stride != 0) return -1;
        const int oy = ny / g.stride, ox = nx / g.stride;
        if (oy >= g.oh || ox >= g.ow) return -1;
        return ((int64_t(image) * g.oh + oy) * g.ow + ox) * g.o + oc;
    }
    __device__ float operator()(int m, int k) const {
        const int64_t i = index(m, k);
        return i < 0 ? 0.0f : dy[i];
    }
    // With o a multiple of 8, the eight k from a multiple of 8 are consecutive channels of one tap.
    __device__ void load8(int m, int k, int valid, float (&v)[8]) const {
        if (g.o % 8 != 0) return gather8([&](int t) { return (*this)(m, k + t); }, valid, v);
        const int64_t i = index(m, k);
        if (i < 0) return zero8(v);
        load_run8(dy + i, valid, v);
    }
    // A thread's run at input pixel m (decoded once) and column k (tap and output channel, kept as k
    // advances).
    struct Cursor {
        int m, k;
        int image, ny0, nx0;  // iy + pad, ix + pad
        int oc, kx, ky;
    };
    __device__ __forceinline__ Cursor cursor(int m, int k, int) const {
        Cursor c;
        c.m = m, c.k = k;
        const int ix = m % g.w, rest = m / g.w;
        c.ny0 = rest % g.h + g.pad, c.nx0 = ix + g.pad, c.image = rest / g.h;
        c.oc = k % g.o;
        const int tap = k / g.o;
        c.kx = tap % g.taps, c.ky = tap / g.taps;
        return c;
    }
    __device__ __forceinline__ void advance(Cursor& c, int step) const {
        c.k += step;
        c.oc += step;
        while (c.oc >= g.o) {
            c.oc -= g.o;
            if (++c.kx == g.taps) c.kx = 0, ++c.ky;
        }
    }
    __device__ __forceinline__ void load8(const Cursor& c, int valid, float (&v)[8]) const {
        if (g.o % 8 != 0) return load8(c.m, c.k, valid, v);
        int ny = c.ny0 - c.ky, nx = c.nx0 - c.kx;
        if (ny < 0 || nx < 0) return zero8(v);
        if (g.stride == 2) {  // the taps between the strides read nothing
            if ((ny | nx) & 1) return zero8(v);
            ny >>= 1, nx >>= 1;
        }
        if (ny >= g.oh || nx >= g.ow) return zero8(v);
        load_run8(dy + ((int64_t(c.image) * g.oh + ny) * g.ow + nx) * g.o + c.oc, valid, v);
    }
};

// The weight [o, ky, kx, c] as the B operand of the input gradient: B(k = (ky, kx, oc), ci); fp32 or its
// bf16 copy, as RowsB.
template <class T>
struct WeightT {
    const T* w;
    ConvGeom g;
    static constexpr bool n_fast = true;
    static constexpr bool packed = Storage<T>::packed;
    __device__ __forceinline__ const T* at(int k, int ci) const {
        const int oc = k % g.o, tap = k / g.o;
        return w + (int64_t(oc) * g.taps * g.taps + tap) * g.c + ci;
    }
    __device__ float operator()(int k, int ci) const { return ci < g.c ? to_f32(*at(k, ci)) : 0.0f; }
    template <class Run>
    __device__ void load8(int k, int ci, int valid, Run& v) const {
        load_run8(at(k, ci), valid, v);
    }
    // A run along ci at row k = (tap, oc): oc and the tap kept as k advances.
    struct Cursor {
        int oc, tap, ci;
    };
    __device__ __forceinline__ Cursor cursor(int k, int ci, int) const { return {k % g.o, k / g.o, ci}; }
    __device__ __forceinline__ void advance(Cursor& c, int step) const {
        c.oc += step;
        while (c.oc >= g.o) c.oc -= g.o, ++c.tap;
    }
    __device__ __forceinline__ const T* at(const Cursor& c) const {
        return w + (int64_t(c.oc) * g.taps * g.taps + c.tap) * g.c + c.ci;
    }
    template <class Run>
    __device__ __forceinline__ void load8(const Cursor& c, int valid, Run& v) const {
        load_run8(at(c), valid, v);
    }
};

// ---- the core -------------------------------------------------------------------------------------

// Accumulates the block's 64 x 64 tile at (m0, n0) over k in [k_begin, k_end) into acc: thread
// (ty, tx) = (tid / 16, tid % 16) owns rows m0 + 4 ty + i and columns n0 + 4 tx + j.
template <class LoadA, class LoadB>
__device__ __forceinline__ void gemm_tile(const LoadA& a, const LoadB& b, int m0, int n0, int k_begin, int k_end,
                                          float (&acc)[4][4]) {
    // +4 keeps rows 16-byte aligned and staggers the banks of the transposed stores.
    __shared__ __align__(16) float As[GEMM_BK][GEMM_BM + 4];
    __shared__ __align__(16) float Bs[GEMM_BK][GEMM_BN + 4];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    for (int k0 = k_begin; k0 < k_end; k0 += GEMM_BK) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int e = tid + i * GEMM_THREADS;
            const int r = LoadA::k_fast ? e / GEMM_BK : e % GEMM_BM;
            const int kk = LoadA::k_fast ? e % GEMM_BK : e / GEMM_BM;
            As[kk][r] = k0 + kk < k_end ? a(m0 + r, k0 + kk) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int e = tid + i * GEMM_THREADS;
            const int cc = LoadB::n_fast ? e % GEMM_BN : e / GEMM_BK;
            const int kk = LoadB::n_fast ? e / GEMM_BN : e % GEMM_BK;
            Bs[kk][cc] = k0 + kk < k_end ? b(k0 + kk, n0 + cc) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GEMM_BK; ++kk) {
            const float4 av = *reinterpret_cast<const float4*>(&As[kk][4 * ty]);
            const float4 bv = *reinterpret_cast<const float4*>(&Bs[kk][4 * tx]);
            const float ar[4] = {av.x, av.y, av.z, av.w};
            const float br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
        }
        __syncthreads();
    }
}

// Where a tile's results go.
struct Epilogue {
    float* c;             // C[m, n] at c[m * ldc + n]
    int64_t ldc;
    const float* bias;    // added per column when not null
    int accumulate;       // C += result instead of C = result
    float* workspace;     // split-K: slice z of the partial sums at workspace[z * rows * cols + m * cols + n]
    // Fused adds of the convolution forward (never split): image_bias[m / pixels, n] (a per-image,
    // per-channel bias: the time embedding) and residual[m * ldc + n], when not null.
    const float* image_bias = nullptr;
    int pixels = 1;
    const float* residual = nullptr;
    // C stored in bf16 instead, at c_bf16[m * ldc + n] rounded to nearest (an activation stored in bf16,
    // Backend::stores_bf16_activations), when not null: c is then unused, and accumulate must be 0.
    __nv_bfloat16* c_bf16 = nullptr;
    // The residual stored in bf16 instead (a block output stored in bf16), when not null: widened, then
    // added as residual is.
    const __nv_bfloat16* residual_bf16 = nullptr;

    // Result v of C[m, n] with the fused adds applied: bias, time embedding, residual (a launch that does
    // not split K).
    __device__ __forceinline__ float finish(int cols, int m, int n, float v) const {
        if (bias) v += bias[n];
        if (image_bias) v += image_bias[int64_t(m / pixels) * cols + n];
        if (residual) v += residual[int64_t(m) * ldc + n];
        if (residual_bf16) v += to_f32(residual_bf16[int64_t(m) * ldc + n]);
        return v;
    }

    // Writes result v of C[m, n] (in range): a raw partial sum to the workspace when the launch splits K,
    // else bias and accumulate applied, to C.
    __device__ __forceinline__ void store(int rows, int cols, int m, int n, float v) const {
        if (gridDim.z > 1) {
            workspace[(int64_t(blockIdx.z) * rows + m) * cols + n] = v;
            return;
        }
        v = finish(cols, m, n, v);
        if (c_bf16) {
            c_bf16[int64_t(m) * ldc + n] = __float2bfloat16_rn(v);
            return;
        }
        float* dst = c + int64_t(m) * ldc + n;
        *dst = accumulate ? *dst + v : v;
    }
};

// One launch: grid (ceil(rows / 64), ceil(cols / 64), splits), block 256 (rows, the long side, on x, whose
// limit is 2^31 - 1; consecutive blocks share a tile of B in L2). With splits > 1, slice z covers
// k in [z * chunk, (z + 1) * chunk) and writes raw partial sums to the workspace (bias and accumulate are
// applied by gemm_reduce_f32).
template <class LoadA, class LoadB>
__device__ __forceinline__ void gemm_run(const LoadA& a, const LoadB& b, int rows, int cols, int kdim, int chunk,
                                         const Epilogue& e) {
    const int m0 = blockIdx.x * GEMM_BM, n0 = blockIdx.y * GEMM_BN;
    const int k_begin = blockIdx.z * chunk, k_end = min(kdim, k_begin + chunk);
    float acc[4][4] = {};
    gemm_tile(a, b, m0, n0, k_begin, k_end, acc);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + 4 * ty + i;
        if (m >= rows) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + 4 * tx + j;
            if (n < cols) e.store(rows, cols, m, n, acc[i][j]);
        }
    }
}

}  // namespace ddpm

// C[m, n] (+)= sum_z workspace[z, m, n] (+ bias[n]), the slices added in order z = 0, 1, ...
// One thread per element of C. Bytes: (splits + 1 or 2) * 4 per element.
extern "C" __global__ void gemm_reduce_f32(const float* __restrict__ workspace, int splits, int rows, int cols,
                                           float* __restrict__ c, int64_t ldc, const float* __restrict__ bias,
                                           int accumulate) {
    const int64_t total = int64_t(rows) * cols;
    for (int64_t i = ddpm::global_thread(); i < total; i += ddpm::grid_threads()) {
        float v = 0.0f;
        for (int z = 0; z < splits; ++z) v += workspace[z * total + i];
        const int64_t m = i / cols;
        const int n = int(i % cols);
        if (bias) v += bias[n];
        float* dst = c + m * ldc + n;
        *dst = accumulate ? *dst + v : v;
    }
}

// out[n] = sum_m x[m, n] over `rows` rows of `cols` columns (a bias gradient), in two deterministic stages:
// column_sums_partial_f32 with grid (ceil(cols / 32), slices), block 256, writes partial[slice, n] (each
// block's 8 warps stride over its rows, lanes on consecutive columns, then sum in warp order);
// column_sums_finish_f32, grid ceil(cols / 32), block 256, adds the slices the same way (warp w every 8th
// slice from w), so no thread adds more than slices / 8 values in a chain.
extern "C" __global__ void __launch_bounds__(256)
    column_sums_partial_f32(const float* __restrict__ x, int64_t rows, int cols, float* __restrict__ partial) {
    __shared__ float part[8][32];
    const int n = blockIdx.x * 32 + (threadIdx.x & 31);
    const int64_t per = (rows + gridDim.y - 1) / gridDim.y;
    const int64_t begin = blockIdx.y * per, end = min(rows, begin + per);
    const float total = ddpm::column_sum_8warps(x, begin, end, cols, n, n < cols, part);
    if (threadIdx.x < 32 && n < cols) partial[int64_t(blockIdx.y) * cols + n] = total;
}

extern "C" __global__ void __launch_bounds__(256)
    column_sums_finish_f32(const float* __restrict__ partial, int slices, int cols, float* __restrict__ out) {
    __shared__ float part[8][32];
    const int n = blockIdx.x * 32 + (threadIdx.x & 31);
    const float total = ddpm::column_sum_8warps(partial, 0, slices, cols, n, n < cols, part);
    if (threadIdx.x < 32 && n < cols) out[n] = total;
}

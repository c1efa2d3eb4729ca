// mma.h for the CUDA emulator (see cuda_emu.h): the part of the WMMA API (nvcuda::wmma) the kernels use,
// for 16 x 16 x 16 tiles of bf16 with fp32 accumulators.
//
// On the device a fragment is spread over the warp's 32 lanes in a layout the API does not disclose; here
// every lane holds the whole tile and does the whole multiply, so the lanes compute the same thing
// redundantly and any layout-independent use of the API (all the kernels may rely on) behaves as on the
// device. Loads and stores are collective, as on the device: each is fenced by warp barriers, so every
// lane has read before any lane writes (a kernel that loads an accumulator from shared memory, adds to
// it and stores it back updates it once, not once per lane). A product of two bf16 values is exact in fp32; sums run in k order (the device's order within
// an mma is unspecified, hence the tests' tolerances). The API's preconditions are checked, not assumed:
// pointers 32-byte aligned, leading dimensions a multiple of 16 bytes.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_emu.h"

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulator has the m16n16k16 shape only");
    static constexpr int num_elements = 256;
    T x[256];  // row-major: (row, col) at 16 row + col, rows m (A, C) or k (B)
};

namespace detail {
inline void check(const void* p, unsigned ldm, unsigned elem_bytes, const char* what) {
    if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0 || (ldm * elem_bytes) % 16 != 0) {
        std::fprintf(stderr, "CUDA emulator: %s with pointer %p and ldm %u breaks WMMA's alignment rules\n", what,
                     p, ldm);
        std::abort();
    }
}
inline float value(float v) { return v; }
inline float value(__nv_bfloat16 v) { return __bfloat162float(v); }

// A collective load of a 16 x 16 tile into a fragment's row-major elements x, from row-major or (col)
// column-major memory.
template <class T>
inline void load(T* x, const T* p, unsigned ldm, bool col) {
    check(p, ldm, sizeof(T), "load_matrix_sync");
    emu::syncwarp();
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) x[16 * r + c] = col ? p[c * ldm + r] : p[r * ldm + c];
    emu::syncwarp();
}
}  // namespace detail

template <class Use, class T, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
    detail::load(f.x, p, ldm, std::is_same_v<Layout, col_major>);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
    detail::load(f.x, p, ldm, layout == mem_col_major);
}

template <class T>
inline void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T v) {
    for (T& e : f.x) e = v;
}

template <class TA, class LA, class TB, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
    float out[256];
    for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 16; ++n) {
            float s = c.x[16 * m + n];
            for (int k = 0; k < 16; ++k) s += detail::value(a.x[16 * m + k]) * detail::value(b.x[16 * k + n]);
            out[16 * m + n] = s;
        }
    for (int i = 0; i < 256; ++i) d.x[i] = out[i];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
    detail::check(p, ldm, sizeof(float), "store_matrix_sync");
    emu::syncwarp();
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) {
            float& dst = layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
            dst = f.x[16 * r + c];
        }
    emu::syncwarp();
}
}  // namespace nvcuda::wmma

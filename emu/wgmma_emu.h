// wgmma_emu.h: the CPU emulator's warpgroup MMA (kernels/wgmma.cuh says what each function does, with
// the PTX ISA's layouts).
//
// - Descriptors keep the device's fields: LBO and SBO are encoded and decoded at the device's bit
//   positions. Only the start address differs: the emulator's shared memory is ordinary host memory, so
//   the 14-bit start field holds an index into a table of the start pointers the kernels have named.
// - A wgmma is queued when issued and run when a wait_group lets it complete (commit_group closes a
//   group): its operands are read from shared memory then, as the hardware may, so a kernel that
//   overwrites an operand before waiting for the wgmma that reads it gets wrong results.
// - Each thread computes its own accumulator elements (thread 32 w + 4 g + t of the warpgroup: rows
//   16 w + g and + 8, columns 8 j + 2 t and + 1; from 0 where the wgmma does not accumulate), reading A
//   and B through the descriptors: K-major element
//   (mn, k) at byte 2 (8 (mn % 8) + k % 8) + LBO (k / 8) + SBO (mn / 8) from the start, MN-major at
//   2 (mn % 8 + 8 (k % 8)) + SBO (mn / 8) + LBO (k / 8); in the 64-byte swizzle, K-major at 2 k +
//   64 (mn % 8) + SBO (mn / 8) and MN-major at 2 (mn % 32) + 64 (k % 8) + LBO (mn / 32) + SBO (k / 8),
//   the address's bits 4-5 then XORed with its bits 7-8; in the 128-byte swizzle K-major at 2 k +
//   128 (mn % 8) + SBO (mn / 8) and MN-major at 2 (mn % 64) + 128 (k % 8) + LBO (mn / 64) + SBO (k / 8),
//   bits 4-6 XORed with bits 7-9. The 32-byte swizzle stops the emulator: no kernel uses it.
// - A from registers (wgmma_rs_*): the issuing warp's fragments are gathered from its lanes as they issue
//   (lane 4 g + t holds rows g and g + 8, k 2 t, 2 t + 1, 2 t + 8, 2 t + 9), so each thread's result reads
//   the other lanes' registers as the hardware does. Products of bf16 values are exact in fp32; sums run in k order after
//   the accumulator.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda_emu.h"
#include "tma_emu.h"

namespace ddpm {
namespace emu_wgmma {
struct Op {
    float* d;
    uint64_t a, b;
    int trans_a, trans_b, accumulate;
    int n;        // the columns of B and D
    bool a_regs;  // A from registers: `frags` holds the warp's fragments, lane by lane
    uint32_t frags[32][4];
};
struct Thread {
    std::vector<std::vector<Op>> committed;  // oldest first
    std::vector<Op> open;
};

inline unsigned thread_id() { return (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x; }

inline Thread& state() {
    static std::vector<Thread> threads(1024);
    return threads[thread_id()];
}

inline std::vector<const void*>& starts() {
    static std::vector<const void*> table;
    return table;
}

inline uint32_t start_index(const void* p) {
    auto& table = starts();
    for (uint32_t i = 0; i < table.size(); ++i)
        if (table[i] == p) return i;
    if (table.size() >= 0x4000) {
        std::fprintf(stderr, "CUDA emulator: more than 16384 distinct wgmma operand addresses\n");
        std::abort();
    }
    table.push_back(p);
    return uint32_t(table.size() - 1);
}

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "CUDA emulator: %s\n", what);
    std::abort();
}

// The byte offset from the start of element (mn, k) of an operand described by `desc`, before any
// swizzle; and the swizzle, applied to the element's shared-memory address (the emulator's shared memory
// is host memory, aligned as the kernel declares it, so the same address bits are XORed as on the device).
inline uint64_t offset(uint64_t desc, bool mn_major, int mn, int k) {
    if ((desc >> 49) & 7) fail("a wgmma descriptor with a base offset (bits 49-51; not modelled)");
    const uint64_t lbo = ((desc >> 16) & 0x3FFF) << 4, sbo = ((desc >> 32) & 0x3FFF) << 4;
    switch (desc >> 62) {
    case 0: {
        const uint64_t in_core = mn_major ? mn % 8 + 8 * (k % 8) : 8 * (mn % 8) + k % 8;
        return 2 * in_core + lbo * (k / 8) + sbo * (mn / 8);
    }
    case 1:  // 128-byte swizzle: rows of 128 bytes
        if (mn_major) return 2 * uint64_t(mn % 64) + 128 * uint64_t(k % 8) + lbo * (mn / 64) + sbo * (k / 8);
        return 2 * uint64_t(k) + 128 * uint64_t(mn % 8) + sbo * (mn / 8);
    case 2:  // 64-byte swizzle: rows of 64 bytes
        if (mn_major) return 2 * uint64_t(mn % 32) + 64 * uint64_t(k % 8) + lbo * (mn / 32) + sbo * (k / 8);
        return 2 * uint64_t(k) + 64 * uint64_t(mn % 8) + sbo * (mn / 8);
    default:
        fail("a wgmma operand in the 32-byte swizzle (not modelled)");
    }
}
// The bytes of one swizzled row (0: no swizzle).
inline unsigned swizzle_row(uint64_t desc) { return desc >> 62 == 1 ? 128 : desc >> 62 == 2 ? 64 : 0; }
inline uintptr_t swizzle(uint64_t desc, uintptr_t address) {
    switch (swizzle_row(desc)) {
    case 64:
        return address ^ (((address >> 7) & 3) << 4);
    case 128:
        return address ^ (((address >> 7) & 7) << 4);
    default:
        return address;
    }
}
// A swizzled operand starts where the pattern does (a multiple of 512 or 1024 bytes: 8 rows), K-major
// ones plus the step along k inside the pattern's first row, so that their 16 k lie in one row.
inline void check_start(uint64_t desc, bool mn_major, const void* start) {
    const auto a = reinterpret_cast<uintptr_t>(start);
    const unsigned row = swizzle_row(desc);
    if (row && (mn_major ? a % (8 * row) != 0 : (a % (8 * row)) + 32 > row))
        fail("a swizzled wgmma operand that does not start where the pattern does");
}

// The bf16 element (mn, k) of an operand described by `desc`.
inline float element(uint64_t desc, bool mn_major, int mn, int k) {
    const auto* start = static_cast<const unsigned char*>(starts().at(desc & 0x3FFF));
    const auto at = swizzle(desc, reinterpret_cast<uintptr_t>(start + offset(desc, mn_major, mn, k)));
    uint16_t bits;
    std::memcpy(&bits, reinterpret_cast<const void*>(at), sizeof bits);
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// Element (row g + 8 h, k) of a warp's A fragments from registers: lane 4 g + (k % 8) / 2, register
// h + 2 (k / 8), the lower column in the low half.
inline float fragment_element(const uint32_t (&frags)[32][4], int g, int h, int k) {
    const uint32_t word = frags[4 * g + (k % 8) / 2][h + 2 * (k / 8)];
    const uint32_t u = (k % 2 ? word >> 16 : word & 0xFFFF) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline void run(const Op& op) {
    const unsigned t = thread_id() % 128, w = t / 32, g = (t % 32) / 4, q = t % 4;
    float a[2][16];  // this thread's two rows of A
    for (int h = 0; h < 2; ++h)
        for (int k = 0; k < 16; ++k)
            a[h][k] = op.a_regs ? fragment_element(op.frags, int(g), h, k)
                                : element(op.a, op.trans_a, int(16 * w + g + 8 * h), k);
    for (int j = 0; j < op.n / 8; ++j)
        for (int x = 0; x < 4; ++x) {
            const int col = 8 * j + 2 * int(q) + x % 2;
            float s = op.accumulate ? op.d[4 * j + x] : 0.0f;
            for (int k = 0; k < 16; ++k) s += a[x / 2][k] * element(op.b, op.trans_b, col, k);
            op.d[4 * j + x] = s;
        }
}
}  // namespace emu_wgmma

inline uint64_t smem_desc(const void* start, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    if (reinterpret_cast<std::uintptr_t>(start) % 16 != 0) {
        std::fprintf(stderr, "CUDA emulator: wgmma operand at %p, not 16-byte aligned\n", start);
        std::abort();
    }
    return smem_desc_fields(emu_wgmma::start_index(start), lbo_bytes, sbo_bytes);
}

inline uint64_t smem_desc_sw64(const void* start, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    return smem_desc(start, lbo_bytes, sbo_bytes) | SMEM_DESC_SWIZZLE_64B;
}

inline uint64_t smem_desc_sw128(const void* start, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    return smem_desc(start, lbo_bytes, sbo_bytes) | SMEM_DESC_SWIZZLE_128B;
}

// Registers are not modelled: a warpgroup's setmaxnreg changes nothing here.
template <int N>
inline void setmaxnreg_dec() {}
template <int N>
inline void setmaxnreg_inc() {}
inline void wgmma_fence() {}
inline void fence_proxy_async() {}
template <int N>
inline void fence_operands(float (&)[N]) {}

namespace emu_wgmma {
// The bytes an operand of `rows` x 16 covers (its last element is its farthest: every term of the
// address grows with mn and k; a swizzle moves an element only within its 64-byte row, so the span runs
// from the start's row to the end of the last element's); no TMA copy may still be landing there for
// this thread.
inline void check_operand(uint64_t desc, bool mn_major, int rows) {
    const auto* start = static_cast<const unsigned char*>(starts().at(desc & 0x3FFF));
    check_start(desc, mn_major, start);
    const uint64_t last = offset(desc, mn_major, rows - 1, 15);
    const unsigned bytes = swizzle_row(desc);
    if (!bytes) {
        emu_tma::check_read(start, start + last + 2);
        return;
    }
    const auto row = [bytes](uintptr_t a) { return reinterpret_cast<const unsigned char*>(a / bytes * bytes); };
    emu_tma::check_read(row(reinterpret_cast<uintptr_t>(start)),
                        row(reinterpret_cast<uintptr_t>(start + last)) + bytes);
}

// Queues a wgmma of N columns, A from shared memory (desc a) or from the warp's registers (frag).
template <int N>
inline void issue(float* d, uint64_t a, const uint32_t* frag, uint64_t b, int ta, int tb, int accumulate) {
    Op op{};
    op.d = d;
    op.a = a;
    op.b = b;
    op.trans_a = ta;
    op.trans_b = tb;
    op.accumulate = accumulate;
    op.n = N;
    op.a_regs = frag != nullptr;
    if (op.a_regs)
        emu::warp_allgather(frag, 16, op.frags);  // every lane's four registers, in lane order
    else
        check_operand(a, ta, 64);
    check_operand(b, tb, N);
    state().open.push_back(op);
}
}  // namespace emu_wgmma

template <int TA, int TB>
inline void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
    emu_wgmma::issue<128>(d, a, nullptr, b, TA, TB, accumulate);
}
template <int TA, int TB>
inline void wgmma_ss_m64n128k16(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
    emu_wgmma::issue<128>(d, a, nullptr, b, TA, TB, accumulate);
}
template <int TA, int TB>
inline void wgmma_ss_m64n256k16(float (&d)[128], uint64_t a, uint64_t b, int accumulate) {
    emu_wgmma::issue<256>(d, a, nullptr, b, TA, TB, accumulate);
}
template <int TB>
inline void wgmma_rs_m64n128k16(float (&d)[64], const uint32_t (&a)[4], uint64_t b, int accumulate) {
    emu_wgmma::issue<128>(d, 0, a, b, 0, TB, accumulate);
}
template <int TB>
inline void wgmma_rs_m64n256k16(float (&d)[128], const uint32_t (&a)[4], uint64_t b, int accumulate) {
    emu_wgmma::issue<256>(d, 0, a, b, 0, TB, accumulate);
}

inline void wgmma_commit() {
    auto& s = emu_wgmma::state();
    s.committed.push_back(std::move(s.open));
    s.open.clear();
}

// Runs the oldest committed groups until at most N remain.
template <int N>
inline void wgmma_wait() {
    auto& s = emu_wgmma::state();
    while (s.committed.size() > std::size_t(N)) {
        for (const auto& op : s.committed.front()) emu_wgmma::run(op);
        s.committed.erase(s.committed.begin());
    }
}
}  // namespace ddpm

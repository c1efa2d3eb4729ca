// tma_emu.h: the CPU emulator's tensor-memory accelerator and shared-memory barriers (kernels/tma.cuh says
// what each function does).
//
// - The tensor map is the emulator's own encoding of what the driver's holds for a 2-D matrix (address,
//   extents, row pitch, box), written by encode_2d (ddpm_emu_tensor_map_2d, which the Rust side calls
//   where the device would call cuTensorMapEncodeTiled) after the driver's checks: a 16-byte aligned
//   address, a pitch that is a multiple of 16 bytes and holds a row, box sides of 1 to 256 elements and
//   box rows a multiple of 16 bytes.
// - A copy reads its source when it is queued and fills its destination with NaN (all bits set); it lands
//   when a thread next waits on its barrier. So a kernel that reads a stage before waiting for the copy
//   into it, or queues a copy into a stage a wgmma still reads, gets NaN there too. A destination not
//   128-byte aligned, or a map the encoder did not write, stops the emulator.
// - A barrier's phase completes when its arrivals are in and every byte announced has landed; a thread
//   waiting on a phase that cannot complete lets the others run (emu::spin), and if none can, the
//   emulator's deadlock check stops it.
// - Each thread's waits are remembered: a wgmma issued over bytes a copy writes stops the emulator unless
//   the issuing thread itself waited for that copy's phase (check_read), wherever the copy happened to
//   land first.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

#include "cuda_emu.h"

namespace ddpm {

struct alignas(8) TensorMap {
    uint64_t opaque[16];
};

namespace emu_tma {
constexpr uint64_t MAGIC = 0x544d41325f656d75ull;  // "TMA2_emu"
constexpr uint64_t ELEMENT_BYTES = 2;              // bf16, the only element type the kernels copy

enum Field { KEY, BASE, WIDTH, HEIGHT, PITCH, BOX_WIDTH, BOX_HEIGHT };

// 0, or 1 when the driver would refuse these parameters.
inline int encode_2d(uint64_t* map, uint64_t base, uint64_t width, uint64_t height, uint64_t pitch,
                     unsigned box_width, unsigned box_height) {
    const bool ok = base % 16 == 0 && width >= 1 && height >= 1 && width <= (1ull << 32) &&
                    height <= (1ull << 32) && pitch % 16 == 0 && pitch < (1ull << 40) &&
                    pitch >= width * ELEMENT_BYTES && box_width >= 1 && box_width <= 256 && box_height >= 1 &&
                    box_height <= 256 && box_width * ELEMENT_BYTES % 16 == 0;
    if (!ok) return 1;
    std::memset(map, 0, 16 * sizeof(uint64_t));
    map[KEY] = MAGIC;
    map[BASE] = base;
    map[WIDTH] = width;
    map[HEIGHT] = height;
    map[PITCH] = pitch;
    map[BOX_WIDTH] = box_width;
    map[BOX_HEIGHT] = box_height;
    return 0;
}

struct Copy {
    void* dst;
    std::vector<unsigned char> bytes;
};

struct Barrier {
    unsigned arrivals = 0, pending = 0;
    long long tx = 0;  // bytes announced and not yet landed (negative: landed before announced)
    unsigned long phase = 0;  // phases completed
    std::vector<Copy> copies;
    std::vector<unsigned long> seen = std::vector<unsigned long>(1024, 0);  // phases each thread waited for
};

// Where the copies queued so far write, and the phase of their barrier a thread must have waited for
// before it may read there (a later copy into the same bytes replaces the entry).
struct Region {
    uintptr_t lo, hi;
    const uint64_t* bar;
    unsigned long phase;
};

inline std::vector<Region>& regions() {
    static std::vector<Region> all;
    return all;
}

inline unsigned thread_id() { return (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x; }

// The block's barriers by address (one block runs at a time, and mbar_init starts each afresh).
inline std::map<const uint64_t*, Barrier>& barriers() {
    static std::map<const uint64_t*, Barrier> all;
    return all;
}

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "CUDA emulator: %s\n", what);
    std::abort();
}

inline Barrier& at(const uint64_t* bar) {
    auto it = barriers().find(bar);
    if (it == barriers().end() || it->second.arrivals == 0) fail("an mbarrier used before mbar_init");
    return it->second;
}

inline void complete_if_done(Barrier& b) {
    if (b.pending == 0 && b.tx == 0) {
        ++b.phase;
        b.pending = b.arrivals;
        emu::progressed();
    }
}

inline void land(Barrier& b) {
    for (const Copy& c : b.copies) {
        std::memcpy(c.dst, c.bytes.data(), c.bytes.size());
        b.tx -= static_cast<long long>(c.bytes.size());
    }
    b.copies.clear();
    complete_if_done(b);
}
// Called by the emulated wgmma as it is issued, for the bytes [lo, hi) an operand covers: the issuing
// thread must have waited for every copy that writes there (on the device the wgmma may read them at
// once; the emulator runs it later, so without this check a wait placed after the issue would pass).
inline void check_read(const void* lo, const void* hi) {
    const auto l = reinterpret_cast<uintptr_t>(lo), h = reinterpret_cast<uintptr_t>(hi);
    for (const Region& r : regions()) {
        if (r.hi <= l || h <= r.lo) continue;
        if (at(r.bar).seen[thread_id()] < r.phase)
            fail("a wgmma reads shared memory that a TMA copy writes before its thread waited for the copy");
    }
}
}  // namespace emu_tma

inline void mbar_init(uint64_t* bar, unsigned arrivals) {
    auto& all = emu_tma::barriers();
    auto it = all.find(bar);
    if (it != all.end() && !it->second.copies.empty()) emu_tma::fail("a TMA copy no thread waited for");
    if (arrivals == 0) emu_tma::fail("mbar_init with 0 arrivals");
    emu_tma::Barrier b;
    b.arrivals = b.pending = arrivals;
    all[bar] = b;
    auto& regions = emu_tma::regions();
    std::erase_if(regions, [bar](const emu_tma::Region& r) { return r.bar == bar; });
}

inline void fence_mbar_init() {}

inline void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
    emu_tma::Barrier& b = emu_tma::at(bar);
    b.tx += bytes;
    --b.pending;  // pending > 0 here: it is reset to the arrivals whenever it reaches 0
    emu_tma::complete_if_done(b);
}

inline void mbar_wait(uint64_t* bar, unsigned parity) {
    for (;;) {
        emu_tma::Barrier& b = emu_tma::at(bar);
        emu_tma::land(b);
        if ((b.phase & 1) != (parity & 1)) {
            b.seen[emu_tma::thread_id()] = b.phase;
            return;
        }
        emu::spin();
    }
}

inline void tma_load_2d(void* dst, const TensorMap* map, uint64_t* bar, int x, int y) {
    using namespace emu_tma;
    const uint64_t* m = map->opaque;
    if (m[KEY] != MAGIC) fail("a tensor map ddpm_emu_tensor_map_2d did not encode");
    if (reinterpret_cast<uintptr_t>(dst) % 128) fail("a TMA copy into shared memory not 128-byte aligned");
    Copy c;
    c.dst = dst;
    const uint64_t row_bytes = m[BOX_WIDTH] * ELEMENT_BYTES;
    c.bytes.assign(row_bytes * m[BOX_HEIGHT], 0);
    const auto* base = reinterpret_cast<const unsigned char*>(m[BASE]);
    for (uint64_t r = 0; r < m[BOX_HEIGHT]; ++r)
        for (uint64_t i = 0; i < m[BOX_WIDTH]; ++i) {
            const long long gx = x + static_cast<long long>(i), gy = y + static_cast<long long>(r);
            if (gx < 0 || gy < 0 || gx >= static_cast<long long>(m[WIDTH]) ||
                gy >= static_cast<long long>(m[HEIGHT]))
                continue;  // outside the matrix: zeros
            std::memcpy(&c.bytes[r * row_bytes + i * ELEMENT_BYTES], base + gy * m[PITCH] + gx * ELEMENT_BYTES,
                        ELEMENT_BYTES);
        }
    std::memset(dst, 0xff, c.bytes.size());
    Barrier& b = at(bar);
    const auto lo = reinterpret_cast<uintptr_t>(dst), hi = lo + c.bytes.size();
    std::erase_if(regions(), [&](const Region& r) { return r.lo < hi && lo < r.hi; });
    regions().push_back({lo, hi, bar, b.phase + 1});
    b.copies.push_back(std::move(c));
}

}  // namespace ddpm

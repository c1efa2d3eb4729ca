// tma_emu.h: the CPU emulator's tensor-memory accelerator and shared-memory barriers (kernels/tma.cuh says
// what each function does).
//
// - The tensor map is the emulator's own encoding of what the driver's holds for a bf16 or fp32 tensor of
//   rank 1 to 5 (address, extents, byte strides, box), written by encode (ddpm_emu_tensor_map, which the
//   Rust side calls where the device would call cuTensorMapEncodeTiled) after the driver's checks: a
//   16-byte aligned address, strides that are multiples of 16 bytes, box sides of 1 to 256 elements and
//   box rows a multiple of 16 bytes; with the 64- or 128-byte swizzle (the ones modelled), rows of exactly
//   64 or 128 bytes.
// - A swizzled copy lands its bytes where the device's would: the 16-byte chunk index within each 64-byte
//   box row XORed with bits 7-8 of the address (into a destination 512-byte aligned), or within each
//   128-byte row with bits 7-9 (1024-byte aligned).
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
constexpr uint64_t MAGIC = 0x544d41335f656d75ull;  // "TMA3_emu"

constexpr unsigned MAX_RANK = 5;

// The words of the emulator's map: key, address, rank, extents (innermost first), the byte strides of
// dimensions 1 and up, the box's sides (16 bits each), the swizzle and the element's bytes (2: bf16, 4:
// fp32).
enum Field {
    KEY,
    BASE,
    RANK,
    DIMS,
    STRIDES = DIMS + MAX_RANK,
    BOX = STRIDES + MAX_RANK - 1,
    SWIZZLE = BOX + 2,
    ELEMENT
};
static_assert(ELEMENT + 1 <= 16, "the fields fit the map's 16 words");

// The swizzle modes (CUtensorMapSwizzle's values) the emulator models, and the row each permutes.
constexpr uint64_t SWIZZLE_NONE = 0, SWIZZLE_64B = 2, SWIZZLE_128B = 3;
inline unsigned swizzle_row(uint64_t swizzle) { return swizzle == SWIZZLE_64B ? 64 : swizzle == SWIZZLE_128B ? 128 : 0; }

inline unsigned box_side(const uint64_t* m, unsigned d) { return unsigned(m[BOX + d / 4] >> (16 * (d % 4))) & 0xFFFF; }

// 0, or 1 when the driver would refuse these parameters (bf16 or fp32 elements, no interleave; with a
// swizzle, box rows of at most its row), or 2 when the emulator does not model them (the 32-byte swizzle,
// a swizzled box row narrower than the swizzle, which the device pads, or a swizzled tensor not 128-byte
// aligned).
inline int encode(uint64_t* map, uint64_t base, unsigned rank, const uint64_t* dims, const uint64_t* strides,
                  const unsigned* box, unsigned swizzle, unsigned element) {
    if (swizzle != SWIZZLE_NONE && swizzle != SWIZZLE_64B && swizzle != SWIZZLE_128B) return 2;
    if (element != 2 && element != 4) return 1;
    const unsigned row = swizzle_row(swizzle);
    if (row && rank >= 1 && box[0] * element < row) return 2;
    // A swizzled copy's global memory 128-byte aligned: the driver checks 16, but the CUDA programming
    // guide's table of swizzle requirements lists 128, which the kernels keep to.
    if (swizzle != SWIZZLE_NONE && base % 128 != 0) return 2;
    bool ok = rank >= 1 && rank <= MAX_RANK && base % 16 == 0 && box[0] * element % 16 == 0 &&
              (!row || box[0] * element <= row);
    for (unsigned d = 0; ok && d < rank; ++d)
        ok = dims[d] >= 1 && dims[d] <= (1ull << 32) && box[d] >= 1 && box[d] <= 256 &&
             (d == 0 || (strides[d - 1] % 16 == 0 && strides[d - 1] < (1ull << 40)));
    if (!ok) return 1;
    std::memset(map, 0, 16 * sizeof(uint64_t));
    map[KEY] = MAGIC;
    map[BASE] = base;
    map[RANK] = rank;
    for (unsigned d = 0; d < rank; ++d) {
        map[DIMS + d] = dims[d];
        if (d > 0) map[STRIDES + d - 1] = strides[d - 1];
        map[BOX + d / 4] |= uint64_t(box[d]) << (16 * (d % 4));
    }
    map[SWIZZLE] = swizzle;
    map[ELEMENT] = element;
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

inline Barrier& at_barrier(const uint64_t* bar) {
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
        if (at_barrier(r.bar).seen[thread_id()] < r.phase)
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
    emu_tma::Barrier& b = emu_tma::at_barrier(bar);
    b.tx += bytes;
    --b.pending;  // pending > 0 here: it is reset to the arrivals whenever it reaches 0
    emu_tma::complete_if_done(b);
}

inline void mbar_arrive(uint64_t* bar) {
    emu_tma::Barrier& b = emu_tma::at_barrier(bar);
    --b.pending;
    emu_tma::complete_if_done(b);
}

inline void mbar_wait(uint64_t* bar, unsigned parity) {
    for (;;) {
        emu_tma::Barrier& b = emu_tma::at_barrier(bar);
        emu_tma::land(b);
        if ((b.phase & 1) != (parity & 1)) {
            b.seen[emu_tma::thread_id()] = b.phase;
            return;
        }
        emu::spin();
    }
}

namespace emu_tma {
// Queues the copy of the box at `at` (one coordinate per dimension, innermost first) into `dst`, box
// row after box row, zeros outside the tensor.
inline void load(void* dst, const TensorMap* map, uint64_t* bar, unsigned rank, const int* at) {
    const uint64_t* m = map->opaque;
    if (m[KEY] != MAGIC) fail("a tensor map ddpm_emu_tensor_map did not encode");
    if (m[RANK] != rank) fail("a TMA copy of another rank than its tensor map's");
    if (reinterpret_cast<uintptr_t>(dst) % 128) fail("a TMA copy into shared memory not 128-byte aligned");
    // The 64-byte swizzle XORs the address's bits 4-5 (the 16-byte chunk of a 64-byte box row) with its
    // bits 7-8, its pattern repeating every 512 bytes; the 128-byte swizzle XORs bits 4-6 with bits 7-9,
    // every 1024 bytes. The kernels start a swizzled copy where the pattern starts (the layouts wgmma
    // reads, wgmma.cuh).
    const unsigned row = swizzle_row(m[SWIZZLE]);
    if (row == 64 && reinterpret_cast<uintptr_t>(dst) % 512)
        fail("a TMA copy in the 64-byte swizzle into shared memory not 512-byte aligned");
    if (row == 128 && reinterpret_cast<uintptr_t>(dst) % 1024)
        fail("a TMA copy in the 128-byte swizzle into shared memory not 1024-byte aligned");
    const uint64_t ELEMENT_BYTES = m[ELEMENT];
    uint64_t elements = 1;
    for (unsigned d = 0; d < rank; ++d) elements *= box_side(m, d);
    Copy c;
    c.dst = dst;
    c.bytes.assign(elements * ELEMENT_BYTES, 0);
    const auto* base = reinterpret_cast<const unsigned char*>(m[BASE]);
    for (uint64_t e = 0; e < elements; ++e) {
        uint64_t rest = e, offset = 0;
        bool inside = true;
        for (unsigned d = 0; d < rank; ++d) {
            const uint64_t side = box_side(m, d), i = rest % side;
            rest /= side;
            const long long g = at[d] + static_cast<long long>(i);
            inside = inside && g >= 0 && g < static_cast<long long>(m[DIMS + d]);
            offset += uint64_t(g) * (d == 0 ? ELEMENT_BYTES : m[STRIDES + d - 1]);
        }
        uint64_t to = e * ELEMENT_BYTES;  // dense, box row after box row; the dst is aligned to the pattern
        if (row == 64) to ^= ((to >> 7) & 3) << 4;
        if (row == 128) to ^= ((to >> 7) & 7) << 4;
        if (inside) std::memcpy(&c.bytes[to], base + offset, ELEMENT_BYTES);
    }
    std::memset(dst, 0xff, c.bytes.size());
    Barrier& b = at_barrier(bar);
    const auto lo = reinterpret_cast<uintptr_t>(dst), hi = lo + c.bytes.size();
    std::erase_if(regions(), [&](const Region& r) { return r.lo < hi && lo < r.hi; });
    regions().push_back({lo, hi, bar, b.phase + 1});
    b.copies.push_back(std::move(c));
}
}  // namespace emu_tma

inline void tma_load_2d(void* dst, const TensorMap* map, uint64_t* bar, int x, int y) {
    const int at[2] = {x, y};
    emu_tma::load(dst, map, bar, 2, at);
}

inline void tma_load_3d(void* dst, const TensorMap* map, uint64_t* bar, int x, int y, int z) {
    const int at[3] = {x, y, z};
    emu_tma::load(dst, map, bar, 3, at);
}

inline void tma_load_4d(void* dst, const TensorMap* map, uint64_t* bar, int x, int y, int z, int w) {
    const int at[4] = {x, y, z, w};
    emu_tma::load(dst, map, bar, 4, at);
}

}  // namespace ddpm

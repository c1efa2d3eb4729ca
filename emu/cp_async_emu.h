// cp_async_emu.h: the CPU emulator's asynchronous copies (kernels/cp_async.cuh says what each does). A
// copy reads its source when it is queued and writes its destination when the thread waits; until then
// the destination holds NaN (all bits set: a bf16 or fp32 NaN), as its contents are undefined on the
// device. So a kernel that reads a stage before waiting for the copies into it, or that queues copies
// into a stage other threads are still reading, gets NaN in its results; and a misaligned copy, which
// faults on the device, stops the emulator.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda_emu.h"

namespace ddpm {
namespace emu_cp_async {
struct Copy {
    void* dst;
    unsigned char bytes[16];
    unsigned group;  // the commit that closes it (the thread's commits so far when it was queued)
};

inline unsigned thread_id() { return (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x; }

inline std::vector<Copy>& queue() {
    static std::vector<std::vector<Copy>> threads(1024);
    return threads[thread_id()];
}

// The thread's commits so far.
inline unsigned& commits() {
    static std::vector<unsigned> threads(1024, 0);
    return threads[thread_id()];
}

// Lands the thread's copies for which `done(group)` holds.
template <class Done>
inline void land(Done done) {
    auto& q = queue();
    std::vector<Copy> left;
    for (const auto& c : q) {
        if (done(c.group))
            std::memcpy(c.dst, c.bytes, 16);
        else
            left.push_back(c);
    }
    q.swap(left);
}
}  // namespace emu_cp_async

inline void cp_async16(void* dst, const void* src) {
    if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) {
        std::fprintf(stderr, "CUDA emulator: cp.async of 16 bytes from %p to %p, not 16-byte aligned\n", src, dst);
        std::abort();
    }
    emu_cp_async::Copy c;
    c.dst = dst;
    c.group = emu_cp_async::commits();
    std::memcpy(c.bytes, src, 16);
    std::memset(dst, 0xff, 16);
    emu_cp_async::queue().push_back(c);
}

inline void cp_async_wait_all() {
    emu_cp_async::land([](unsigned) { return true; });
}

inline void cp_async_commit() { ++emu_cp_async::commits(); }

// Lands every copy of the committed groups but the newest N (copies not yet committed stay in flight).
template <int N>
inline void cp_async_wait() {
    const unsigned committed = emu_cp_async::commits();
    emu_cp_async::land([committed](unsigned g) { return g + unsigned(N) < committed; });
}
}  // namespace ddpm

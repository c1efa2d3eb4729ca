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
};

inline std::vector<Copy>& queue() {
    static std::vector<std::vector<Copy>> threads(1024);
    const unsigned id = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    return threads[id];
}
}  // namespace emu_cp_async

inline void cp_async16(void* dst, const void* src) {
    if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) {
        std::fprintf(stderr, "CUDA emulator: cp.async of 16 bytes from %p to %p, not 16-byte aligned\n", src, dst);
        std::abort();
    }
    emu_cp_async::Copy c;
    c.dst = dst;
    std::memcpy(c.bytes, src, 16);
    std::memset(dst, 0xff, 16);
    emu_cp_async::queue().push_back(c);
}

inline void cp_async_wait_all() {
    auto& q = emu_cp_async::queue();
    for (const auto& c : q) std::memcpy(c.dst, c.bytes, 16);
    q.clear();
}
}  // namespace ddpm

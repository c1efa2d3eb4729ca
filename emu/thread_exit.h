// thread_exit.h: what the CPU emulator checks as each thread of a kernel returns. Nothing the thread
// started asynchronously may still be in flight: a cp.async it never waited for would land, on the
// device, in shared memory the next block on the SM owns (the emulator would merely drop it), and a wgmma
// never waited for leaves its accumulators undefined. Either stops the emulator. (A TMA copy nobody
// waited for is caught when its barrier is initialised again, emu/tma_emu.h.)
#pragma once

#include <cstdio>
#include <cstdlib>

#include "cp_async.cuh"
#include "wgmma.cuh"

namespace ddpm {
inline void emu_check_thread_exit() {
    const char* what = nullptr;
    if (!emu_cp_async::queue().empty()) what = "cp.async copies it never waited for";
    const auto& w = emu_wgmma::state();
    if (!w.open.empty() || !w.committed.empty()) what = "wgmma operations it never waited for";
    if (what) {
        std::fprintf(stderr, "CUDA emulator: thread (%u, %u, %u) of block (%u, %u, %u) returns with %s\n",
                     threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z, what);
        std::abort();
    }
}
}  // namespace ddpm

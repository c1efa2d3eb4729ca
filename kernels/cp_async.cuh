// cp_async.cuh: sm_80's asynchronous copy from global to shared memory, for operands that need no
// conversion on the way (the weights' bf16 copy).
//
//   cp_async16(dst, src)   queues a copy of the 16 bytes at global `src` to shared `dst` (both 16-byte
//                          aligned), bypassing the registers and L1 (.cg)
//   cp_async_wait_all()    waits until every copy this thread queued has landed; a barrier after it
//                          makes them visible to the block
//   cp_async_commit()      closes the thread's copies queued since the last commit into a group
//   cp_async_wait<N>()     waits until at most N of the thread's committed groups are still in flight
//
// The CPU emulator (emu/cp_async_emu.h) queues each copy per thread, fills its destination with NaN and
// writes it only at the wait, so a kernel that reads a stage before waiting for the copies into it, or
// queues copies into a stage still being read, gets NaN there too.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)

namespace ddpm {

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace ddpm

#else

#include "cp_async_emu.h"

#endif

// runtime.cpp: the CUDA emulator's launch machinery (see cuda_emu.h): how the threads of a block run, the
// block barrier, warp shuffles, dynamic shared memory, and the C entry points the Rust side calls
// (src/backend/cuda/device.rs).
//
// The threads of a block are fibers on the calling OS thread: each has its own stack, and a thread that
// reaches a barrier switches back to a round-robin scheduler, which resumes it once every thread that
// has not exited has reached that barrier (an exited thread no longer holds a barrier back, as on sm_70
// and later). Switching is a handful of instructions (x86-64 assembly below), so a block of 256 threads
// passing a barrier costs microseconds, where OS threads cost milliseconds. Blocks run one after
// another. A kernel whose body never synchronises (build.rs decides) runs its threads one after another
// with no fibers at all.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "cuda_emu.h"
#include "runtime.h"
#include "tma_emu.h"

#if !defined(__x86_64__)
#error "the CUDA emulator's fibers are written for x86-64"
#endif

// emu_switch(save, load): saves the callee-saved registers on the current stack, stores the stack pointer
// in *save, loads `load` as the stack pointer and restores the registers saved there, returning into
// whatever that stack was doing. emu_fiber_entry is where a new fiber's first switch returns to: it calls
// emu_fiber_main(r12) with the stack aligned as a call expects.
extern "C" void emu_switch(void** save, void* load);
extern "C" void emu_fiber_entry();
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch

    .globl emu_fiber_entry
    .type emu_fiber_entry, @function
emu_fiber_entry:
    movq %r12, %rdi
    call emu_fiber_main
    ud2
    .size emu_fiber_entry, .-emu_fiber_entry
)");

namespace emu {
thread_local dim3 thread_idx;
thread_local dim3 block_idx;
dim3 block_dim;
dim3 grid_dim;

namespace {
constexpr unsigned MAX_THREADS = 1024;
constexpr std::size_t STACK_BYTES = 64 << 10;

// Barrier phases passed and fibers finished: a scheduler pass that changes neither is a deadlock.
unsigned long progress = 0;

// A barrier over `expected` fibers: each arrival waits until the phase advances.
struct Barrier {
    unsigned expected = 0, arrived = 0;
    unsigned long phase = 0;
    void arrive() {
        if (++arrived == expected) advance();
    }
    void drop() {
        --expected;
        if (expected > 0 && arrived == expected) advance();
    }
    void advance() {
        arrived = 0;
        ++phase;
        ++progress;
    }
};

struct Fiber {
    void* sp = nullptr;
    std::unique_ptr<char[]> stack;
    unsigned id = 0;
    bool done = false;
};

struct Block {
    const Launcher* launcher = nullptr;
    void** args = nullptr;
    Barrier all;
    std::vector<Barrier> warps;
    std::vector<double> slots;
    std::vector<unsigned char> shared_slots;  // warp_allgather's, WARP_SHARE_BYTES per thread
    std::vector<float> shared;  // dynamic shared memory, from the first 128-byte boundary in it
    std::vector<Fiber> fibers;
    void* scheduler_sp = nullptr;
    Fiber* running = nullptr;
};
Block* current = nullptr;

void set_thread(unsigned id) {
    thread_idx.x = id % block_dim.x;
    thread_idx.y = (id / block_dim.x) % block_dim.y;
    thread_idx.z = id / (block_dim.x * block_dim.y);
}

// Back to the scheduler; returns when it resumes this fiber.
void yield() { emu_switch(&current->running->sp, current->scheduler_sp); }

void wait(Barrier& b) {
    const unsigned long phase = b.phase;
    b.arrive();
    while (b.phase == phase) yield();
}

template <class T>
T exchange(T v, int lane_mask) {
    const unsigned t = current->running->id, warp = t / 32, lane = t % 32;
    Barrier& b = current->warps[warp];
    current->slots[t] = double(v);
    wait(b);
    const T r = T(current->slots[warp * 32 + (lane ^ unsigned(lane_mask))]);
    wait(b);
    return r;
}

// A fresh stack whose first switch "returns" into emu_fiber_entry with r12 = the fiber.
void prepare(Fiber& f) {
    if (!f.stack) f.stack.reset(new char[STACK_BYTES]);
    auto top = reinterpret_cast<std::uintptr_t>(f.stack.get() + STACK_BYTES) & ~std::uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    // After the six pops and the `ret`, rsp is back at `top` (16-byte aligned), as a `call` needs.
    *--sp = reinterpret_cast<void*>(&emu_fiber_entry);  // where `ret` goes
    *--sp = nullptr;                                   // rbp
    *--sp = nullptr;                                   // rbx
    *--sp = &f;                                        // r12: the fiber
    *--sp = nullptr;                                   // r13
    *--sp = nullptr;                                   // r14
    *--sp = nullptr;                                   // r15
    f.sp = sp;
    f.done = false;
}

void run_fibers(Block& b, unsigned threads) {
    if (b.fibers.size() < threads) b.fibers.resize(threads);
    for (unsigned id = 0; id < threads; ++id) {
        b.fibers[id].id = id;
        prepare(b.fibers[id]);
    }
    unsigned left = threads;
    while (left > 0) {
        const unsigned long before = progress;
        for (unsigned id = 0; id < threads; ++id) {
            Fiber& f = b.fibers[id];
            if (f.done) continue;
            b.running = &f;
            set_thread(id);
            emu_switch(&b.scheduler_sp, f.sp);
            if (f.done) {
                --left;
                ++progress;
            }
        }
        if (left > 0 && progress == before) {
            std::fprintf(stderr, "CUDA emulator: the threads of block (%u, %u, %u) wait on barriers that can "
                         "never complete (a barrier some threads skip)\n", block_idx.x, block_idx.y, block_idx.z);
            std::abort();
        }
    }
    b.running = nullptr;
}
}  // namespace

void syncthreads() { wait(current->all); }
void syncwarp() { wait(current->warps[current->running->id / 32]); }
float shfl_xor(float v, int m) { return exchange(v, m); }
double shfl_xor(double v, int m) { return exchange(v, m); }
unsigned lane_id() { return current->running->id % 32; }
void warp_allgather(const void* mine, unsigned bytes, void* all) {
    if (bytes > WARP_SHARE_BYTES) {
        std::fprintf(stderr, "CUDA emulator: warp_allgather of %u bytes (at most %u)\n", bytes, WARP_SHARE_BYTES);
        std::abort();
    }
    const unsigned t = current->running->id, warp = t / 32;
    Barrier& b = current->warps[warp];
    std::memcpy(&current->shared_slots[t * WARP_SHARE_BYTES], mine, bytes);
    wait(b);
    const std::size_t threads = current->shared_slots.size() / WARP_SHARE_BYTES;
    for (unsigned lane = 0; lane < 32; ++lane) {
        unsigned char* dst = static_cast<unsigned char*>(all) + lane * bytes;
        const std::size_t from = warp * 32 + lane;  // lanes past the block's last thread give zeros
        if (from < threads) std::memcpy(dst, &current->shared_slots[from * WARP_SHARE_BYTES], bytes);
        else std::memset(dst, 0, bytes);
    }
    wait(b);
}
void spin() {
    if (!current || !current->running) {
        std::fprintf(stderr, "CUDA emulator: a thread polls in a kernel that build.rs ran without fibers\n");
        std::abort();
    }
    yield();
}
void progressed() { ++progress; }
float* dynamic_shared() {
    // The device's dynamic shared memory starts aligned (WMMA needs 32 bytes); a vector's data need not.
    const auto at = reinterpret_cast<std::uintptr_t>(current->shared.data());
    return current->shared.data() + ((128 - at % 128) % 128) / sizeof(float);
}

int launch(const Launcher& launcher, bool sequential, const unsigned grid[3], const unsigned block[3],
           unsigned shared_bytes, void** args) {
    static std::mutex lock;
    static Block state;  // kept between launches: the fibers' stacks are reused
    const unsigned threads = block[0] * block[1] * block[2];
    if (threads == 0 || threads > MAX_THREADS) return 2;
    std::lock_guard<std::mutex> guard(lock);
    grid_dim = dim3{grid[0], grid[1], grid[2]};
    block_dim = dim3{block[0], block[1], block[2]};
    state.launcher = &launcher;
    state.args = args;
    state.slots.assign(threads, 0.0);
    state.shared_slots.assign(std::size_t(threads) * WARP_SHARE_BYTES, 0);
    current = &state;
    for (unsigned z = 0; z < grid[2]; ++z)
        for (unsigned y = 0; y < grid[1]; ++y)
            for (unsigned x = 0; x < grid[0]; ++x) {
                block_idx = dim3{x, y, z};
                state.shared.assign((shared_bytes + 3) / 4 + 32, __int_as_float(0x7fc00000));
                if (sequential) {
                    for (unsigned id = 0; id < threads; ++id) {
                        set_thread(id);
                        launcher(args);
                    }
                    continue;
                }
                state.all = Barrier{threads, 0, 0};
                state.warps.assign((threads + 31) / 32, Barrier{});
                for (unsigned w = 0; w < state.warps.size(); ++w)
                    state.warps[w].expected = threads - 32 * w < 32 ? threads - 32 * w : 32;
                run_fibers(state, threads);
            }
    current = nullptr;
    return 0;
}
}  // namespace emu

// A fiber's life: run the kernel as its thread, leave the barriers, and hand back to the scheduler for
// good.
extern "C" void emu_fiber_main(emu::Fiber* f) {
    using namespace emu;
    (*current->launcher)(current->args);
    current->all.drop();
    current->warps[f->id / 32].drop();
    f->done = true;
    emu_switch(&f->sp, current->scheduler_sp);
    __builtin_unreachable();
}

extern "C" {
int ddpm_emu_tensor_map(uint64_t* map, uint64_t base, unsigned rank, const uint64_t* dims, const uint64_t* strides,
                        const unsigned* box, unsigned swizzle, unsigned element) {
    return ddpm::emu_tma::encode(map, base, rank, dims, strides, box, swizzle, element);
}
void* ddpm_emu_malloc(size_t bytes) { return std::aligned_alloc(256, (bytes + 255) / 256 * 256); }
void ddpm_emu_free(void* p) { std::free(p); }
}

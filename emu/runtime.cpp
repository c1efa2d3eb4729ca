// runtime.cpp: the CUDA emulator's launch machinery (see cuda_emu.h): a pool of worker threads that run
// the threads of one block at a time, the block barrier, warp shuffles, dynamic shared memory, and the
// C entry points the Rust side calls (src/backend/cuda/device.rs).
#include <barrier>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <semaphore>
#include <thread>
#include <vector>

#include "cuda_emu.h"
#include "runtime.h"

namespace emu {
thread_local dim3 thread_idx;
thread_local dim3 block_idx;
dim3 block_dim;
dim3 grid_dim;

namespace {
constexpr unsigned MAX_THREADS = 1024;

struct Block {
    std::unique_ptr<std::barrier<>> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<double> slots;
    std::vector<float> shared;
};
Block* current = nullptr;

unsigned linear_thread() { return thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z); }

void set_thread(unsigned id) {
    thread_idx.x = id % block_dim.x;
    thread_idx.y = (id / block_dim.x) % block_dim.y;
    thread_idx.z = id / (block_dim.x * block_dim.y);
}

template <class T>
T exchange(T v, int lane_mask) {
    const unsigned t = linear_thread(), warp = t / 32, lane = t % 32;
    std::barrier<>& b = *current->warps[warp];
    current->slots[t] = double(v);
    b.arrive_and_wait();
    const T r = T(current->slots[warp * 32 + (lane ^ unsigned(lane_mask))]);
    b.arrive_and_wait();
    return r;
}

// Worker `id` runs thread `id` of each block with more than `id` threads; each waits on its own
// semaphore, so a block wakes exactly the workers it needs. Workers are created as blocks need them and
// live as long as the process.
class Pool {
   public:
    void run_block(const Launcher& launcher, void** args, dim3 block, unsigned threads) {
        while (go_.size() < threads) {
            const unsigned id = unsigned(go_.size());
            go_.push_back(std::make_unique<std::binary_semaphore>(0));
            std::thread([this, id] { work(id); }).detach();
        }
        job_ = &launcher;
        args_ = args;
        block_ = block;
        for (unsigned id = 0; id < threads; ++id) go_[id]->release();
        for (unsigned id = 0; id < threads; ++id) done_.acquire();
    }

   private:
    void work(unsigned id) {
        std::binary_semaphore& go = *go_[id];
        for (;;) {
            go.acquire();
            set_thread(id);
            block_idx = block_;
            (*job_)(args_);
            // An exited thread no longer holds back a barrier, as on the GPU (sm_70 and later).
            current->all->arrive_and_drop();
            current->warps[id / 32]->arrive_and_drop();
            done_.release();
        }
    }

    // Grown only by run_block, which the launch lock serialises, before any new worker reads it.
    std::vector<std::unique_ptr<std::binary_semaphore>> go_;
    std::counting_semaphore<MAX_THREADS> done_{0};
    const Launcher* job_ = nullptr;
    void** args_ = nullptr;
    dim3 block_;
};

Pool& pool() {
    static Pool* p = new Pool();  // never destroyed: its threads live as long as the process
    return *p;
}

std::mutex launch_lock;
}  // namespace

void syncthreads() { current->all->arrive_and_wait(); }
float shfl_xor(float v, int m) { return exchange(v, m); }
double shfl_xor(double v, int m) { return exchange(v, m); }
float* dynamic_shared() { return current->shared.data(); }

int launch(const Launcher& launcher, bool sequential, const unsigned grid[3], const unsigned block[3],
           unsigned shared_bytes, void** args) {
    const unsigned threads = block[0] * block[1] * block[2];
    if (threads == 0 || threads > MAX_THREADS) return 2;
    std::lock_guard<std::mutex> guard(launch_lock);
    grid_dim = dim3{grid[0], grid[1], grid[2]};
    block_dim = dim3{block[0], block[1], block[2]};
    Block state;
    state.slots.assign(threads, 0.0);
    current = &state;
    for (unsigned z = 0; z < grid[2]; ++z)
        for (unsigned y = 0; y < grid[1]; ++y)
            for (unsigned x = 0; x < grid[0]; ++x) {
                // Fresh barriers for every block: the threads of the last one dropped out of theirs.
                state.all = std::make_unique<std::barrier<>>(threads);
                state.warps.clear();
                for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
                    const unsigned lanes = threads - 32 * w < 32 ? threads - 32 * w : 32;
                    state.warps.push_back(std::make_unique<std::barrier<>>(lanes));
                }
                state.shared.assign((shared_bytes + 3) / 4, __int_as_float(0x7fc00000));
                if (sequential) {
                    block_idx = dim3{x, y, z};
                    for (unsigned id = 0; id < threads; ++id) {
                        set_thread(id);
                        launcher(args);
                    }
                    continue;
                }
                pool().run_block(launcher, args, dim3{x, y, z}, threads);
            }
    current = nullptr;
    return 0;
}
}  // namespace emu

extern "C" {
void* ddpm_emu_malloc(size_t bytes) { return std::aligned_alloc(256, (bytes + 255) / 256 * 256); }
void ddpm_emu_free(void* p) { std::free(p); }
}

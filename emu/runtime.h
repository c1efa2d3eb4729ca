// runtime.h: what the generated kernel table (build.rs) needs from the emulator's runtime.
#pragma once

#include <cstddef>
#include <utility>

namespace emu {
// Calls a kernel with its arguments unpacked from an array of pointers (as cuLaunchKernel takes them).
using Launcher = void (*)(void** args);

template <class... A, std::size_t... I>
void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<A*>(args[I])...);
}

// Runs a grid; returns 0, or 2 for a block of more than 1024 threads. `sequential`: the kernel never
// synchronises, so each block's threads run one after another on the calling thread.
int launch(const Launcher& launcher, bool sequential, const unsigned grid[3], const unsigned block[3],
           unsigned shared_bytes, void** args);
}  // namespace emu

// One thread's run of a kernel, then the checks of emu/thread_exit.h (which the generated unit includes
// after the kernels).
#define EMU_LAUNCHER(kernel)                                                                  \
    [](void** args) {                                                                         \
        emu::call(&kernel, args, std::make_index_sequence<emu::arity(&kernel)>{});            \
        ddpm::emu_check_thread_exit();                                                        \
    }

namespace emu {
template <class... A>
constexpr std::size_t arity(void (*)(A...)) {
    return sizeof...(A);
}
}  // namespace emu

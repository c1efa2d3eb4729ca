// gemm_cores.cuh: the rungs of the convolution ladder (dev/conv/) behind one name, for the kernels that
// exist on several: the fp32 SIMT core (v1, gemm.cuh) of the `_f32` kernels, the WMMA core (v2,
// gemm_tc.cuh) and the wgmma core (v4, gemm_wgmma.cuh, sm_90a only) that the bench times beside the
// mma.sync core (v3, gemm_mma.cuh) of the `_bf16` kernels.
#pragma once

#include "gemm_hopper.cuh"
#include "gemm_wgmma.cuh"

namespace ddpm {

enum class Core { Simt, Wmma, Mma, Wgmma };

// What a core's kernels read the weights from: the fp32 weights for the fp32 core, their bf16 copy (kept
// beside them by the backend, rounded once per update instead of once per tile) for the tensor cores.
template <Core C>
struct WeightOf {
    using type = __nv_bfloat16;
};
template <>
struct WeightOf<Core::Simt> {
    using type = float;
};
template <Core C>
using Weight = typename WeightOf<C>::type;

template <Core C, class LoadA, class LoadB>
__device__ __forceinline__ void gemm(const LoadA& a, const LoadB& b, int rows, int cols, int kdim, int chunk,
                                     const Epilogue& e) {
    if constexpr (C == Core::Wgmma)
        gemm_run_wgmma(a, b, rows, cols, kdim, chunk, e);
    else if constexpr (C == Core::Mma)
        gemm_run_mma(a, b, rows, cols, kdim, chunk, e);
    else if constexpr (C == Core::Wmma)
        gemm_run_tc(a, b, rows, cols, kdim, chunk, e);
    else
        gemm_run(a, b, rows, cols, kdim, chunk, e);
}

}  // namespace ddpm

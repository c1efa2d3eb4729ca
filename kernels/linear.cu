// linear.cu: fully connected layers (the time-embedding MLP, the time projection of every ResBlock and
// the attention projections, where the rows are the batch's pixels) on the GEMM core of gemm.cuh.
//   linear_forward_f32          y[m, n] = x[m, k] w[n, k]^T + b[n]
//   linear_backward_data_f32    dx[m, k] (+)= dy[m, n] w[n, k]
//   linear_backward_weight_f32  dw[n, k] = dy[m, n]^T x[m, k]  (split-K partials; gemm_reduce_f32 adds them)
// The bias gradient is a column sum of dy (column_sums_* in gemm.cuh).
// FLOPs: 2 m n k each. Launch: grid (ceil(M / 64), ceil(N / 64), splits), block 256.
#include "gemm.cuh"

extern "C" __global__ void __launch_bounds__(ddpm::GEMM_THREADS)
    linear_forward_f32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                       float* __restrict__ y, int m, int k, int n) {
    const ddpm::RowsA a{x, k, m};
    const ddpm::ColsB bw{w, k, n};
    const ddpm::Epilogue e{y, n, b, 0, nullptr};
    ddpm::gemm_run(a, bw, m, n, k, k, e);
}

extern "C" __global__ void __launch_bounds__(ddpm::GEMM_THREADS)
    linear_backward_data_f32(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
                             int m, int k, int n, int accumulate) {
    const ddpm::RowsA a{dy, n, m};
    const ddpm::RowsB bw{w, k, k};
    const ddpm::Epilogue e{dx, k, nullptr, accumulate, nullptr};
    ddpm::gemm_run(a, bw, m, k, n, n, e);
}

extern "C" __global__ void __launch_bounds__(ddpm::GEMM_THREADS)
    linear_backward_weight_f32(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dw,
                               float* __restrict__ workspace, int chunk, int m, int k, int n) {
    const ddpm::ColsA a{dy, n, n};
    const ddpm::RowsB bx{x, k, k};
    const ddpm::Epilogue e{dw, k, nullptr, 0, workspace};
    ddpm::gemm_run(a, bx, n, k, m, chunk, e);
}

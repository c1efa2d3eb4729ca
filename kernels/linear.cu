// linear.cu: fully connected layers (the time-embedding MLP, the time projection of every ResBlock and
// the attention projections, where the rows are the batch's pixels) on the GEMM core of gemm.cuh.
//   linear_forward_{f32,bf16}          y[m, n] = x[m, k] w[n, k]^T + b[n] (+ residual[m, n] when not null)
//   linear_forward_bf16_io{,_bf16in}   the same with the residual and y each stored in fp32 or bf16 (and
//                                      _bf16in x in bf16); linear_backward_weight_bf16_bf16in, dw over it
//   linear_backward_data_{f32,bf16}    dx[m, k] (+)= dy[m, n] w[n, k]
//   linear_backward_weight_{f32,bf16}  dw[n, k] = dy[m, n]^T x[m, k]  (split-K partials; gemm_reduce_f32
//                                      adds them)
// _f32 on the fp32 core (gemm.cuh), _bf16 on the mma.sync tensor-core core (gemm_mma.cuh) reading the
// weight's bf16 copy, as in conv.cu.
// The bias gradient is a column sum of dy (column_sums_* in gemm.cuh).
// FLOPs: 2 m n k each. Launch: grid (ceil(M / T), ceil(N / T), splits), block 256, T = 64 (_f32) or 128
// (_bf16).
#include "gemm_cores.cuh"

namespace {
// y is written in fp32, or in bf16 to y_bf16 when that is not null; the residual is read from
// residual_bf16 instead when that is not null.
template <ddpm::Core CORE, class X = float>
__device__ __forceinline__ void linear_forward_gemm(const X* x, const ddpm::Weight<CORE>* w, const float* b,
                                                    const float* residual, float* y, int m, int k, int n,
                                                    const __nv_bfloat16* residual_bf16 = nullptr,
                                                    __nv_bfloat16* y_bf16 = nullptr) {
    const ddpm::RowsAOf<X> a{x, k, m};
    const ddpm::ColsB<ddpm::Weight<CORE>> bw{w, k, n};
    const ddpm::Epilogue e{y, n, b, 0, nullptr, nullptr, 1, residual, y_bf16, residual_bf16};
    ddpm::gemm<CORE>(a, bw, m, n, k, k, e);
}

template <ddpm::Core CORE>
__device__ __forceinline__ void linear_backward_data_gemm(const float* dy, const ddpm::Weight<CORE>* w, float* dx,
                                                          int m, int k,
                                                          int n, int accumulate) {
    const ddpm::RowsA a{dy, n, m};
    const ddpm::RowsB<ddpm::Weight<CORE>> bw{w, k, k};
    const ddpm::Epilogue e{dx, k, nullptr, accumulate, nullptr};
    ddpm::gemm<CORE>(a, bw, m, k, n, n, e);
}

template <ddpm::Core CORE, class X = float>
__device__ __forceinline__ void linear_backward_weight_gemm(const X* x, const float* dy, float* dw,
                                                            float* workspace, int chunk, int m, int k, int n) {
    const ddpm::ColsA a{dy, n, n};
    const ddpm::RowsB<X> bx{x, k, k};
    const ddpm::Epilogue e{dw, k, nullptr, 0, workspace};
    ddpm::gemm<CORE>(a, bx, n, k, m, chunk, e);
}
}  // namespace

extern "C" __global__ void __launch_bounds__(256)
    linear_forward_f32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                       const float* __restrict__ residual, float* __restrict__ y, int m, int k, int n) {
    linear_forward_gemm<ddpm::Core::Simt>(x, w, b, residual, y, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256)
    linear_backward_data_f32(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
                             int m, int k, int n, int accumulate) {
    linear_backward_data_gemm<ddpm::Core::Simt>(dy, w, dx, m, k, n, accumulate);
}

extern "C" __global__ void __launch_bounds__(256)
    linear_backward_weight_f32(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dw,
                               float* __restrict__ workspace, int chunk, int m, int k, int n) {
    linear_backward_weight_gemm<ddpm::Core::Simt>(x, dy, dw, workspace, chunk, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256)
    linear_forward_bf16(const float* __restrict__ x, const __nv_bfloat16* __restrict__ w, const float* __restrict__ b,
                       const float* __restrict__ residual, float* __restrict__ y, int m, int k, int n) {
    linear_forward_gemm<ddpm::Core::Mma>(x, w, b, residual, y, m, k, n);
}

// The attention block's output projection where its activations are stored in bf16
// (Backend::stores_bf16_activations; ladder v7): linear_forward_bf16 with the residual (the block's input)
// read and y (its output) written in either storage, chosen per launch: of (residual, residual_bf16) and
// of (y, y_bf16) the launcher passes one pointer and nulls the other. A bf16 y is rounded in the epilogue,
// after the bias and the residual. _bf16in: x (the attention output) stored in bf16 too, copied to shared
// memory as it is; and the weight gradient over it.
#define DDPM_IO_PARAMS                                                                                     \
    const __nv_bfloat16 *__restrict__ w, const float *__restrict__ b, const float *__restrict__ residual,  \
        const __nv_bfloat16 *__restrict__ residual_bf16, float *__restrict__ y,                            \
        __nv_bfloat16 *__restrict__ y_bf16, int m, int k, int n
extern "C" __global__ void __launch_bounds__(256)
    linear_forward_bf16_io(const float* __restrict__ x, DDPM_IO_PARAMS) {
    linear_forward_gemm<ddpm::Core::Mma>(x, w, b, residual, y, m, k, n, residual_bf16, y_bf16);
}

extern "C" __global__ void __launch_bounds__(256)
    linear_forward_bf16_io_bf16in(const __nv_bfloat16* __restrict__ x, DDPM_IO_PARAMS) {
    linear_forward_gemm<ddpm::Core::Mma>(x, w, b, residual, y, m, k, n, residual_bf16, y_bf16);
}
#undef DDPM_IO_PARAMS

extern "C" __global__ void __launch_bounds__(256)
    linear_backward_weight_bf16_bf16in(const __nv_bfloat16* __restrict__ x, const float* __restrict__ dy,
                                       float* __restrict__ dw, float* __restrict__ workspace, int chunk, int m,
                                       int k, int n) {
    linear_backward_weight_gemm<ddpm::Core::Mma>(x, dy, dw, workspace, chunk, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256)
    linear_backward_data_bf16(const float* __restrict__ dy, const __nv_bfloat16* __restrict__ w,
                              float* __restrict__ dx,
                             int m, int k, int n, int accumulate) {
    linear_backward_data_gemm<ddpm::Core::Mma>(dy, w, dx, m, k, n, accumulate);
}

extern "C" __global__ void __launch_bounds__(256)
    linear_backward_weight_bf16(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dw,
                               float* __restrict__ workspace, int chunk, int m, int k, int n) {
    linear_backward_weight_gemm<ddpm::Core::Mma>(x, dy, dw, workspace, chunk, m, k, n);
}

// Version 8 (sm_90a only; gemm_hopper.cuh): the attention projection's three GEMMs with both operands
// copied by the tensor-memory accelerator (tiles of 128 x 256, block 384, `stages` stages): ma and mb
// are x [m, k] (bf16) and W [n, k] for the forward, dy [m, n] (fp32) and W for the input gradient, dy and x
// for the weight gradient (split K, as the other cores). The launcher runs these where in and out are
// multiples of 64 and the activations bf16.
extern "C" __global__ void __launch_bounds__(384, 1)
    linear_forward_v8_n256(const __grid_constant__ ddpm::TensorMap ma, const __grid_constant__ ddpm::TensorMap mb,
                           const float* __restrict__ b, const float* __restrict__ residual,
                           const __nv_bfloat16* __restrict__ residual_bf16, float* __restrict__ y,
                           __nv_bfloat16* __restrict__ y_bf16, int m, int k, int n, int stages) {
    namespace hop = ddpm::hop;
    const hop::LinearForward<256> p{&ma, &mb, int(blockIdx.x) * hop::BM, int(blockIdx.y) * 256, k, m, n};
    const ddpm::Epilogue e{y, n, b, 0, nullptr, nullptr, 1, residual, y_bf16, residual_bf16};
    hop::gemm(p, stages, e);
}

extern "C" __global__ void __launch_bounds__(384, 1)
    linear_backward_data_v8_n256(const __grid_constant__ ddpm::TensorMap ma, const __grid_constant__ ddpm::TensorMap mb,
                                 float* __restrict__ dx, int accumulate, int m, int k, int n, int stages) {
    namespace hop = ddpm::hop;
    const hop::LinearInputGrad<256> p{&ma, &mb, int(blockIdx.x) * hop::BM, int(blockIdx.y) * 256, n, m, k};
    const ddpm::Epilogue e{dx, k, nullptr, accumulate, nullptr};
    hop::gemm(p, stages, e);
}

extern "C" __global__ void __launch_bounds__(384, 1)
    linear_backward_weight_v8_n256(const __grid_constant__ ddpm::TensorMap ma, const __grid_constant__ ddpm::TensorMap mb,
                                   float* __restrict__ dw, float* __restrict__ workspace, int chunk, int m, int k,
                                   int n, int stages) {
    namespace hop = ddpm::hop;
    int first, count;
    hop::split_run((m + hop::BK - 1) / hop::BK, chunk, first, count);
    const hop::LinearWeightGrad<256> p{&ma, &mb, int(blockIdx.x) * hop::BM, int(blockIdx.y) * 256, n, k, first, count};
    const ddpm::Epilogue e{dw, k, nullptr, 0, workspace};
    hop::gemm(p, stages, e);
}

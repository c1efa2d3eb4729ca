// conv.cu: the model's three convolutions as implicit GEMMs, each in two precisions:
//   conv2d_forward_{f32,bf16}          y = conv(x, w) + b (+ image_bias[image, o]) (+ residual): the
//                                      ResNet block's time-embedding and residual adds fused into the
//                                      epilogue when their pointers are not null
//   conv2d_backward_data_{f32,bf16}    dx (+)= the input gradient
//   conv2d_backward_weight_{f32,bf16}  dw = the weight gradient (split-K partials; see gemm.cuh)
//   conv2d_forward_normed_{f32,bf16}, conv2d_backward_weight_normed_{f32,bf16}
//                                      the same two with the input given as silu(group_norm(x)), then
//                                      dropout in training: applied as the operand is loaded (NormedIm2col
//                                      in gemm.cuh), from statistics group_norm_forward_f32 computed
//                                      without writing its output and the dropout mask regenerated. The
//                                      normalised (and dropped-out) activation is never stored: one write
//                                      and one read of it saved per ResNet block normalisation (two with
//                                      dropout).
//   conv2d_forward{,_normed}_bf16_io{,_bf16in}, conv2d_backward_weight{,_normed}_bf16_bf16in
//                                      the _bf16 kernels for activations stored in bf16 (ladder v7): the
//                                      input read in bf16 (_bf16in, widened to fp32 as it is loaded, before
//                                      it is normalised), the residual read and the output written in
//                                      either storage, chosen per launch (_io)
//   conv2d_{forward,backward_data,backward_weight}_{wmma,wgmma}
//                                      the three _bf16 convolutions on version 2 of the ladder (WMMA,
//                                      gemm_tc.cuh), kept so the bench times each rung side by side
//                                      (dev/conv/), and on version 4 (wgmma, gemm_wgmma.cuh; sm_90a only),
//                                      timed and tested beside version 3 until a GPU run promotes it
//   conv2d_{forward,backward_data}_tma the forward convolution and the input gradient on version 5
//                                      (version 4 with the weights copied by the tensor-memory
//                                      accelerator; sm_90a only)
//   conv2d_{forward,backward_data}_tma_sw64
//                                      the same two on version 6 (version 5 with one copy per slice, in
//                                      the 64-byte swizzle; sm_90a only)
// _f32 runs on the fp32 core of gemm.cuh (version 1: exact fp32, the path the tests hold to the CPU), _bf16
// on the mma.sync tensor-core core of gemm_mma.cuh (version 3: operands rounded to bf16, fp32 sums).
// Gradients are fp32 either way, and so are activations but in the kernels above. The weights are fp32
// for _f32 and, for every bf16 kernel (_bf16, _wmma, _wgmma), their bf16 copy: the backend keeps one
// beside the fp32 weights, refreshed when they change (Adam writes it as it updates them), so a weight is
// rounded once per update, not by every tile that reads it, and crosses the memory bus in 2 bytes.
// The bias gradient is a column sum of dy (column_sums_* in gemm.cuh).
//
// Layouts: x [batch, h, w, c] and y [batch, oh, ow, o] NHWC; w [o, taps, taps, c] (ours: the PyTorch
// weight with the input channel last). Kinds: taps 3, stride 1, pad 1 (same size); taps 3, stride 2,
// pad 0 with the bottom/right row and column of padding implied by oh = (h - 2) / 2 + 1 (TensorFlow
// 'SAME'); taps 1, stride 1, pad 0.
//
// As GEMMs (M x N, reduction K):
//   forward:         M = batch*oh*ow pixels,  N = o,            K = taps^2 * c   A = im2col(x), B = w^T
//   input gradient:  M = batch*h*w pixels,    N = c,            K = taps^2 * o   A = gather(dy), B = w
//   weight gradient: M = o,                   N = taps^2 * c,   K = batch*oh*ow  A = dy^T, B = im2col(x)
// FLOPs: 2 M N K each; the paper's 3x3 256->256 conv at 16x16, batch 128: 2 * 32768 * 256 * 2304 = 38.7 GFLOP.
// Launch (all three): grid (ceil(M / T), ceil(N / T), splits), block 256, with tile T = 64 (_f32) or 128
// (_bf16); splits = 1 except for the weight gradient, whose chunk is a multiple of 16 (_f32) or 32 (_bf16).
#include "gemm_cores.cuh"

__device__ __forceinline__ ddpm::ConvGeom conv_geom(int h, int w, int c, int o, int taps, int stride, int pad) {
    ddpm::ConvGeom g;
    g.h = h, g.w = w, g.c = c, g.o = o, g.taps = taps, g.stride = stride, g.pad = pad;
    g.oh = (h + 2 * pad - taps) / stride + 1;
    g.ow = (w + 2 * pad - taps) / stride + 1;
    if (stride == 2) g.oh = (h - 2) / 2 + 1, g.ow = (w - 2) / 2 + 1;
    return g;
}

// The statistics and affine parameters of a normalisation applied as the input is loaded, and the
// dropout after it (p = 0: none).
struct NormArgs {
    const float* mean;
    const float* rstd;
    const float* gamma;
    const float* beta;
    int groups;
    int silu;
    float p;
    uint64_t seed, stream;
};

namespace {
// The input gather over input stored as X: plain, or normalised as it is loaded when NORMED.
template <bool NORMED, class X = float>
struct Gather;
template <class X>
struct Gather<false, X> {
    using type = ddpm::Im2colOf<X>;
    __device__ static type make(const type& a, const NormArgs&) { return a; }
};
template <class X>
struct Gather<true, X> {
    using type = ddpm::NormedIm2colOf<X>;
    __device__ static type make(const ddpm::Im2colOf<X>& a, const NormArgs& n) {
        const float keep = n.p > 0.0f ? float(1.0 / (1.0 - double(n.p))) : 1.0f;
        return type{a, n.mean, n.rstd, n.gamma, n.beta, n.groups, n.silu, n.p, keep, n.seed, n.stream};
    }
};

// y is written in fp32, or in bf16 to y_bf16 when that is not null (y is then unused); the residual is
// read from residual_bf16 instead when that is not null.
template <ddpm::Core CORE, bool NORMED = false, class X = float>
__device__ __forceinline__ void conv_forward_gemm(const X* x, const ddpm::Weight<CORE>* w, const float* b,
                                                  const float* image_bias, const float* residual, float* y,
                                                  int batch, int h, int wd, int c, int o, int taps, int stride,
                                                  int pad, NormArgs norm = NormArgs{},
                                                  __nv_bfloat16* y_bf16 = nullptr,
                                                  const __nv_bfloat16* residual_bf16 = nullptr) {
    const ddpm::ConvGeom g = conv_geom(h, wd, c, o, taps, stride, pad);
    const int rows = batch * g.oh * g.ow, kdim = taps * taps * c;
    const auto a = Gather<NORMED, X>::make(ddpm::Im2colOf<X>{x, g, rows, kdim}, norm);
    const ddpm::ColsB<ddpm::Weight<CORE>> bw{w, kdim, o};
    const ddpm::Epilogue e{y, o, b, 0, nullptr, image_bias, g.oh * g.ow, residual, y_bf16, residual_bf16};
    ddpm::gemm<CORE>(a, bw, rows, o, kdim, kdim, e);
}

template <ddpm::Core CORE>
__device__ __forceinline__ void conv_backward_data_gemm(const float* dy, const ddpm::Weight<CORE>* w, float* dx,
                                                        int batch,
                                                        int h, int wd, int c, int o, int taps, int stride,
                                                        int pad, int accumulate) {
    const ddpm::ConvGeom g = conv_geom(h, wd, c, o, taps, stride, pad);
    const int rows = batch * h * wd, kdim = taps * taps * o;
    const ddpm::DyGather a{dy, g, rows, kdim};
    const ddpm::WeightT<ddpm::Weight<CORE>> bw{w, g};
    const ddpm::Epilogue e{dx, c, nullptr, accumulate, nullptr};
    ddpm::gemm<CORE>(a, bw, rows, c, kdim, kdim, e);
}

// Slice z of the reduction over pixels writes workspace[z, o, k]; gemm_reduce_f32 then writes dw.
template <ddpm::Core CORE, bool NORMED = false, class X = float>
__device__ __forceinline__ void conv_backward_weight_gemm(const X* x, const float* dy, float* dw,
                                                          float* workspace, int chunk, int batch, int h, int wd,
                                                          int c, int o, int taps, int stride, int pad,
                                                          NormArgs norm = NormArgs{}) {
    const ddpm::ConvGeom g = conv_geom(h, wd, c, o, taps, stride, pad);
    const int pixels = batch * g.oh * g.ow, kdim = taps * taps * c;
    const ddpm::ColsA a{dy, o, o};
    using G = Gather<NORMED, X>;
    const ddpm::Im2colB<typename G::type> bx{G::make(ddpm::Im2colOf<X>{x, g, pixels, kdim}, norm)};
    const ddpm::Epilogue e{dw, kdim, nullptr, 0, workspace};
    ddpm::gemm<CORE>(a, bx, o, kdim, pixels, chunk, e);
}
}  // namespace

// The entry points: one per op and precision, the same arguments in both.
extern "C" __global__ void __launch_bounds__(256)
    conv2d_forward_f32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                       const float* __restrict__ image_bias, const float* __restrict__ residual,
                       float* __restrict__ y, int batch, int h, int wd, int c, int o, int taps, int stride,
                       int pad) {
    conv_forward_gemm<ddpm::Core::Simt>(x, w, b, image_bias, residual, y, batch, h, wd, c, o, taps, stride, pad);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_backward_data_f32(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
                             int batch, int h, int wd, int c, int o, int taps, int stride, int pad,
                             int accumulate) {
    conv_backward_data_gemm<ddpm::Core::Simt>(dy, w, dx, batch, h, wd, c, o, taps, stride, pad, accumulate);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_backward_weight_f32(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dw,
                               float* __restrict__ workspace, int chunk, int batch, int h, int wd, int c, int o,
                               int taps, int stride, int pad) {
    conv_backward_weight_gemm<ddpm::Core::Simt>(x, dy, dw, workspace, chunk, batch, h, wd, c, o, taps, stride, pad);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_forward_bf16(const float* __restrict__ x, const __nv_bfloat16* __restrict__ w, const float* __restrict__ b,
                       const float* __restrict__ image_bias, const float* __restrict__ residual,
                       float* __restrict__ y, int batch, int h, int wd, int c, int o, int taps, int stride,
                       int pad) {
    conv_forward_gemm<ddpm::Core::Mma>(x, w, b, image_bias, residual, y, batch, h, wd, c, o, taps, stride, pad);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_backward_data_bf16(const float* __restrict__ dy, const __nv_bfloat16* __restrict__ w, float* __restrict__ dx,
                             int batch, int h, int wd, int c, int o, int taps, int stride, int pad,
                             int accumulate) {
    conv_backward_data_gemm<ddpm::Core::Mma>(dy, w, dx, batch, h, wd, c, o, taps, stride, pad, accumulate);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_backward_weight_bf16(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dw,
                               float* __restrict__ workspace, int chunk, int batch, int h, int wd, int c, int o,
                               int taps, int stride, int pad) {
    conv_backward_weight_gemm<ddpm::Core::Mma>(x, dy, dw, workspace, chunk, batch, h, wd, c, o, taps, stride, pad);
}

// The rungs of the ladder the bf16 kernels do not run on, each with the three convolutions, the same
// arguments as the _bf16 ones: version 2 (WMMA) and version 4 (wgmma, sm_90a only: elsewhere its kernels
// are never launched).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_forward_wmma(const float* __restrict__ x, const __nv_bfloat16* __restrict__ w, const float* __restrict__ b,
                       const float* __restrict__ image_bias, const float* __restrict__ residual,
                       float* __restrict__ y, int batch, int h, int wd, int c, int o, int taps, int stride,
                       int pad) {
    conv_forward_gemm<ddpm::Core::Wmma>(x, w, b, image_bias, residual, y, batch, h, wd, c, o, taps, stride, pad);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_backward_data_wmma(const float* __restrict__ dy, const __nv_bfloat16* __restrict__ w, float* __restrict__ dx,
                             int batch, int h, int wd, int c, int o, int taps, int stride, int pad,
                             int accumulate) {
    conv_backward_data_gemm<ddpm::Core::Wmma>(dy, w, dx, batch, h, wd, c, o, taps, stride, pad, accumulate);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_backward_weight_wmma(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dw,
                               float* __restrict__ workspace, int chunk, int batch, int h, int wd, int c, int o,
                               int taps, int stride, int pad) {
    conv_backward_weight_gemm<ddpm::Core::Wmma>(x, dy, dw, workspace, chunk, batch, h, wd, c, o, taps, stride,
                                                 pad);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_forward_wgmma(const float* __restrict__ x, const __nv_bfloat16* __restrict__ w, const float* __restrict__ b,
                       const float* __restrict__ image_bias, const float* __restrict__ residual,
                       float* __restrict__ y, int batch, int h, int wd, int c, int o, int taps, int stride,
                       int pad) {
    conv_forward_gemm<ddpm::Core::Wgmma>(x, w, b, image_bias, residual, y, batch, h, wd, c, o, taps, stride, pad);
}

// Version 5 (sm_90a only): the forward convolution on version 4 with the weight operand copied by the
// tensor-memory accelerator (gemm_wgmma.cuh). `wmap` describes the weights' bf16 copy as the [o, taps *
// taps * c] matrix it is, in boxes of 8 x 128; taps * taps * c must be a multiple of 8 (the launcher runs
// version 4 otherwise). The other arguments are conv2d_forward_bf16's.
template <class TmaB>
__device__ __forceinline__ void conv_forward_tma(const float* x, const ddpm::TensorMap& wmap, const float* b,
                                                 const float* image_bias, const float* residual, float* y,
                                                 int batch, int h, int wd, int c, int o, int taps, int stride,
                                                 int pad) {
    const ddpm::ConvGeom g = conv_geom(h, wd, c, o, taps, stride, pad);
    const int rows = batch * g.oh * g.ow, kdim = taps * taps * c;
    const ddpm::Im2col a{x, g, rows, kdim};
    const ddpm::Epilogue e{y, o, b, 0, nullptr, image_bias, g.oh * g.ow, residual};
    ddpm::gemm_run_wgmma_tma(a, TmaB{}, wmap, rows, o, kdim, kdim, e);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_forward_tma(const float* __restrict__ x, const __grid_constant__ ddpm::TensorMap wmap,
                       const float* __restrict__ b, const float* __restrict__ image_bias,
                       const float* __restrict__ residual, float* __restrict__ y, int batch, int h, int wd, int c,
                       int o, int taps, int stride, int pad) {
    conv_forward_tma<ddpm::TmaWeightRows>(x, wmap, b, image_bias, residual, y, batch, h, wd, c, o, taps, stride,
                                          pad);
}

// Version 6 (sm_90a only): version 5's forward with each slice of the weights one copy of 32 k x 128
// rows in the 64-byte swizzle (TmaWeightRowsSw64); `wmap` the same matrix in boxes of 32 x 128, encoded
// with CU_TENSOR_MAP_SWIZZLE_64B.
extern "C" __global__ void __launch_bounds__(256)
    conv2d_forward_tma_sw64(const float* __restrict__ x, const __grid_constant__ ddpm::TensorMap wmap,
                            const float* __restrict__ b, const float* __restrict__ image_bias,
                            const float* __restrict__ residual, float* __restrict__ y, int batch, int h, int wd,
                            int c, int o, int taps, int stride, int pad) {
    conv_forward_tma<ddpm::TmaWeightRowsSw64>(x, wmap, b, image_bias, residual, y, batch, h, wd, c, o, taps,
                                              stride, pad);
}

// Version 5's input gradient: conv2d_backward_data_bf16 with the weights copied by TMA. `wmap` views the
// bf16 weight copy [o, taps^2, c] as the 4-D tensor TmaWeightTaps describes (gemm_wgmma.cuh); c and o
// must be multiples of 8 (the launcher runs version 4 otherwise).
template <class TmaB>
__device__ __forceinline__ void conv_backward_data_tma(const float* dy, const ddpm::TensorMap& wmap, float* dx,
                                                       int batch, int h, int wd, int c, int o, int taps,
                                                       int stride, int pad, int accumulate) {
    const ddpm::ConvGeom g = conv_geom(h, wd, c, o, taps, stride, pad);
    const int rows = batch * h * wd, kdim = taps * taps * o;
    const ddpm::DyGather a{dy, g, rows, kdim};
    const ddpm::Epilogue e{dx, c, nullptr, accumulate, nullptr};
    ddpm::gemm_run_wgmma_tma(a, TmaB{o}, wmap, rows, c, kdim, kdim, e);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_backward_data_tma(const float* __restrict__ dy, const __grid_constant__ ddpm::TensorMap wmap,
                             float* __restrict__ dx, int batch, int h, int wd, int c, int o, int taps, int stride,
                             int pad, int accumulate) {
    conv_backward_data_tma<ddpm::TmaWeightTaps>(dy, wmap, dx, batch, h, wd, c, o, taps, stride, pad, accumulate);
}

// Version 6's input gradient: version 5's with each slice of the weights one copy in the 64-byte swizzle
// (TmaWeightTapsSw64, whose 4-D view of the weights `wmap` is); c and o must be multiples of 32 (the
// launcher runs version 5 or 4 otherwise).
extern "C" __global__ void __launch_bounds__(256)
    conv2d_backward_data_tma_sw64(const float* __restrict__ dy, const __grid_constant__ ddpm::TensorMap wmap,
                                  float* __restrict__ dx, int batch, int h, int wd, int c, int o, int taps,
                                  int stride, int pad, int accumulate) {
    conv_backward_data_tma<ddpm::TmaWeightTapsSw64>(dy, wmap, dx, batch, h, wd, c, o, taps, stride, pad,
                                                    accumulate);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_backward_data_wgmma(const float* __restrict__ dy, const __nv_bfloat16* __restrict__ w, float* __restrict__ dx,
                             int batch, int h, int wd, int c, int o, int taps, int stride, int pad,
                             int accumulate) {
    conv_backward_data_gemm<ddpm::Core::Wgmma>(dy, w, dx, batch, h, wd, c, o, taps, stride, pad, accumulate);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_backward_weight_wgmma(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dw,
                               float* __restrict__ workspace, int chunk, int batch, int h, int wd, int c, int o,
                               int taps, int stride, int pad) {
    conv_backward_weight_gemm<ddpm::Core::Wgmma>(x, dy, dw, workspace, chunk, batch, h, wd, c, o, taps, stride,
                                                 pad);
}


// The normalised-input twins: x is the block's input before group norm (+ SiLU); mean and rstd are
// [batch, groups] from group_norm_forward_f32, gamma and beta [c]; dropout p (0: none) with the mask of
// (seed, stream_base + stream_per_step * *clock), as dropout_forward_f32 draws it.
#define DDPM_NORM_PARAMS                                                                                   \
    const float *__restrict__ mean, const float *__restrict__ rstd, const float *__restrict__ gamma,       \
        const float *__restrict__ beta, int groups, int silu, float p, uint64_t seed, uint64_t stream_base, \
        uint64_t stream_per_step, const uint64_t *__restrict__ clock
#define DDPM_NORM_ARGS                                                                                     \
    NormArgs { mean, rstd, gamma, beta, groups, silu, p, seed, stream_base + stream_per_step * *clock }

extern "C" __global__ void __launch_bounds__(256)
    conv2d_forward_normed_f32(const float* __restrict__ x, DDPM_NORM_PARAMS, const float* __restrict__ w,
                              const float* __restrict__ b, const float* __restrict__ image_bias,
                              const float* __restrict__ residual, float* __restrict__ y, int batch, int h, int wd,
                              int c, int o, int taps, int stride, int pad) {
    conv_forward_gemm<ddpm::Core::Simt, true>(x, w, b, image_bias, residual, y, batch, h, wd, c, o, taps, stride, pad,
                                   DDPM_NORM_ARGS);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_forward_normed_bf16(const float* __restrict__ x, DDPM_NORM_PARAMS, const __nv_bfloat16* __restrict__ w,
                               const float* __restrict__ b, const float* __restrict__ image_bias,
                               const float* __restrict__ residual, float* __restrict__ y, int batch, int h,
                               int wd, int c, int o, int taps, int stride, int pad) {
    conv_forward_gemm<ddpm::Core::Mma, true>(x, w, b, image_bias, residual, y, batch, h, wd, c, o, taps, stride, pad,
                                  DDPM_NORM_ARGS);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_backward_weight_normed_f32(const float* __restrict__ x, DDPM_NORM_PARAMS,
                                      const float* __restrict__ dy, float* __restrict__ dw,
                                      float* __restrict__ workspace, int chunk, int batch, int h, int wd, int c,
                                      int o, int taps, int stride, int pad) {
    conv_backward_weight_gemm<ddpm::Core::Simt, true>(x, dy, dw, workspace, chunk, batch, h, wd, c, o, taps, stride, pad,
                                           DDPM_NORM_ARGS);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_backward_weight_normed_bf16(const float* __restrict__ x, DDPM_NORM_PARAMS,
                                       const float* __restrict__ dy, float* __restrict__ dw,
                                       float* __restrict__ workspace, int chunk, int batch, int h, int wd, int c,
                                       int o, int taps, int stride, int pad) {
    conv_backward_weight_gemm<ddpm::Core::Mma, true>(x, dy, dw, workspace, chunk, batch, h, wd, c, o, taps, stride, pad,
                                          DDPM_NORM_ARGS);
}

// The bf16 kernels for activations stored in bf16 (Backend::stores_bf16_activations; ladder v7): version 3
// with each activation it touches in either storage. The input's is fixed per kernel (_bf16in: x stored in
// bf16, widened as it is loaded, then normalised in fp32 where the kernel normalises); the residual's and
// the output's are chosen per launch: of each pair of pointers (residual, residual_bf16) and (y, y_bf16),
// the launcher passes one and nulls the other. The output is rounded to bf16 in the epilogue, after the
// bias, the time embedding and the residual. Otherwise their arguments are conv2d_forward{,_normed}_bf16's.
#define DDPM_IO_PARAMS                                                                                     \
    const __nv_bfloat16 *__restrict__ w, const float *__restrict__ b, const float *__restrict__ image_bias, \
        const float *__restrict__ residual, const __nv_bfloat16 *__restrict__ residual_bf16,                \
        float *__restrict__ y, __nv_bfloat16 *__restrict__ y_bf16, int batch, int h, int wd, int c, int o,  \
        int taps, int stride, int pad

extern "C" __global__ void __launch_bounds__(256)
    conv2d_forward_bf16_io(const float* __restrict__ x, DDPM_IO_PARAMS) {
    conv_forward_gemm<ddpm::Core::Mma>(x, w, b, image_bias, residual, y, batch, h, wd, c, o, taps, stride, pad,
                                       NormArgs{}, y_bf16, residual_bf16);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_forward_bf16_io_bf16in(const __nv_bfloat16* __restrict__ x, DDPM_IO_PARAMS) {
    conv_forward_gemm<ddpm::Core::Mma>(x, w, b, image_bias, residual, y, batch, h, wd, c, o, taps, stride, pad,
                                       NormArgs{}, y_bf16, residual_bf16);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_forward_normed_bf16_io(const float* __restrict__ x, DDPM_NORM_PARAMS, DDPM_IO_PARAMS) {
    conv_forward_gemm<ddpm::Core::Mma, true>(x, w, b, image_bias, residual, y, batch, h, wd, c, o, taps, stride,
                                             pad, DDPM_NORM_ARGS, y_bf16, residual_bf16);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_forward_normed_bf16_io_bf16in(const __nv_bfloat16* __restrict__ x, DDPM_NORM_PARAMS, DDPM_IO_PARAMS) {
    conv_forward_gemm<ddpm::Core::Mma, true>(x, w, b, image_bias, residual, y, batch, h, wd, c, o, taps, stride,
                                             pad, DDPM_NORM_ARGS, y_bf16, residual_bf16);
}
#undef DDPM_IO_PARAMS

// The weight gradients over an input stored in bf16: conv2d_backward_weight{,_normed}_bf16 with x's type
// changed.
extern "C" __global__ void __launch_bounds__(256)
    conv2d_backward_weight_bf16_bf16in(const __nv_bfloat16* __restrict__ x, const float* __restrict__ dy,
                                       float* __restrict__ dw, float* __restrict__ workspace, int chunk, int batch,
                                       int h, int wd, int c, int o, int taps, int stride, int pad) {
    conv_backward_weight_gemm<ddpm::Core::Mma>(x, dy, dw, workspace, chunk, batch, h, wd, c, o, taps, stride, pad);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_backward_weight_normed_bf16_bf16in(const __nv_bfloat16* __restrict__ x, DDPM_NORM_PARAMS,
                                              const float* __restrict__ dy, float* __restrict__ dw,
                                              float* __restrict__ workspace, int chunk, int batch, int h, int wd,
                                              int c, int o, int taps, int stride, int pad) {
    conv_backward_weight_gemm<ddpm::Core::Mma, true>(x, dy, dw, workspace, chunk, batch, h, wd, c, o, taps, stride,
                                                     pad, DDPM_NORM_ARGS);
}
#undef DDPM_NORM_PARAMS
#undef DDPM_NORM_ARGS

// Version 8 (sm_90a only; gemm_hopper.cuh): the three convolutions of stride 1 with both operands copied by
// the tensor-memory accelerator into a pipeline of `stages` stages, a producer warpgroup and two consumer
// warpgroups (block 384), the tile BN = 128 or 256 columns (_n128, _n256). A tile of M is a rectangle of
// wt x ht x nt pixels (128; the weight gradient's slices of K are such rectangles of 64). The launcher
// encodes the maps (src/backend/cuda/hopper.rs says which views and boxes) and runs these only where they
// describe the convolution: c (and o for the input gradient) multiples of 64, x in bf16 for the forward.
//   conv2d_forward_v8_*          ma: x (bf16), mb: W; the epilogue of the _io kernels (residual and y in
//                                either storage)
//   conv2d_backward_data_v8_*    ma: dy (fp32), mb: W viewed as (c, taps^2, o)
//   conv2d_backward_weight_v8_n256  ma: dy (fp32), mb: x (bf16); split K as the other cores
#define DDPM_V8_GEOMETRY int batch, int h, int wd, int c, int o, int taps, int pad, int wt, int ht, int nt, int stages

template <int BN>
__device__ __forceinline__ void conv_forward_v8(const ddpm::TensorMap& ma, const ddpm::TensorMap& mb, const float* b,
                                                const float* image_bias, const float* residual,
                                                const __nv_bfloat16* residual_bf16, float* y, __nv_bfloat16* y_bf16,
                                                int batch, int h, int wd, int c, int o, int taps, int pad, int wt,
                                                int ht, int nt, int stages) {
    namespace hop = ddpm::hop;
    const hop::PixelTiles tiles = hop::pixel_tiles(batch, h, wd, wt, ht, nt);
    const hop::ConvForward<BN> p{&ma, &mb, tiles, tiles.origin(blockIdx.x), int(blockIdx.y) * BN, c, taps, pad,
                                 batch * h * wd, o};
    const ddpm::Epilogue e{y, o, b, 0, nullptr, image_bias, h * wd, residual, y_bf16, residual_bf16};
    hop::gemm(p, stages, e);
}

extern "C" __global__ void __launch_bounds__(384, 1)
    conv2d_forward_v8_n128(const __grid_constant__ ddpm::TensorMap ma, const __grid_constant__ ddpm::TensorMap mb,
                           const float* __restrict__ b, const float* __restrict__ image_bias,
                           const float* __restrict__ residual, const __nv_bfloat16* __restrict__ residual_bf16,
                           float* __restrict__ y, __nv_bfloat16* __restrict__ y_bf16, DDPM_V8_GEOMETRY) {
    conv_forward_v8<128>(ma, mb, b, image_bias, residual, residual_bf16, y, y_bf16, batch, h, wd, c, o, taps, pad,
                         wt, ht, nt, stages);
}

extern "C" __global__ void __launch_bounds__(384, 1)
    conv2d_forward_v8_n256(const __grid_constant__ ddpm::TensorMap ma, const __grid_constant__ ddpm::TensorMap mb,
                           const float* __restrict__ b, const float* __restrict__ image_bias,
                           const float* __restrict__ residual, const __nv_bfloat16* __restrict__ residual_bf16,
                           float* __restrict__ y, __nv_bfloat16* __restrict__ y_bf16, DDPM_V8_GEOMETRY) {
    conv_forward_v8<256>(ma, mb, b, image_bias, residual, residual_bf16, y, y_bf16, batch, h, wd, c, o, taps, pad,
                         wt, ht, nt, stages);
}


// The forward transposed (hop::ConvForwardT): grid (pixel patches of 256, o / 128); the maps as the other
// forwards take them (ma: x, mb: W), the problem reading W as its A.
extern "C" __global__ void __launch_bounds__(384, 1)
    conv2d_forward_v8_t256(const __grid_constant__ ddpm::TensorMap ma, const __grid_constant__ ddpm::TensorMap mb,
                           const float* __restrict__ b, const float* __restrict__ image_bias,
                           const float* __restrict__ residual, const __nv_bfloat16* __restrict__ residual_bf16,
                           float* __restrict__ y, __nv_bfloat16* __restrict__ y_bf16, DDPM_V8_GEOMETRY) {
    namespace hop = ddpm::hop;
    const hop::PixelTiles tiles = hop::pixel_tiles(batch, h, wd, wt, ht, nt);
    const hop::ConvForwardT<256> p{&mb, &ma, tiles, tiles.origin(blockIdx.x), int(blockIdx.y) * hop::BM, c, taps, pad,
                                   batch * h * wd, o};
    const ddpm::Epilogue e{y, o, b, 0, nullptr, image_bias, h * wd, residual, y_bf16, residual_bf16};
    hop::gemm(p, stages, e);
}

template <int BN>
__device__ __forceinline__ void conv_backward_data_v8(const ddpm::TensorMap& ma, const ddpm::TensorMap& mb, float* dx,
                                                      int accumulate, int batch, int h, int wd, int c, int o,
                                                      int taps, int pad, int wt, int ht, int nt, int stages) {
    namespace hop = ddpm::hop;
    const hop::PixelTiles tiles = hop::pixel_tiles(batch, h, wd, wt, ht, nt);
    const hop::ConvInputGrad<BN> p{&ma, &mb, tiles, tiles.origin(blockIdx.x), int(blockIdx.y) * BN, o, taps, pad,
                                   batch * h * wd, c};
    const ddpm::Epilogue e{dx, c, nullptr, accumulate, nullptr};
    hop::gemm(p, stages, e);
}

extern "C" __global__ void __launch_bounds__(384, 1)
    conv2d_backward_data_v8_n128(const __grid_constant__ ddpm::TensorMap ma,
                                 const __grid_constant__ ddpm::TensorMap mb, float* __restrict__ dx, int accumulate,
                                 DDPM_V8_GEOMETRY) {
    conv_backward_data_v8<128>(ma, mb, dx, accumulate, batch, h, wd, c, o, taps, pad, wt, ht, nt, stages);
}

extern "C" __global__ void __launch_bounds__(384, 1)
    conv2d_backward_data_v8_n256(const __grid_constant__ ddpm::TensorMap ma,
                                 const __grid_constant__ ddpm::TensorMap mb, float* __restrict__ dx, int accumulate,
                                 DDPM_V8_GEOMETRY) {
    conv_backward_data_v8<256>(ma, mb, dx, accumulate, batch, h, wd, c, o, taps, pad, wt, ht, nt, stages);
}


// Slice z of the reduction over pixels (runs of `chunk` patches of wt x ht x nt = 64) writes
// workspace[z, o, k] when gridDim.z > 1; gemm_reduce_f32 then writes dw.
extern "C" __global__ void __launch_bounds__(384, 1)
    conv2d_backward_weight_v8_n256(const __grid_constant__ ddpm::TensorMap ma, const __grid_constant__ ddpm::TensorMap mb,
                                   float* __restrict__ dw, float* __restrict__ workspace, int chunk,
                                   DDPM_V8_GEOMETRY) {
    namespace hop = ddpm::hop;
    const hop::PixelTiles tiles = hop::pixel_tiles(batch, h, wd, wt, ht, nt);
    const int kdim = taps * taps * c;
    int first, count;
    hop::split_run(tiles.patches(), chunk, first, count);
    const hop::ConvWeightGrad<256> p{&ma, &mb, tiles, int(blockIdx.x) * hop::BM, int(blockIdx.y) * 256, c, taps, pad,
                                     o, kdim, first, count};
    const ddpm::Epilogue e{dw, kdim, nullptr, 0, workspace};
    hop::gemm(p, stages, e);
}
#undef DDPM_V8_GEOMETRY

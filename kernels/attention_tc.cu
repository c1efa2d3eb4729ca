// attention_tc.cu: the attention forward on bf16 tensor cores (version 2; version 1 is attention.cu's fp32
// kernel, which the backward pass and the channel counts this one does not take still use).
//   attention_forward_bf16   out = softmax(q k^T / sqrt(c)) v and lse, as attention_forward_f32
//
// Flash-style (Dao et al. 2022): a block owns 64 queries of one image and streams the keys and values
// through shared memory 64 at a time, so the l x l scores are never stored. Per key tile, each of the 4
// warps (16 queries each):
//   1. S = Q K^T for its 16 x 64 scores: WMMA m16n16k16 over the c channels, q and k rounded to bf16,
//      fp32 sums, written to shared memory;
//   2. the online softmax in fp32: two lanes per query row (32 keys each) update the row maximum m and the
//      row sum, write P = exp(S / sqrt(c) - m) as bf16, and rescale the row's output accumulator by
//      exp(m_old - m_new);
//   3. O += P V: the warp's 16 x c accumulator, kept in shared memory in fp32 (WMMA's accumulator layout
//      is opaque, so the per-row rescaling of step 2 needs it there), loaded, updated by 4 mma per 16
//      channels and stored back.
// At the end each row is divided by its sum and lse = m + log(sum) is written (fp32), as the fp32
// backward pass expects.
//
// Requirements (the launcher checks them and otherwise runs the fp32 kernel): c a multiple of 16, and the
// shared memory below within the device's limit (c = 256: 195 KB; the backend opts in to the maximum).
// Shared memory, with every region 32-byte aligned and row strides padded against bank conflicts:
//   Q, K, V tiles  3 x 64 x (c + 8) bf16;  S 64 x 68 fp32;  P 64 x 72 bf16;  O 64 x (c + 4) fp32.
// Launch: block 128 (4 warps), grid (ceil(l / 64), n), dynamic shared memory attention_tc_smem(c).
// FLOPs: 4 n l^2 c, on tensor cores.
#include <cuda_bf16.h>
#include <mma.h>

#include "common.cuh"

namespace {
constexpr int AT_Q = 64;   // queries per block
constexpr int AT_KV = 64;  // keys per tile
constexpr int AT_WARPS = 4;  // 16 queries each
static_assert(AT_Q == 16 * AT_WARPS, "each warp owns 16 query rows");
constexpr int AT_LDS = AT_KV + 4;  // S row stride (fp32)
constexpr int AT_LDP = AT_KV + 8;  // P row stride (bf16)

__device__ __forceinline__ size_t align32(size_t bytes) { return (bytes + 31) / 32 * 32; }
}  // namespace

extern "C" __global__ void __launch_bounds__(32 * AT_WARPS)
    attention_forward_bf16(const float* __restrict__ qkv, float* __restrict__ out, float* __restrict__ lse, int l,
                           int c) {
    namespace wmma = nvcuda::wmma;
    extern __shared__ float smem[];
    const int ldt = c + 8, ldo = c + 4;
    char* base = reinterpret_cast<char*>(smem);
    const size_t tile_bytes = align32(size_t(AT_Q) * ldt * 2);
    __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(base);
    __nv_bfloat16* ks = reinterpret_cast<__nv_bfloat16*>(base + tile_bytes);
    __nv_bfloat16* vs = reinterpret_cast<__nv_bfloat16*>(base + 2 * tile_bytes);
    float* ss = reinterpret_cast<float*>(base + 3 * tile_bytes);
    __nv_bfloat16* ps = reinterpret_cast<__nv_bfloat16*>(base + 3 * tile_bytes + align32(AT_Q * AT_LDS * 4));
    float* os = reinterpret_cast<float*>(base + 3 * tile_bytes + align32(AT_Q * AT_LDS * 4) +
                                         align32(AT_Q * AT_LDP * 2));

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int image = blockIdx.y, q0 = blockIdx.x * AT_Q;
    const int64_t row = 3 * int64_t(c);
    const float* src = qkv + int64_t(image) * l * row;
    // 1 / sqrt(c) in fp64, rounded once (as the fp32 kernel and the CPU do).
    const float scale = float(1.0 / sqrt(double(c)));

    // Stage the block's queries (zero past the end), clear the output accumulators.
    for (int e = threadIdx.x; e < AT_Q * c; e += blockDim.x) {
        const int r = e / c, ch = e % c;
        qs[r * ldt + ch] = __float2bfloat16_rn(q0 + r < l ? src[(q0 + r) * row + ch] : 0.0f);
        os[r * ldo + ch] = 0.0f;
    }

    // Lanes 2r and 2r + 1 of warp w own query row 16 w + r of the block: keys [32 half, 32 half + 32) of
    // each tile, channels [half c / 2, (half + 1) c / 2) of the output.
    const int r = 16 * warp + lane / 2, half = lane % 2;
    float m = -INFINITY, sum = 0.0f;
    __nv_bfloat16* qw = qs + 16 * warp * ldt;
    float* sw = ss + 16 * warp * AT_LDS;
    __nv_bfloat16* pw = ps + 16 * warp * AT_LDP;
    float* ow = os + 16 * warp * ldo;

    for (int j0 = 0; j0 < l; j0 += AT_KV) {
        __syncthreads();  // every warp is done with the previous K and V tiles (and, first, Q is staged)
        for (int e = threadIdx.x; e < AT_KV * c; e += blockDim.x) {
            const int j = e / c, ch = e % c;
            const bool in = j0 + j < l;
            ks[j * ldt + ch] = __float2bfloat16_rn(in ? src[(j0 + j) * row + c + ch] : 0.0f);
            vs[j * ldt + ch] = __float2bfloat16_rn(in ? src[(j0 + j) * row + 2 * c + ch] : 0.0f);
        }
        __syncthreads();

        // 1. S = Q K^T for the warp's 16 rows: K stored [key][channel] is K^T in column-major order.
        for (int n = 0; n < AT_KV / 16; ++n) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> s;
            wmma::fill_fragment(s, 0.0f);
            for (int k = 0; k < c; k += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
                wmma::load_matrix_sync(a, qw + k, ldt);
                wmma::load_matrix_sync(b, ks + 16 * n * ldt + k, ldt);
                wmma::mma_sync(s, a, b, s);
            }
            wmma::store_matrix_sync(sw + 16 * n, s, AT_LDS, wmma::mem_row_major);
        }
        __syncwarp();

        // 2. The online softmax of row r over this tile's keys (past the end of the sequence: -inf).
        const float* srow = ss + r * AT_LDS + 32 * half;
        float tile_max = -INFINITY;
        for (int j = 0; j < 32; ++j)
            if (j0 + 32 * half + j < l) tile_max = fmaxf(tile_max, srow[j] * scale);
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        const float m_new = fmaxf(m, tile_max);  // finite: every tile holds at least one key
        const float corr = expf(m - m_new);
        float part = 0.0f;
        __nv_bfloat16* prow = ps + r * AT_LDP + 32 * half;
        for (int j = 0; j < 32; ++j) {
            const float p = j0 + 32 * half + j < l ? expf(srow[j] * scale - m_new) : 0.0f;
            prow[j] = __float2bfloat16_rn(p);
            part += p;
        }
        part += __shfl_xor_sync(0xffffffffu, part, 1);
        sum = sum * corr + part;
        m = m_new;
        float* orow = os + r * ldo + half * (c / 2);
        for (int ch = 0; ch < c / 2; ++ch) orow[ch] *= corr;
        __syncwarp();

        // 3. O += P V, 16 channels at a time.
        for (int n = 0; n < c; n += 16) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
            wmma::load_matrix_sync(o, ow + n, ldo, wmma::mem_row_major);
            for (int k = 0; k < AT_KV; k += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
                wmma::load_matrix_sync(a, pw + k, AT_LDP);
                wmma::load_matrix_sync(b, vs + k * ldt + n, ldt);
                wmma::mma_sync(o, a, b, o);
            }
            wmma::store_matrix_sync(ow + n, o, ldo, wmma::mem_row_major);
        }
        __syncwarp();
    }

    if (q0 + r >= l) return;
    const float inv = 1.0f / sum;
    const float* orow = os + r * ldo + half * (c / 2);
    float* dst = out + (int64_t(image) * l + q0 + r) * c + half * (c / 2);
    for (int ch = 0; ch < c / 2; ++ch) dst[ch] = orow[ch] * inv;
    if (half == 0) lse[int64_t(image) * l + q0 + r] = m + logf(sum);
}

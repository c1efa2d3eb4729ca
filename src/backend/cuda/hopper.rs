//! Launchers of version 8 of the convolution ladder (`kernels/gemm_hopper.cuh`, sm_90a): the stride-1
//! convolutions and the attention projection with both operands copied by the tensor-memory accelerator
//! into a warp-specialised wgmma pipeline, on `Rung::Pipelined`. Each launcher says whether it ran: where
//! its tensor maps cannot describe the op (channels not multiples of 64, an fp32 operand the kernel reads
//! as bf16, a tensor not 128-byte aligned, a stride-2 convolution), the caller runs version 3.
//!
//! The maps (innermost extent first; every box row 128 bytes, in the 128-byte swizzle):
//!
//! | GEMM | A | B |
//! |---|---|---|
//! | conv forward | x bf16 (c, w, h, n), box (64, wt, ht, nt) | W (taps^2 c, o), box (64, BN) |
//! | conv forward, transposed (C^T, o < 256) | W (taps^2 c, o), box (64, 128) | x bf16 (c, w, h, n), box (64, wt, ht, nt) of 256 |
//! | conv input gradient | dy fp32 (o, w, h, n), box (32, wt, ht, nt) | W (c, taps^2, o), box (64, 1, 64) |
//! | conv weight gradient | dy fp32 (o, w, h, n), box (32, 64 pixels) | x bf16 (c, w, h, n), box (64, 64 pixels) |
//! | linear forward | x bf16 (k, m), box (64, 128) | W (k, n), box (64, 256) |
//! | linear input gradient | dy fp32 (n, m), box (32, 128) | W (k, n), box (64, 64) |
//! | linear weight gradient | dy fp32 (n, m), box (32, 64) | x bf16 (k, m), box (64, 64) |
//!
//! A tile of M is 128 rows: for a convolution, a rectangle of wt x ht x nt output pixels ([`patch`]) (the
//! transposed forward's tile of N is such a rectangle of 256); the weight gradient's slices of K are
//! rectangles of 64.

use super::device::{Element, Swizzle, TensorMap};
use super::elementwise::dims;
use super::{CudaBackend, KernelArgs, WORKSPACE};
use crate::backend::{ConvKind, ConvShape, Rung, Tensor};
use crate::error::Result;
use cudarc::driver::LaunchConfig;

/// Rows of a tile, k per stage, threads per block (`kernels/gemm_hopper.cuh`).
const BM: usize = 128;
const BK: usize = 64;
const THREADS: u32 = 384;
/// The most stages a pipeline takes.
const MAX_STAGES: usize = 8;
/// The alignment the kernels' swizzled copies ask of global memory (as version 6's, `conv.rs`).
const ALIGN: u64 = 128;

/// Every version-8 kernel: each may use the device's maximum of dynamic shared memory.
pub(super) const KERNELS: [&str; 9] = [
    "conv2d_forward_v8_n128",
    "conv2d_forward_v8_n256",
    "conv2d_forward_v8_t256",
    "conv2d_backward_data_v8_n128",
    "conv2d_backward_data_v8_n256",
    "conv2d_backward_weight_v8_n256",
    "linear_forward_v8_n256",
    "linear_backward_data_v8_n256",
    "linear_backward_weight_v8_n256",
];

/// A rectangle of `rows` pixels (a power of two) of a grid of `w x h` images: as wide as the image (to the
/// next power of two, at most `rows`), as tall as what is left allows, the rest images: (wt, ht, nt).
pub(super) fn patch(h: usize, w: usize, rows: usize) -> [usize; 3] {
    let wt = w.next_power_of_two().min(rows);
    let ht = h.next_power_of_two().min(rows / wt);
    [wt, ht, rows / (wt * ht)]
}

/// The patches of a grid of `n` images of `h x w` pixels.
fn patches(n: usize, h: usize, w: usize, [wt, ht, nt]: [usize; 3]) -> usize {
    w.div_ceil(wt) * h.div_ceil(ht) * n.div_ceil(nt)
}

/// The share of the device's SMs (one block each) `blocks` keep busy over whole waves.
fn wave_efficiency(blocks: usize, sms: usize) -> f64 {
    blocks as f64 / (blocks.div_ceil(sms) * sms) as f64
}

/// The tile width of an output of `cols` columns in `m_tiles` row tiles: 256 where it divides the columns
/// and keeps the SMs as busy as 128 does, else 128.
fn tile_cols(cols: usize, m_tiles: usize, sms: usize) -> usize {
    if cols.is_multiple_of(256)
        && wave_efficiency(m_tiles * cols / 256, sms)
            >= wave_efficiency(m_tiles * cols.div_ceil(128), sms) - 1e-9
    {
        256
    } else {
        128
    }
}

/// How to split a reduction of `slices` slices over `tiles` output tiles: the fewest splits that keep 90%
/// of the SMs busy over whole waves (at most 64, each split at least 4 slices, the partial sums of `out`
/// elements each within the workspace), else the best of those. (splits, slices per split).
fn splits(tiles: usize, slices: usize, sms: usize, out: usize) -> (usize, usize) {
    let most = 64.min(slices / 4).min(WORKSPACE / out.max(1)).max(1);
    let mut best = (1, wave_efficiency(tiles, sms));
    for s in 1..=most {
        let e = wave_efficiency(tiles * s, sms);
        if e >= 0.9 {
            best = (s, e);
            break;
        }
        if e > best.1 + 1e-9 {
            best = (s, e);
        }
    }
    let chunk = slices.div_ceil(best.0);
    (slices.div_ceil(chunk), chunk)
}

/// A launch's bytes of dynamic shared memory for `stages` stages of `stage` bytes (plus the alignment the
/// 128-byte swizzle needs and the stages' two barriers).
fn shared_bytes(stages: usize, stage: usize) -> usize {
    stages * stage + 1024 + 16 * stages
}

impl CudaBackend {
    /// Whether version 8 runs here: its rung selected on an sm_90a device.
    fn on_v8(&self) -> bool {
        self.rung == Some(Rung::Pipelined) && self.props.sm90a
    }

    /// The most stages of `stage` bytes the device's shared memory holds (at least 2).
    fn v8_stages(&self, stage: usize) -> usize {
        let room = (self.props.max_shared as usize).saturating_sub(1024);
        (room / (stage + 16)).clamp(2, MAX_STAGES)
    }

    /// Whether `t` starts where a swizzled copy may.
    fn aligned(&self, t: Tensor) -> bool {
        self.ptr(t).is_multiple_of(ALIGN)
    }

    /// A swizzled tensor map of `element`s at `base` (see [`super::device::Device::tensor_map`]).
    fn map(
        &self,
        element: Element,
        base: u64,
        dims: &[u64],
        strides: &[u64],
        boxes: &[u32],
    ) -> Result<TensorMap> {
        self.dev
            .tensor_map(element, base, dims, strides, boxes, Swizzle::B128)
    }

    /// The map of an NHWC tensor `[n, h, w, c]` of `element`s as (c, w, h, n), in boxes of `run` channels
    /// by a patch.
    fn nhwc_map(
        &self,
        element: Element,
        base: u64,
        [n, h, w, c]: [usize; 4],
        run: u32,
        [wt, ht, nt]: [usize; 3],
    ) -> Result<TensorMap> {
        let e = element.bytes();
        let (c, w, h) = (c as u64, w as u64, h as u64);
        self.map(
            element,
            base,
            &[c, w, h, n as u64],
            &[e * c, e * c * w, e * c * w * h],
            &[run, wt as u32, ht as u32, nt as u32],
        )
    }

    /// The map of a row-major `[rows, cols]` matrix of `element`s as (cols, rows), in boxes of `box_cols`
    /// x `box_rows`.
    fn matrix_map(
        &self,
        element: Element,
        base: u64,
        rows: usize,
        cols: usize,
        boxes: [u32; 2],
    ) -> Result<TensorMap> {
        let e = element.bytes();
        self.map(
            element,
            base,
            &[cols as u64, rows as u64],
            &[e * cols as u64],
            &boxes,
        )
    }

    /// Runs a version-8 kernel: grid `grid`, `stages` stages of `stage` bytes, arguments `a` (their maps
    /// first), the work as the caller counted it.
    fn v8_launch(
        &mut self,
        kernel: &'static str,
        grid: (u32, u32, u32),
        stage: usize,
        stages: usize,
        mut a: KernelArgs,
    ) -> Result<()> {
        a.push(stages as i32);
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: shared_bytes(stages, stage) as u32,
        };
        let work = self.take_work();
        a.launch(&mut self.dev, kernel, cfg, work)?;
        self.v8_launches += 1;
        Ok(())
    }

    /// Counts a version-8 GEMM's work: `macs` of the op, `m_tiles` x `n_tiles` tiles of 128 x `bn` over
    /// `k_issued` of the reduction, `stage` bytes of operands a slice.
    fn count_v8(
        &mut self,
        macs: usize,
        [m_tiles, n_tiles, bn]: [usize; 3],
        k_issued: usize,
        stage: usize,
    ) {
        self.work.flops = 2.0 * macs as f64;
        self.work.issued_macs = (m_tiles * BM * n_tiles * bn * k_issued) as f64;
        self.work.tile = Some([BM as u32, bn as u32, BK as u32]);
        self.work.staged = stage as f64;
    }

    /// The geometry arguments of the convolution kernels: n, h, w, c, o, taps, pad, wt, ht, nt.
    fn v8_geometry(a: &mut KernelArgs, s: &ConvShape, p: [usize; 3]) -> Result<()> {
        let [n, h, w, c, o, taps, pad, wt, ht, nt] = dims([
            s.n,
            s.h,
            s.w,
            s.c,
            s.o,
            s.kind.taps(),
            s.kind.pad_before(),
            p[0],
            p[1],
            p[2],
        ])?;
        for v in [n, h, w, c, o, taps, pad, wt, ht, nt] {
            a.push(v);
        }
        Ok(())
    }

    /// The convolution forward on version 8 (x bf16, stride 1, c a multiple of 64, o of 128), the
    /// epilogue's pointers as the `_io` kernels take them: (bias, image bias, residual, residual bf16, y,
    /// y bf16). Whether it ran.
    pub(super) fn v8_conv_forward(
        &mut self,
        s: &ConvShape,
        x: Tensor,
        pw: u64,
        epilogue: [u64; 6],
    ) -> Result<bool> {
        if !self.on_v8()
            || s.kind == ConvKind::K3S2
            || !x.is_bf16()
            || !s.c.is_multiple_of(BK)
            || !s.o.is_multiple_of(128)
            || !self.aligned(x)
            || !pw.is_multiple_of(ALIGN)
        {
            return Ok(false);
        }
        let p = patch(s.h, s.w, BM);
        let m_tiles = patches(s.n, s.h, s.w, p);
        let sms = self.props.sms as usize;
        let bn = tile_cols(s.o, m_tiles, sms);
        // 128 columns re-read B for every 64 rows (the model's 80% by shared memory): computed transposed
        // instead (`conv2d_forward_v8_t256`: 128 channels by a patch of 256 pixels), where its waves keep
        // the SMs as busy.
        let pt = patch(s.h, s.w, 256);
        let t_tiles = patches(s.n, s.h, s.w, pt);
        let transposed = bn == 128
            && !s.o.is_multiple_of(256)
            && wave_efficiency(t_tiles * (s.o / 128), sms)
                >= 0.8 * wave_efficiency(m_tiles * (s.o / 128), sms);
        // The kernel, its pixel patch and their count, the output channels of a tile, and the pixels of a
        // tile (the stage holds 128 rows of A and that many of B, or the other way round).
        let (kernel, p, pixel_tiles, o_tile, pixels) = match (transposed, bn) {
            (true, _) => ("conv2d_forward_v8_t256", pt, t_tiles, BM, 256),
            (false, 256) => ("conv2d_forward_v8_n256", p, m_tiles, 256, BM),
            _ => ("conv2d_forward_v8_n128", p, m_tiles, 128, BM),
        };
        let ma = self.nhwc_map(
            Element::Bf16,
            self.ptr(x),
            [s.n, s.h, s.w, s.c],
            BK as u32,
            p,
        )?;
        let k = s.k();
        let mb = self.matrix_map(Element::Bf16, pw, s.o, k, [BK as u32, o_tile as u32])?;
        let mut a = KernelArgs::default();
        a.push_tensor_map(&ma);
        a.push_tensor_map(&mb);
        for v in epilogue {
            a.push(v);
        }
        Self::v8_geometry(&mut a, s, p)?;
        let stage = (pixels + o_tile) * BK * 2;
        let o_tiles = s.o / o_tile;
        let tiles = match transposed {
            true => [o_tiles, pixel_tiles, pixels],
            false => [pixel_tiles, o_tiles, o_tile],
        };
        self.count_v8(s.macs(), tiles, k, stage);
        let stages = self.v8_stages(stage);
        self.v8_launch(
            kernel,
            (pixel_tiles as u32, o_tiles as u32, 1),
            stage,
            stages,
            a,
        )?;
        Ok(true)
    }

    /// The convolution's input gradient on version 8 (stride 1, o a multiple of 64, c of 128). Whether it
    /// ran.
    pub(super) fn v8_conv_backward_data(
        &mut self,
        s: &ConvShape,
        dy: Tensor,
        pw: u64,
        dx: Tensor,
        acc: bool,
    ) -> Result<bool> {
        if !self.on_v8()
            || s.kind == ConvKind::K3S2
            || dy.is_bf16()
            || !s.o.is_multiple_of(BK)
            || !s.c.is_multiple_of(128)
            || !self.aligned(dy)
            || !pw.is_multiple_of(ALIGN)
        {
            return Ok(false);
        }
        let p = patch(s.h, s.w, BM);
        let m_tiles = patches(s.n, s.h, s.w, p);
        let bn = tile_cols(s.c, m_tiles, self.props.sms as usize);
        let ma = self.nhwc_map(Element::F32, self.ptr(dy), [s.n, s.h, s.w, s.o], 32, p)?;
        let (c, o, t2) = (
            s.c as u64,
            s.o as u64,
            (s.kind.taps() * s.kind.taps()) as u64,
        );
        let mb = self.map(
            Element::Bf16,
            pw,
            &[c, t2, o],
            &[2 * c, 2 * c * t2],
            &[BK as u32, 1, BK as u32],
        )?;
        let mut a = KernelArgs::default();
        a.push_tensor_map(&ma);
        a.push_tensor_map(&mb);
        a.push(self.ptr(dx));
        a.push(acc as i32);
        Self::v8_geometry(&mut a, s, p)?;
        let stage = BM * BK * 4 + bn * BK * 2;
        self.count_v8(s.macs(), [m_tiles, s.c / bn, bn], (t2 * o) as usize, stage);
        let kernel = if bn == 256 {
            "conv2d_backward_data_v8_n256"
        } else {
            "conv2d_backward_data_v8_n128"
        };
        let stages = self.v8_stages(stage);
        self.v8_launch(
            kernel,
            (m_tiles as u32, (s.c / bn) as u32, 1),
            stage,
            stages,
            a,
        )?;
        Ok(true)
    }

    /// The convolution's weight gradient on version 8 into `pdw` (x bf16, stride 1, c a multiple of 64,
    /// o of 128), split over K into the workspace and reduced. Whether it ran.
    pub(super) fn v8_conv_backward_weight(
        &mut self,
        s: &ConvShape,
        x: Tensor,
        dy: Tensor,
        pdw: u64,
    ) -> Result<bool> {
        if !self.on_v8()
            || s.kind == ConvKind::K3S2
            || !x.is_bf16()
            || dy.is_bf16()
            || !s.c.is_multiple_of(BK)
            || !s.o.is_multiple_of(128)
            || !self.aligned(x)
            || !self.aligned(dy)
        {
            return Ok(false);
        }
        let p = patch(s.h, s.w, BK);
        let slices = patches(s.n, s.h, s.w, p);
        let k = s.k();
        let (m_tiles, n_tiles) = (s.o / BM, k.div_ceil(256));
        let (split, chunk) = splits(m_tiles * n_tiles, slices, self.props.sms as usize, s.o * k);
        let ma = self.nhwc_map(Element::F32, self.ptr(dy), [s.n, s.h, s.w, s.o], 32, p)?;
        let mb = self.nhwc_map(
            Element::Bf16,
            self.ptr(x),
            [s.n, s.h, s.w, s.c],
            BK as u32,
            p,
        )?;
        let mut a = KernelArgs::default();
        a.push_tensor_map(&ma);
        a.push_tensor_map(&mb);
        a.push(pdw);
        a.push(self.workspace_ptr());
        let [chunk_i] = dims([chunk])?;
        a.push(chunk_i);
        Self::v8_geometry(&mut a, s, p)?;
        let stage = BM * BK * 4 + 256 * BK * 2;
        self.count_v8(s.macs(), [m_tiles, n_tiles, 256], split * chunk * BK, stage);
        if split > 1 {
            self.work.bytes += (4 * split * s.o * k) as f64;
        }
        let stages = self.v8_stages(stage);
        self.v8_launch(
            "conv2d_backward_weight_v8_n256",
            (m_tiles as u32, n_tiles as u32, split as u32),
            stage,
            stages,
            a,
        )?;
        if split > 1 {
            self.reduce_splits(split, s.o, k, pdw, 0, false)?;
        }
        Ok(true)
    }

    /// `y = x w^T + b (+ residual)` on version 8 (x bf16 `[m, k]`, k and n multiples of 64), the
    /// epilogue's pointers (bias, residual, residual bf16, y, y bf16). Whether it ran.
    pub(super) fn v8_linear(
        &mut self,
        [m, k, n]: [usize; 3],
        x: Tensor,
        pw: u64,
        epilogue: [u64; 5],
    ) -> Result<bool> {
        if !self.on_v8()
            || !x.is_bf16()
            || k % BK != 0
            || n % BK != 0
            || !self.aligned(x)
            || !pw.is_multiple_of(ALIGN)
        {
            return Ok(false);
        }
        let ma = self.matrix_map(Element::Bf16, self.ptr(x), m, k, [BK as u32, BM as u32])?;
        let mb = self.matrix_map(Element::Bf16, pw, n, k, [BK as u32, 256])?;
        let mut a = KernelArgs::default();
        a.push_tensor_map(&ma);
        a.push_tensor_map(&mb);
        for v in epilogue {
            a.push(v);
        }
        for v in dims([m, k, n])? {
            a.push(v);
        }
        let (m_tiles, n_tiles) = (m.div_ceil(BM), n.div_ceil(256));
        let stage = BM * BK * 2 + 256 * BK * 2;
        self.count_v8(m * n * k, [m_tiles, n_tiles, 256], k, stage);
        let stages = self.v8_stages(stage);
        self.v8_launch(
            "linear_forward_v8_n256",
            (m_tiles as u32, n_tiles as u32, 1),
            stage,
            stages,
            a,
        )?;
        Ok(true)
    }

    /// `dx (+)= dy w` on version 8 (dy fp32 `[m, n]`, k and n multiples of 64). Whether it ran.
    pub(super) fn v8_linear_backward_data(
        &mut self,
        [m, k, n]: [usize; 3],
        dy: Tensor,
        pw: u64,
        dx: Tensor,
        acc: bool,
    ) -> Result<bool> {
        if !self.on_v8()
            || dy.is_bf16()
            || k % BK != 0
            || n % BK != 0
            || !self.aligned(dy)
            || !pw.is_multiple_of(ALIGN)
        {
            return Ok(false);
        }
        let ma = self.matrix_map(Element::F32, self.ptr(dy), m, n, [32, BM as u32])?;
        let mb = self.matrix_map(Element::Bf16, pw, n, k, [BK as u32, BK as u32])?;
        let mut a = KernelArgs::default();
        a.push_tensor_map(&ma);
        a.push_tensor_map(&mb);
        a.push(self.ptr(dx));
        a.push(acc as i32);
        for v in dims([m, k, n])? {
            a.push(v);
        }
        let (m_tiles, n_tiles) = (m.div_ceil(BM), k.div_ceil(256));
        let stage = BM * BK * 4 + 256 * BK * 2;
        self.count_v8(m * n * k, [m_tiles, n_tiles, 256], n, stage);
        let stages = self.v8_stages(stage);
        self.v8_launch(
            "linear_backward_data_v8_n256",
            (m_tiles as u32, n_tiles as u32, 1),
            stage,
            stages,
            a,
        )?;
        Ok(true)
    }

    /// `dw = dy^T x` on version 8 into `pdw` (x bf16 `[m, k]`, dy fp32 `[m, n]`, n a multiple of 128, k of
    /// 64), split over the rows into the workspace and reduced. Whether it ran.
    pub(super) fn v8_linear_backward_weight(
        &mut self,
        [m, k, n]: [usize; 3],
        x: Tensor,
        dy: Tensor,
        pdw: u64,
    ) -> Result<bool> {
        if !self.on_v8()
            || !x.is_bf16()
            || dy.is_bf16()
            || n % BM != 0
            || k % BK != 0
            || !self.aligned(x)
            || !self.aligned(dy)
        {
            return Ok(false);
        }
        let slices = m.div_ceil(BK);
        let (m_tiles, n_tiles) = (n / BM, k.div_ceil(256));
        let (split, chunk) = splits(m_tiles * n_tiles, slices, self.props.sms as usize, n * k);
        let ma = self.matrix_map(Element::F32, self.ptr(dy), m, n, [32, BK as u32])?;
        let mb = self.matrix_map(Element::Bf16, self.ptr(x), m, k, [BK as u32, BK as u32])?;
        let mut a = KernelArgs::default();
        a.push_tensor_map(&ma);
        a.push_tensor_map(&mb);
        a.push(pdw);
        a.push(self.workspace_ptr());
        for v in dims([chunk, m, k, n])? {
            a.push(v);
        }
        let stage = BM * BK * 4 + 256 * BK * 2;
        self.count_v8(
            m * n * k,
            [m_tiles, n_tiles, 256],
            split * chunk * BK,
            stage,
        );
        if split > 1 {
            self.work.bytes += (4 * split * n * k) as f64;
        }
        let stages = self.v8_stages(stage);
        self.v8_launch(
            "linear_backward_weight_v8_n256",
            (m_tiles as u32, n_tiles as u32, split as u32),
            stage,
            stages,
            a,
        )?;
        if split > 1 {
            self.reduce_splits(split, n, k, pdw, 0, false)?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Patches are 128 (or 64) pixels, as wide as the image where it is narrower, and cover the grid.
    #[test]
    fn patches_cover_the_grid_in_rectangles_of_the_tile() {
        for (h, w, rows) in [
            (32, 32, 128),
            (16, 16, 128),
            (8, 8, 128),
            (4, 4, 128),
            (7, 5, 128),
            (16, 16, 64),
            (4, 4, 64),
            (1, 1, 64),
        ] {
            let [wt, ht, nt] = patch(h, w, rows);
            assert_eq!(wt * ht * nt, rows, "{h}x{w}");
            assert!(wt >= w.min(rows) && wt.is_power_of_two(), "{h}x{w}");
            let n = 3;
            assert!(patches(n, h, w, [wt, ht, nt]) * rows >= n * h * w);
        }
        assert_eq!(patch(16, 16, 128), [16, 8, 1]);
        assert_eq!(patch(4, 4, 128), [4, 4, 8]);
    }

    /// The splits of a weight gradient keep 90% of the SMs busy where they can, cover the reduction once,
    /// and fit the workspace.
    #[test]
    fn weight_gradient_splits_fill_the_waves() {
        // 16x16, 256 -> 256 at batch 128: 2 x 9 tiles, 512 slices of 64 pixels.
        let (s, chunk) = splits(18, 512, 132, 256 * 2304);
        assert!(wave_efficiency(18 * s, 132) >= 0.9, "{s}");
        assert!(s * chunk >= 512 && (s - 1) * chunk < 512);
        assert!(s * 256 * 2304 <= WORKSPACE);
        // Too few slices to split: one.
        assert_eq!(splits(18, 3, 132, 100).0, 1);
    }
}

//! Launchers of `kernels/conv.cu`: the three convolutions as implicit GEMMs, plus the bias gradient as a
//! column sum (`kernels/gemm.cuh`).

use super::device::{Swizzle, TensorMap};
use super::elementwise::dims;
use super::{launch, CudaBackend, KernelArgs, WORKSPACE};
use crate::backend::{ConvKind, ConvShape, NormedInput, Precision, Rung, Tensor};
use crate::error::{Error, Result};
use cudarc::driver::LaunchConfig;

/// A GEMM core's tiling: each block computes an `mn` x `mn` tile of the output, stepping `k` at a time
/// through the reduction.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tile {
    pub mn: usize,
    pub k: usize,
}

/// The fp32 core (`kernels/gemm.cuh`) and the bf16 tensor-core cores (`kernels/gemm_tc.cuh`, WMMA, and
/// `kernels/gemm_mma.cuh`, mma.sync, which share their tiling).
pub(super) const TILE_F32: Tile = Tile { mn: 64, k: 16 };
pub(super) const TILE_BF16: Tile = Tile { mn: 128, k: 32 };

/// One convolution's kernels: fp32 (version 1 of the convolution ladder), bf16 (version 3), and bf16 on
/// the rungs only the bench and the tests launch (`Backend::set_rung`): version 2 (WMMA) and version 4
/// (wgmma, sm_90a), which have no convolution that normalises its input (on those rungs, those run on
/// version 3).
struct Kernels {
    f32: &'static str,
    bf16: &'static str,
    wmma: Option<&'static str>,
    wgmma: Option<&'static str>,
}

const FORWARD: Kernels = Kernels {
    f32: "conv2d_forward_f32",
    bf16: "conv2d_forward_bf16",
    wmma: Some("conv2d_forward_wmma"),
    wgmma: Some("conv2d_forward_wgmma"),
};
const FORWARD_NORMED: Kernels = Kernels {
    f32: "conv2d_forward_normed_f32",
    bf16: "conv2d_forward_normed_bf16",
    wmma: None,
    wgmma: None,
};
const BACKWARD_DATA: Kernels = Kernels {
    f32: "conv2d_backward_data_f32",
    bf16: "conv2d_backward_data_bf16",
    wmma: Some("conv2d_backward_data_wmma"),
    wgmma: Some("conv2d_backward_data_wgmma"),
};
const BACKWARD_WEIGHT: Kernels = Kernels {
    f32: "conv2d_backward_weight_f32",
    bf16: "conv2d_backward_weight_bf16",
    wmma: Some("conv2d_backward_weight_wmma"),
    wgmma: Some("conv2d_backward_weight_wgmma"),
};
const BACKWARD_WEIGHT_NORMED: Kernels = Kernels {
    f32: "conv2d_backward_weight_normed_f32",
    bf16: "conv2d_backward_weight_normed_bf16",
    wmma: None,
    wgmma: None,
};

/// The version-3 kernels for convolutions that touch an activation stored in bf16
/// (`Backend::stores_bf16_activations`; ladder v7), by [normalising][input stored in bf16]. The forward ones
/// (`_io`) take the residual and the output each in either storage, a pointer for each and the other null.
/// Run in bf16 precision only, on every rung (the other rungs have no such kernels).
const FORWARD_IO: [[&str; 2]; 2] = [
    ["conv2d_forward_bf16_io", "conv2d_forward_bf16_io_bf16in"],
    [
        "conv2d_forward_normed_bf16_io",
        "conv2d_forward_normed_bf16_io_bf16in",
    ],
];
const BACKWARD_WEIGHT_BF16_IN: [&str; 2] = [
    "conv2d_backward_weight_bf16_bf16in",
    "conv2d_backward_weight_normed_bf16_bf16in",
];

/// What one of version 5's copies of the weights holds: 8 k of the reduction by 128 n of the GEMM's
/// columns, one k/8 column of wgmma's 8 x 8 core matrices (`TmaCoresB` in `kernels/gemm_wgmma.cuh`).
const TMA_COPY: [u32; 2] = [8, 128];

/// The alignment of the weights' bf16 copy version 6 needs: the CUDA programming guide lists 128 bytes of
/// global memory alignment for a swizzled TMA copy (the driver checks only 16), and the declared weights'
/// copy starts on such a boundary (`weights.rs`).
const SWIZZLED_ALIGN: u64 = 128;

/// What one of version 6's copies holds: a whole slice, 32 k by 128 n, in box rows of 64 bytes (the
/// 64-byte swizzle's): 32 k per row in the forward (`TmaWeightRowsSw64`), 32 n per row in the input
/// gradient (`TmaWeightTapsSw64`).
const TMA_COPY_SW64: [u32; 2] = [32, 128];

/// A convolution whose weights versions 5 and 6 copy by the tensor-memory accelerator: its kernel, the
/// tensor map of its weights, and whether the copies are in the 64-byte swizzle (version 6's).
struct TmaLaunch {
    kernel: &'static str,
    map: TensorMap,
    swizzled: bool,
}

/// A GEMM launch over an M x N output: grid (M / tile, N / tile, splits), the long side on x.
pub(super) fn gemm_cfg(tile: Tile, rows: usize, cols: usize, splits: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            rows.div_ceil(tile.mn) as u32,
            cols.div_ceil(tile.mn) as u32,
            splits as u32,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// How to cut a reduction of `kdim` for an M x N output: enough slices to give the device ~4 waves of
/// blocks, at most 64, each at least 8 steps of the tile's K long, and all partial sums fitting the
/// workspace. Returns (splits, chunk), chunk a multiple of the K step. Depends on the shape, the core and
/// the SM count only, so a run is reproducible.
pub(super) fn split_k(
    tile: Tile,
    rows: usize,
    cols: usize,
    kdim: usize,
    sms: u32,
) -> (usize, usize) {
    let tiles = rows.div_ceil(tile.mn) * cols.div_ceil(tile.mn);
    let want = (4 * sms as usize).div_ceil(tiles.max(1));
    let by_length = kdim / (8 * tile.k);
    let by_memory = WORKSPACE / (rows * cols).max(1);
    let splits = want.min(by_length).min(by_memory).clamp(1, 64);
    let chunk = kdim.div_ceil(splits).div_ceil(tile.k) * tile.k;
    (kdim.div_ceil(chunk.max(1)).max(1), chunk.max(tile.k))
}

/// The kernels' geometry arguments: (taps, stride, pad).
fn geometry(kind: ConvKind) -> [i32; 3] {
    [
        kind.taps() as i32,
        kind.stride() as i32,
        kind.pad_before() as i32,
    ]
}

impl CudaBackend {
    /// Adds the tensors of a normalised input to `ins` after checking that it is the convolution's
    /// input (`x` of `s.x_len()` is checked with the other inputs).
    fn normed_ins(s: &ConvShape, n: &NormedInput, ins: &mut Vec<super::Arg>) -> Result<()> {
        Self::is_input_of(s, n)?;
        ins.extend([
            ("gamma", n.gamma, n.s.c),
            ("beta", n.beta, n.s.c),
            ("mean", n.mean, n.s.stats_len()),
            ("rstd", n.rstd, n.s.stats_len()),
        ]);
        Ok(())
    }

    /// Checks that `n` normalises the input of convolution `s`.
    pub(super) fn is_input_of(s: &ConvShape, n: &NormedInput) -> Result<()> {
        crate::backend::checks::groups(&n.s)?;
        if (n.s.n, n.s.hw, n.s.c) != (s.n, s.h * s.w, s.c) {
            return Err(Error::shape(
                "normalised convolution input",
                format!(
                    "[{}, {}, {}] (the convolution's input)",
                    s.n,
                    s.h * s.w,
                    s.c
                ),
                format!("[{}, {}, {}]", n.s.n, n.s.hw, n.s.c),
            ));
        }
        Ok(())
    }

    /// The kernel's first argument, `x`, then with `norm` the normalisation's (mean, rstd, gamma, beta,
    /// groups, silu) and the dropout's after it (p, seed, stream base, stream per step, clock), as the
    /// `_normed` kernels take them after `x`.
    pub(super) fn input_args(&self, x: Tensor, norm: Option<&NormedInput>) -> Result<KernelArgs> {
        let mut a = KernelArgs::default();
        a.push(self.ptr(x));
        let Some(n) = norm else {
            return Ok(a);
        };
        let [groups] = dims([n.s.groups])?;
        for t in [n.mean, n.rstd, n.gamma, n.beta] {
            a.push(self.ptr(t));
        }
        a.push(groups);
        a.push(n.silu as i32);
        let (p, seed, base, per_step) = match n.dropout {
            Some(d) => {
                crate::backend::checks::dropout(d.p)?;
                (d.p, d.seed, d.stream.base, d.stream.per_step)
            }
            None => (0.0, 0, 0, 0),
        };
        a.push(p);
        for v in [seed, base, per_step, self.clock_ptr()] {
            a.push(v);
        }
        Ok(a)
    }

    /// The kernel of a convolution in the current precision, on the current rung in bf16. A rung without
    /// a kernel for it (the convolutions that normalise their input) runs it on version 3, so the whole
    /// network runs on every rung (the bench times it there), its other convolutions on the rung.
    fn conv_kernel(&self, k: &Kernels) -> &'static str {
        let rung = match (self.precision, self.rung) {
            (Precision::Fp32, _) => return k.f32,
            (Precision::Bf16, None) => return k.bf16,
            (Precision::Bf16, Some(r)) => r,
        };
        let kernel = match rung {
            Rung::Wmma => k.wmma,
            // Versions 5 and 6 have kernels of their own for some convolutions, chosen by
            // `conv_forward` and `conv_backward_data`, where their tensor maps can be made.
            Rung::Wgmma | Rung::WgmmaTma | Rung::WgmmaTmaSwizzled => k.wgmma,
            // Version 8's kernels are tried first (`hopper.rs`); what they cannot take runs on version 3.
            Rung::Pipelined => None,
        };
        kernel.unwrap_or(k.bf16)
    }

    /// How many convolutions (forwards and input gradients) ran with their weights copied by the
    /// tensor-memory accelerator, on version 5 or 6 of the ladder (the rest of those rungs' convolutions
    /// run on version 4).
    pub fn tma_launches(&self) -> u64 {
        self.tma_launches[0] + self.tma_launches[1]
    }

    /// How many of those ran on version 6, their copies in the 64-byte swizzle.
    pub fn swizzled_tma_launches(&self) -> u64 {
        self.tma_launches[1]
    }

    /// Counts a launch that succeeded, when it copied its weights by TMA.
    fn count_tma(&mut self, tma: Option<&TmaLaunch>) {
        if let Some(t) = tma {
            self.tma_launches[t.swizzled as usize] += 1;
        }
    }

    /// On versions 5 and 6 of the ladder, the kernel of a plain forward convolution and the tensor map of
    /// its bf16 weights at `pw` (version 5: boxes of 8 x 128, no swizzle; version 6: boxes of 32 x 128 in
    /// the 64-byte swizzle, where the weights start 128-byte aligned as the CUDA programming guide asks
    /// of a swizzled copy's global memory, else version 5's); `None` where the convolution runs on
    /// version 4 instead: on any other rung, for a normalised input (neither has such a kernel), or where
    /// the map cannot describe the weights (a reduction `taps^2 c` not a multiple of 8, or a copy not
    /// 16-byte aligned). A map the driver refuses anyway is an error, not a quiet fallback: the bench's v5
    /// and v6 rows must be what they say.
    fn tma_weights(&mut self, s: ConvShape, normed: bool, pw: u64) -> Result<Option<TmaLaunch>> {
        let k = s.k() as u64;
        let swizzled = match self.rung {
            Some(Rung::WgmmaTma) => false,
            Some(Rung::WgmmaTmaSwizzled) => pw.is_multiple_of(SWIZZLED_ALIGN),
            _ => return Ok(None),
        };
        if normed || !k.is_multiple_of(8) || !pw.is_multiple_of(16) {
            return Ok(None);
        }
        let (kernel, [copy_k, copy_n], swizzle) = match swizzled {
            true => ("conv2d_forward_tma_sw64", TMA_COPY_SW64, Swizzle::B64),
            false => ("conv2d_forward_tma", TMA_COPY, Swizzle::None),
        };
        let map =
            self.dev
                .tensor_map_bf16(pw, &[k, s.o as u64], &[2 * k], &[copy_k, copy_n], swizzle)?;
        Ok(Some(TmaLaunch {
            kernel,
            map,
            swizzled,
        }))
    }

    /// On versions 5 and 6 of the ladder, the kernel of the input gradient and the tensor map of its
    /// weights at `pw`, viewing `[o, taps^2, c]` as a 4-D tensor:
    /// - version 6, where c and o are multiples of 32 (a slice's 32 k must be 32 output channels of one
    ///   tap) and the weights start 128-byte aligned: the view `TmaWeightTapsSw64` reads
    ///   (`kernels/gemm_wgmma.cuh`), extents (32, o, c / 32, taps^2), innermost first, byte strides (2 taps^2 c, 64, 2 c), copies of 32 x 32 x 4 x 1 in the
    ///   64-byte swizzle;
    /// - version 5, and version 6 where it cannot, where c and o are multiples of 8 (a copy of 8 output
    ///   channels must stay in one tap): `TmaWeightTaps`'s view, extents (8, o, c / 8, taps^2), byte
    ///   strides (2 taps^2 c, 16, 2 c), copies of 8 x 8 x 16 x 1, no swizzle.
    ///
    /// `None` (version 4) on any other rung, for other channel counts, or where the copy is not 16-byte
    /// aligned. A map the driver refuses is an error.
    fn tma_weights_transposed(&mut self, s: ConvShape, pw: u64) -> Result<Option<TmaLaunch>> {
        let swizzled = match self.rung {
            Some(Rung::WgmmaTma) => false,
            Some(Rung::WgmmaTmaSwizzled) => {
                s.c.is_multiple_of(32)
                    && s.o.is_multiple_of(32)
                    && pw.is_multiple_of(SWIZZLED_ALIGN)
            }
            _ => return Ok(None),
        };
        if !s.c.is_multiple_of(8) || !s.o.is_multiple_of(8) || !pw.is_multiple_of(16) {
            return Ok(None);
        }
        let (c, o, taps) = (
            s.c as u64,
            s.o as u64,
            (s.kind.taps() * s.kind.taps()) as u64,
        );
        // Runs of `run` input channels (one box row) stacked along the output channels of one tap.
        let (kernel, run, [copy_k, copy_n], swizzle) = match swizzled {
            true => (
                "conv2d_backward_data_tma_sw64",
                32,
                TMA_COPY_SW64,
                Swizzle::B64,
            ),
            false => ("conv2d_backward_data_tma", 8, TMA_COPY, Swizzle::None),
        };
        let map = self.dev.tensor_map_bf16(
            pw,
            &[run, o, c / run, taps],
            &[2 * taps * c, 2 * run, 2 * c],
            &[run as u32, copy_k, copy_n / run as u32, 1],
            swizzle,
        )?;
        Ok(Some(TmaLaunch {
            kernel,
            map,
            swizzled,
        }))
    }

    /// The tiling of the GEMM core the current precision runs on.
    pub(super) fn tile(&self) -> Tile {
        match self.precision {
            Precision::Fp32 => TILE_F32,
            Precision::Bf16 => TILE_BF16,
        }
    }

    /// `y = conv(x, w) + b`, plus the per-image bias `[n, o]` and the residual `[n, oh, ow, o]` when given,
    /// all in the GEMM's epilogue; with `norm`, `x` is normalised (`norm.x` = `x`) as it is loaded.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv_forward(
        &mut self,
        s: ConvShape,
        x: Tensor,
        norm: Option<NormedInput>,
        w: Tensor,
        b: Tensor,
        image_bias: Option<Tensor>,
        residual: Option<Tensor>,
        y: Tensor,
    ) -> Result<()> {
        let mut ins = vec![
            ("x", x, s.x_len()),
            ("weight", w, s.w_len()),
            ("bias", b, s.o),
        ];
        if let Some(t) = image_bias {
            ins.push(("image bias", t, s.n * s.o));
        }
        if let Some(r) = residual {
            ins.push(("residual", r, s.y_len()));
        }
        if let Some(n) = &norm {
            Self::normed_ins(&s, n, &mut ins)?;
        }
        // Activations may be stored in bf16: the input, the residual and the output (a ResNet block's
        // hidden activation, its input and output, an attention block's q, k, v, the up path's
        // concatenations; see `UNet`).
        self.args_stored(
            "conv2d_forward",
            &ins,
            &[("y", y, s.y_len())],
            &["x", "residual", "y"],
        )?;
        let mut stored = vec![x, y];
        stored.extend(residual);
        let io = self.stores_bf16("conv2d_forward", &stored)?;
        let name = match io {
            true => FORWARD_IO[norm.is_some() as usize][x.is_bf16() as usize],
            false => self.conv_kernel(match norm {
                Some(_) => &FORWARD_NORMED,
                None => &FORWARD,
            }),
        };
        let (pw, pb) = (self.weight_ptr(w)?, self.ptr(b));
        let pt = image_bias.map_or(0, |t| self.ptr(t));
        if io && norm.is_none() {
            let [pr, pr16] = self.ptr_by_dtype(residual);
            let [py, py16] = self.ptr_by_dtype(Some(y));
            if self.v8_conv_forward(&s, x, pw, [pb, pt, pr, pr16, py, py16])? {
                return Ok(());
            }
        }
        let (oh, ow) = s.out_hw();
        let cfg = gemm_cfg(self.tile(), s.n * oh * ow, s.o, 1);
        self.count_gemm(s.macs(), self.tile(), s.n * oh * ow, s.o, 1, s.k());
        let mut a = self.input_args(x, norm.as_ref())?;
        let tma = match io {
            true => None,
            false => self.tma_weights(s, norm.is_some(), pw)?,
        };
        let (name, map) = match &tma {
            Some(t) => (t.kernel, Some(&t.map)),
            None => (name, None),
        };
        a.push_weight(pw, map);
        a.push(pb);
        a.push(pt);
        match io {
            // (residual, residual_bf16, y, y_bf16)
            true => {
                for v in self
                    .ptr_by_dtype(residual)
                    .into_iter()
                    .chain(self.ptr_by_dtype(Some(y)))
                {
                    a.push(v);
                }
            }
            false => {
                a.push(residual.map_or(0, |r| self.ptr(r)));
                a.push(self.ptr(y));
            }
        }
        for v in dims([s.n, s.h, s.w, s.c, s.o])?
            .into_iter()
            .chain(geometry(s.kind))
        {
            a.push(v);
        }
        let work = self.take_work();
        a.launch(&mut self.dev, name, cfg, work)?;
        self.count_tma(tma.as_ref());
        Ok(())
    }

    pub(super) fn conv_backward_data(
        &mut self,
        s: ConvShape,
        dy: Tensor,
        w: Tensor,
        dx: Tensor,
        acc: bool,
    ) -> Result<()> {
        self.args(
            "conv2d_backward_data",
            &[("dy", dy, s.y_len()), ("weight", w, s.w_len())],
            &[("dx", dx, s.x_len())],
        )?;
        let name = self.conv_kernel(&BACKWARD_DATA);
        let (pdy, pw, pdx) = (self.ptr(dy), self.weight_ptr(w)?, self.ptr(dx));
        if self.v8_conv_backward_data(&s, dy, pw, dx, acc)? {
            return Ok(());
        }
        let cfg = gemm_cfg(self.tile(), s.n * s.h * s.w, s.c, 1);
        let kt = s.kind.taps() * s.kind.taps() * s.o;
        self.count_gemm(s.macs(), self.tile(), s.n * s.h * s.w, s.c, 1, kt);
        let tma = self.tma_weights_transposed(s, pw)?;
        let (name, map) = match &tma {
            Some(t) => (t.kernel, Some(&t.map)),
            None => (name, None),
        };
        let mut a = KernelArgs::default();
        a.push(pdy);
        a.push_weight(pw, map);
        a.push(pdx);
        for v in dims([s.n, s.h, s.w, s.c, s.o])?
            .into_iter()
            .chain(geometry(s.kind))
            .chain([acc as i32])
        {
            a.push(v);
        }
        let work = self.take_work();
        a.launch(&mut self.dev, name, cfg, work)?;
        self.count_tma(tma.as_ref());
        Ok(())
    }

    /// `dw` by split-K GEMM into the workspace and a reduce; `db` as column sums of `dy`. With `norm`, `x`
    /// is normalised (`norm.x` = `x`) as it is loaded.
    pub(super) fn conv_backward_weight(
        &mut self,
        s: ConvShape,
        x: Tensor,
        norm: Option<NormedInput>,
        dy: Tensor,
        dw: Tensor,
        db: Tensor,
    ) -> Result<()> {
        let mut ins = vec![("x", x, s.x_len()), ("dy", dy, s.y_len())];
        if let Some(n) = &norm {
            Self::normed_ins(&s, n, &mut ins)?;
        }
        self.args_stored(
            "conv2d_backward_weight",
            &ins,
            &[("dweight", dw, s.w_len()), ("dbias", db, s.o)],
            &["x"],
        )?;
        let (pdy, pdw, ws) = (self.ptr(dy), self.ptr(dw), self.workspace_ptr());
        let (oh, ow) = s.out_hw();
        let pixels = s.n * oh * ow;
        if norm.is_none() && self.v8_conv_backward_weight(&s, x, dy, pdw)? {
            return self.column_sums(dy, pixels, s.o, db);
        }
        let (splits, chunk) = split_k(self.tile(), s.o, s.k(), pixels, self.props.sms);
        let cfg = gemm_cfg(self.tile(), s.o, s.k(), splits);
        self.count_gemm(s.macs(), self.tile(), s.o, s.k(), splits, chunk);
        if splits > 1 {
            // The partial sums: written here, read by the reduction.
            self.work.bytes += (4 * splits * s.o * s.k()) as f64;
        }
        let mut a = self.input_args(x, norm.as_ref())?;
        for v in [pdy, pdw, ws] {
            a.push(v);
        }
        let [n, h, wd, c, o, chunk_i] = dims([s.n, s.h, s.w, s.c, s.o, chunk])?;
        for v in [chunk_i, n, h, wd, c, o]
            .into_iter()
            .chain(geometry(s.kind))
        {
            a.push(v);
        }
        let name = match self.stores_bf16("conv2d_backward_weight", &[x])? {
            true => BACKWARD_WEIGHT_BF16_IN[norm.is_some() as usize],
            false => self.conv_kernel(match norm {
                Some(_) => &BACKWARD_WEIGHT_NORMED,
                None => &BACKWARD_WEIGHT,
            }),
        };
        let work = self.take_work();
        a.launch(&mut self.dev, name, cfg, work)?;
        if splits > 1 {
            self.reduce_splits(splits, s.o, s.k(), pdw, 0, false)?;
        }
        self.column_sums(dy, pixels, s.o, db)
    }

    /// `c[m, n] (+)= sum of the split-K partials in the workspace (+ bias)`.
    pub(super) fn reduce_splits(
        &mut self,
        splits: usize,
        rows: usize,
        cols: usize,
        c: u64,
        bias: u64,
        acc: bool,
    ) -> Result<()> {
        let ws = self.workspace_ptr();
        let cfg = self.elementwise_cfg(rows * cols);
        self.count_bytes(4 * (splits + 1 + acc as usize) * rows * cols);
        let [splits, rows, cols] = dims([splits, rows, cols])?;
        let (ldc, acc) = (cols as i64, acc as i32);
        launch!(
            self,
            "gemm_reduce_f32",
            cfg,
            ws,
            splits,
            rows,
            cols,
            c,
            ldc,
            bias,
            acc
        )
    }

    /// `out[n] = sum_m x[m, n]` for an `[rows, cols]` tensor, in two deterministic stages through the
    /// workspace.
    pub(super) fn column_sums(
        &mut self,
        x: Tensor,
        rows: usize,
        cols: usize,
        out: Tensor,
    ) -> Result<()> {
        if x.len != rows * cols || out.len != cols {
            return Err(Error::shape("column sums", rows * cols, x.len));
        }
        let (px, pout, ws) = (self.ptr(x), self.ptr(out), self.workspace_ptr());
        let slices = rows.div_ceil(256).clamp(1, 64).min(WORKSPACE / cols.max(1));
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(32) as u32, slices as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let rows_i = rows as i64;
        let [cols_i, slices_i] = dims([cols, slices])?;
        self.count_bytes(4 * (rows + slices) * cols);
        launch!(self, "column_sums_partial_f32", cfg, px, rows_i, cols_i, ws)?;
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(32) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "column_sums_finish_f32",
            cfg,
            ws,
            slices_i,
            cols_i,
            pout
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The split must cover the reduction exactly once, in chunks the kernel can take, for any shape and
    // either core.
    #[test]
    fn split_k_covers_the_reduction() {
        for tile in [TILE_F32, TILE_BF16] {
            for (rows, cols, kdim) in [
                (256, 2304, 131_072),
                (3, 27, 7),
                (128, 1152, 8 * 64),
                (1, 1, 1),
                (512, 4608, 2048),
                (7000, 7000, 1_000_000),
            ] {
                let (splits, chunk) = split_k(tile, rows, cols, kdim, 132);
                assert!((1..=64).contains(&splits));
                assert_eq!(chunk % tile.k, 0, "{tile:?} {rows} {cols} {kdim}");
                assert!(splits * chunk >= kdim && (splits - 1) * chunk < kdim);
                assert!(splits == 1 || splits * rows * cols <= WORKSPACE);
            }
        }
    }
}

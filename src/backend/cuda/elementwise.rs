//! Launchers of `kernels/elementwise.cu`: buffers, SiLU, upsample, concat, the time-embedding add,
//! the timestep embedding, dropout and normal draws.

use super::{launch, CudaBackend};
use crate::backend::{ClassEmbedShape, Stream, Tensor};
use crate::error::{Error, Result};
use cudarc::driver::LaunchConfig;

/// The kernel of a copy (`[fp32, bf16]`) for its tensors' storage, which must be one for all: a copy
/// neither rounds nor widens, so it runs in either precision.
fn copy_kernel(op: &str, tensors: &[Tensor], kernels: [&'static str; 2]) -> Result<&'static str> {
    let bf16 = tensors.iter().filter(|t| t.is_bf16()).count();
    match bf16 {
        0 => Ok(kernels[0]),
        n if n == tensors.len() => Ok(kernels[1]),
        _ => Err(Error::Invalid(format!(
            "{op}: its inputs and output must be stored alike (all fp32 or all bf16); got {bf16} of {} \
             in bf16",
            tensors.len()
        ))),
    }
}

impl CudaBackend {
    pub(super) fn fill_tensor(&mut self, dst: Tensor, value: f32) -> Result<()> {
        self.args("fill", &[], &[("dst", dst, dst.len)])?;
        let (y, n) = (self.ptr(dst), dst.len as i64);
        let cfg = self.elementwise_cfg(dst.len);
        launch!(self, "fill_f32", cfg, y, value, n)
    }

    pub(super) fn accumulate_tensor(&mut self, src: Tensor, dst: Tensor, acc: bool) -> Result<()> {
        self.args(
            "accumulate",
            &[("src", src, src.len)],
            &[("dst", dst, src.len)],
        )?;
        let (s, d, n, acc) = (self.ptr(src), self.ptr(dst), src.len as i64, acc as i32);
        let cfg = self.elementwise_cfg(src.len);
        launch!(self, "accumulate_f32", cfg, s, d, n, acc)
    }

    pub(super) fn add_tensors(&mut self, a: Tensor, b: Tensor, y: Tensor) -> Result<()> {
        self.args(
            "add",
            &[("a", a, a.len), ("b", b, a.len)],
            &[("y", y, a.len)],
        )?;
        let (pa, pb, py, n) = (self.ptr(a), self.ptr(b), self.ptr(y), a.len as i64);
        let cfg = self.elementwise_cfg(a.len);
        launch!(self, "add_f32", cfg, pa, pb, py, n)
    }

    pub(super) fn silu(&mut self, x: Tensor, y: Tensor) -> Result<()> {
        self.args("silu_forward", &[("x", x, x.len)], &[("y", y, x.len)])?;
        let (px, py, n) = (self.ptr(x), self.ptr(y), x.len as i64);
        let cfg = self.elementwise_cfg(x.len);
        launch!(self, "silu_forward_f32", cfg, px, py, n)
    }

    pub(super) fn silu_grad(&mut self, x: Tensor, dy: Tensor, dx: Tensor, acc: bool) -> Result<()> {
        self.args(
            "silu_backward",
            &[("x", x, x.len), ("dy", dy, x.len)],
            &[("dx", dx, x.len)],
        )?;
        let (px, pdy, pdx) = (self.ptr(x), self.ptr(dy), self.ptr(dx));
        let (n, acc) = (x.len as i64, acc as i32);
        let cfg = self.elementwise_cfg(x.len);
        launch!(self, "silu_backward_f32", cfg, px, pdy, pdx, n, acc)
    }

    pub(super) fn upsample(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        x: Tensor,
        y: Tensor,
    ) -> Result<()> {
        let len = n * h * w * c;
        self.args_stored(
            "upsample2x_forward",
            &[("x", x, len)],
            &[("y", y, 4 * len)],
            &["x", "y"],
        )?;
        let kernel = copy_kernel(
            "upsample2x_forward",
            &[x, y],
            ["upsample2x_forward_f32", "upsample2x_forward_bf16"],
        )?;
        let (px, py) = (self.ptr(x), self.ptr(y));
        let [n, h, w, c] = dims([n, h, w, c])?;
        let cfg = self.elementwise_cfg(4 * len);
        launch!(self, kernel, cfg, px, py, n, h, w, c)
    }

    pub(super) fn upsample_grad(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        dy: Tensor,
        dx: Tensor,
        acc: bool,
    ) -> Result<()> {
        let len = n * h * w * c;
        self.args(
            "upsample2x_backward",
            &[("dy", dy, 4 * len)],
            &[("dx", dx, len)],
        )?;
        let (pdy, pdx, acc) = (self.ptr(dy), self.ptr(dx), acc as i32);
        let [n, h, w, c] = dims([n, h, w, c])?;
        let cfg = self.elementwise_cfg(len);
        launch!(
            self,
            "upsample2x_backward_f32",
            cfg,
            pdy,
            pdx,
            n,
            h,
            w,
            c,
            acc
        )
    }

    pub(super) fn concat(
        &mut self,
        pixels: usize,
        ca: usize,
        cb: usize,
        a: Tensor,
        b: Tensor,
        y: Tensor,
    ) -> Result<()> {
        self.args_stored(
            "concat_forward",
            &[("a", a, pixels * ca), ("b", b, pixels * cb)],
            &[("y", y, pixels * (ca + cb))],
            &["a", "b", "y"],
        )?;
        let kernel = copy_kernel(
            "concat_forward",
            &[a, b, y],
            ["concat_forward_f32", "concat_forward_bf16"],
        )?;
        let (pa, pb, py, p) = (self.ptr(a), self.ptr(b), self.ptr(y), pixels as i64);
        let [ca, cb] = dims([ca, cb])?;
        let cfg = self.elementwise_cfg(y.len);
        launch!(self, kernel, cfg, pa, pb, py, p, ca, cb)
    }

    pub(super) fn concat_grad(
        &mut self,
        pixels: usize,
        ca: usize,
        cb: usize,
        dy: Tensor,
        da: Tensor,
        db: Tensor,
        acc_a: bool,
        acc_b: bool,
    ) -> Result<()> {
        self.args(
            "concat_backward",
            &[("dy", dy, pixels * (ca + cb))],
            &[("da", da, pixels * ca), ("db", db, pixels * cb)],
        )?;
        let (pdy, pda, pdb, p) = (self.ptr(dy), self.ptr(da), self.ptr(db), pixels as i64);
        let [ca, cb] = dims([ca, cb])?;
        let (acc_a, acc_b) = (acc_a as i32, acc_b as i32);
        let cfg = self.elementwise_cfg(dy.len);
        launch!(
            self,
            "concat_backward_f32",
            cfg,
            pdy,
            pda,
            pdb,
            p,
            ca,
            cb,
            acc_a,
            acc_b
        )
    }

    pub(super) fn image_bias(
        &mut self,
        n: usize,
        hw: usize,
        c: usize,
        y: Tensor,
        bias: Tensor,
    ) -> Result<()> {
        self.args(
            "add_image_bias",
            &[("bias", bias, n * c)],
            &[("y", y, n * hw * c)],
        )?;
        let (py, pb) = (self.ptr(y), self.ptr(bias));
        let [n, hw, c] = dims([n, hw, c])?;
        let cfg = self.elementwise_cfg(y.len);
        launch!(self, "add_image_bias_f32", cfg, py, pb, n, hw, c)
    }

    pub(super) fn image_bias_grad(
        &mut self,
        n: usize,
        hw: usize,
        c: usize,
        dy: Tensor,
        dbias: Tensor,
    ) -> Result<()> {
        self.args(
            "image_bias_backward",
            &[("dy", dy, n * hw * c)],
            &[("dbias", dbias, n * c)],
        )?;
        if n > 65_535 {
            return Err(Error::Invalid(format!(
                "a time-embedding gradient over {n} images does not fit one launch"
            )));
        }
        let (pdy, pdb) = (self.ptr(dy), self.ptr(dbias));
        let cfg = LaunchConfig {
            grid_dim: (c.div_ceil(32) as u32, n as u32, 1),
            // The kernel's shared partials are sized for exactly 8 warps.
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let [n, hw, c] = dims([n, hw, c])?;
        launch!(self, "image_bias_backward_f32", cfg, pdy, pdb, n, hw, c)
    }

    pub(super) fn class_embed(
        &mut self,
        s: ClassEmbedShape,
        table: Tensor,
        labels: Tensor,
        y: Tensor,
    ) -> Result<()> {
        let (ins, outs) = s.add_args(table, labels, y);
        self.args("class_embedding_add", &ins, &outs)?;
        let (pt, pl, py) = (self.ptr(table), self.ptr(labels), self.ptr(y));
        let cfg = self.elementwise_cfg(s.n * s.dim);
        let [n, classes, dim] = dims([s.n, s.classes, s.dim])?;
        launch!(
            self,
            "class_embedding_add_f32",
            cfg,
            pt,
            pl,
            py,
            n,
            classes,
            dim
        )
    }

    pub(super) fn class_embed_grad(
        &mut self,
        s: ClassEmbedShape,
        labels: Tensor,
        dy: Tensor,
        dtable: Tensor,
    ) -> Result<()> {
        let (ins, outs) = s.backward_args(labels, dy, dtable);
        self.args("class_embedding_backward", &ins, &outs)?;
        let (pl, pd, pt) = (self.ptr(labels), self.ptr(dy), self.ptr(dtable));
        let cfg = self.elementwise_cfg(s.dim);
        let [n, classes, dim] = dims([s.n, s.classes, s.dim])?;
        launch!(
            self,
            "class_embedding_backward_f32",
            cfg,
            pl,
            pd,
            pt,
            n,
            classes,
            dim
        )
    }

    pub(super) fn embedding(&mut self, n: usize, dim: usize, t: Tensor, y: Tensor) -> Result<()> {
        crate::backend::checks::embedding_width(dim)?;
        self.args(
            "timestep_embedding",
            &[("timesteps", t, n)],
            &[("y", y, n * dim)],
        )?;
        let (pt, py) = (self.ptr(t), self.ptr(y));
        let cfg = self.elementwise_cfg(n * dim / 2);
        let [n, dim] = dims([n, dim])?;
        launch!(self, "timestep_embedding_f32", cfg, pt, py, n, dim)
    }

    pub(super) fn dropout(
        &mut self,
        x: Tensor,
        y: Tensor,
        p: f32,
        seed: u64,
        stream: Stream,
    ) -> Result<()> {
        crate::backend::checks::dropout(p)?;
        self.args("dropout_forward", &[("x", x, x.len)], &[("y", y, x.len)])?;
        let (px, py, n) = (self.ptr(x), self.ptr(y), x.len as i64);
        let (base, per_step, clock) = (stream.base, stream.per_step, self.clock_ptr());
        let cfg = self.elementwise_cfg(x.len);
        launch!(
            self,
            "dropout_forward_f32",
            cfg,
            px,
            py,
            n,
            p,
            seed,
            base,
            per_step,
            clock
        )
    }

    pub(super) fn dropout_grad(
        &mut self,
        dy: Tensor,
        dx: Tensor,
        p: f32,
        seed: u64,
        stream: Stream,
        acc: bool,
    ) -> Result<()> {
        crate::backend::checks::dropout(p)?;
        self.args(
            "dropout_backward",
            &[("dy", dy, dy.len)],
            &[("dx", dx, dy.len)],
        )?;
        let (pdy, pdx, n, acc) = (self.ptr(dy), self.ptr(dx), dy.len as i64, acc as i32);
        let (base, per_step, clock) = (stream.base, stream.per_step, self.clock_ptr());
        let cfg = self.elementwise_cfg(dy.len);
        launch!(
            self,
            "dropout_backward_f32",
            cfg,
            pdy,
            pdx,
            n,
            p,
            seed,
            base,
            per_step,
            clock,
            acc
        )
    }

    pub(super) fn normal_draws(
        &mut self,
        x: Tensor,
        first: u64,
        seed: u64,
        stream: u64,
    ) -> Result<()> {
        self.args("normal", &[], &[("x", x, x.len)])?;
        let (px, n, first) = (self.ptr(x), x.len as i64, first as i64);
        let cfg = self.elementwise_cfg(x.len.div_ceil(4) + 1);
        launch!(self, "normal_f32", cfg, px, n, first, seed, stream)
    }
}

/// Sizes as the kernels' `int`s, refusing any that does not fit.
pub(super) fn dims<const N: usize>(v: [usize; N]) -> Result<[i32; N]> {
    let mut out = [0i32; N];
    for (o, &x) in out.iter_mut().zip(&v) {
        *o = i32::try_from(x)
            .map_err(|_| Error::Invalid(format!("size {x} is too large for a kernel argument")))?;
    }
    Ok(out)
}

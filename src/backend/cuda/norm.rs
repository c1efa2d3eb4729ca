//! Launchers of `kernels/groupnorm.cu`: group norm (with SiLU fused or not), forward and backward.

use super::elementwise::dims;
use super::{launch, CudaBackend, WORKSPACE};
use crate::backend::{Dtype, GroupNormShape, NormedInput, Precision, Tensor};
use crate::error::{Error, Result};
use cudarc::driver::LaunchConfig;

fn check(s: &GroupNormShape) -> Result<()> {
    crate::backend::checks::groups(s)?;
    if s.n > 65_535 || s.groups > i32::MAX as usize {
        return Err(Error::Invalid(format!(
            "group norm over {} images of {} groups does not fit one launch",
            s.n, s.groups
        )));
    }
    Ok(())
}

/// The kernel for `x`'s storage: fp32, or bf16 (`Backend::stores_bf16_activations`).
fn x_kernel(x: Tensor, f32: &'static str, bf16: &'static str) -> &'static str {
    match x.dtype {
        Dtype::F32 => f32,
        Dtype::Bf16 => bf16,
    }
}

/// One block of 256 threads per (group, image).
fn cfg(s: &GroupNormShape) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (s.groups as u32, s.n as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Whether `input` is normalised into the scratch region before its convolution
    /// (`Backend::normalises_into_scratch`): in bf16 precision, where the scratch holds it and its
    /// channels come in runs of 8 (`group_norm_apply_*`); elsewhere the convolution normalises as it
    /// loads (`NormedIm2col`).
    pub(super) fn norm_scratch_for(&self, input: &NormedInput) -> Option<Tensor> {
        let scratch = self.norm_scratch?;
        let len = input.s.len();
        (self.precision == Precision::Bf16 && input.s.c.is_multiple_of(8) && len <= scratch.len)
            .then(|| scratch.slice(0, len))
    }

    /// `y = dropout(silu(GN(x) gamma + beta))` in bf16 from the statistics already in `input.mean` and
    /// `input.rstd` (`group_norm_apply_bf16{,_bf16in}`): the normalised input of a convolution, into the
    /// scratch region (`y`, from [`CudaBackend::norm_scratch_for`]).
    pub(super) fn norm_apply(&mut self, input: &NormedInput, y: Tensor) -> Result<()> {
        let s = input.s;
        check(&s)?;
        if !s.c.is_multiple_of(8) || s.c / 8 > 256 || !y.is_bf16() {
            return Err(Error::shape(
                "normalised input",
                "channels a multiple of 8 (at most 2048) into bf16",
                s.c,
            ));
        }
        self.args_stored(
            "group_norm_apply",
            &[
                ("x", input.x, s.len()),
                ("gamma", input.gamma, s.c),
                ("beta", input.beta, s.c),
                ("mean", input.mean, s.stats_len()),
                ("rstd", input.rstd, s.stats_len()),
            ],
            &[("y", y, s.len())],
            &["x", "y"],
        )?;
        let kernel = x_kernel(
            input.x,
            "group_norm_apply_bf16",
            "group_norm_apply_bf16_bf16in",
        );
        let runs = s.c / 8;
        let rows = (256 / runs).max(1);
        let pixels = s.n * s.hw;
        let cfg = LaunchConfig {
            grid_dim: (
                pixels.div_ceil(rows).clamp(1, 8 * self.props.sms as usize) as u32,
                1,
                1,
            ),
            block_dim: (runs as u32, rows as u32, 1),
            shared_mem_bytes: 0,
        };
        let mut a = self.input_args(input.x, Some(input))?;
        a.push(self.ptr(y));
        for v in dims([s.n, s.hw, s.c])? {
            a.push(v);
        }
        let work = self.take_work();
        a.launch(&mut self.dev, kernel, cfg, work)
    }

    /// The normalised output to `y`, or with `y` `None` the statistics only (for a convolution that
    /// normalises its input as it loads it).
    pub(super) fn norm_forward(
        &mut self,
        s: GroupNormShape,
        x: Tensor,
        gamma: Tensor,
        beta: Tensor,
        y: Option<Tensor>,
        mean: Tensor,
        rstd: Tensor,
        silu: bool,
    ) -> Result<()> {
        check(&s)?;
        let mut outs = vec![("mean", mean, s.stats_len()), ("rstd", rstd, s.stats_len())];
        if let Some(y) = y {
            outs.push(("y", y, s.len()));
        }
        self.args_stored(
            "group_norm_forward",
            &[
                ("x", x, s.len()),
                ("gamma", gamma, s.c),
                ("beta", beta, s.c),
            ],
            &outs,
            &["x"],
        )?;
        let (px, pg, pb) = (self.ptr(x), self.ptr(gamma), self.ptr(beta));
        let py = y.map_or(0, |y| self.ptr(y));
        let (pm, pr) = (self.ptr(mean), self.ptr(rstd));
        let [hw, c, groups] = dims([s.hw, s.c, s.groups])?;
        let (eps, silu) = (s.eps, silu as i32);
        launch!(
            self,
            x_kernel(x, "group_norm_forward_f32", "group_norm_forward_bf16in"),
            cfg(&s),
            px,
            pg,
            pb,
            py,
            pm,
            pr,
            hw,
            c,
            groups,
            eps,
            silu
        )
    }

    /// dx by the backward kernel, which also leaves per-image sums of dgamma and dbeta in the workspace;
    /// a second kernel adds them over images in order.
    pub(super) fn norm_backward(
        &mut self,
        s: GroupNormShape,
        x: Tensor,
        gamma: Tensor,
        beta: Tensor,
        mean: Tensor,
        rstd: Tensor,
        dy: Tensor,
        dx: Tensor,
        dgamma: Tensor,
        dbeta: Tensor,
        silu: bool,
        acc: bool,
    ) -> Result<()> {
        check(&s)?;
        if 2 * s.n * s.c > WORKSPACE {
            return Err(Error::Invalid(format!(
                "group norm partials for {} images of {} channels exceed the workspace",
                s.n, s.c
            )));
        }
        self.args_stored(
            "group_norm_backward",
            &[
                ("x", x, s.len()),
                ("gamma", gamma, s.c),
                ("beta", beta, s.c),
                ("mean", mean, s.stats_len()),
                ("rstd", rstd, s.stats_len()),
                ("dy", dy, s.len()),
            ],
            &[
                ("dx", dx, s.len()),
                ("dgamma", dgamma, s.c),
                ("dbeta", dbeta, s.c),
            ],
            &["x"],
        )?;
        let (px, pg, pb) = (self.ptr(x), self.ptr(gamma), self.ptr(beta));
        let (pm, pr, pdy, pdx) = (self.ptr(mean), self.ptr(rstd), self.ptr(dy), self.ptr(dx));
        let part_g = self.workspace_ptr();
        let part_b = part_g + 4 * (s.n * s.c) as u64;
        let [n, hw, c, groups] = dims([s.n, s.hw, s.c, s.groups])?;
        let (silu, acc) = (silu as i32, acc as i32);
        launch!(
            self,
            x_kernel(x, "group_norm_backward_f32", "group_norm_backward_bf16in"),
            cfg(&s),
            px,
            pg,
            pb,
            pm,
            pr,
            pdy,
            pdx,
            part_g,
            part_b,
            hw,
            c,
            groups,
            silu,
            acc
        )?;
        let (pdg, pdb) = (self.ptr(dgamma), self.ptr(dbeta));
        // Lanes on 32 consecutive channels; dgamma in row 0 of the grid, dbeta in row 1.
        let finish = LaunchConfig {
            grid_dim: (s.c.div_ceil(32) as u32, 2, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "group_norm_params_finish_f32",
            finish,
            part_g,
            part_b,
            pdg,
            pdb,
            n,
            c
        )
    }
}

//! Launchers of `kernels/optim.cu`: the global gradient norm, Adam(W) and the EMA over the flat parameters.

use super::diffusion::reduce_cfg;
use super::{launch, CudaBackend};
use crate::backend::{AdamHyper, Tensor};
use crate::error::Result;

impl CudaBackend {
    /// `out[0] = sqrt(sum grads^2)` through fixed-grid fp64 partials (deterministic).
    pub(super) fn grad_norm(&mut self, grads: Tensor, out: Tensor) -> Result<()> {
        self.args(
            "global_norm",
            &[("grads", grads, grads.len)],
            &[("out", out, 1)],
        )?;
        let (pg, parts, n) = (self.ptr(grads), self.partials_ptr(), grads.len as i64);
        launch!(self, "sum_squares_partial_f32", reduce_cfg(), pg, n, parts)?;
        self.finish_sum(1.0, true, out)
    }

    pub(super) fn adam(
        &mut self,
        params: Tensor,
        grads: Tensor,
        m: Tensor,
        v: Tensor,
        norm: Tensor,
        hp: AdamHyper,
    ) -> Result<()> {
        let len = params.len;
        self.args(
            "adam_step",
            &[("grads", grads, len), ("norm", norm, 1)],
            &[
                ("params", params, len),
                ("adam_m", m, len),
                ("adam_v", v, len),
            ],
        )?;
        // Adam writes the parameters' bf16 copy itself when they are declared weights.
        let copy = self.copy_written_by_adam(params);
        let (pp, pg, pm, pv, pn) = (
            self.ptr(params),
            self.ptr(grads),
            self.ptr(m),
            self.ptr(v),
            self.ptr(norm),
        );
        let (n, clock) = (len as i64, self.clock_ptr());
        // The kernel resolves the schedule for update `clock + 1` as AdamHyper::at does.
        let warmup = hp.warmup.max(1) as f64;
        let cfg = self.elementwise_cfg(len);
        launch!(
            self,
            "adam_step_f32",
            cfg,
            pp,
            copy,
            pg,
            pm,
            pv,
            pn,
            n,
            clock,
            hp.lr,
            warmup,
            hp.beta1,
            hp.beta2,
            hp.eps,
            hp.weight_decay,
            hp.max_grad_norm
        )
    }

    pub(super) fn ema(&mut self, ema: Tensor, params: Tensor, decay: f32) -> Result<()> {
        self.args(
            "ema_update",
            &[("params", params, params.len)],
            &[("ema", ema, params.len)],
        )?;
        let (pe, pp, n) = (self.ptr(ema), self.ptr(params), params.len as i64);
        let cfg = self.elementwise_cfg(params.len);
        launch!(self, "ema_update_f32", cfg, pe, pp, n, decay)
    }
}

//! Launchers of `kernels/diffusion.cu`: the fused noise-add, the loss, and the sampler (its table and step
//! counter on the device).

use super::elementwise::dims;
use super::{launch, CudaBackend, REDUCE_BLOCKS};
use crate::backend::{checks, ReverseStep, SamplerRow, Stream, Tensor};
use crate::error::{Error, Result};
use cudarc::driver::LaunchConfig;

impl CudaBackend {
    pub(super) fn forward_process(
        &mut self,
        x0: Tensor,
        timesteps: Tensor,
        sqrt_ab: Tensor,
        sqrt_1m_ab: Tensor,
        x_t: Tensor,
        eps: Tensor,
        per_image: usize,
        first: u64,
        seed: u64,
        stream: Stream,
    ) -> Result<()> {
        checks::images(x0.len, per_image)?;
        self.args(
            "noise_add",
            &[
                ("x0", x0, x0.len),
                ("timesteps", timesteps, x0.len / per_image),
                ("sqrt_alphas_cumprod", sqrt_ab, sqrt_ab.len),
                ("sqrt_one_minus_alphas_cumprod", sqrt_1m_ab, sqrt_ab.len),
            ],
            &[("x_t", x_t, x0.len), ("eps", eps, x0.len)],
        )?;
        let (px0, pt, pa, pb) = (
            self.ptr(x0),
            self.ptr(timesteps),
            self.ptr(sqrt_ab),
            self.ptr(sqrt_1m_ab),
        );
        let (pxt, pe) = (self.ptr(x_t), self.ptr(eps));
        let (total, per, first) = (x0.len as i64, per_image as i64, first as i64);
        let steps = sqrt_ab.len as i64;
        let (base, per_step, clock) = (stream.base, stream.per_step, self.clock_ptr());
        let cfg = self.elementwise_cfg(x0.len.div_ceil(4) + 1);
        launch!(
            self,
            "noise_add_f32",
            cfg,
            px0,
            pt,
            pa,
            pb,
            pxt,
            pe,
            total,
            per,
            first,
            seed,
            base,
            per_step,
            clock,
            steps
        )
    }

    /// `timesteps[i] = below(seed, stream.at(clock), i, steps)` as floats.
    pub(super) fn timestep_draws(
        &mut self,
        timesteps: Tensor,
        steps: usize,
        seed: u64,
        stream: Stream,
    ) -> Result<()> {
        checks::timestep_count(steps)?;
        self.args(
            "draw_timesteps",
            &[],
            &[("timesteps", timesteps, timesteps.len)],
        )?;
        let (pt, n) = (self.ptr(timesteps), timesteps.len as i64);
        let (base, per_step, clock) = (stream.base, stream.per_step, self.clock_ptr());
        let steps = steps as u64;
        let cfg = self.elementwise_cfg(timesteps.len);
        launch!(
            self,
            "draw_timesteps_f32",
            cfg,
            pt,
            n,
            seed,
            base,
            per_step,
            clock,
            steps
        )
    }

    /// `ring[(clock % slots) * src.len + i] = src[i]`.
    pub(super) fn log_entry(&mut self, src: Tensor, ring: Tensor) -> Result<()> {
        let slots = checks::ring_slots(src.len, ring.len)?;
        self.args(
            "log_at_clock",
            &[("src", src, src.len)],
            &[("ring", ring, ring.len)],
        )?;
        let (ps, pr, clock) = (self.ptr(src), self.ptr(ring), self.clock_ptr());
        let (n, slots) = (src.len as i64, slots as i64);
        let cfg = self.elementwise_cfg(src.len);
        launch!(self, "log_at_clock_f32", cfg, ps, pr, n, slots, clock)
    }

    /// `loss[0] = mean((pred - target)^2)` through fp64 partials, `dpred = 2 (pred - target) / n`.
    pub(super) fn mse(
        &mut self,
        pred: Tensor,
        target: Tensor,
        loss: Tensor,
        dpred: Tensor,
    ) -> Result<()> {
        self.args(
            "mse_loss",
            &[("pred", pred, pred.len), ("target", target, pred.len)],
            &[("loss", loss, 1), ("dpred", dpred, pred.len)],
        )?;
        let (pp, pt, pd, parts) = (
            self.ptr(pred),
            self.ptr(target),
            self.ptr(dpred),
            self.partials_ptr(),
        );
        let n = pred.len as i64;
        launch!(self, "mse_partial_f32", reduce_cfg(), pp, pt, pd, n, parts)?;
        self.finish_sum(1.0 / pred.len as f64, false, loss)
    }

    /// `out[0] = scale * sum of the REDUCE_BLOCKS fp64 partials` (or its square root).
    pub(super) fn finish_sum(&mut self, scale: f64, root: bool, out: Tensor) -> Result<()> {
        let (parts, po) = (self.partials_ptr(), self.ptr(out));
        let (count, root) = (REDUCE_BLOCKS as i32, root as i32);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "finish_sum_f64", cfg, parts, count, scale, root, po)
    }

    /// Uploads a table and sets the counter to its last row (host work: not for a recorded sequence).
    pub(super) fn load_table(&mut self, rows: &[SamplerRow]) -> Result<()> {
        self.not_recording("loading a sampler table")?;
        if rows.is_empty() || rows.len() > i32::MAX as usize {
            return Err(Error::Invalid(
                "a sampler table needs at least one row".into(),
            ));
        }
        self.materialise()?;
        let bytes = std::mem::size_of_val(rows);
        if self.table.as_ref().is_none_or(|t| t.bytes < bytes) {
            self.table = Some(self.dev.malloc(bytes, "the sampler table")?);
        }
        if self.step.is_none() {
            self.step = Some(self.dev.malloc(4, "the sampler step")?);
        }
        let (table, step) = (self.table_ptr(), self.step_ptr());
        let last = [(rows.len() - 1) as i32];
        // SAFETY: both buffers were just sized for these copies.
        unsafe {
            self.dev.htod(table, bytemuck::cast_slice(rows))?;
            self.dev.htod(step, bytemuck::cast_slice(&last))?;
        }
        self.table_rows = rows.len();
        Ok(())
    }

    fn table_ptr(&self) -> u64 {
        self.table.as_ref().map_or(0, |t| t.ptr)
    }

    fn step_ptr(&self) -> u64 {
        self.step.as_ref().map_or(0, |t| t.ptr)
    }

    fn loaded(&self) -> Result<()> {
        if self.table_rows == 0 {
            return Err(Error::Invalid("no sampler table was loaded".into()));
        }
        Ok(())
    }

    /// Reads the counter (a synchronisation: not for inside a sampling loop).
    pub(super) fn table_position(&mut self) -> Result<Option<usize>> {
        self.loaded()?;
        self.not_recording("reading the sampler step")?;
        let mut step = [0i32];
        // SAFETY: the step buffer holds one i32; dtoh waits for everything queued.
        unsafe {
            self.dev
                .dtoh(bytemuck::cast_slice_mut(&mut step), self.step_ptr())?
        };
        Ok(usize::try_from(step[0])
            .ok()
            .filter(|&s| s < self.table_rows))
    }

    pub(super) fn table_timesteps(&mut self, timesteps: Tensor) -> Result<()> {
        self.loaded()?;
        self.args(
            "sampler_timesteps",
            &[],
            &[("timesteps", timesteps, timesteps.len)],
        )?;
        let (table, step, pt) = (self.table_ptr(), self.step_ptr(), self.ptr(timesteps));
        let [images, rows] = dims([timesteps.len, self.table_rows])?;
        let cfg = self.elementwise_cfg(timesteps.len);
        launch!(
            self,
            "sampler_timesteps_f32",
            cfg,
            table,
            step,
            pt,
            images,
            rows
        )
    }

    pub(super) fn reverse_step(
        &mut self,
        x_t: Tensor,
        eps_hat: Tensor,
        x_prev: Tensor,
        rs: ReverseStep,
    ) -> Result<()> {
        self.loaded()?;
        let total = rs.images_len(x_t.len)?;
        // x_prev may be x_t itself (each element is read before the same thread writes it).
        let outs = [("x_prev", x_prev, x_t.len)];
        if x_prev == x_t {
            self.args("sampler_step", &[("eps_hat", eps_hat, x_t.len)], &outs)?;
        } else {
            self.args(
                "sampler_step",
                &[("x_t", x_t, x_t.len), ("eps_hat", eps_hat, x_t.len)],
                &outs,
            )?;
        }
        let (px, pe, pp) = (self.ptr(x_t), self.ptr(eps_hat), self.ptr(x_prev));
        let (table, step) = (self.table_ptr(), self.step_ptr());
        let (first, clip) = (rs.first_element as i64, rs.clip as i32);
        let (guided, w) = (rs.guidance.is_some() as i32, rs.guidance.unwrap_or(1.0));
        let (seed, base, total) = (rs.seed, rs.stream_base, total as i64);
        let rows = self.table_rows as i32;
        let cfg = self.elementwise_cfg(total as usize / 4 + 1);
        launch!(
            self,
            "sampler_step_f32",
            cfg,
            px,
            pe,
            table,
            step,
            pp,
            total,
            first,
            clip,
            seed,
            base,
            rows,
            guided,
            w
        )
    }

    pub(super) fn table_advance(&mut self) -> Result<()> {
        self.loaded()?;
        let step = self.step_ptr();
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "sampler_advance", cfg, step)
    }
}

/// The fixed grid of the two-stage reductions.
pub(super) fn reduce_cfg() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (REDUCE_BLOCKS, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

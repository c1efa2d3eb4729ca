//! Launchers of `kernels/attention.cu`: single-head attention forward, and its backward as two kernels
//! (dq with the row terms delta, then dk and dv).

use super::elementwise::dims;
use super::{launch, CudaBackend, WORKSPACE};
use crate::backend::{AttentionShape, Tensor};
use crate::error::{Error, Result};
use cudarc::driver::LaunchConfig;

/// The kernels that use more than the default 48 KB of dynamic shared memory for wide layers; the
/// backend opts them in to the device's maximum at load.
pub(super) const KERNELS: [&str; 3] = [
    "attention_forward_f32",
    "attention_backward_dq_f32",
    "attention_backward_dkv_f32",
];

/// Warps per block (one query or key each) and the tile staged in shared memory: `kernels/attention.cu`.
const WARPS: usize = 8;
const TILE: usize = 8;

impl CudaBackend {
    fn attention_cfg(&self, s: &AttentionShape, floats: usize) -> Result<LaunchConfig> {
        let bytes = 4 * floats;
        if bytes > self.props.max_shared as usize {
            return Err(Error::Invalid(format!(
                "attention over {} channels needs {bytes} bytes of shared memory per block; this device \
                 allows {}",
                s.c, self.props.max_shared
            )));
        }
        if s.n > 65_535 {
            return Err(Error::Invalid(format!(
                "attention over {} images does not fit one launch",
                s.n
            )));
        }
        Ok(LaunchConfig {
            grid_dim: (s.l.div_ceil(WARPS) as u32, s.n as u32, 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: bytes as u32,
        })
    }

    pub(super) fn attention(
        &mut self,
        s: AttentionShape,
        qkv: Tensor,
        out: Tensor,
        lse: Tensor,
    ) -> Result<()> {
        self.args(
            "attention_forward",
            &[("qkv", qkv, s.n * s.l * 3 * s.c)],
            &[("out", out, s.n * s.l * s.c), ("lse", lse, s.n * s.l)],
        )?;
        let cfg = self.attention_cfg(&s, (2 * TILE + 2 * WARPS) * s.c)?;
        let (pq, po, pl) = (self.ptr(qkv), self.ptr(out), self.ptr(lse));
        let [l, c] = dims([s.l, s.c])?;
        launch!(self, "attention_forward_f32", cfg, pq, po, pl, l, c)
    }

    pub(super) fn attention_grad(
        &mut self,
        s: AttentionShape,
        qkv: Tensor,
        out: Tensor,
        lse: Tensor,
        dout: Tensor,
        dqkv: Tensor,
    ) -> Result<()> {
        if s.n * s.l > WORKSPACE {
            return Err(Error::Invalid(format!(
                "attention row terms for {} positions exceed the workspace",
                s.n * s.l
            )));
        }
        self.args(
            "attention_backward",
            &[
                ("qkv", qkv, s.n * s.l * 3 * s.c),
                ("out", out, s.n * s.l * s.c),
                ("lse", lse, s.n * s.l),
                ("dout", dout, s.n * s.l * s.c),
            ],
            &[("dqkv", dqkv, s.n * s.l * 3 * s.c)],
        )?;
        let (pq, po, pl) = (self.ptr(qkv), self.ptr(out), self.ptr(lse));
        let (pdo, pdq, delta) = (self.ptr(dout), self.ptr(dqkv), self.workspace_ptr());
        let [l, c] = dims([s.l, s.c])?;
        let cfg = self.attention_cfg(&s, (2 * TILE + 3 * WARPS) * s.c)?;
        launch!(
            self,
            "attention_backward_dq_f32",
            cfg,
            pq,
            po,
            pl,
            pdo,
            pdq,
            delta,
            l,
            c
        )?;
        let cfg = self.attention_cfg(&s, (2 * TILE + 4 * WARPS) * s.c + 2 * TILE)?;
        launch!(
            self,
            "attention_backward_dkv_f32",
            cfg,
            pq,
            pl,
            pdo,
            delta,
            pdq,
            l,
            c
        )
    }
}

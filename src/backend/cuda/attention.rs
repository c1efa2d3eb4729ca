//! Launchers of `kernels/attention.cu`: single-head attention forward, and its backward as two kernels
//! (dq with the row terms delta, then dk and dv).

use super::elementwise::dims;
use super::{launch, CudaBackend, WORKSPACE};
use crate::backend::{AttentionShape, Precision, Tensor};
use crate::error::{Error, Result};
use cudarc::driver::LaunchConfig;

/// The kernels that use more than the default 48 KB of dynamic shared memory for wide layers; the
/// backend opts them in to the device's maximum at load.
pub(super) const KERNELS: [&str; 4] = [
    "attention_forward_f32",
    "attention_forward_bf16",
    "attention_backward_dq_f32",
    "attention_backward_dkv_f32",
];

/// Warps per block (one query or key each) and the tile staged in shared memory: `kernels/attention.cu`.
const WARPS: usize = 8;
const TILE: usize = 8;

/// Queries per block of the bf16 forward (`kernels/attention_tc.cu`), 4 warps of 16.
const TC_QUERIES: usize = 64;

/// The bf16 forward's dynamic shared memory for `c` channels: the Q, K and V tiles (bf16, rows padded by 8),
/// the scores (fp32, 64 x 68), the probabilities (bf16, 64 x 72) and the output accumulators (fp32, rows
/// padded by 4), each region rounded up to 32 bytes (`kernels/attention_tc.cu`).
fn tc_shared_bytes(c: usize) -> usize {
    let align = |b: usize| b.div_ceil(32) * 32;
    3 * align(64 * (c + 8) * 2) + align(64 * 68 * 4) + align(64 * 72 * 2) + 64 * (c + 4) * 4
}

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
        let (pq, po, pl) = (self.ptr(qkv), self.ptr(out), self.ptr(lse));
        let [l, c] = dims([s.l, s.c])?;
        // bf16 on tensor cores where the kernel takes the width (c a multiple of 16, its tiles within the
        // shared memory); the fp32 kernel otherwise.
        let tc_bytes = tc_shared_bytes(s.c);
        if self.precision == Precision::Bf16
            && s.c % 16 == 0
            && tc_bytes <= self.props.max_shared as usize
            && s.n <= 65_535
        {
            let cfg = LaunchConfig {
                grid_dim: (s.l.div_ceil(TC_QUERIES) as u32, s.n as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: tc_bytes as u32,
            };
            return launch!(self, "attention_forward_bf16", cfg, pq, po, pl, l, c);
        }
        let cfg = self.attention_cfg(&s, (2 * TILE + 2 * WARPS) * s.c)?;
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

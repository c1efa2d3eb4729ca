//! Launchers of `kernels/attention.cu`: single-head attention forward, and its backward as two kernels
//! (dq with the row terms delta, then dk and dv).

use super::elementwise::dims;
use super::{launch, CudaBackend, WORKSPACE};
use crate::backend::{AttentionShape, Precision, Tensor};
use crate::error::{Error, Result};
use cudarc::driver::LaunchConfig;

/// The kernels, each beside its twins for activations stored in bf16 (`Backend::stores_bf16_activations`):
/// qkv in bf16 (`_bf16in`: the projection's output), and qkv and out in bf16 (`_bf16io`: the attention
/// output too, as the projection after it reads it; the dkv kernels, which do not read out, serve with
/// their `_bf16in` twin). The fp32 and bf16 forward, dq and dkv kernels.
const TWINS: [[&str; 3]; 6] = [
    [
        "attention_forward_f32",
        "attention_forward_f32_bf16in",
        "attention_forward_f32_bf16io",
    ],
    [
        "attention_forward_bf16",
        "attention_forward_bf16_bf16in",
        "attention_forward_bf16_bf16io",
    ],
    [
        "attention_backward_dq_f32",
        "attention_backward_dq_f32_bf16in",
        "attention_backward_dq_f32_bf16io",
    ],
    [
        "attention_backward_dq_bf16",
        "attention_backward_dq_bf16_bf16in",
        "attention_backward_dq_bf16_bf16io",
    ],
    [
        "attention_backward_dkv_f32",
        "attention_backward_dkv_f32_bf16in",
        "attention_backward_dkv_f32_bf16in",
    ],
    [
        "attention_backward_dkv_bf16",
        "attention_backward_dkv_bf16_bf16in",
        "attention_backward_dkv_bf16_bf16in",
    ],
];

/// The kernels that use more than the default 48 KB of dynamic shared memory for wide layers (all of
/// them); the backend opts them in to the device's maximum at load.
pub(super) fn kernels() -> &'static [&'static str] {
    TWINS.as_flattened()
}

/// The twin of an attention kernel for qkv and out stored as they are; an error for out in bf16 with qkv
/// in fp32, which no kernel takes (the network stores both in bf16 or neither).
fn for_storage(kernel: &'static str, qkv: Tensor, out: Tensor) -> Result<&'static str> {
    let Some(twins) = TWINS.iter().find(|t| t[0] == kernel) else {
        return Ok(kernel);
    };
    match (qkv.is_bf16(), out.is_bf16()) {
        (false, false) => Ok(twins[0]),
        (true, false) => Ok(twins[1]),
        (true, true) => Ok(twins[2]),
        (false, true) => Err(Error::Invalid(
            "attention: out is stored in bf16 but qkv in fp32; no kernel takes that (store both in \
             bf16 or neither)"
                .into(),
        )),
    }
}

/// Warps per block (one query or key each) and the tile staged in shared memory: `kernels/attention.cu`.
const WARPS: usize = 8;
const TILE: usize = 8;

/// The bf16 kernels (`kernels/attention_mma.cu`, the forward: queries per block, keys per block of its
/// stream, the widest c; `kernels/attention_tc.cu`, the backward: queries per block of the dq kernel, keys
/// per tile of the dq kernel, keys per block of the dkv kernel).
const MMA_QUERIES: usize = 128;
const MMA_KEYS: usize = 32;
const MMA_WIDEST: usize = 256;
const TC_QUERIES: usize = 64;
const TC_DQ_KEYS: usize = 32;
const TC_DKV_KEYS: usize = 32;

/// The bf16 kernels' dynamic shared memory for `c` channels, region by region as the kernels carve it
/// (each rounded up to 32 bytes): [forward, dq, dkv].
fn tc_shared_bytes(c: usize) -> [usize; 3] {
    let r = |count: usize, bytes: usize| (count * bytes).div_ceil(32) * 32;
    let (ldt, ldo) = (c + 8, c + 4);
    let (q, kt, kb) = (TC_QUERIES, TC_DQ_KEYS, TC_DKV_KEYS);
    [
        // Q; K and V, double-buffered (rows of c + 8 bf16, packed).
        (MMA_QUERIES + 4 * MMA_KEYS) * ldt * 2,
        // Q, dO; K, V; S, dP; dS; dq.
        2 * r(q * ldt, 2)
            + 2 * r(kt * ldt, 2)
            + 2 * r(q * (kt + 4), 4)
            + r(q * (kt + 8), 2)
            + r(q * ldo, 4),
        // K, V; Q, dO; lse, delta; S^T, dP^T; P^T, dS^T; dk, dv.
        2 * r(kb * ldt, 2)
            + 2 * r(q * ldt, 2)
            + 2 * r(q, 4)
            + 2 * r(kb * (q + 4), 4)
            + 2 * r(kb * (q + 8), 2)
            + 2 * r(kb * ldo, 4),
    ]
}

/// A bf16 attention launch: `per_block` positions a block, `threads` threads, `bytes` of shared memory.
fn tc_cfg(s: &AttentionShape, per_block: usize, threads: u32, bytes: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (s.l.div_ceil(per_block) as u32, s.n as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: bytes as u32,
    }
}

impl CudaBackend {
    /// Whether `pass` of attention of shape `s` runs on the bf16 kernels: in bf16 precision, for widths
    /// they take (a multiple of 16, at most 256) and where the pass's shared memory fits the device (the
    /// backward's two kernels together: the dq kernel's row terms are the dkv kernel's). The fp32 kernels
    /// otherwise: on an A100 (163 KiB) the forward runs on tensor cores, the backward in fp32.
    fn attention_on_tensor_cores(&self, s: &AttentionShape, pass: Pass) -> bool {
        let [forward, dq, dkv] = tc_shared_bytes(s.c);
        let need = match pass {
            Pass::Forward => forward,
            Pass::Dq | Pass::Dkv => dq.max(dkv),
        };
        self.precision == Precision::Bf16
            && s.c.is_multiple_of(16)
            && s.c <= MMA_WIDEST
            && s.n <= 65_535
            && need <= self.props.max_shared as usize
    }

    /// The widths up to which bf16 attention runs each pass on tensor cores here, for `info`.
    pub(super) fn attention_fit(&self) -> String {
        let widest = |pass: usize| {
            (16..=MMA_WIDEST)
                .step_by(16)
                .filter(|&c| {
                    let [f, dq, dkv] = tc_shared_bytes(c);
                    let need = if pass == 0 { f } else { dq.max(dkv) };
                    need <= self.props.max_shared as usize
                })
                .max()
        };
        let say = |w: Option<usize>| match w {
            Some(c) if c == MMA_WIDEST => format!("on tensor cores at every width up to {c}"),
            Some(c) => format!("on tensor cores up to {c} channels, wider in fp32"),
            None => "in fp32 (no width fits the shared memory)".into(),
        };
        format!(
            "in bf16 precision the forward {}, the backward {}",
            say(widest(0)),
            say(widest(1))
        )
    }

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

    /// The kernel that runs `pass` of attention of shape `s`, and its launch: bf16 on tensor cores where
    /// those kernels take the width ([`Self::attention_on_tensor_cores`]), fp32 otherwise. Both kernels of
    /// a pass take the same arguments.
    fn attention_kernel(
        &self,
        s: &AttentionShape,
        pass: Pass,
        qkv: Tensor,
        out: Tensor,
    ) -> Result<(&'static str, LaunchConfig)> {
        let (name, cfg) = self.attention_kernel_f32(s, pass)?;
        Ok((for_storage(name, qkv, out)?, cfg))
    }

    /// [`Self::attention_kernel`] for qkv in fp32.
    fn attention_kernel_f32(
        &self,
        s: &AttentionShape,
        pass: Pass,
    ) -> Result<(&'static str, LaunchConfig)> {
        if self.attention_on_tensor_cores(s, pass) {
            let [forward, dq, dkv] = tc_shared_bytes(s.c);
            return Ok(match pass {
                Pass::Forward => (
                    "attention_forward_bf16",
                    tc_cfg(s, MMA_QUERIES, 256, forward),
                ),
                Pass::Dq => ("attention_backward_dq_bf16", tc_cfg(s, TC_QUERIES, 128, dq)),
                Pass::Dkv => (
                    "attention_backward_dkv_bf16",
                    tc_cfg(s, TC_DKV_KEYS, 64, dkv),
                ),
            });
        }
        Ok(match pass {
            Pass::Forward => (
                "attention_forward_f32",
                self.attention_cfg(s, (2 * TILE + 2 * WARPS) * s.c)?,
            ),
            Pass::Dq => (
                "attention_backward_dq_f32",
                self.attention_cfg(s, (2 * TILE + 3 * WARPS) * s.c)?,
            ),
            Pass::Dkv => (
                "attention_backward_dkv_f32",
                self.attention_cfg(s, (2 * TILE + 4 * WARPS) * s.c + 2 * TILE)?,
            ),
        })
    }

    /// What one block of `pass` multiplies per iteration of its main loop (queries x keys x channels of
    /// its products: 2 in the forward, 3 in dq, 4 in dkv), for the static model.
    fn attention_tile(&self, s: &AttentionShape, pass: Pass) -> [usize; 3] {
        let tc = self.attention_on_tensor_cores(s, pass);
        match (pass, tc) {
            (Pass::Forward, true) => [MMA_QUERIES, MMA_KEYS, 2 * s.c],
            (Pass::Dq, true) => [TC_QUERIES, TC_DQ_KEYS, 3 * s.c],
            (Pass::Dkv, true) => [TC_DKV_KEYS, TC_QUERIES, 4 * s.c],
            (Pass::Forward, false) => [WARPS, TILE, 2 * s.c],
            (Pass::Dq, false) => [WARPS, TILE, 3 * s.c],
            (Pass::Dkv, false) => [WARPS, TILE, 4 * s.c],
        }
    }

    pub(super) fn attention(
        &mut self,
        s: AttentionShape,
        qkv: Tensor,
        out: Tensor,
        lse: Tensor,
    ) -> Result<()> {
        self.args_stored(
            "attention_forward",
            &[("qkv", qkv, s.n * s.l * 3 * s.c)],
            &[("out", out, s.n * s.l * s.c), ("lse", lse, s.n * s.l)],
            &["qkv", "out"],
        )?;
        let (pq, po, pl) = (self.ptr(qkv), self.ptr(out), self.ptr(lse));
        let [l, c] = dims([s.l, s.c])?;
        let (kernel, cfg) = self.attention_kernel(&s, Pass::Forward, qkv, out)?;
        // Two products of l x l x c per image: q k^T and p v.
        let per = s.n * s.l * s.l * s.c;
        self.count_work(2 * per, 2 * per, self.attention_tile(&s, Pass::Forward));
        launch!(self, kernel, cfg, pq, po, pl, l, c)
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
        self.args_stored(
            "attention_backward",
            &[
                ("qkv", qkv, s.n * s.l * 3 * s.c),
                ("out", out, s.n * s.l * s.c),
                ("lse", lse, s.n * s.l),
                ("dout", dout, s.n * s.l * s.c),
            ],
            &[("dqkv", dqkv, s.n * s.l * 3 * s.c)],
            &["qkv", "out"],
        )?;
        let (pq, po, pl) = (self.ptr(qkv), self.ptr(out), self.ptr(lse));
        let (pdo, pdq, delta) = (self.ptr(dout), self.ptr(dqkv), self.workspace_ptr());
        let [l, c] = dims([s.l, s.c])?;
        let (kernel, cfg) = self.attention_kernel(&s, Pass::Dq, qkv, out)?;
        // The backward's four products (dp = do v^T and dq = ds k in the first kernel, dv = p^T do and
        // dk = ds^T q in the second), each kernel recomputing s = q k^T (and the second dp too); the
        // op's bytes split between the two.
        let per = s.n * s.l * s.l * s.c;
        let bytes = self.work.bytes;
        self.count_work(2 * per, 3 * per, self.attention_tile(&s, Pass::Dq));
        self.count_bytes(bytes as usize / 2);
        launch!(self, kernel, cfg, pq, po, pl, pdo, pdq, delta, l, c)?;
        let (kernel, cfg) = self.attention_kernel(&s, Pass::Dkv, qkv, out)?;
        self.count_work(2 * per, 4 * per, self.attention_tile(&s, Pass::Dkv));
        self.count_bytes(bytes as usize / 2);
        launch!(self, kernel, cfg, pq, pl, pdo, delta, pdq, l, c)
    }
}

/// The three kernels of attention: the forward, and the backward's two.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Forward,
    Dq,
    Dkv,
}

#[cfg(test)]
mod tests {
    use super::{for_storage, TWINS};
    use crate::backend::Tensor;

    /// Each kernel's bf16-qkv twin is its name with `_bf16in` appended, and its bf16-qkv-and-out twin
    /// with `_bf16io` (the dkv kernels, which do not read out, keep `_bf16in`); fp32 keeps the kernel; out
    /// in bf16 with qkv in fp32 is refused.
    #[test]
    fn every_attention_kernel_has_its_bf16_twins() {
        let (f32, bf16) = (Tensor::new(0, 1), Tensor::bf16(0, 1));
        for [k, ..] in &TWINS {
            assert_eq!(for_storage(k, f32, f32).unwrap(), *k);
            assert_eq!(for_storage(k, bf16, f32).unwrap(), format!("{k}_bf16in"));
            let io = if k.contains("_dkv_") { "in" } else { "io" };
            assert_eq!(for_storage(k, bf16, bf16).unwrap(), format!("{k}_bf16{io}"));
            assert!(for_storage(k, f32, bf16).is_err());
        }
    }
}

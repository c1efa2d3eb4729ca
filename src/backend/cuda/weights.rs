//! The bf16 copy of the weights that the bf16 GEMMs read ([`Backend::keep_weight_copy`]).
//!
//! The U-Net declares its parameter region; the backend reserves a copy of it in the arena, bf16 element
//! `i` of the copy being element `i` of the region, the copy starting on a 128-byte boundary (what
//! ladder v6's swizzled TMA copies ask of global memory; a weight whose offset in the region is a
//! multiple of 64 elements starts on one too, as every weight of the paper's network does): a run of 8
//! weights is one aligned 16-byte load where it starts a multiple of 8 elements into the region (every
//! run of every weight of the paper's network, whose parameter lengths are multiples of 8; elsewhere the
//! kernels read the run element by element). Every bf16 convolution and linear layer (all rungs) reads
//! its weight there: a weight crosses the memory bus in 2 bytes and is rounded once per update instead of
//! by every tile that reads it.
//!
//! The copy is kept equal to the bf16 rounding of the region, whatever writes it:
//! - Adam writes it as it updates the parameters (`adam_step_f32`'s `copy`), so a training step needs no
//!   pass of its own.
//! - Any other op whose output overlaps a region (an upload, a copy of the EMA into a sampler's network, a
//!   fill, any op at all) leaves the range it wrote *stale*. Stale ranges are rounded
//!   (`round_to_bf16_f32`) before the next op is queued, before a recording ends and before a replay, so
//!   a recorded sequence contains the roundings its own writes need and nothing reads a stale copy.
//! - A bf16 GEMM whose weight lies in no region (an op called on its own, as the tests do) rounds it into
//!   the workspace first: correct, but one more pass per launch; [`CudaBackend::loose_weight_roundings`]
//!   counts them, so a test can check that the U-Net never takes that path.
//!
//! [`Backend::keep_weight_copy`]: crate::backend::Backend::keep_weight_copy

use super::{launch, Arg, CudaBackend, WORKSPACE};
use crate::backend::{weight_copy_len, Backend, Precision, Tensor};
use crate::error::{Error, Result};

/// A declared region and where its copy starts (in arena elements, 4 bytes each).
#[derive(Clone, Copy, Debug)]
pub(super) struct WeightCopy {
    region: Tensor,
    at: usize,
}

impl CudaBackend {
    /// Reserves the copy of `weights` (see the module's documentation); declaring a region again is a
    /// no-op.
    pub(super) fn declare_weights(&mut self, weights: Tensor) -> Result<()> {
        if self.capturing.is_some() {
            return Err(Error::Invalid(
                "declaring weights while recording a sequence of device work".into(),
            ));
        }
        if weights.end() > self.reserved {
            return Err(Error::OutOfBounds {
                what: "weights",
                off: weights.off,
                len: weights.len,
                arena: "cuda",
                capacity: self.reserved,
            });
        }
        if weights.len == 0 || self.copies.iter().any(|c| c.region == weights) {
            return Ok(());
        }
        // One copy per weight: Adam writes the copy of the region holding its parameters, and a second
        // copy of the same weights would go stale.
        if let Some(c) = self.copies.iter().find(|c| c.region.overlaps(weights)) {
            return Err(Error::Invalid(format!(
                "weights at {}..{} overlap weights declared before at {}..{}",
                weights.off,
                weights.end(),
                c.region.off,
                c.region.end()
            )));
        }
        let space = self.alloc(weight_copy_len(weights.len))?;
        self.copies.push(WeightCopy {
            region: weights,
            at: space.off.next_multiple_of(32), // 128 bytes (the arena starts 256-byte aligned)
        });
        // Whatever the region holds now (zeros, if nothing was written yet) is rounded before the first op.
        self.stale.push((self.copies.len() - 1, weights));
        Ok(())
    }

    /// Marks what an op is about to write into a declared region as stale.
    pub(super) fn mark_written(&mut self, outs: &[Arg]) {
        for &(_, t, _) in outs {
            for (i, c) in self.copies.iter().enumerate() {
                if t.overlaps(c.region) {
                    let (lo, hi) = (t.off.max(c.region.off), t.end().min(c.region.end()));
                    self.stale.push((i, Tensor::new(lo, hi - lo)));
                }
            }
        }
    }

    /// Rounds every stale range into its copy (queued, or recorded when recording). The arena is made
    /// ready first: a copy may have been declared since the last op.
    pub(super) fn refresh_copies(&mut self) -> Result<()> {
        if self.stale.is_empty() {
            return Ok(());
        }
        self.materialise()?;
        let stale = std::mem::take(&mut self.stale);
        for (n, &(i, range)) in stale.iter().enumerate() {
            let dst = self.copy_address(self.copies[i], range);
            if let Err(e) = self.round_to_bf16(self.ptr(range), dst, range.len) {
                self.stale.extend_from_slice(&stale[n..]);
                return Err(e);
            }
        }
        Ok(())
    }

    /// The device address of the copy of `t`, which lies inside `c`'s region.
    fn copy_address(&self, c: WeightCopy, t: Tensor) -> u64 {
        self.ptr(Tensor::new(c.at, 0)) + 2 * (t.off - c.region.off) as u64
    }

    /// The copy of `t` when `t` lies inside a declared region.
    fn copy_of(&self, t: Tensor) -> Option<u64> {
        self.copies
            .iter()
            .find(|c| c.region.off <= t.off && t.end() <= c.region.end())
            .map(|&c| self.copy_address(c, t))
    }

    fn round_to_bf16(&mut self, src: u64, dst: u64, len: usize) -> Result<()> {
        let cfg = self.elementwise_cfg(len);
        let n = len as i64;
        launch!(self, "round_to_bf16_f32", cfg, src, dst, n)
    }

    /// What the GEMM of the current precision reads as weight `w` (checked by the op): `w` itself in
    /// fp32; in bf16 its copy, or, for a weight outside every declared region, its rounding into the
    /// workspace (which none of the ops reading a weight uses while that GEMM runs).
    pub(super) fn weight_ptr(&mut self, w: Tensor) -> Result<u64> {
        if self.precision == Precision::Fp32 {
            return Ok(self.ptr(w));
        }
        if let Some(p) = self.copy_of(w) {
            return Ok(p);
        }
        if w.len > 2 * WORKSPACE {
            return Err(Error::Invalid(format!(
                "a weight of {} elements outside the declared weights (Backend::keep_weight_copy) is more \
                 than the workspace can hold in bf16 ({})",
                w.len,
                2 * WORKSPACE
            )));
        }
        self.loose_roundings += 1;
        let ws = self.workspace_ptr();
        self.round_to_bf16(self.ptr(w), ws, w.len)?;
        Ok(ws)
    }

    /// The copy Adam is about to write itself for `params` (the op's output, just marked stale): its
    /// address, with those marks dropped; 0 (no copy written by Adam) when `params` is not inside a
    /// declared region, which then stays marked for rounding.
    pub(super) fn copy_written_by_adam(&mut self, params: Tensor) -> u64 {
        let Some(p) = self.copy_of(params) else {
            return 0;
        };
        self.stale
            .retain(|&(_, r)| !(params.off <= r.off && r.end() <= params.end()));
        p
    }

    /// How many bf16 GEMMs rounded a weight that lies in no declared region into the workspace (a pass
    /// the declared weights never need).
    pub fn loose_weight_roundings(&self) -> u64 {
        self.loose_roundings
    }

    /// The bf16 copy of `t` as floats, when `t` lies inside a declared region (after any pending
    /// rounding): for tests and diagnostics.
    pub fn weight_copy(&mut self, t: Tensor) -> Result<Option<Vec<f32>>> {
        self.not_recording("reading a weight copy")?;
        self.args("weight_copy", &[("weights", t, t.len)], &[])?;
        let Some(p) = self.copy_of(t) else {
            return Ok(None);
        };
        let mut bits = vec![0u16; t.len];
        // SAFETY: the copy of `t` is 2 * t.len bytes inside the arena (the region's copy holds 2 bytes per
        // element of the region, and `t` lies inside the region); dtoh waits for the queued roundings.
        unsafe { self.dev.dtoh(bytemuck::cast_slice_mut(&mut bits), p)? };
        Ok(Some(
            bits.iter()
                .map(|&b| f32::from_bits(u32::from(b) << 16))
                .collect(),
        ))
    }
}

//! The `Backend` trait: buffers and the op set. The U-Net, the training loop and the samplers are written
//! once over it; `cpu` is the reference implementation (and the fallback without a GPU), `cuda` the product.
//!
//! Memory is one arena per backend. A [`Tensor`] is a handle into it (offset and length, in elements), so
//! handles are `Copy`, parameters can be views into one flat buffer (one optimizer launch for all of them),
//! and the CUDA backend can size the arena once and never allocate inside a step.
//!
//! Conventions: activations are NHWC (channels last); convolution weights are `[out, kh, kw, in]`; linear
//! weights `[out, in]`. Ops that write a gradient of an *input* take `accumulate`: `false` overwrites,
//! `true` adds (a tensor consumed twice gets the sum of both gradients). Parameter gradients always
//! overwrite, since every parameter is used once.

pub mod cpu;
pub mod cuda;

use crate::error::{Error, Result};
pub use crate::rng::Stream;

/// How a tensor's elements are stored. Every tensor is fp32 but the activations a backend stores in
/// bf16 ([`Backend::stores_bf16_activations`]); an op refuses a bf16 tensor wherever it was not written to
/// take one ([`check_args`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Dtype {
    #[default]
    F32,
    /// Two elements per word of the arena, element `2i` in the low half of word `i` (little-endian
    /// bf16 pairs, as the kernels read them).
    Bf16,
}

/// A handle to `len` elements at `off` in a backend's arena. Offsets count the arena's 4-byte words; `len`
/// counts elements, which for a bf16 tensor take half a word each ([`Tensor::words`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Tensor {
    pub off: usize,
    pub len: usize,
    pub dtype: Dtype,
}

impl Tensor {
    pub fn new(off: usize, len: usize) -> Self {
        Self {
            off,
            len,
            dtype: Dtype::F32,
        }
    }
    /// `len` bf16 elements from word `off`.
    pub fn bf16(off: usize, len: usize) -> Self {
        Self {
            off,
            len,
            dtype: Dtype::Bf16,
        }
    }
    pub fn is_bf16(self) -> bool {
        self.dtype == Dtype::Bf16
    }
    /// The words of the arena the tensor covers.
    pub fn words(self) -> usize {
        match self.dtype {
            Dtype::F32 => self.len,
            Dtype::Bf16 => self.len.div_ceil(2),
        }
    }
    /// The sub-tensor `start .. start + len` (of a bf16 tensor: from an even element, where a word
    /// starts).
    pub fn slice(self, start: usize, len: usize) -> Self {
        assert!(
            start + len <= self.len,
            "slice {start}+{len} of a tensor of {}",
            self.len
        );
        let off = match self.dtype {
            Dtype::F32 => self.off + start,
            Dtype::Bf16 => {
                assert!(
                    start.is_multiple_of(2),
                    "a bf16 slice must start on an even element"
                );
                self.off + start / 2
            }
        };
        Self { off, len, ..self }
    }
    /// The word past the tensor's last.
    pub fn end(self) -> usize {
        self.off + self.words()
    }
    pub fn overlaps(self, other: Tensor) -> bool {
        self.len > 0 && other.len > 0 && self.off < other.end() && other.off < self.end()
    }
}

/// The words every allocation starts on a multiple of ([`Backend::alloc`]): 128 bytes.
pub const ALLOC_ALIGN: usize = 32;

/// One argument of an op: its name (for errors), its handle, and the length the op expects.
pub type Arg = (&'static str, Tensor, usize);

/// Checks one argument: its length is what the op expects, it is fp32, and it lies inside an arena of
/// `capacity` words.
pub fn check_arg(arg: Arg, capacity: usize, arena: &'static str) -> Result<()> {
    check_stored_arg(arg, capacity, arena, false)
}

/// [`check_arg`], accepting bf16 storage as well where `bf16_ok`.
fn check_stored_arg(
    (name, t, len): Arg,
    capacity: usize,
    arena: &'static str,
    bf16_ok: bool,
) -> Result<()> {
    if t.len != len {
        return Err(Error::shape(
            format!("argument {name}"),
            format!("{len} elements"),
            t.len,
        ));
    }
    if t.dtype == Dtype::Bf16 && !bf16_ok {
        return Err(Error::shape(
            format!("argument {name}"),
            "fp32 storage (this op has no kernel reading or writing bf16 there)",
            "bf16",
        ));
    }
    if t.end() > capacity {
        return Err(Error::OutOfBounds {
            what: name,
            off: t.off,
            len: t.words(),
            arena,
            capacity,
        });
    }
    Ok(())
}

/// Checks every argument of an op ([`check_arg`]) and that no output overlaps an input or another output.
/// Every backend runs this before an op, so a bad handle is an error, never a wild read or write.
pub fn check_args(
    op: &'static str,
    capacity: usize,
    arena: &'static str,
    ins: &[Arg],
    outs: &[Arg],
) -> Result<()> {
    check_args_stored(op, capacity, arena, ins, outs, &[])
}

/// [`check_args`] for an op with kernels that read or write bf16 storage for the arguments named in
/// `bf16_ok`; the others must be fp32.
pub fn check_args_stored(
    op: &'static str,
    capacity: usize,
    arena: &'static str,
    ins: &[Arg],
    outs: &[Arg],
    bf16_ok: &[&str],
) -> Result<()> {
    for a in ins.iter().chain(outs) {
        check_stored_arg(*a, capacity, arena, bf16_ok.contains(&a.0))?;
    }
    for (i, o) in outs.iter().enumerate() {
        let clash = ins.iter().any(|a| a.1.overlaps(o.1))
            || outs[i + 1..].iter().any(|b| b.1.overlaps(o.1));
        if clash {
            return Err(Error::Overlap(op));
        }
    }
    Ok(())
}

/// The elements [`Backend::keep_weight_copy`] reserves for `len` weights on a backend that keeps copies:
/// two bf16 values per element, and up to 31 more elements to start the copy on a 128-byte boundary (the
/// alignment a swizzled TMA copy asks of global memory, which 16-byte loads get too).
pub fn weight_copy_len(len: usize) -> usize {
    len.div_ceil(2) + 31
}

/// What a backend stores for a network besides the fp32 tensors every backend has, so memory can be
/// counted before anything is allocated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// No normalised inputs ([`Backend::fuses_normalisation`]).
    pub fused: bool,
    /// A bf16 copy of the weights ([`Backend::keeps_weight_copies`]).
    pub weight_copies: bool,
    /// Activations in bf16 where their ops take it ([`Backend::stores_bf16_activations`]).
    pub bf16_activations: bool,
    /// One bf16 region the size of the largest normalised input, which the backend normalises each
    /// convolution's input into ([`Backend::normalises_into_scratch`]).
    pub norm_scratch: bool,
}

impl Layout {
    /// The layout of `be`.
    pub fn of<B: Backend + ?Sized>(be: &B) -> Self {
        Self {
            fused: be.fuses_normalisation(),
            weight_copies: be.keeps_weight_copies(),
            bf16_activations: be.stores_bf16_activations(),
            norm_scratch: be.normalises_into_scratch(),
        }
    }
}

/// The words [`Backend::reserve_norm_scratch`] takes for a region of `len` bf16 elements: two to a word,
/// and up to 31 more to start it on a 128-byte boundary (as [`weight_copy_len`]).
pub fn norm_scratch_len(len: usize) -> usize {
    len.div_ceil(2) + 31
}

/// Fails, before anything is allocated, when `need(batch)` elements do not fit in what `be` has left,
/// naming the memory needed, the memory available, and the largest batch that fits (`need` is affine in
/// the batch: a fixed part and a part per image).
pub fn check_fits<B: Backend + ?Sized>(
    be: &B,
    what: &str,
    batch: usize,
    need: impl Fn(usize) -> Result<usize>,
) -> Result<()> {
    let Some(avail) = be.memory_available() else {
        return Ok(());
    };
    let want = need(batch)?;
    if want <= avail {
        return Ok(());
    }
    let (one, two) = (need(1)?, need(2)?);
    let per_image = two.saturating_sub(one).max(1);
    let fixed = one.saturating_sub(per_image);
    let largest = avail.saturating_sub(fixed) / per_image;
    let gib = |elements: usize| elements as f64 * 4.0 / (1u64 << 30) as f64;
    Err(Error::Memory(format!(
        "{what} at batch {batch} needs {:.2} GiB; {:.2} GiB is available on {}; the largest batch \
         that fits is {largest}",
        gib(want),
        gib(avail),
        be.describe()
    )))
}

/// The checks on an op's parameters (beyond its tensors' lengths) that every backend makes.
pub mod checks {
    use super::GroupNormShape;
    use crate::error::{Error, Result};

    pub fn groups(s: &GroupNormShape) -> Result<()> {
        if s.groups == 0 || !s.c.is_multiple_of(s.groups) {
            return Err(Error::shape(
                "group norm channels",
                format!("a multiple of {} groups", s.groups),
                s.c,
            ));
        }
        Ok(())
    }

    pub fn dropout(p: f32) -> Result<()> {
        if (0.0..1.0).contains(&p) {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "dropout probability {p} is outside [0, 1)"
            )))
        }
    }

    pub fn embedding_width(dim: usize) -> Result<()> {
        if dim < 4 {
            return Err(Error::shape("timestep embedding width", "at least 4", dim));
        }
        Ok(())
    }

    /// A count of diffusion timesteps to draw from: at least one, and each exact as an f32.
    pub fn timestep_count(steps: usize) -> Result<()> {
        if steps == 0 || steps > 1 << 24 {
            return Err(Error::shape(
                "timestep count",
                "1 ..= 16777216 (integers exact in f32)",
                steps,
            ));
        }
        Ok(())
    }

    /// The slots of a ring of `ring` elements holding entries of `entry`.
    pub fn ring_slots(entry: usize, ring: usize) -> Result<usize> {
        if entry == 0 || ring < entry || !ring.is_multiple_of(entry) {
            return Err(Error::shape(
                "log ring",
                format!("a positive multiple of its entry ({entry} elements)"),
                ring,
            ));
        }
        Ok(ring / entry)
    }

    /// A batch of `len` elements in images of `per_image`.
    pub fn images(len: usize, per_image: usize) -> Result<()> {
        if per_image == 0 || !len.is_multiple_of(per_image) {
            return Err(Error::shape(
                "noise_add batch",
                format!("a multiple of {per_image} elements"),
                len,
            ));
        }
        Ok(())
    }
}

/// The three convolutions of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKind {
    /// 3x3, stride 1, padding 1.
    K3S1,
    /// 3x3, stride 2, padding only on the bottom and right (TensorFlow 'SAME'; diffusers pads (0, 1, 0, 1)).
    K3S2,
    /// 1x1.
    K1,
}

impl ConvKind {
    pub fn taps(self) -> usize {
        match self {
            Self::K1 => 1,
            _ => 3,
        }
    }
    pub fn stride(self) -> usize {
        match self {
            Self::K3S2 => 2,
            _ => 1,
        }
    }
    /// Padding before the first row/column.
    pub fn pad_before(self) -> usize {
        match self {
            Self::K3S1 => 1,
            _ => 0,
        }
    }
}

/// A convolution of an NHWC batch `[n, h, w, c]` with `o` filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub o: usize,
    pub kind: ConvKind,
}

impl ConvShape {
    pub fn out_hw(&self) -> (usize, usize) {
        match self.kind {
            ConvKind::K3S2 => ((self.h - 2) / 2 + 1, (self.w - 2) / 2 + 1),
            _ => (self.h, self.w),
        }
    }
    /// Elements of one filter: `kh * kw * c`.
    pub fn k(&self) -> usize {
        self.kind.taps() * self.kind.taps() * self.c
    }
    pub fn x_len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }
    pub fn y_len(&self) -> usize {
        let (oh, ow) = self.out_hw();
        self.n * oh * ow * self.o
    }
    pub fn w_len(&self) -> usize {
        self.o * self.k()
    }
    /// Multiply-adds of the forward pass.
    pub fn macs(&self) -> usize {
        self.y_len() * self.k()
    }
}

/// A convolution's input given as `GN(x) * gamma + beta` (then SiLU when `silu`, then dropout when
/// `dropout`): the normalisation of a ResNet block before its convolution. Backends that fuse them (CUDA)
/// normalise as the convolution loads its operand and never store the result; the others write it to
/// `normed` (and `dropout.dropped`) and convolve that. The statistics land in `mean` and `rstd` as
/// [`Backend::group_norm_forward`]'s, so [`Backend::group_norm_backward`] takes them as usual.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormedInput {
    pub s: GroupNormShape,
    pub x: Tensor,
    pub gamma: Tensor,
    pub beta: Tensor,
    pub mean: Tensor,
    pub rstd: Tensor,
    pub silu: bool,
    /// Where a backend that does not fuse writes the normalised input (left alone by one that does).
    pub normed: Tensor,
    pub dropout: Option<DropoutAfter>,
}

/// Inverted dropout of a normalised input (training): `Backend::dropout_forward(normed, dropped, p,
/// seed, stream)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutAfter {
    pub p: f32,
    pub seed: u64,
    pub stream: Stream,
    /// Where a backend that does not fuse writes the dropped-out input.
    pub dropped: Tensor,
}

impl NormedInput {
    /// The tensor that stands for the convolution's input: `dropout.dropped`, else `normed` (what a
    /// backend that does not fuse convolves, and whose gradient the convolution's input gradient is).
    pub fn conv_input(&self) -> Tensor {
        self.dropout.map_or(self.normed, |d| d.dropped)
    }
}

/// A class embedding: a table `[classes, dim]` looked up by the labels of `n` images (integers stored
/// as f32, like the timesteps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassEmbedShape {
    pub n: usize,
    pub classes: usize,
    pub dim: usize,
}

impl ClassEmbedShape {
    /// The contract of [`Backend::class_embedding_add`], for every backend: (inputs, outputs).
    pub fn add_args(&self, table: Tensor, labels: Tensor, y: Tensor) -> ([Arg; 2], [Arg; 1]) {
        let table = ("table", table, self.classes * self.dim);
        (
            [table, ("labels", labels, self.n)],
            [("y", y, self.n * self.dim)],
        )
    }

    /// The contract of [`Backend::class_embedding_backward`]: (inputs, outputs).
    pub fn backward_args(
        &self,
        labels: Tensor,
        dy: Tensor,
        dtable: Tensor,
    ) -> ([Arg; 2], [Arg; 1]) {
        let dy = ("dy", dy, self.n * self.dim);
        (
            [("labels", labels, self.n), dy],
            [("dtable", dtable, self.classes * self.dim)],
        )
    }
}

/// Group norm over `[n, hw, c]` with `groups` groups of `c / groups` channels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupNormShape {
    pub n: usize,
    pub hw: usize,
    pub c: usize,
    pub groups: usize,
    pub eps: f32,
}

impl GroupNormShape {
    pub fn len(&self) -> usize {
        self.n * self.hw * self.c
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Length of the saved mean and reciprocal standard deviation: one per (image, group).
    pub fn stats_len(&self) -> usize {
        self.n * self.groups
    }
}

/// Single-head self-attention over the `l = h * w` positions of `n` images with width `c`. The input is the
/// packed projection `[n, l, 3c]` (q, k, v side by side), the output `[n, l, c]`; the forward pass saves one
/// log-sum-exp per query row (`[n, l]`) so the backward pass never stores the `l x l` matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub n: usize,
    pub l: usize,
    pub c: usize,
}

/// One row of a sampler's table, built on the host in f64 (see `sample.rs`) and stored as f32;
/// the layout matches `struct SamplerRow` in `kernels/diffusion.cu`.
///
/// `x0_hat = x0_from_xt * x_t - x0_from_eps * eps_hat` (clamped to [-1, 1] when clipping);
/// `x_prev = c_x0 * x0_hat + c_xt * x_t + c_eps * eps_hat + sigma * z`.
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct SamplerRow {
    pub t: f32,
    pub x0_from_xt: f32,
    pub x0_from_eps: f32,
    pub c_x0: f32,
    pub c_xt: f32,
    pub c_eps: f32,
    pub sigma: f32,
    pub unused: f32,
}

/// What a reverse step takes besides its tensors and the table's row. The noise of element `i` is Philox
/// normal draw `first_element + i` of stream `stream_base + step`.
///
/// With `guidance: Some(w)` (classifier-free guidance) the batch is doubled: `x_t`, `eps_hat` and `x_prev`
/// hold `2T` elements, the first `T` those of the images with their classes and the last `T` the same
/// images with the null class. The step uses `eps = eps_null + w (eps_class - eps_null)` and writes its
/// result into both halves, so the next forward pass sees the same `x` twice.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReverseStep {
    pub first_element: u64,
    pub clip: bool,
    pub seed: u64,
    pub stream_base: u64,
    pub guidance: Option<f32>,
}

impl ReverseStep {
    /// The elements of one copy of the images: `T` of a tensor of `len` (`2T` when guided).
    pub fn images_len(&self, len: usize) -> Result<usize> {
        match self.guidance {
            None => Ok(len),
            Some(w) if w.is_finite() && len.is_multiple_of(2) => Ok(len / 2),
            Some(w) => Err(Error::Invalid(format!(
                "a guided reverse step needs a finite scale and an even length (scale {w}, {len} elements)"
            ))),
        }
    }
}

/// Adam(W) hyper-parameters and the learning-rate schedule. The backend resolves them for update
/// `t = clock + 1` ([`AdamHyper::at`]), so a recorded training step needs nothing from the host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamHyper {
    /// The learning rate after warmup.
    pub lr: f32,
    /// Updates over which the learning rate rises linearly from `lr / warmup` to `lr` (0: none).
    pub warmup: u64,
    /// The betas in f64: `1 - beta` and the bias corrections `1 - beta^t` are computed in f64 and rounded
    /// once (as PyTorch does with Python floats), the moment updates use the betas rounded to f32.
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f32,
    pub weight_decay: f32,
    /// Gradients are scaled by `min(1, max_grad_norm / norm)` first; 0 disables clipping.
    pub max_grad_norm: f32,
}

impl AdamHyper {
    /// The values of update number `t` (from 1): the warmed-up learning rate and the bias corrections,
    /// computed in f64 and rounded once (`kernels/optim.cu` does the same on the device).
    pub fn at(&self, t: u64) -> AdamStep {
        let t = t as f64;
        let warm = (t / self.warmup.max(1) as f64).min(1.0);
        AdamStep {
            lr: (f64::from(self.lr) * warm) as f32,
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            eps: self.eps,
            weight_decay: self.weight_decay,
            bias_correction1: (1.0 - self.beta1.powf(t)) as f32,
            bias_correction2: (1.0 - self.beta2.powf(t)) as f32,
            max_grad_norm: self.max_grad_norm,
        }
    }
}

/// The recorded sequences a backend keeps, one of each: recording one replaces only its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sequence {
    /// One step of a sampler (`sample::run`).
    Sampling = 0,
    /// One training step (`train::Trainer::step`).
    Training = 1,
}

impl Sequence {
    pub const COUNT: usize = 2;
}

/// Adam(W) hyper-parameters of one update, resolved ([`AdamHyper::at`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// `1 - beta`, rounded from f64 (not computed in f32 from the rounded beta: 1 - 0.999f32 is 1.3e-5
    /// off in relative terms, which would move every update by 6e-6).
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// `1 - beta1^step` and `1 - beta2^step`.
    pub bias_correction1: f32,
    pub bias_correction2: f32,
    /// Gradients are scaled by `min(1, max_grad_norm / norm)` first; 0 disables clipping.
    pub max_grad_norm: f32,
}

/// The arithmetic of the GEMM-shaped ops (convolutions and linear layers). Tensors are fp32 either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// fp32 multiply-adds: the exact path, the one every backend has and the tests hold to the CPU.
    Fp32,
    /// Operands rounded to bf16 (8 significant bits) and multiplied on tensor cores, sums in fp32 (CUDA,
    /// compute capability 8.0 and newer).
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Bf16 => "bf16",
        }
    }
}

/// A rung of the convolution ladder (`dev/conv/README.md`) that the bf16 kernels do not run on (they run
/// on version 3, mma.sync), kept so the bench can time it beside them: version 2 (WMMA), which version 3
/// replaced; version 4 (wgmma, sm_90a only), version 5 (wgmma with the weights copied by the
/// tensor-memory accelerator, sm_90a only) and version 6 (version 5 with the weights copied a slice at a
/// time in the 64-byte swizzle), until a GPU run shows them correct and faster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rung {
    Wmma,
    Wgmma,
    /// Version 5 changes the forward convolution and the input gradient (where the channels are
    /// multiples of 8, as its tensor maps need) but not one that normalises its input; the weight
    /// gradient, and anything else, runs on version 4.
    WgmmaTma,
    /// Version 6 is version 5 with each slice of the weights one copy in the 64-byte swizzle (its input
    /// gradient where c and o are multiples of 32; else version 5's).
    WgmmaTmaSwizzled,
    /// Version 8: both operands copied by TMA into a pipeline of stages, a producer warpgroup and two
    /// consumer warpgroups (sm_90a): the stride-1 convolutions (forward from bf16 activations, input and
    /// weight gradients) where the channels are multiples of 64, and the attention projection; the others
    /// run on version 3 there.
    Pipelined,
}

impl Rung {
    pub const ALL: [Rung; 5] = [
        Rung::Wmma,
        Rung::Wgmma,
        Rung::WgmmaTma,
        Rung::WgmmaTmaSwizzled,
        Rung::Pipelined,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Wmma => "WMMA (ladder v2)",
            Self::Wgmma => "wgmma (ladder v4)",
            Self::WgmmaTma => "wgmma + TMA (ladder v5)",
            Self::WgmmaTmaSwizzled => "wgmma + swizzled TMA (ladder v6)",
            Self::Pipelined => "TMA + wgmma pipeline, warp-specialised (ladder v8)",
        }
    }

    /// The rungs that only a Hopper (sm_90a) has.
    pub fn needs_sm90a(self) -> bool {
        matches!(
            self,
            Self::Wgmma | Self::WgmmaTma | Self::WgmmaTmaSwizzled | Self::Pipelined
        )
    }

    /// The rungs that copy some convolutions' weights by the tensor-memory accelerator with the register
    /// path for the activations (versions 5 and 6; version 8 copies both operands and counts its own
    /// launches).
    pub fn uses_tma(self) -> bool {
        matches!(self, Self::WgmmaTma | Self::WgmmaTmaSwizzled)
    }
}

/// One kernel launch as a profile reports it ([`Backend::profile_end`]): the kernel, the milliseconds it
/// took (0 where nothing ran: a planned device), its grid and block, and the work its launcher counts for
/// it: the op's FLOPs (2 per multiply-add of its GEMM, 0 for a kernel that does no matrix product) and
/// its compulsory bytes (every tensor the op reads or writes crossing the memory bus once, attributed to
/// the op's first launch; a launcher that moves more, such as split-K partial sums, counts those on the
/// launch that moves them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Launch {
    pub kernel: &'static str,
    pub ms: f64,
    pub blocks: u64,
    pub threads: u32,
    /// Dynamic shared memory per block, in bytes.
    pub shared: u32,
    /// A matrix kernel's tile: the m x n x k multiply-adds one block does per iteration of its main loop
    /// (for attention, queries x keys x the channels of all its products).
    pub tile: Option<[u32; 3]>,
    /// The bytes one tile's operands take in shared memory per iteration where the launcher knows them
    /// (an operand copied in fp32); 0 for bf16 operands of the tile's sizes.
    pub staged: f64,
    pub flops: f64,
    pub bytes: f64,
    /// The multiply-adds a GEMM launch's tiles issue (its FLOPs / 2 plus padding to whole tiles and any
    /// structural zeros); 0 for a kernel that does no matrix product.
    pub issued_macs: f64,
}

/// The op set. Every method checks its arguments and returns an error rather than panicking.
pub trait Backend {
    /// A short description for logs ("cpu (2 threads)", "cuda: NVIDIA H100 ...").
    fn describe(&self) -> String;

    // --- buffers -----------------------------------------------------------------------------------------
    /// Reserves `len` elements (zero-initialised) from the next multiple of [`ALLOC_ALIGN`] words, so a
    /// tensor at the start of an allocation is 128-byte aligned on every backend (the same handles on
    /// all of them); an error, before anything is allocated, when they do not fit in
    /// [`Backend::memory_available`].
    fn alloc(&mut self, len: usize) -> Result<Tensor>;
    fn upload(&mut self, dst: Tensor, src: &[f32]) -> Result<()>;
    fn download(&mut self, src: Tensor) -> Result<Vec<f32>>;
    fn fill(&mut self, dst: Tensor, value: f32) -> Result<()>;
    fn copy(&mut self, src: Tensor, dst: Tensor) -> Result<()>;
    /// `dst = src` or, with `accumulate`, `dst += src`.
    fn accumulate(&mut self, src: Tensor, dst: Tensor, accumulate: bool) -> Result<()>;
    /// `y = a + b`.
    fn add(&mut self, a: Tensor, b: Tensor, y: Tensor) -> Result<()>;

    // --- convolution ---------------------------------------------------------------------------------------
    fn conv2d_forward(
        &mut self,
        s: ConvShape,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        y: Tensor,
    ) -> Result<()>;
    /// `y = conv(x, w) + b (+ image_bias[image, o]) (+ residual)`: a convolution with the time-embedding add
    /// and the residual add of a ResNet block done in its epilogue, where the backend fuses them (CUDA);
    /// elsewhere the same three steps one after another, in the same order of additions.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_forward_fused(
        &mut self,
        s: ConvShape,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        image_bias: Option<Tensor>,
        residual: Option<Tensor>,
        y: Tensor,
    ) -> Result<()> {
        self.conv2d_forward(s, x, w, b, y)?;
        if let Some(t) = image_bias {
            let (oh, ow) = s.out_hw();
            self.add_image_bias(s.n, oh * ow, s.o, y, t)?;
        }
        match residual {
            Some(r) => self.accumulate(r, y, true),
            None => Ok(()),
        }
    }
    /// Whether [`Backend::group_norm_conv2d_forward`] and [`Backend::conv2d_backward_weight_normed`]
    /// apply the normalisation (and dropout) as the convolution loads its input, never touching
    /// `NormedInput::normed` or `DropoutAfter::dropped`: then the U-Net gives those no memory (only their
    /// gradients, which the convolution's input gradient writes).
    fn fuses_normalisation(&self) -> bool {
        false
    }
    /// Declares `weights` (a region of parameters placed by `alloc`, which the GEMM-shaped ops read as
    /// their `w`) so the backend may keep a copy of it in the arithmetic its GEMMs read. The CUDA backend
    /// keeps a bf16 copy, reserving [`weight_copy_len`] elements like `alloc` does (call it before the
    /// first op, never while recording), and keeps it equal to the region's bf16 rounding whatever writes
    /// the region. The default keeps none.
    fn keep_weight_copy(&mut self, weights: Tensor) -> Result<()> {
        let _ = weights;
        Ok(())
    }
    /// Whether [`Backend::keep_weight_copy`] reserves memory.
    fn keeps_weight_copies(&self) -> bool {
        false
    }
    /// Whether a network placed now should store its activations in bf16 ([`Dtype::Bf16`]) wherever the
    /// ops that meet them take bf16: true on a backend in bf16 precision whose kernels read and write them
    /// so. They are the residual stream (the input convolution's output, every block's output and
    /// shortcut, the resamplers' outputs, the up path's concatenations and upsampled maps), each ResNet
    /// block's hidden activation (its first convolution's output, time embedding added) and each
    /// attention block's q, k, v and attention output. The ops that meet them: [`Backend::conv2d_forward`]
    /// and [`Backend::group_norm_conv2d_forward`] (input, residual, output),
    /// [`Backend::conv2d_backward_weight`] and [`Backend::conv2d_backward_weight_normed`] (input),
    /// [`Backend::group_norm_forward`] and [`Backend::group_norm_backward`] (x),
    /// [`Backend::linear_forward_fused`] (input, residual, output) and [`Backend::linear_backward`] (x),
    /// [`Backend::concat_forward`] and [`Backend::upsample2x_forward`] (all stored alike),
    /// [`Backend::attention_forward`] and [`Backend::attention_backward`] (qkv, out). Their gradients,
    /// the statistics, the time embedding and the network's output stay fp32.
    fn stores_bf16_activations(&self) -> bool {
        false
    }
    /// Whether the backend writes each convolution's normalised input ([`NormedInput`]: group norm, SiLU,
    /// dropout) in bf16 into one scratch region it keeps for every normalised input of a network (sized by
    /// [`Backend::reserve_norm_scratch`]) and convolves that, in [`Backend::group_norm_conv2d_forward`]
    /// and again in [`Backend::conv2d_backward_weight_normed`]: the CUDA backend in bf16 precision, where
    /// this takes the normalisation out of the GEMMs' main loops. It still stores no normalised input of
    /// its own ([`Backend::fuses_normalisation`]).
    fn normalises_into_scratch(&self) -> bool {
        false
    }
    /// Makes the scratch region of [`Backend::normalises_into_scratch`] hold at least `len` bf16
    /// elements, reserving [`norm_scratch_len`] words like `alloc` does (call it before the first op,
    /// never while recording). A no-op on a backend that keeps none.
    fn reserve_norm_scratch(&mut self, len: usize) -> Result<()> {
        let _ = len;
        Ok(())
    }
    /// [`Backend::group_norm_forward`] then [`Backend::conv2d_forward_fused`] on its output, the
    /// normalisation fused into the convolution's operand load where the backend can (see
    /// [`NormedInput`]).
    #[allow(clippy::too_many_arguments)]
    fn group_norm_conv2d_forward(
        &mut self,
        s: ConvShape,
        input: NormedInput,
        w: Tensor,
        b: Tensor,
        image_bias: Option<Tensor>,
        residual: Option<Tensor>,
        y: Tensor,
    ) -> Result<()> {
        let n = input;
        self.group_norm_forward(n.s, n.x, n.gamma, n.beta, n.normed, n.mean, n.rstd, n.silu)?;
        if let Some(d) = n.dropout {
            self.dropout_forward(n.normed, d.dropped, d.p, d.seed, d.stream)?;
        }
        self.conv2d_forward_fused(s, n.conv_input(), w, b, image_bias, residual, y)
    }
    /// [`Backend::conv2d_backward_weight`] of a convolution run by
    /// [`Backend::group_norm_conv2d_forward`] (the same `input`, its statistics already computed): the
    /// fusing backends normalise again as they load.
    fn conv2d_backward_weight_normed(
        &mut self,
        s: ConvShape,
        input: NormedInput,
        dy: Tensor,
        dw: Tensor,
        db: Tensor,
    ) -> Result<()> {
        self.conv2d_backward_weight(s, input.conv_input(), dy, dw, db)
    }
    fn conv2d_backward_data(
        &mut self,
        s: ConvShape,
        dy: Tensor,
        w: Tensor,
        dx: Tensor,
        accumulate: bool,
    ) -> Result<()>;
    fn conv2d_backward_weight(
        &mut self,
        s: ConvShape,
        x: Tensor,
        dy: Tensor,
        dw: Tensor,
        db: Tensor,
    ) -> Result<()>;

    // --- normalisation and activations ---------------------------------------------------------------------
    /// `y = GN(x) * gamma + beta`, then SiLU when `silu`; saves mean and 1/std per (image, group).
    #[allow(clippy::too_many_arguments)]
    fn group_norm_forward(
        &mut self,
        s: GroupNormShape,
        x: Tensor,
        gamma: Tensor,
        beta: Tensor,
        y: Tensor,
        mean: Tensor,
        rstd: Tensor,
        silu: bool,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn group_norm_backward(
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
        accumulate: bool,
    ) -> Result<()>;
    fn silu_forward(&mut self, x: Tensor, y: Tensor) -> Result<()>;
    fn silu_backward(&mut self, x: Tensor, dy: Tensor, dx: Tensor, accumulate: bool) -> Result<()>;

    // --- linear and attention ------------------------------------------------------------------------------
    /// `y[m, n] = x[m, k] w[n, k]^T + b[n]`.
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &mut self,
        m: usize,
        k: usize,
        n: usize,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        y: Tensor,
    ) -> Result<()>;
    /// `y = x w^T + b + residual`: the attention block's residual add done in the layer's epilogue where
    /// the backend fuses it (CUDA); elsewhere the two steps one after another, in the same order.
    #[allow(clippy::too_many_arguments)]
    fn linear_forward_fused(
        &mut self,
        m: usize,
        k: usize,
        n: usize,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        residual: Tensor,
        y: Tensor,
    ) -> Result<()> {
        self.linear_forward(m, k, n, x, w, b, y)?;
        self.accumulate(residual, y, true)
    }
    /// `dx = dy w` (skipped when `dx` is `None`), `dw = dy^T x`, `db = sum_rows dy`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &mut self,
        m: usize,
        k: usize,
        n: usize,
        x: Tensor,
        w: Tensor,
        dy: Tensor,
        dx: Option<Tensor>,
        dw: Tensor,
        db: Tensor,
        accumulate: bool,
    ) -> Result<()>;
    fn attention_forward(
        &mut self,
        s: AttentionShape,
        qkv: Tensor,
        out: Tensor,
        lse: Tensor,
    ) -> Result<()>;
    /// Writes (overwrites) `dqkv`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &mut self,
        s: AttentionShape,
        qkv: Tensor,
        out: Tensor,
        lse: Tensor,
        dout: Tensor,
        dqkv: Tensor,
    ) -> Result<()>;

    // --- reshaping -----------------------------------------------------------------------------------------
    /// Nearest-neighbour x2 of `[n, h, w, c]` to `[n, 2h, 2w, c]`.
    #[allow(clippy::too_many_arguments)]
    fn upsample2x_forward(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        x: Tensor,
        y: Tensor,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn upsample2x_backward(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        dy: Tensor,
        dx: Tensor,
        accumulate: bool,
    ) -> Result<()>;
    /// `y[p] = [a[p], b[p]]` over `pixels` positions (channels `ca` then `cb`).
    fn concat_forward(
        &mut self,
        pixels: usize,
        ca: usize,
        cb: usize,
        a: Tensor,
        b: Tensor,
        y: Tensor,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn concat_backward(
        &mut self,
        pixels: usize,
        ca: usize,
        cb: usize,
        dy: Tensor,
        da: Tensor,
        db: Tensor,
        accumulate_a: bool,
        accumulate_b: bool,
    ) -> Result<()>;
    /// `y[i, p, c] += bias[i, c]` for `n` images of `hw` positions (the time-embedding add).
    fn add_image_bias(
        &mut self,
        n: usize,
        hw: usize,
        c: usize,
        y: Tensor,
        bias: Tensor,
    ) -> Result<()>;
    /// `dbias[i, c] = sum_p dy[i, p, c]` (overwrites).
    fn image_bias_backward(
        &mut self,
        n: usize,
        hw: usize,
        c: usize,
        dy: Tensor,
        dbias: Tensor,
    ) -> Result<()>;

    // --- the diffusion model's own ops ---------------------------------------------------------------------
    /// `y[i, :] += table[labels[i], :]`: the class embedding added to the time embedding. A label
    /// outside `0..classes` is an error on the CPU and adds nothing on a device (the host checks labels
    /// as it uploads them: `UNet::set_labels`).
    fn class_embedding_add(
        &mut self,
        s: ClassEmbedShape,
        table: Tensor,
        labels: Tensor,
        y: Tensor,
    ) -> Result<()>;
    /// `dtable[k, :] = sum of dy[i, :] over the images with labels[i] = k`, summed in image order
    /// (overwrites; rows of absent classes are zero).
    fn class_embedding_backward(
        &mut self,
        s: ClassEmbedShape,
        labels: Tensor,
        dy: Tensor,
        dtable: Tensor,
    ) -> Result<()>;
    /// Sinusoidal embedding `[n, dim]` of `n` timesteps: `[sin(t f_i), cos(t f_i)]`,
    /// `f_i = exp(-ln(10000) i / (dim/2 - 1))`.
    fn timestep_embedding(&mut self, n: usize, dim: usize, t: Tensor, y: Tensor) -> Result<()>;
    /// Inverted dropout: keeps element `e` when `uniform(seed, stream.at(clock), e) >= p`, scaling by
    /// `1 / (1 - p)`.
    fn dropout_forward(
        &mut self,
        x: Tensor,
        y: Tensor,
        p: f32,
        seed: u64,
        stream: Stream,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn dropout_backward(
        &mut self,
        dy: Tensor,
        dx: Tensor,
        p: f32,
        seed: u64,
        stream: Stream,
        accumulate: bool,
    ) -> Result<()>;
    /// `loss[0] = mean((pred - target)^2)`, `dpred = 2 (pred - target) / len`.
    fn mse_loss(&mut self, pred: Tensor, target: Tensor, loss: Tensor, dpred: Tensor)
        -> Result<()>;
    /// The forward process for a batch: draws `eps` (Philox normal of elements `first_element + i` of
    /// `stream.at(clock)`) and writes `x_t = sqrt_ab[t] x0 + sqrt_1m_ab[t] eps`, `t = timesteps[i / per_image]`.
    #[allow(clippy::too_many_arguments)]
    fn noise_add(
        &mut self,
        x0: Tensor,
        timesteps: Tensor,
        sqrt_ab: Tensor,
        sqrt_1m_ab: Tensor,
        x_t: Tensor,
        eps: Tensor,
        per_image: usize,
        first_element: u64,
        seed: u64,
        stream: Stream,
    ) -> Result<()>;
    /// Fills `x` with Philox normal draws of elements `first_element + i`.
    fn normal(&mut self, x: Tensor, first_element: u64, seed: u64, stream: u64) -> Result<()>;
    /// Training timesteps: `timesteps[i] = below(seed, stream.at(clock), i, steps)` (`rng::below`), as
    /// floats.
    fn draw_timesteps(
        &mut self,
        timesteps: Tensor,
        steps: usize,
        seed: u64,
        stream: Stream,
    ) -> Result<()>;

    // --- the training clock: the step number that per-step streams and Adam's schedule read ------------
    /// Sets the clock, in order with the ops around it (not while recording: a recorded step reads the
    /// clock when it is replayed, so the caller sets it before each replay).
    fn clock_set(&mut self, step: u64) -> Result<()>;
    /// `ring[slot * src.len + i] = src[i]`, `slot = clock % (ring.len / src.len)`: a log of per-step
    /// values that the host reads a chunk at a time.
    fn log_at_clock(&mut self, src: Tensor, ring: Tensor) -> Result<()>;

    // --- the sampler: a table of rows and a step counter that live with the backend --------------------
    /// Installs a sampler table and sets the counter to its last row.
    fn sampler_load(&mut self, rows: &[SamplerRow]) -> Result<()>;
    /// The row the counter points at (`None` when the table is exhausted).
    fn sampler_position(&mut self) -> Result<Option<usize>>;
    /// `timesteps[i] = table[step].t` for every image.
    fn sampler_timesteps(&mut self, timesteps: Tensor) -> Result<()>;
    /// One reverse step with the current row (see [`ReverseStep`]). `x_prev` may be `x_t`.
    fn sampler_step(
        &mut self,
        x_t: Tensor,
        eps_hat: Tensor,
        x_prev: Tensor,
        step: ReverseStep,
    ) -> Result<()>;
    /// Moves the counter to the next row (one step down).
    fn sampler_advance(&mut self) -> Result<()>;

    // --- optimisation --------------------------------------------------------------------------------------
    /// `out[0] = sqrt(sum grads^2)`.
    fn global_norm(&mut self, grads: Tensor, out: Tensor) -> Result<()>;
    /// One Adam(W) step over the flat parameter buffer, update number `clock + 1`; reads the gradient norm
    /// from `norm[0]` for clipping and skips the update (parameters and moments unchanged) when the norm
    /// is not finite.
    #[allow(clippy::too_many_arguments)]
    fn adam_step(
        &mut self,
        params: Tensor,
        grads: Tensor,
        m: Tensor,
        v: Tensor,
        norm: Tensor,
        hp: AdamHyper,
    ) -> Result<()>;
    /// `ema = decay * ema + (1 - decay) * params`.
    fn ema_update(&mut self, ema: Tensor, params: Tensor, decay: f32) -> Result<()>;

    // --- replayable sequences ------------------------------------------------------------------------------
    /// Starts recording the ops that follow, up to [`Backend::capture_end`], as sequence `seq` (replacing
    /// an earlier recording of it), which [`Backend::replay`] runs again with no host work (a CUDA graph).
    /// Returns false where the backend does not record (the CPU): the caller then runs the ops itself each
    /// time. Recorded ops do not run while they are recorded, and must not download, upload or allocate.
    fn capture_begin(&mut self, seq: Sequence) -> Result<bool> {
        let _ = seq;
        Ok(false)
    }
    fn capture_end(&mut self) -> Result<()> {
        Ok(())
    }
    /// An id of the current recording of `seq`, new with each recording; `None` when there is none (never
    /// recorded, or forgotten because memory moved). A caller keeps the id it recorded and replays only
    /// while it is current: another caller may have recorded `seq` since.
    fn recording_id(&self, seq: Sequence) -> Option<u64> {
        let _ = seq;
        None
    }
    /// Runs recorded sequence `seq` once more (queued; nothing waits for it).
    fn replay(&mut self, seq: Sequence) -> Result<()> {
        Err(Error::Invalid(format!(
            "this backend records no sequences (asked to replay {seq:?})"
        )))
    }
    /// Waits for everything queued (a no-op on the CPU).
    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }
    /// Starts timing each kernel launched from now to [`Backend::profile_end`] (ops run one by one, not
    /// recorded). False where the backend has no kernels to time (the CPU).
    fn profile_begin(&mut self) -> Result<bool> {
        Ok(false)
    }
    /// Waits for everything queued and returns each kernel launched since [`Backend::profile_begin`], in
    /// launch order ([`Launch`]: its name and milliseconds, between events recorded just before and after
    /// its launch, so including any wait of the device for the host's launch).
    fn profile_end(&mut self) -> Result<Vec<Launch>> {
        Ok(Vec::new())
    }
    /// How many more elements `alloc` can reserve before memory runs out (device memory on a GPU, the
    /// host's available memory on the CPU), where the backend can tell.
    fn memory_available(&self) -> Option<usize> {
        None
    }
    /// Memory this backend holds, in bytes: (tensors, scratch). Tensors are everything `alloc` handed out
    /// (the one arena: the peak, since nothing is freed before the backend is); scratch is the fixed
    /// workspace of the kernels that need one.
    fn bytes_held(&self) -> (usize, usize);
    /// The arithmetic of the GEMM-shaped ops (see [`Precision`]).
    fn precision(&self) -> Precision {
        Precision::Fp32
    }
    /// Runs the GEMM-shaped ops in `p` from now on; an error where the backend has no such arithmetic.
    fn set_precision(&mut self, p: Precision) -> Result<()> {
        match p {
            Precision::Fp32 => Ok(()),
            _ => Err(Error::Invalid(format!(
                "{} computes in fp32 only (asked for {})",
                self.describe(),
                p.name()
            ))),
        }
    }
    /// Runs the bf16 convolutions (forward, input and weight gradients; not those that normalise their
    /// input, nor the linear layers) on `rung` from now on, or on the bf16 kernels' own core with `None`:
    /// for the bench and the tests of the ladder's other rungs. Returns whether the backend and device
    /// have that rung (`false`: nothing changed). fp32 convolutions are not affected.
    fn set_rung(&mut self, rung: Option<Rung>) -> Result<bool> {
        Ok(rung.is_none())
    }
    /// The arithmetic peak of `p`'s GEMMs from the device's specification, in TFLOP/s, where the backend
    /// knows it.
    fn stated_peak_tflops(&self, p: Precision) -> Option<f64> {
        let _ = p;
        None
    }
    /// The same peak measured here, with the instructions the GEMMs use and nothing else in the loop.
    fn measure_peak_tflops(&mut self, p: Precision) -> Result<Option<f64>> {
        let _ = p;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bf16 tensor covers half a word per element (rounded up), slices from even elements only, and
    /// overlaps by words; an op refuses it unless it names the argument as one its kernels take in bf16.
    #[test]
    fn bf16_tensors_cover_half_words_and_only_named_arguments_take_them() {
        let t = Tensor::bf16(8, 7);
        assert_eq!((t.words(), t.end()), (4, 12));
        let s = t.slice(4, 3);
        assert_eq!((s.off, s.len, s.dtype), (10, 3, Dtype::Bf16));
        assert!(t.overlaps(Tensor::new(11, 1)));
        assert!(!t.overlaps(Tensor::new(12, 4)));
        let out = Tensor::new(12, 7);
        let ins = [("x", t, 7)];
        let outs = [("y", out, 7)];
        assert!(check_args("op", 100, "test", &ins, &outs).is_err());
        check_args_stored("op", 100, "test", &ins, &outs, &["x"]).unwrap();
        let e = check_args_stored("op", 100, "test", &ins, &outs, &["y"]).unwrap_err();
        assert!(e.to_string().contains("bf16"), "{e}");
        // Bounds count words: 7 bf16 elements from word 8 end at word 12.
        check_args_stored("op", 12, "test", &ins, &[], &["x"]).unwrap();
        assert!(check_args_stored("op", 11, "test", &ins, &[], &["x"]).is_err());
        // An fp32 output over the bf16 input's last word clashes.
        let clash = [("y", Tensor::new(11, 7), 7)];
        assert!(check_args_stored("op", 100, "test", &ins, &clash, &["x"]).is_err());
    }
}

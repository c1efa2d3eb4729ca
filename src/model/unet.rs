//! The U-Net of the paper (diffusers' `UNet2DModel` with one attention head), forward and backward over a
//! [`Backend`]. Built once for a batch size: every parameter, gradient, activation and activation gradient
//! has its place in the backend's arena before the first step, so a step allocates nothing.

use super::config::UNetConfig;
use super::params::{legacy_name, Kind, NamedTensor, ParamSpec};
use crate::backend::{
    norm_scratch_len, weight_copy_len, AttentionShape, Backend, ClassEmbedShape, ConvKind,
    ConvShape, DropoutAfter, GroupNormShape, Layout, NormedInput, Stream, Tensor,
};
use crate::error::{Error, Result};
use crate::rng;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Lays out parameters and activations, and the activations' gradients. The model is built twice: once
/// to count, once at the real offsets.
///
/// An activation made inside a block (a ResNet or attention block: its normalisations, convolutions,
/// projections) has a gradient that lives only while that block's backward runs, so those gradients
/// share one scratch region, as large as the largest block's.
///
/// The up path is built in *units*: each layer (its concatenation, ResNet block and attention block)
/// and each upsampler (the upsampled tensor and its convolution). A unit's gradients outside its blocks
/// (its concatenation, its blocks' outputs, its upsampled tensor) live only from the backward of the unit
/// after it, which writes the gradient of this unit's output (its only consumer: the next layer's
/// concatenation, the upsampler, or the final normalisation), to the end of this unit's backward; the
/// backward runs the units in reverse. So units alternate between two regions, each as large as the
/// largest unit of its parity: unit k's gradients are dead before unit k - 2, which shares its region,
/// writes any. That takes the up path's gradients (the largest, at the highest resolution) from the sum
/// of all units to two units' worth.
///
/// The others (the down path's outputs, which the up path reads as skips and whose gradients live from
/// there to the down path's backward; the middle blocks; the embeddings; the output convolution) each
/// have their own.
///
/// Every group norm's output (and the dropout after one) is the input of one convolution. A backend that
/// applies the normalisation as that convolution loads its input ([`Backend::fuses_normalisation`])
/// never writes or reads it, so for such a backend it is *unstored*: a handle far outside the arena, with
/// a gradient (which the convolution's backward does write) but no memory of its own.
struct Builder {
    specs: Vec<ParamSpec>,
    params: usize,
    grads: usize,
    acts: usize,
    act_next: usize,
    /// Where the gradients start, when the net has gradients, and the sizes of their regions (from a
    /// counting build; zeros in one).
    grad_base: Option<usize>,
    sizes: GradLens,
    grad_next: usize,
    scratch_next: usize,
    scratch_max: usize,
    /// The up path's unit being built (see above): its count, and its gradients' next offset and the
    /// largest unit of each parity.
    up_unit: Option<usize>,
    up_next: usize,
    up_max: [usize; 2],
    in_block: bool,
    /// Activation offset -> gradient offset.
    grad_of: HashMap<usize, usize>,
    /// Whether normalised inputs are unstored (the backend fuses the normalisations), and the next
    /// unstored handle.
    fused: bool,
    unstored_next: usize,
    /// The largest normalised input (the scratch region of [`Backend::normalises_into_scratch`]).
    norm_max: usize,
    /// Whether activations are stored in bf16 where their ops take it
    /// ([`Backend::stores_bf16_activations`]).
    bf16_activations: bool,
}

/// The elements of the activations' gradients, by region (see [`Builder`]): those with a place of
/// their own, the two regions the up path's units alternate between, and the blocks' shared scratch; laid
/// out in that order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct GradLens {
    own: usize,
    up: [usize; 2],
    scratch: usize,
}

impl GradLens {
    fn total(&self) -> usize {
        self.own + self.up[0] + self.up[1] + self.scratch
    }
}

/// The alignment, in words (128 bytes), of the activations stored in bf16 and of every activation's
/// gradient: what the swizzled copies of ladder version 8 need of a tensor's start (backends start every
/// allocation so aligned: [`Backend::alloc`]).
const ALIGN: usize = 32;

/// Where unstored activations' handles start: past any arena (`UNet::size_guard` keeps arenas under
/// 2^50 elements), so an op handed one by mistake refuses it as outside the backend's memory.
const UNSTORED: usize = 1 << 60;

#[derive(Clone, Copy, Debug)]
struct Param {
    value: Tensor,
    grad: Tensor,
}

impl Builder {
    fn param(&mut self, name: String, kind: Kind, len: usize, init_scale: f64) -> Param {
        let offset = self.specs.last().map_or(0, |s| s.offset + s.len);
        self.specs.push(ParamSpec {
            name,
            kind,
            offset,
            len,
            init_scale,
        });
        Param {
            value: Tensor::new(self.params + offset, len),
            grad: Tensor::new(self.grads + offset, len),
        }
    }
    /// An activation; inside a block, one whose gradient is the block's own.
    fn act(&mut self, len: usize) -> Tensor {
        self.act_in(len, self.in_block)
    }
    fn act_in(&mut self, len: usize, scratch: bool) -> Tensor {
        let t = Tensor::new(self.acts + self.act_next, len);
        self.act_next += len;
        self.grad_for(t, scratch);
        t
    }
    /// An activation every op that meets it takes in bf16 (see [`Backend::stores_bf16_activations`]):
    /// in bf16 where the backend stores those so, 128-byte aligned ([`ALIGN`] words) for the kernels'
    /// vector loads and swizzled copies; inside a block, one whose gradient is the block's own. The 31
    /// words of padding are reserved wherever the arena starts, so a counting build and the real one agree
    /// on every size.
    fn act16(&mut self, len: usize) -> Tensor {
        self.act16_in(len, self.in_block)
    }
    /// [`Builder::act16`] with a gradient of its own even inside a block (a block's output).
    fn act16_kept(&mut self, len: usize) -> Tensor {
        self.act16_in(len, false)
    }
    fn act16_in(&mut self, len: usize, scratch: bool) -> Tensor {
        if !self.bf16_activations {
            return self.act_in(len, scratch);
        }
        let start = self.acts + self.act_next;
        let t = Tensor::bf16(start.next_multiple_of(ALIGN), len);
        self.act_next += t.words() + ALIGN - 1;
        self.grad_for(t, scratch);
        t
    }
    /// A normalised input: unstored when the backend fuses normalisations into the convolutions, else
    /// an activation like any other. Its gradient is placed as any activation's.
    fn act_normalised(&mut self, len: usize) -> Tensor {
        self.norm_max = self.norm_max.max(len);
        if !self.fused {
            return self.act(len);
        }
        let t = Tensor::new(UNSTORED + self.unstored_next, len);
        self.unstored_next += len;
        self.grad_for(t, self.in_block);
        t
    }
    /// Places the gradient of activation `t`: in the block scratch, in the region of the up path's
    /// current unit, or in a place of its own.
    fn grad_for(&mut self, t: Tensor, scratch: bool) {
        let base = self.grad_base.unwrap_or(0);
        let s = self.sizes;
        // Each gradient takes a whole number of ALIGN words, so every one starts 128-byte aligned when
        // the gradients do (the kernels' swizzled copies read them).
        let len = t.len.next_multiple_of(ALIGN);
        let grad = if scratch {
            let g = base + s.own + s.up[0] + s.up[1] + self.scratch_next;
            self.scratch_next += len;
            self.scratch_max = self.scratch_max.max(self.scratch_next);
            g
        } else if let Some(unit) = self.up_unit {
            let parity = unit % 2;
            let g = base + s.own + parity * s.up[0] + self.up_next;
            self.up_next += len;
            self.up_max[parity] = self.up_max[parity].max(self.up_next);
            g
        } else {
            let g = base + self.grad_next;
            self.grad_next += len;
            g
        };
        if self.grad_base.is_some() {
            self.grad_of.insert(t.off, grad);
        }
    }
    /// Starts the next unit of the up path (see [`Builder`]).
    fn next_up_unit(&mut self) {
        self.up_unit = Some(self.up_unit.map_or(0, |u| u + 1));
        self.up_next = 0;
    }
    /// Starts a block: its activations' gradients take the scratch region from its start.
    fn begin_block(&mut self) {
        self.in_block = true;
        self.scratch_next = 0;
    }
    fn end_block(&mut self) {
        self.in_block = false;
    }
    fn conv(&mut self, name: &str, s: ConvShape, init_scale: f64) -> Conv {
        let y = self.act(s.y_len());
        self.conv_into(name, s, init_scale, y)
    }
    /// A convolution whose output is in the residual stream ([`Builder::act16`]).
    fn conv16(&mut self, name: &str, s: ConvShape, init_scale: f64) -> Conv {
        let y = self.act16(s.y_len());
        self.conv_into(name, s, init_scale, y)
    }

    /// A convolution whose output is `y`, an activation allocated by the caller.
    fn conv_into(&mut self, name: &str, s: ConvShape, init_scale: f64, y: Tensor) -> Conv {
        let k = s.kind.taps();
        let w = self.param(
            format!("{name}.weight"),
            Kind::Conv { o: s.o, c: s.c, k },
            s.w_len(),
            init_scale,
        );
        let b = self.param(format!("{name}.bias"), Kind::Bias, s.o, 0.0);
        Conv { s, w, b, y }
    }
    fn norm(&mut self, name: &str, s: GroupNormShape, silu: bool) -> Norm {
        let gamma = self.param(format!("{name}.weight"), Kind::Gamma, s.c, 0.0);
        let beta = self.param(format!("{name}.bias"), Kind::Beta, s.c, 0.0);
        Norm {
            s,
            gamma,
            beta,
            silu,
            y: self.act_normalised(s.len()),
            mean: self.act(s.stats_len()),
            rstd: self.act(s.stats_len()),
        }
    }
    fn linear(&mut self, name: &str, m: usize, inp: usize, out: usize, init_scale: f64) -> Linear {
        let y = self.act(m * out);
        self.linear_into(name, m, inp, out, init_scale, y)
    }

    /// A linear layer whose output is `y`, an activation allocated by the caller.
    fn linear_into(
        &mut self,
        name: &str,
        m: usize,
        inp: usize,
        out: usize,
        init_scale: f64,
        y: Tensor,
    ) -> Linear {
        let w = self.param(
            format!("{name}.weight"),
            Kind::Linear { out, inp },
            out * inp,
            init_scale,
        );
        let b = self.param(format!("{name}.bias"), Kind::Bias, out, 0.0);
        Linear {
            m,
            k: inp,
            n: out,
            w,
            b,
            y,
        }
    }
}

/// Which gradients have been written in this backward pass: the first write overwrites, later ones add.
#[derive(Default)]
struct Tape {
    written: HashSet<usize>,
}

impl Tape {
    /// Whether a write to the gradient of activation `x` adds (it was written before in this pass) or
    /// overwrites. Keyed by the activation: gradients in the block scratch share offsets.
    fn accumulate(&mut self, x: Tensor) -> bool {
        !self.written.insert(x.off)
    }
}

struct Conv {
    s: ConvShape,
    w: Param,
    b: Param,
    y: Tensor,
}

impl Conv {
    fn forward<B: Backend>(&self, be: &mut B, x: Tensor) -> Result<Tensor> {
        be.conv2d_forward(self.s, x, self.w.value, self.b.value, self.y)?;
        Ok(self.y)
    }
    /// The forward of `conv(norm(x))`, the normalisation fused into the operand load where the backend
    /// can (`Backend::group_norm_conv2d_forward`).
    fn forward_normed<B: Backend>(
        &self,
        be: &mut B,
        input: NormedInput,
        image_bias: Option<Tensor>,
        residual: Option<Tensor>,
    ) -> Result<Tensor> {
        be.group_norm_conv2d_forward(
            self.s,
            input,
            self.w.value,
            self.b.value,
            image_bias,
            residual,
            self.y,
        )?;
        Ok(self.y)
    }
    fn backward<B: Backend>(
        &self,
        be: &mut B,
        net: &Ctx,
        tape: &mut Tape,
        x: Tensor,
        dy: Tensor,
        want_dx: bool,
    ) -> Result<()> {
        be.conv2d_backward_weight(self.s, x, dy, self.w.grad, self.b.grad)?;
        self.backward_data(be, net, tape, x, dy, want_dx)
    }
    /// The backward of [`Conv::forward_normed`]: the input gradient goes to the gradient of
    /// `input.conv_input()` (where the dropout's or the normalisation's backward takes it).
    fn backward_normed<B: Backend>(
        &self,
        be: &mut B,
        net: &Ctx,
        tape: &mut Tape,
        input: NormedInput,
        dy: Tensor,
    ) -> Result<()> {
        be.conv2d_backward_weight_normed(self.s, input, dy, self.w.grad, self.b.grad)?;
        self.backward_data(be, net, tape, input.conv_input(), dy, true)
    }
    fn backward_data<B: Backend>(
        &self,
        be: &mut B,
        net: &Ctx,
        tape: &mut Tape,
        x: Tensor,
        dy: Tensor,
        want_dx: bool,
    ) -> Result<()> {
        if want_dx {
            let dx = net.grad(x);
            be.conv2d_backward_data(self.s, dy, self.w.value, dx, tape.accumulate(x))?;
        }
        Ok(())
    }
}

struct Norm {
    s: GroupNormShape,
    gamma: Param,
    beta: Param,
    silu: bool,
    y: Tensor,
    mean: Tensor,
    rstd: Tensor,
}

impl Norm {
    /// This normalisation of `x` as the input of a convolution that may apply it as it loads.
    fn of(&self, x: Tensor) -> NormedInput {
        NormedInput {
            s: self.s,
            x,
            gamma: self.gamma.value,
            beta: self.beta.value,
            mean: self.mean,
            rstd: self.rstd,
            silu: self.silu,
            normed: self.y,
            dropout: None,
        }
    }
    fn backward<B: Backend>(
        &self,
        be: &mut B,
        net: &Ctx,
        tape: &mut Tape,
        x: Tensor,
    ) -> Result<()> {
        let dx = net.grad(x);
        let acc = tape.accumulate(x);
        be.group_norm_backward(
            self.s,
            x,
            self.gamma.value,
            self.beta.value,
            self.mean,
            self.rstd,
            net.grad(self.y),
            dx,
            self.gamma.grad,
            self.beta.grad,
            self.silu,
            acc,
        )
    }
}

struct Linear {
    m: usize,
    k: usize,
    n: usize,
    w: Param,
    b: Param,
    y: Tensor,
}

impl Linear {
    fn forward<B: Backend>(&self, be: &mut B, x: Tensor) -> Result<Tensor> {
        be.linear_forward(
            self.m,
            self.k,
            self.n,
            x,
            self.w.value,
            self.b.value,
            self.y,
        )?;
        Ok(self.y)
    }
    /// The forward with `residual` added in the layer's epilogue.
    fn forward_fused<B: Backend>(&self, be: &mut B, x: Tensor, residual: Tensor) -> Result<Tensor> {
        be.linear_forward_fused(
            self.m,
            self.k,
            self.n,
            x,
            self.w.value,
            self.b.value,
            residual,
            self.y,
        )?;
        Ok(self.y)
    }
    fn backward<B: Backend>(
        &self,
        be: &mut B,
        net: &Ctx,
        tape: &mut Tape,
        x: Tensor,
        want_dx: bool,
    ) -> Result<()> {
        let dx = want_dx.then(|| net.grad(x));
        let acc = dx.is_some() && tape.accumulate(x);
        be.linear_backward(
            self.m,
            self.k,
            self.n,
            x,
            self.w.value,
            net.grad(self.y),
            dx,
            self.w.grad,
            self.b.grad,
            acc,
        )
    }
}

/// Addresses shared by all blocks: the gradient region's offset and the dropout draw of this step.
struct Ctx {
    /// Activation offset -> gradient offset (empty in an inference net, which has no gradients).
    grads: HashMap<usize, usize>,
    dropout: Option<(f32, u64, Stream)>,
}

impl Ctx {
    fn grad(&self, t: Tensor) -> Tensor {
        match self.grads.get(&t.off) {
            Some(&g) => Tensor::new(g, t.len),
            // An inference net: its gradient handles alias the activations, and `training: false` keeps
            // the backward pass from running.
            None => {
                assert!(self.grads.is_empty(), "activation {t:?} has no gradient");
                t
            }
        }
    }
}

/// `ResnetBlock2D`: `h = conv1(silu(gn1(x))) + proj(silu(temb))`, `h = conv2(dropout(silu(gn2(h))))`,
/// `out = shortcut(x) + h`.
struct ResBlock {
    index: usize,
    n: usize,
    hw: usize,
    norm1: Norm,
    conv1: Conv,
    temb: Linear,
    norm2: Norm,
    dropped: Tensor,
    conv2: Conv,
    shortcut: Option<Conv>,
    out: Tensor,
}

impl ResBlock {
    #[allow(clippy::too_many_arguments)]
    fn build(
        b: &mut Builder,
        cfg: &UNetConfig,
        name: &str,
        index: usize,
        n: usize,
        h: usize,
        cin: usize,
        cout: usize,
    ) -> Self {
        b.begin_block();
        let (g, eps) = (cfg.norm_num_groups, cfg.norm_eps as f32);
        let hw = h * h;
        let gn = |c| GroupNormShape {
            n,
            hw,
            c,
            groups: g,
            eps,
        };
        let conv = |c, o, kind| ConvShape {
            n,
            h,
            w: h,
            c,
            o,
            kind,
        };
        let norm1 = b.norm(&format!("{name}.norm1"), gn(cin), true);
        let s1 = conv(cin, cout, ConvKind::K3S1);
        let hidden = b.act16(s1.y_len());
        let conv1 = b.conv_into(&format!("{name}.conv1"), s1, 1.0, hidden);
        let temb = b.linear(
            &format!("{name}.time_emb_proj"),
            n,
            cfg.time_embed_dim(),
            cout,
            1.0,
        );
        let norm2 = b.norm(&format!("{name}.norm2"), gn(cout), true);
        // conv2 writes the block's output: the residual is added in its epilogue.
        let out = b.act16_kept(n * hw * cout);
        let conv2 = b.conv_into(
            &format!("{name}.conv2"),
            conv(cout, cout, ConvKind::K3S1),
            0.0,
            out,
        );
        let shortcut = (cin != cout).then(|| {
            b.conv16(
                &format!("{name}.conv_shortcut"),
                conv(cin, cout, ConvKind::K1),
                1.0,
            )
        });
        let dropped = if cfg.dropout > 0.0 {
            b.act_normalised(n * hw * cout)
        } else {
            norm2.y
        };
        b.end_block();
        Self {
            index,
            n,
            hw,
            norm1,
            conv1,
            temb,
            norm2,
            dropped,
            conv2,
            shortcut,
            out,
        }
    }

    fn forward<B: Backend>(
        &self,
        be: &mut B,
        net: &Ctx,
        x: Tensor,
        temb_act: Tensor,
    ) -> Result<Tensor> {
        // The time-embedding add and the residual add happen in the convolutions' epilogues, so their
        // inputs come first: the projection of the embedding, and the shortcut. Each group norm + SiLU
        // (and the dropout after the second) is applied as its convolution loads its input, where the
        // backend fuses them.
        let t = self.temb.forward(be, temb_act)?;
        self.conv1
            .forward_normed(be, self.norm1.of(x), Some(t), None)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(be, x)?,
            None => x,
        };
        self.conv2
            .forward_normed(be, self.conv2_input(net), None, Some(skip))
    }

    /// conv2's input: `dropout(silu(norm2(conv1.y)))`, the dropout only when it is on.
    fn conv2_input(&self, net: &Ctx) -> NormedInput {
        let mut input = self.norm2.of(self.conv1.y);
        if let Some((p, seed, stream)) = net.dropout.filter(|_| self.dropped != self.norm2.y) {
            input.dropout = Some(DropoutAfter {
                p,
                seed,
                stream: stream.offset(self.index as u64),
                dropped: self.dropped,
            });
        }
        input
    }

    fn backward<B: Backend>(
        &self,
        be: &mut B,
        net: &Ctx,
        tape: &mut Tape,
        x: Tensor,
        temb_act: Tensor,
    ) -> Result<()> {
        let dout = net.grad(self.out);
        let input = self.conv2_input(net);
        self.conv2.backward_normed(be, net, tape, input, dout)?;
        if let Some(d) = input.dropout {
            let dx = net.grad(self.norm2.y);
            be.dropout_backward(
                net.grad(d.dropped),
                dx,
                d.p,
                d.seed,
                d.stream,
                tape.accumulate(self.norm2.y),
            )?;
        }
        self.norm2.backward(be, net, tape, self.conv1.y)?;
        let dh = net.grad(self.conv1.y);
        be.image_bias_backward(self.n, self.hw, self.conv1.s.o, dh, net.grad(self.temb.y))?;
        self.temb.backward(be, net, tape, temb_act, true)?;
        self.conv1
            .backward_normed(be, net, tape, self.norm1.of(x), dh)?;
        self.norm1.backward(be, net, tape, x)?;
        match &self.shortcut {
            Some(c) => c.backward(be, net, tape, x, dout, true),
            None => {
                let dx = net.grad(x);
                be.accumulate(dout, dx, tape.accumulate(x))
            }
        }
    }
}

/// Diffusers' `Attention` with one head: `x + to_out(softmax(q k^T / sqrt(C)) v)`, q, k, v from `GN(x)`.
struct AttnBlock {
    norm: Norm,
    /// to_q, to_k and to_v side by side: one `[3C, C]` projection, run as the 1x1 convolution it is
    /// (weights `[3C, 1, 1, C]`, the same memory), so the group norm is applied as it loads its input.
    qkv: Conv,
    shape: AttentionShape,
    attn: Tensor,
    lse: Tensor,
    proj: Linear,
    out: Tensor,
}

impl AttnBlock {
    fn build(b: &mut Builder, cfg: &UNetConfig, name: &str, n: usize, h: usize, c: usize) -> Self {
        b.begin_block();
        let l = h * h;
        let norm = b.norm(
            &format!("{name}.group_norm"),
            GroupNormShape {
                n,
                hw: l,
                c,
                groups: cfg.norm_num_groups,
                eps: cfg.norm_eps as f32,
            },
            false,
        );
        // Weights of q, k, v adjacent, then their biases adjacent, so that they form one [3C, C] linear.
        let wq = b.param(
            format!("{name}.to_q.weight"),
            Kind::Linear { out: c, inp: c },
            c * c,
            1.0,
        );
        b.param(
            format!("{name}.to_k.weight"),
            Kind::Linear { out: c, inp: c },
            c * c,
            1.0,
        );
        b.param(
            format!("{name}.to_v.weight"),
            Kind::Linear { out: c, inp: c },
            c * c,
            1.0,
        );
        let bq = b.param(format!("{name}.to_q.bias"), Kind::Bias, c, 0.0);
        b.param(format!("{name}.to_k.bias"), Kind::Bias, c, 0.0);
        b.param(format!("{name}.to_v.bias"), Kind::Bias, c, 0.0);
        let widen = |p: Param, len| Param {
            value: Tensor::new(p.value.off, len),
            grad: Tensor::new(p.grad.off, len),
        };
        let qkv = Conv {
            s: ConvShape {
                n,
                h,
                w: h,
                c,
                o: 3 * c,
                kind: ConvKind::K1,
            },
            w: widen(wq, 3 * c * c),
            b: widen(bq, 3 * c),
            // Read only by the attention kernels, which take it in bf16 too.
            y: b.act16(n * l * 3 * c),
        };
        // Read by the projection and by attention's backward, which take it in bf16 too.
        let attn = b.act16(n * l * c);
        let lse = b.act(n * l);
        // The projection writes the block's output: the residual is added in its epilogue.
        let out = b.act16_kept(n * l * c);
        let proj = b.linear_into(&format!("{name}.to_out.0"), n * l, c, c, 0.0, out);
        b.end_block();
        Self {
            norm,
            qkv,
            shape: AttentionShape { n, l, c },
            attn,
            lse,
            proj,
            out,
        }
    }

    fn forward<B: Backend>(&self, be: &mut B, x: Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward_normed(be, self.norm.of(x), None, None)?;
        be.attention_forward(self.shape, qkv, self.attn, self.lse)?;
        self.proj.forward_fused(be, self.attn, x)
    }

    fn backward<B: Backend>(
        &self,
        be: &mut B,
        net: &Ctx,
        tape: &mut Tape,
        x: Tensor,
    ) -> Result<()> {
        // The projection's output is the block's output, so its gradient is already dout.
        let dout = net.grad(self.out);
        self.proj.backward(be, net, tape, self.attn, true)?;
        be.attention_backward(
            self.shape,
            self.qkv.y,
            self.attn,
            self.lse,
            net.grad(self.attn),
            net.grad(self.qkv.y),
        )?;
        self.qkv
            .backward_normed(be, net, tape, self.norm.of(x), net.grad(self.qkv.y))?;
        self.norm.backward(be, net, tape, x)?;
        let dx = net.grad(x);
        be.accumulate(dout, dx, tape.accumulate(x))
    }
}

/// One layer of a level: a ResBlock, optionally preceded by a skip concatenation and followed by attention.
struct Layer {
    /// Up path: `concat(h, skip)` into this tensor, with the skip's handle and channel counts.
    concat: Option<(Tensor, Tensor, usize, usize)>,
    res: ResBlock,
    attn: Option<AttnBlock>,
}

impl Layer {
    fn output(&self) -> Tensor {
        self.attn.as_ref().map_or(self.res.out, |a| a.out)
    }
}

/// Downsample (3x3 stride 2) or nearest upsample followed by a 3x3 conv.
struct Resample {
    up: Option<(usize, usize, usize, usize, Tensor)>,
    conv: Conv,
}

struct Level {
    layers: Vec<Layer>,
    resample: Option<Resample>,
}

/// The U-Net for a fixed batch size, its tensors placed in a backend's arena.
pub struct UNet {
    pub config: UNetConfig,
    pub batch: usize,
    training: bool,
    specs: Vec<ParamSpec>,
    /// All parameters, flat (the optimizer and EMA treat them as one buffer).
    pub params: Tensor,
    /// Their gradients, same layout.
    pub grads: Tensor,
    /// Model input `[batch, size, size, in_channels]` (NHWC) and timesteps `[batch]` (integers as f32).
    pub input: Tensor,
    pub timesteps: Tensor,
    /// A class-conditional model's labels `[batch]` (integers as f32; [`UNet::set_labels`] checks them).
    pub labels: Option<Tensor>,
    acts: Tensor,
    /// Elements of the activations' gradients, by region.
    grad_lens: GradLens,
    /// The largest normalised input's elements.
    norm_max: usize,
    ctx: Ctx,
    temb_sin: Tensor,
    temb1: Linear,
    temb1_act: Tensor,
    temb2: Linear,
    /// `class_embedding.weight` `[num_class_embeds, tdim]`, added to `temb2`'s output.
    class_embed: Option<(Param, ClassEmbedShape)>,
    temb_act: Tensor,
    conv_in: Conv,
    down: Vec<Level>,
    mid: (ResBlock, AttnBlock, ResBlock),
    up: Vec<Level>,
    norm_out: Norm,
    conv_out: Conv,
}

impl UNet {
    /// Places a U-Net for batches of `batch` images in `be`'s arena. Parameters start zeroed: call
    /// [`UNet::init`] or load weights.
    pub fn new<B: Backend>(be: &mut B, config: &UNetConfig, batch: usize) -> Result<Self> {
        Self::place(be, config, batch, true)
    }

    /// A U-Net for the forward pass only (sampling, evaluation): no parameter gradients and no activation
    /// gradients, so about half the memory. [`UNet::backward`] refuses to run on it.
    pub fn new_inference<B: Backend>(
        be: &mut B,
        config: &UNetConfig,
        batch: usize,
    ) -> Result<Self> {
        Self::place(be, config, batch, false)
    }

    fn place<B: Backend>(
        be: &mut B,
        config: &UNetConfig,
        batch: usize,
        training: bool,
    ) -> Result<Self> {
        config.validate()?;
        if batch == 0 {
            return Err(Error::Invalid("the batch size must be at least 1".into()));
        }
        Self::size_guard(config, batch)?;
        let layout = Layout::of(be);
        let count = Self::build(config, batch, layout, 0, 0, 0, None);
        let np = count.specs.last().map_or(0, |s| s.offset + s.len);
        let na = count.acts.len;
        let grad_lens = count.grad_lens;
        let params = be.alloc(np)?;
        be.keep_weight_copy(params)?;
        be.reserve_norm_scratch(count.norm_max)?;
        if !training {
            let acts = be.alloc(na)?;
            // Gradient handles alias the parameters and activations; `training: false` guards them.
            let mut net = Self::build(
                config, batch, layout, params.off, params.off, acts.off, None,
            );
            net.training = false;
            return Ok(net);
        }
        let grads = be.alloc(np)?;
        let acts = be.alloc(na)?;
        let dacts = be.alloc(grad_lens.total())?;
        Ok(Self::build(
            config,
            batch,
            layout,
            params.off,
            grads.off,
            acts.off,
            Some((dacts.off, grad_lens)),
        ))
    }

    /// The elements [`UNet::new`] (training) or [`UNet::new_inference`] reserves for `config` at `batch`
    /// on a backend of `layout` (whether it fuses the normalisations into the convolutions, whether it
    /// keeps a bf16 copy of the weights), and the parameter count, computed without allocating.
    pub fn arena_len(
        config: &UNetConfig,
        batch: usize,
        training: bool,
        layout: Layout,
    ) -> Result<(usize, usize)> {
        config.validate()?;
        Self::size_guard(config, batch)?;
        let count = Self::build(config, batch.max(1), layout, 0, 0, 0, None);
        let (np, na) = (count.params.len, count.acts.len);
        let grads = count.grad_lens.total();
        let copy = match layout.weight_copies {
            true => weight_copy_len(np),
            false => 0,
        };
        let total = if training {
            2 * np + na + grads
        } else {
            np + na
        };
        Ok((total + copy + count.norm_scratch_len(layout), np))
    }

    /// The elements of a training net's activations and of their gradients (all their regions: see
    /// [`Builder`]) for `config` at `batch`, on a backend of `layout`.
    pub fn activation_lens(
        config: &UNetConfig,
        batch: usize,
        layout: Layout,
    ) -> Result<(usize, usize)> {
        config.validate()?;
        Self::size_guard(config, batch)?;
        let count = Self::build(config, batch.max(1), layout, 0, 0, 0, None);
        Ok((
            count.acts.len + count.norm_scratch_len(layout),
            count.grad_lens.total(),
        ))
    }

    /// Refuses a batch whose arena could not exist: a generous bound on the elements (every layer of
    /// every level at full resolution and the widest channel count) must stay under 2^50, checked
    /// without overflow, so the sizes computed while building the net cannot wrap.
    fn size_guard(config: &UNetConfig, batch: usize) -> Result<()> {
        let widest = config.block_out_channels.iter().copied().max().unwrap_or(0);
        let layers = config.block_out_channels.len() * (config.layers_per_block + 2) + 4;
        let bound = [
            config.sample_size,
            config.sample_size,
            2 * widest,
            64,
            layers,
        ]
        .iter()
        .try_fold(batch, |acc, &x| acc.checked_mul(x));
        match bound {
            Some(b) if b < 1 << 50 => Ok(()),
            _ => Err(Error::Memory(format!(
                "batch {batch} of {0}x{0} images with up to {widest} channels is beyond any memory",
                config.sample_size
            ))),
        }
    }

    /// The words the backend's normalisation scratch takes for this net on a backend of `layout`
    /// ([`Backend::reserve_norm_scratch`]), counted with the activations.
    fn norm_scratch_len(&self, layout: Layout) -> usize {
        match layout.norm_scratch {
            true => norm_scratch_len(self.norm_max),
            false => 0,
        }
    }

    /// Whether this net holds gradients (built with [`UNet::new`]).
    pub fn is_training(&self) -> bool {
        self.training
    }

    fn build(
        config: &UNetConfig,
        n: usize,
        layout: Layout,
        params: usize,
        grads: usize,
        acts: usize,
        grad_bases: Option<(usize, GradLens)>,
    ) -> Self {
        let mut b = Builder {
            specs: Vec::new(),
            params,
            grads,
            acts,
            act_next: 0,
            grad_base: grad_bases.map(|(base, _)| base),
            sizes: grad_bases.map_or(GradLens::default(), |(_, sizes)| sizes),
            grad_next: 0,
            scratch_next: 0,
            scratch_max: 0,
            up_unit: None,
            up_next: 0,
            up_max: [0, 0],
            in_block: false,
            grad_of: HashMap::new(),
            fused: layout.fused,
            unstored_next: 0,
            norm_max: 0,
            bf16_activations: layout.bf16_activations,
        };
        let cfg = config;
        let chans = &cfg.block_out_channels;
        let levels = chans.len();
        let size = cfg.sample_size;
        let input = b.act(n * size * size * cfg.in_channels);
        let timesteps = b.act(n);
        let (ch0, tdim) = (chans[0], cfg.time_embed_dim());
        let temb_sin = b.act(n * ch0);
        // Parameter order follows diffusers' module order (time embedding, conv_in, down, mid, up, out).
        let temb1 = b.linear("time_embedding.linear_1", n, ch0, tdim, 1.0);
        let temb1_act = b.act(n * tdim);
        let temb2 = b.linear("time_embedding.linear_2", n, tdim, tdim, 1.0);
        let (class_embed, labels) = match &cfg.classes {
            Some(c) => {
                let shape = ClassEmbedShape {
                    n,
                    classes: c.embeds,
                    dim: tdim,
                };
                let table = b.param(
                    "class_embedding.weight".into(),
                    Kind::Embedding {
                        classes: c.embeds,
                        dim: tdim,
                    },
                    c.embeds * tdim,
                    1.0,
                );
                (Some((table, shape)), Some(b.act(n)))
            }
            None => (None, None),
        };
        let temb_act = b.act(n * tdim);
        let conv_in = b.conv16(
            "conv_in",
            ConvShape {
                n,
                h: size,
                w: size,
                c: cfg.in_channels,
                o: ch0,
                kind: ConvKind::K3S1,
            },
            1.0,
        );
        let mut res_index = 0;
        let mut next_res = || {
            res_index += 1;
            res_index - 1
        };
        // Down path; `skips` records (handle, channels) of every tensor the up path concatenates.
        let mut skips = vec![(conv_in.y, ch0)];
        let (mut h, mut c) = (size, ch0);
        let mut down = Vec::new();
        for (i, &out) in chans.iter().enumerate() {
            let mut layers = Vec::new();
            for j in 0..cfg.layers_per_block {
                let name = format!("down_blocks.{i}.resnets.{j}");
                let res = ResBlock::build(&mut b, cfg, &name, next_res(), n, h, c, out);
                c = out;
                let attn = cfg.down_attention(i).then(|| {
                    AttnBlock::build(
                        &mut b,
                        cfg,
                        &format!("down_blocks.{i}.attentions.{j}"),
                        n,
                        h,
                        c,
                    )
                });
                let layer = Layer {
                    concat: None,
                    res,
                    attn,
                };
                skips.push((layer.output(), c));
                layers.push(layer);
            }
            let resample = (i + 1 < levels).then(|| {
                let conv = b.conv16(
                    &format!("down_blocks.{i}.downsamplers.0.conv"),
                    ConvShape {
                        n,
                        h,
                        w: h,
                        c,
                        o: c,
                        kind: ConvKind::K3S2,
                    },
                    1.0,
                );
                Resample { up: None, conv }
            });
            if let Some(r) = &resample {
                h /= 2;
                skips.push((r.conv.y, c));
            }
            down.push(Level { layers, resample });
        }
        let mid = (
            ResBlock::build(&mut b, cfg, "mid_block.resnets.0", next_res(), n, h, c, c),
            AttnBlock::build(&mut b, cfg, "mid_block.attentions.0", n, h, c),
            ResBlock::build(&mut b, cfg, "mid_block.resnets.1", next_res(), n, h, c, c),
        );
        let mut up = Vec::new();
        for i in 0..levels {
            let out = chans[levels - 1 - i];
            let mut layers = Vec::new();
            for j in 0..=cfg.layers_per_block {
                b.next_up_unit();
                let (skip, cs) = skips.pop().expect("one skip per up layer");
                let cat = b.act16(n * h * h * (c + cs));
                let name = format!("up_blocks.{i}.resnets.{j}");
                let res = ResBlock::build(&mut b, cfg, &name, next_res(), n, h, c + cs, out);
                let concat = Some((cat, skip, c, cs));
                c = out;
                let attn = cfg.up_attention(i).then(|| {
                    AttnBlock::build(
                        &mut b,
                        cfg,
                        &format!("up_blocks.{i}.attentions.{j}"),
                        n,
                        h,
                        c,
                    )
                });
                layers.push(Layer { concat, res, attn });
            }
            let resample = (i + 1 < levels).then(|| {
                b.next_up_unit();
                let upsampled = b.act16(n * 4 * h * h * c);
                let conv = b.conv16(
                    &format!("up_blocks.{i}.upsamplers.0.conv"),
                    ConvShape {
                        n,
                        h: 2 * h,
                        w: 2 * h,
                        c,
                        o: c,
                        kind: ConvKind::K3S1,
                    },
                    1.0,
                );
                Resample {
                    up: Some((n, h, h, c, upsampled)),
                    conv,
                }
            });
            if resample.is_some() {
                h *= 2;
            }
            up.push(Level { layers, resample });
        }
        b.up_unit = None;
        let norm_out = b.norm(
            "conv_norm_out",
            GroupNormShape {
                n,
                hw: h * h,
                c,
                groups: cfg.norm_num_groups,
                eps: cfg.norm_eps as f32,
            },
            true,
        );
        let conv_out = b.conv(
            "conv_out",
            ConvShape {
                n,
                h,
                w: h,
                c,
                o: cfg.out_channels,
                kind: ConvKind::K3S1,
            },
            0.0,
        );
        let np = b.specs.last().map_or(0, |s| s.offset + s.len);
        Self {
            config: cfg.clone(),
            batch: n,
            training: true,
            params: Tensor::new(params, np),
            grads: Tensor::new(grads, np),
            input,
            timesteps,
            labels,
            acts: Tensor::new(acts, b.act_next),
            grad_lens: GradLens {
                own: b.grad_next,
                up: b.up_max,
                scratch: b.scratch_max,
            },
            norm_max: b.norm_max,
            ctx: Ctx {
                grads: b.grad_of,
                dropout: None,
            },
            specs: b.specs,
            temb_sin,
            temb1,
            temb1_act,
            temb2,
            class_embed,
            temb_act,
            conv_in,
            down,
            mid,
            up,
            norm_out,
            conv_out,
        }
    }

    /// Every parameter in diffusers' names and order, with its place in [`UNet::params`] (offsets relative
    /// to its start).
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    pub fn num_params(&self) -> usize {
        self.params.len
    }

    /// Activation elements kept for the backward pass.
    pub fn activation_len(&self) -> usize {
        self.acts.len
    }

    /// Elements of the activations' gradients in a net built for training: those with a place of their
    /// own, the two regions of the up path's units, and the scratch the blocks share.
    pub fn activation_grad_len(&self) -> usize {
        self.grad_lens.total()
    }

    /// The network's output `[batch, size, size, out_channels]` after [`UNet::forward`].
    pub fn output(&self) -> Tensor {
        self.conv_out.y
    }

    /// The gradient of the loss with respect to the output, which the loss op writes before
    /// [`UNet::backward`].
    pub fn output_grad(&self) -> Tensor {
        self.ctx.grad(self.conv_out.y)
    }

    /// Uploads the labels of a class-conditional model's batch (one per image, each a row of its
    /// embedding table: a real class or the null class).
    pub fn set_labels<B: Backend>(&self, be: &mut B, labels: &[usize]) -> Result<()> {
        let (Some(t), Some(c)) = (self.labels, &self.config.classes) else {
            return Err(Error::Invalid(
                "class labels given to a model without classes (its config has no num_class_embeds)"
                    .into(),
            ));
        };
        if labels.len() != self.batch {
            return Err(Error::shape("class labels", self.batch, labels.len()));
        }
        if let Some(&bad) = labels.iter().find(|&&l| l >= c.embeds) {
            return Err(Error::Invalid(format!(
                "class label {bad} is outside the model's {} embedding rows",
                c.embeds
            )));
        }
        be.upload(t, &labels.iter().map(|&l| l as f32).collect::<Vec<_>>())
    }

    /// Writes the paper's initialisation (see [`ParamSpec::init`]) into the parameters.
    pub fn init<B: Backend>(&self, be: &mut B, seed: u64) -> Result<()> {
        let mut flat = vec![0.0f32; self.params.len];
        for (i, s) in self.specs.iter().enumerate() {
            flat[s.offset..s.offset + s.len].copy_from_slice(&s.init(seed, i));
        }
        be.upload(self.params, &flat)
    }

    /// Forward pass on [`UNet::input`] and [`UNet::timesteps`]. `dropout = Some(seed)` turns dropout on
    /// (training), with the masks of the backend's training clock (block `i` of step `s` draws from
    /// stream `Dropout, s * 1024 + i`); `None` runs the network deterministically.
    pub fn forward<B: Backend>(&mut self, be: &mut B, dropout: Option<u64>) -> Result<Tensor> {
        let p = self.config.dropout as f32;
        self.ctx.dropout = match dropout {
            Some(seed) if p > 0.0 => {
                Some((p, seed, Stream::per_step(rng::Purpose::Dropout, 1 << 10, 0)))
            }
            _ => None,
        };
        let n = self.batch;
        be.timestep_embedding(
            n,
            self.config.block_out_channels[0],
            self.timesteps,
            self.temb_sin,
        )?;
        let t = self.temb1.forward(be, self.temb_sin)?;
        be.silu_forward(t, self.temb1_act)?;
        let t = self.temb2.forward(be, self.temb1_act)?;
        if let (Some((table, s)), Some(labels)) = (self.class_embed, self.labels) {
            be.class_embedding_add(s, table.value, labels, t)?;
        }
        be.silu_forward(t, self.temb_act)?;
        let ta = self.temb_act;
        let mut h = self.conv_in.forward(be, self.input)?;
        for level in &self.down {
            for layer in &level.layers {
                h = layer.res.forward(be, &self.ctx, h, ta)?;
                if let Some(a) = &layer.attn {
                    h = a.forward(be, h)?;
                }
            }
            if let Some(r) = &level.resample {
                h = r.conv.forward(be, h)?;
            }
        }
        h = self.mid.0.forward(be, &self.ctx, h, ta)?;
        h = self.mid.1.forward(be, h)?;
        h = self.mid.2.forward(be, &self.ctx, h, ta)?;
        for level in &self.up {
            for layer in &level.layers {
                let (cat, skip, ca, cb) = layer.concat.expect("up layers concatenate");
                be.concat_forward(cat.len / (ca + cb), ca, cb, h, skip, cat)?;
                h = layer.res.forward(be, &self.ctx, cat, ta)?;
                if let Some(a) = &layer.attn {
                    h = a.forward(be, h)?;
                }
            }
            if let Some(r) = &level.resample {
                let (n, hh, ww, c, upsampled) = r.up.expect("up path resamples up");
                be.upsample2x_forward(n, hh, ww, c, h, upsampled)?;
                h = r.conv.forward(be, upsampled)?;
            }
        }
        self.conv_out
            .forward_normed(be, self.norm_out.of(h), None, None)
    }

    /// Backward pass after [`UNet::forward`] (same dropout setting), from the gradient in
    /// [`UNet::output_grad`]; writes every parameter gradient into [`UNet::grads`].
    pub fn backward<B: Backend>(&mut self, be: &mut B) -> Result<()> {
        if !self.training {
            return Err(Error::Invalid(
                "backward pass on a U-Net built for inference (UNet::new_inference)".into(),
            ));
        }
        let mut tape = Tape::default();
        let net = &self.ctx;
        let tp = &mut tape;
        let ta = self.temb_act;
        // The input of the final norm is the output of the last up level.
        let mut h = self.up_output();
        let dy = net.grad(self.conv_out.y);
        self.conv_out
            .backward_normed(be, net, tp, self.norm_out.of(h), dy)?;
        self.norm_out.backward(be, net, tp, h)?;
        for (li, level) in self.up.iter().enumerate().rev() {
            if let Some(r) = &level.resample {
                let (n, hh, ww, c, upsampled) = r.up.expect("up path resamples up");
                r.conv
                    .backward(be, net, tp, upsampled, net.grad(r.conv.y), true)?;
                let below = level.layers.last().expect("a level has layers").output();
                let dx = net.grad(below);
                be.upsample2x_backward(
                    n,
                    hh,
                    ww,
                    c,
                    net.grad(upsampled),
                    dx,
                    tp.accumulate(below),
                )?;
            }
            for (j, layer) in level.layers.iter().enumerate().rev() {
                let (cat, skip, ca, cb) = layer.concat.expect("up layers concatenate");
                if let Some(a) = &layer.attn {
                    a.backward(be, net, tp, layer.res.out)?;
                }
                layer.res.backward(be, net, tp, cat, ta)?;
                // The layer's input h is the previous layer's output, or the level below's output.
                h = if j > 0 {
                    level.layers[j - 1].output()
                } else {
                    self.up_input(li)
                };
                let (dh, ds) = (net.grad(h), net.grad(skip));
                let (acc_h, acc_s) = (tp.accumulate(h), tp.accumulate(skip));
                be.concat_backward(
                    cat.len / (ca + cb),
                    ca,
                    cb,
                    net.grad(cat),
                    dh,
                    ds,
                    acc_h,
                    acc_s,
                )?;
            }
        }
        let mid_in = self.down_output();
        self.mid.2.backward(be, net, tp, self.mid.1.out, ta)?;
        self.mid.1.backward(be, net, tp, self.mid.0.out)?;
        self.mid.0.backward(be, net, tp, mid_in, ta)?;
        for (li, level) in self.down.iter().enumerate().rev() {
            let last = level.layers.last().expect("a level has layers").output();
            if let Some(r) = &level.resample {
                r.conv
                    .backward(be, net, tp, last, net.grad(r.conv.y), true)?;
            }
            for (j, layer) in level.layers.iter().enumerate().rev() {
                let x = if j > 0 {
                    level.layers[j - 1].output()
                } else {
                    self.down_input(li)
                };
                if let Some(a) = &layer.attn {
                    a.backward(be, net, tp, layer.res.out)?;
                }
                layer.res.backward(be, net, tp, x, ta)?;
            }
        }
        self.conv_in
            .backward(be, net, tp, self.input, net.grad(self.conv_in.y), false)?;
        // The time embedding's gradient is the sum over every ResBlock; if none wrote it the net has none.
        let dta = net.grad(self.temb_act);
        if !tp.accumulate(self.temb_act) {
            be.fill(dta, 0.0)?;
        }
        be.silu_backward(self.temb2.y, dta, net.grad(self.temb2.y), false)?;
        if let (Some((table, s)), Some(labels)) = (self.class_embed, self.labels) {
            be.class_embedding_backward(s, labels, net.grad(self.temb2.y), table.grad)?;
        }
        self.temb2.backward(be, net, tp, self.temb1_act, true)?;
        be.silu_backward(
            self.temb1.y,
            net.grad(self.temb1_act),
            net.grad(self.temb1.y),
            false,
        )?;
        self.temb1.backward(be, net, tp, self.temb_sin, false)
    }

    fn down_input(&self, level: usize) -> Tensor {
        if level == 0 {
            self.conv_in.y
        } else {
            let below = &self.down[level - 1];
            below.resample.as_ref().map_or_else(
                || below.layers.last().expect("layers").output(),
                |r| r.conv.y,
            )
        }
    }

    fn down_output(&self) -> Tensor {
        self.down_input(self.down.len())
    }

    fn up_input(&self, level: usize) -> Tensor {
        if level == 0 {
            self.mid.2.out
        } else {
            let below = &self.up[level - 1];
            below.resample.as_ref().map_or_else(
                || below.layers.last().expect("layers").output(),
                |r| r.conv.y,
            )
        }
    }

    fn up_output(&self) -> Tensor {
        self.up_input(self.up.len())
    }

    /// The flat parameter vector from named PyTorch-layout tensors (a diffusers state dict). Accepts the
    /// legacy attention names; every tensor must be present with its shape, and nothing else may be.
    pub fn flat_from_state(
        &self,
        state: &HashMap<String, NamedTensor>,
        origin: &Path,
    ) -> Result<Vec<f32>> {
        let mut flat = vec![0.0f32; self.params.len];
        let mut used = HashSet::new();
        let (mut missing, mut bad_shape) = (Vec::new(), None);
        for s in &self.specs {
            let found = state
                .get(&s.name)
                .map(|t| (s.name.clone(), t))
                .or_else(|| legacy_name(&s.name).and_then(|l| state.get(&l).map(|t| (l, t))));
            let Some((name, t)) = found else {
                missing.push(s.name.as_str());
                continue;
            };
            if t.shape != s.shape() {
                bad_shape.get_or_insert(format!(
                    "tensor {name}: expected shape {:?}, found {:?}",
                    s.shape(),
                    t.shape
                ));
            } else {
                flat[s.offset..s.offset + s.len].copy_from_slice(&s.from_pytorch(&t.data));
            }
            used.insert(name);
        }
        let mut extra: Vec<&str> = state
            .keys()
            .filter(|k| !used.contains(*k))
            .map(String::as_str)
            .collect();
        extra.sort();
        let list = |v: &[&str]| match v.len() {
            0..=3 => v.join(", "),
            n => format!("{}, ... ({n} in all)", v[..3].join(", ")),
        };
        // Missing and unexpected names say more (another config) than a shape does (a wrong tensor).
        let msg = match (missing.is_empty(), extra.is_empty()) {
            (true, true) => match bad_shape {
                Some(m) => m,
                None => return Ok(flat),
            },
            (false, true) => format!("missing tensor {}", list(&missing)),
            (true, false) => format!("unexpected tensors for this config: {}", list(&extra)),
            (false, false) => format!(
                "these weights are for another config: missing tensor {}; unexpected tensors {}",
                list(&missing),
                list(&extra)
            ),
        };
        Err(Error::format(origin, msg))
    }

    /// Named PyTorch-layout tensors from a flat vector laid out like [`UNet::params`].
    pub fn state_from_flat(&self, flat: &[f32]) -> Vec<(String, NamedTensor)> {
        self.specs
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    NamedTensor {
                        shape: s.shape(),
                        data: s.to_pytorch(&flat[s.offset..s.offset + s.len]),
                    },
                )
            })
            .collect()
    }

    /// Multiply-adds of one forward pass per image (convolutions, linears and attention matmuls).
    pub fn macs_per_image(&self) -> usize {
        let mut total = 0;
        let convs = |lvl: &Level| lvl.resample.as_ref().map_or(0, |r| r.conv.s.macs());
        let res = |r: &ResBlock| {
            r.conv1.s.macs()
                + r.conv2.s.macs()
                + r.shortcut.as_ref().map_or(0, |c| c.s.macs())
                + r.temb.m * r.temb.k * r.temb.n
        };
        let attn = |a: &AttnBlock| {
            let s = a.shape;
            a.qkv.s.macs() + a.proj.m * a.proj.k * a.proj.n + 2 * s.n * s.l * s.l * s.c
        };
        for lvl in self.down.iter().chain(&self.up) {
            total += convs(lvl);
            for l in &lvl.layers {
                total += res(&l.res) + l.attn.as_ref().map_or(0, attn);
            }
        }
        total += res(&self.mid.0) + attn(&self.mid.1) + res(&self.mid.2);
        total += self.conv_in.s.macs() + self.conv_out.s.macs();
        total +=
            self.temb1.m * self.temb1.k * self.temb1.n + self.temb2.m * self.temb2.k * self.temb2.n;
        total / self.batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Dtype;

    /// Every activation a net stores, each with whether it should be bf16 in a net placed with bf16
    /// activations: the residual stream, the ResNet blocks' hidden activations and the attention
    /// blocks' q, k, v and outputs are; the timesteps and their embedding, the statistics and the
    /// network's output are not.
    fn stored_activations(net: &UNet) -> Vec<(Tensor, bool)> {
        let mut out = vec![
            (net.input, false),
            (net.timesteps, false),
            (net.temb_sin, false),
        ];
        out.extend([net.temb1.y, net.temb1_act, net.temb2.y, net.temb_act].map(|t| (t, false)));
        out.extend(net.labels.map(|t| (t, false)));
        out.push((net.conv_in.y, true));
        let norm = |n: &Norm| [(n.mean, false), (n.rstd, false)];
        let res = |out: &mut Vec<(Tensor, bool)>, r: &ResBlock| {
            out.extend(norm(&r.norm1));
            out.extend(norm(&r.norm2));
            out.extend([(r.conv1.y, true), (r.temb.y, false), (r.out, true)]);
            out.extend(r.shortcut.as_ref().map(|c| (c.y, true)));
        };
        let attn = |out: &mut Vec<(Tensor, bool)>, a: &AttnBlock| {
            out.extend(norm(&a.norm));
            out.extend([
                (a.qkv.y, true),
                (a.attn, true),
                (a.lse, false),
                (a.out, true),
            ]);
        };
        for level in net.down.iter().chain(&net.up) {
            for l in &level.layers {
                out.extend(l.concat.map(|(cat, ..)| (cat, true)));
                res(&mut out, &l.res);
                if let Some(a) = &l.attn {
                    attn(&mut out, a);
                }
            }
            if let Some(r) = &level.resample {
                out.extend(r.up.map(|(.., upsampled)| (upsampled, true)));
                out.push((r.conv.y, true));
            }
        }
        res(&mut out, &net.mid.0);
        attn(&mut out, &net.mid.1);
        res(&mut out, &net.mid.2);
        out.extend(norm(&net.norm_out));
        out.push((net.conv_out.y, false));
        out
    }

    /// In a net placed with bf16 activations, at an arena offset that is not a multiple of 4 words: every
    /// activation that should be bf16 is, and starts 16-byte aligned; every one lies inside the
    /// activations and overlaps no other; and the counting build (at offset 0) reserved exactly what the
    /// placed one uses. Placed with fp32 activations, none is bf16.
    #[test]
    fn bf16_activations_are_aligned_and_inside_the_counted_activations() {
        let config = UNetConfig::preset("tiny").unwrap();
        for bf16_activations in [true, false] {
            let layout = Layout {
                fused: true,
                weight_copies: true,
                bf16_activations,
                norm_scratch: bf16_activations,
            };
            let count = UNet::build(&config, 3, layout, 0, 0, 0, None);
            let base = 4 * 1000 + 1;
            let net = UNet::build(&config, 3, layout, 0, 0, base, None);
            assert_eq!(net.acts.len, count.acts.len);
            let acts = Tensor::new(base, net.acts.len);
            let stored = stored_activations(&net);
            let (levels, per) = (config.block_out_channels.len(), config.layers_per_block);
            let blocks = levels * per + levels * (per + 1) + 2;
            let bf16 = stored
                .iter()
                .filter(|(t, _)| t.dtype == Dtype::Bf16)
                .count();
            let want = stored.iter().filter(|(_, b)| *b).count();
            assert!(want >= 3 * blocks, "{want} for {blocks} blocks");
            assert_eq!(bf16, if bf16_activations { want } else { 0 });
            for (i, &(t, should)) in stored.iter().enumerate() {
                if bf16_activations && should {
                    assert_eq!(t.dtype, Dtype::Bf16, "{t:?}");
                    assert_eq!(t.off % 4, 0, "{t:?} 16-byte aligned");
                }
                assert!(
                    t.len > 0 && t.off >= acts.off && t.end() <= acts.end(),
                    "{t:?} in {acts:?}"
                );
                for &(other, _) in &stored[i + 1..] {
                    assert!(!t.overlaps(other), "{t:?} and {other:?}");
                }
            }
        }
    }
}

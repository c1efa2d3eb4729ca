//! The CUDA backend against the CPU backend (the oracle), on a GPU machine:
//!     cargo test --release --test gpu -- --ignored --test-threads=1
//!
//! Each op runs on both backends with the same random inputs of awkward sizes (odd channel counts,
//! batch > 1, non-square images, sizes that are not multiples of the kernels' tiles); the device's
//! outputs are poisoned with NaN before the op, so an element a kernel forgets to write fails the check.
//! Then the whole U-Net (output and every parameter gradient), ten training steps' losses, the samplers
//! with the closed-form Gaussian predictor, and the noise one seed draws. The bf16 tensor-core GEMMs
//! (`--precision bf16`) are held to the same CPU oracle with the tolerances derived at TOL_BF16_EXACT and
//! TOL_BF16.
//!
//! The error measure is max |gpu - cpu| / max |cpu| over a tensor (relative to its scale). fp32 sums of K
//! products carry ~sqrt(K) * 6e-8 relative error in either backend, and the two add in different
//! orders: 1e-5 is ~10x that for the largest K here (2304), and any indexing mistake is O(1).

mod common;

use ddpm_cuda::backend::cpu::CpuBackend;
use ddpm_cuda::backend::cuda::CudaBackend;
use ddpm_cuda::backend::{
    AdamHyper, AttentionShape, Backend, ClassEmbedShape, ConvKind, ConvShape, DropoutAfter,
    GroupNormShape, Layout, NormedInput, Precision, ReverseStep, Rung, SamplerRow, Sequence,
    Stream, Tensor,
};
use ddpm_cuda::model::{UNet, UNetConfig};
use ddpm_cuda::rng;
use ddpm_cuda::sample::{ddim_table, ddpm_respaced_table, ddpm_table, leading_timesteps, Variance};
use ddpm_cuda::schedule::Schedule;
use ddpm_cuda::train::{TrainOptions, Trainer};

const TOL: f64 = 1e-5;

/// The device under test: the GPU, or with `--features emu` the CPU emulator running the same kernels
/// through the same launchers (`cargo test --release --features emu --test gpu -- --ignored`).
fn device() -> CudaBackend {
    #[cfg(feature = "emu")]
    {
        CudaBackend::emulated()
    }
    #[cfg(not(feature = "emu"))]
    {
        CudaBackend::new().expect("these tests need a CUDA device and the kernels")
    }
}

/// [`device`] running its GEMMs and attention in `p`.
fn device_in(p: Precision) -> CudaBackend {
    let mut be = device();
    be.set_precision(p).unwrap();
    be
}

/// The two backends side by side; every tensor has the same handle in both.
struct Pair {
    cpu: CpuBackend<f32>,
    gpu: CudaBackend,
    draws: u64,
    /// Round every input to the nearest bf16 number (the same on both sides).
    bf16_inputs: bool,
}

impl Pair {
    fn new() -> Self {
        Self::with(device())
    }

    /// The device running its GEMMs and attention in bf16 on tensor cores.
    fn bf16() -> Self {
        Self::with(device_in(Precision::Bf16))
    }

    fn with(gpu: CudaBackend) -> Self {
        Self {
            cpu: CpuBackend::new(),
            gpu,
            draws: 0,
            bf16_inputs: false,
        }
    }

    fn alloc(&mut self, len: usize) -> Tensor {
        let t = self.cpu.alloc(len).unwrap();
        assert_eq!(self.gpu.alloc(len).unwrap(), t);
        t
    }

    /// A tensor of normal draws times `scale` (plus `shift`), the same on both sides.
    fn input(&mut self, len: usize, scale: f32, shift: f32) -> Tensor {
        let t = self.alloc(len);
        self.draws += 1;
        let v: Vec<f32> = (0..len)
            .map(|i| shift + scale * rng::normal(7, self.draws, i as u64))
            .map(|v| match self.bf16_inputs {
                true => half::bf16::from_f32(v).to_f32(),
                false => v,
            })
            .collect();
        self.cpu.upload(t, &v).unwrap();
        self.gpu.upload(t, &v).unwrap();
        t
    }

    /// An output: zero on the CPU, NaN on the device.
    fn output(&mut self, len: usize) -> Tensor {
        let t = self.alloc(len);
        self.gpu.fill(t, f32::NAN).unwrap();
        t
    }

    fn run(&mut self, op: impl Fn(&mut dyn Backend) -> ddpm_cuda::Result<()>) {
        op(&mut self.cpu).expect("the CPU op");
        op(&mut self.gpu).expect("the CUDA op");
    }

    /// Asserts the two sides agree on `t` within `tol` of its scale; returns the error.
    fn check(&mut self, what: &str, t: Tensor, tol: f64) -> f64 {
        self.check_apart(what, t, t, tol)
    }

    /// [`Pair::check`] of a tensor that lies at `gpu_t` on the device and at `cpu_t` on the CPU.
    fn check_apart(&mut self, what: &str, gpu_t: Tensor, cpu_t: Tensor, tol: f64) -> f64 {
        let a = self.gpu.download(gpu_t).unwrap();
        let b = self.cpu.download(cpu_t).unwrap();
        let e = scaled_error(&a, &b);
        eprintln!("{what:<48} error {e:.2e}");
        if e > tol {
            eprintln!("  device {:?}...", &a[..a.len().min(8)]);
            eprintln!("  cpu    {:?}...", &b[..b.len().min(8)]);
        }
        assert!(e <= tol, "{what}: error {e:e} (tolerance {tol:e})");
        e
    }
}

/// max |a - b| / max |b|; infinite when `a` holds a NaN (an element the kernel did not write).
fn scaled_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(1e-30f64, |m, v| m.max(f64::from(v.abs())));
    let err = a.iter().zip(b).fold(0.0f64, |m, (x, y)| {
        m.max((f64::from(*x) - f64::from(*y)).abs())
    });
    err / scale
}

/// [`scaled_error`] with the scale at least `floor`.
fn floored_error(a: &[f32], b: &[f32], floor: f64) -> f64 {
    let scale = b.iter().fold(floor, |m, v| m.max(f64::from(v.abs())));
    scaled_error(a, b) * b.iter().fold(1e-30f64, |m, v| m.max(f64::from(v.abs()))) / scale
}

fn conv_case(p: &mut Pair, s: ConvShape, tol: f64) {
    let what = format!("{:?} n{} {}x{} {}->{}", s.kind, s.n, s.h, s.w, s.c, s.o);
    let x = p.input(s.x_len(), 1.0, 0.0);
    let w = p.input(s.w_len(), 0.2, 0.0);
    let b = p.input(s.o, 0.5, 0.0);
    let y = p.output(s.y_len());
    p.run(|be| be.conv2d_forward(s, x, w, b, y));
    p.check(&format!("conv forward {what}"), y, tol);
    // The ResNet block's two fused forms: + the time embedding per image, + the residual.
    let (t, r) = (p.input(s.n * s.o, 0.5, 0.0), p.input(s.y_len(), 1.0, 0.0));
    let yf = p.output(s.y_len());
    p.run(|be| be.conv2d_forward_fused(s, x, w, b, Some(t), None, yf));
    p.check(&format!("conv forward + image bias {what}"), yf, tol);
    p.run(|be| be.conv2d_forward_fused(s, x, w, b, None, Some(r), yf));
    p.check(&format!("conv forward + residual {what}"), yf, tol);
    let dy = p.input(s.y_len(), 1.0, 0.0);
    let (dw, db) = (p.output(s.w_len()), p.output(s.o));
    p.run(|be| be.conv2d_backward_weight(s, x, dy, dw, db));
    p.check(&format!("conv weight grad {what}"), dw, tol);
    p.check(&format!("conv bias grad {what}"), db, tol);
    let dx = p.output(s.x_len());
    p.run(|be| be.conv2d_backward_data(s, dy, w, dx, false));
    p.check(&format!("conv input grad {what}"), dx, tol);
    p.run(|be| be.conv2d_backward_data(s, dy, w, dx, true));
    p.check(&format!("conv input grad, accumulated {what}"), dx, tol);
}

/// Every kind of convolution at awkward sizes, and at the paper's widths with many tiles and split-K.
fn conv_shapes() -> Vec<ConvShape> {
    let shape = |n, h, w, c, o, kind| ConvShape {
        n,
        h,
        w,
        c,
        o,
        kind,
    };
    vec![
        shape(3, 7, 5, 5, 7, ConvKind::K3S1),
        shape(2, 9, 6, 3, 11, ConvKind::K3S2),
        shape(2, 8, 8, 6, 4, ConvKind::K3S2),
        shape(3, 5, 7, 9, 13, ConvKind::K1),
        // Channels in multiples of 8, which the tensor-core core loads 8 at a time (the im2col gather of
        // x with c % 8 == 0, the output gradient's with o % 8 == 0), with padding, strides and partial
        // tiles around them; and 12, a multiple of 4 only, which it must load one by one.
        shape(3, 7, 5, 16, 24, ConvKind::K3S1),
        shape(2, 9, 7, 8, 40, ConvKind::K3S2),
        shape(3, 5, 7, 24, 12, ConvKind::K1),
        shape(2, 6, 5, 12, 16, ConvKind::K3S1),
        // Channels in multiples of 32 (v6's swizzled input gradient), the input gradient's last group
        // of 32 columns past c.
        shape(2, 6, 6, 96, 32, ConvKind::K3S1),
        // Many tiles, long reductions (split-K), the paper's widths.
        shape(4, 16, 16, 128, 256, ConvKind::K3S1),
        shape(2, 32, 32, 3, 128, ConvKind::K3S1),
        shape(2, 16, 16, 256, 256, ConvKind::K3S2),
    ]
}

#[test]
#[ignore = "needs a CUDA device"]
fn convolutions_match_the_cpu() {
    let mut p = Pair::new();
    for s in conv_shapes() {
        conv_case(&mut p, s, TOL);
    }
}

/// With inputs that are bf16 numbers, the bf16 path rounds nothing: a product of two bf16 values is exact
/// in fp32, so the tensor cores sum the very products the CPU's fp32 path sums, in another order. This
/// is the tight check of the bf16 kernels (every index, fragment and epilogue): an indexing mistake is
/// O(1). Tolerance 1e-4 of scale, 10x the fp32 one: tensor cores add in fp32 but truncate the aligned
/// significands instead of rounding them (Fasi et al., "Numerical behavior of NVIDIA tensor cores",
/// 2021), a bias that grows with the reduction length K.
const TOL_BF16_EXACT: f64 = 1e-4;

/// With arbitrary fp32 inputs the bf16 path rounds both operands of every product to 8 significant bits
/// (relative error <= 2^-9 each, so <= 2^-8 per product). Those errors are independent across the K
/// products of a sum, so they grow like sqrt(K), as the sum itself does: the error relative to the
/// output's scale stays near 2^-8 / sqrt(3) ~ 2e-3 for any K. Tolerance 1e-2 of scale, ~4x that.
const TOL_BF16: f64 = 1e-2;

#[test]
#[ignore = "needs a CUDA device"]
fn bf16_convolutions_are_exact_on_bf16_inputs_and_close_on_any() {
    let mut p = Pair::bf16();
    p.bf16_inputs = true;
    for s in conv_shapes() {
        conv_case(&mut p, s, TOL_BF16_EXACT);
        // The same on the rungs of the ladder the bf16 kernels do not run on (v2 WMMA, v4 wgmma, v5
        // wgmma + TMA, v6 wgmma + swizzled TMA), which the bench times beside them. The emulated device has them all; a real one
        // has wgmma and TMA on sm_90a only.
        for rung in Rung::ALL {
            if p.gpu.set_rung(Some(rung)).unwrap() {
                eprintln!("on {}:", rung.name());
                let tma_before = p.gpu.tma_launches();
                let swizzled_before = p.gpu.swizzled_tma_launches();
                conv_case(&mut p, s, TOL_BF16_EXACT);
                // v5 and v6 must really copy the weights by TMA wherever their tensor maps can
                // describe them (the loose weights' rounding in the workspace is aligned): all three
                // forwards of the case (plain, time-embedding add, residual add) where the reduction is
                // a multiple of 8 long, and both input gradients (overwriting, accumulating) where c and
                // o are.
                // v6 copies in the 64-byte swizzle in all those forwards, and in the input gradients
                // where c and o are multiples of 32 (the others on v5's kernel).
                let tma = p.gpu.tma_launches() - tma_before;
                let swizzled = p.gpu.swizzled_tma_launches() - swizzled_before;
                let expect = if rung.uses_tma() {
                    3 * u64::from(s.k() % 8 == 0) + 2 * u64::from(s.c % 8 == 0 && s.o % 8 == 0)
                } else {
                    0
                };
                let expect_swizzled = if rung == Rung::WgmmaTmaSwizzled {
                    3 * u64::from(s.k() % 8 == 0) + 2 * u64::from(s.c % 32 == 0 && s.o % 32 == 0)
                } else {
                    0
                };
                assert_eq!(tma, expect, "TMA launches for {s:?} on {}", rung.name());
                assert_eq!(
                    swizzled,
                    expect_swizzled,
                    "swizzled TMA launches for {s:?} on {}",
                    rung.name()
                );
            } else {
                assert!(rung.needs_sm90a(), "every bf16 device has the WMMA core");
                eprintln!("{}: not on this device", rung.name());
            }
        }
        assert!(p.gpu.set_rung(None).unwrap());
    }
    p.bf16_inputs = false;
    for s in [conv_shapes()[0], conv_shapes()[9]] {
        conv_case(&mut p, s, TOL_BF16);
    }
}

/// `values` on the device at a 128-byte boundary (where version 8's swizzled copies may read), in bf16
/// or fp32.
fn aligned_tensor(be: &mut CudaBackend, values: &[f32], bf16: bool) -> Tensor {
    let words = match bf16 {
        true => values.len().div_ceil(2),
        false => values.len(),
    };
    let region = be.alloc(words + 32).unwrap();
    let off = region.off.next_multiple_of(32);
    let t = match bf16 {
        true => Tensor::bf16(off, values.len()),
        false => Tensor::new(off, values.len()),
    };
    be.upload(t, values).unwrap();
    t
}

/// `len` normal draws (stream `stream`) times `scale`, rounded to bf16 numbers.
fn bf16_values(len: usize, scale: f32, stream: u64) -> Vec<f32> {
    (0..len)
        .map(|i| half::bf16::from_f32(scale * rng::normal(11, stream, i as u64)).to_f32())
        .collect()
}

/// Version 8 (`Rung::Pipelined`: both operands by TMA, a warp-specialised wgmma pipeline) against the
/// CPU on operands that are bf16 numbers, where no operand is rounded: the stride-1 convolutions' forward
/// (from a bf16 input, with the time-embedding and residual adds, the output in fp32 and in bf16), input
/// gradient (overwriting and accumulating) and weight gradient (split K), and the attention projection's
/// three GEMMs, at shapes its maps take (channels multiples of 64) with patches that cover a partial
/// image, tiles of 128 and 256 columns, and pipelines that wrap their stages; each must run on version 8
/// (its launches are counted), within TOL_BF16_EXACT. A fragment, swizzle or barrier phase out of place is
/// an O(1) error.
#[test]
#[ignore = "needs a CUDA device"]
fn v8_gemms_are_exact_on_bf16_inputs() {
    let shape = |n, h, w, c, o, kind| ConvShape {
        n,
        h,
        w,
        c,
        o,
        kind,
    };
    let mut gpu = device_in(Precision::Bf16);
    if !gpu.set_rung(Some(Rung::Pipelined)).unwrap() {
        eprintln!("version 8: not on this device");
        return;
    }
    for s in [
        shape(2, 5, 6, 64, 128, ConvKind::K3S1),
        shape(2, 5, 6, 128, 128, ConvKind::K3S1),
        shape(2, 8, 8, 128, 256, ConvKind::K3S1),
        shape(3, 4, 4, 192, 128, ConvKind::K1),
    ] {
        let what = format!("{s:?}");
        let mut cpu = CpuBackend::<f32>::new();
        let (x, w) = (
            bf16_values(s.x_len(), 1.0, 1),
            bf16_values(s.w_len(), 0.1, 2),
        );
        let (b, t) = (bf16_values(s.o, 0.5, 3), bf16_values(s.n * s.o, 0.5, 4));
        let (r, dy) = (
            bf16_values(s.y_len(), 1.0, 5),
            bf16_values(s.y_len(), 1.0, 6),
        );
        let dx0 = bf16_values(s.x_len(), 1.0, 7);
        let up = |be: &mut dyn Backend, v: &[f32]| {
            let t = be.alloc(v.len()).unwrap();
            be.upload(t, v).unwrap();
            t
        };
        let (cx, cw, cb, ct, cr, cdy) = (
            up(&mut cpu, &x),
            up(&mut cpu, &w),
            up(&mut cpu, &b),
            up(&mut cpu, &t),
            up(&mut cpu, &r),
            up(&mut cpu, &dy),
        );
        let (cy, cdx, cdw, cdb) = (
            cpu.alloc(s.y_len()).unwrap(),
            up(&mut cpu, &dx0),
            cpu.alloc(s.w_len()).unwrap(),
            cpu.alloc(s.o).unwrap(),
        );
        cpu.conv2d_forward_fused(s, cx, cw, cb, Some(ct), Some(cr), cy)
            .unwrap();
        cpu.conv2d_backward_data(s, cdy, cw, cdx, true).unwrap();
        cpu.conv2d_backward_weight(s, cx, cdy, cdw, cdb).unwrap();

        let gx = aligned_tensor(&mut gpu, &x, true);
        let gw = aligned_tensor(&mut gpu, &w, false);
        let gb = aligned_tensor(&mut gpu, &b, false);
        let gt = aligned_tensor(&mut gpu, &t, false);
        let gr = aligned_tensor(&mut gpu, &r, false);
        let gdy = aligned_tensor(&mut gpu, &dy, false);
        let gdx = aligned_tensor(&mut gpu, &dx0, false);
        let nan = vec![f32::NAN; s.y_len()];
        let gy = aligned_tensor(&mut gpu, &nan, false);
        let gy16 = aligned_tensor(&mut gpu, &nan, true);
        let gdw = aligned_tensor(&mut gpu, &vec![f32::NAN; s.w_len()], false);
        let gdb = aligned_tensor(&mut gpu, &vec![f32::NAN; s.o], false);
        let before = gpu.v8_launches();
        gpu.conv2d_forward_fused(s, gx, gw, gb, Some(gt), Some(gr), gy)
            .unwrap();
        gpu.conv2d_forward_fused(s, gx, gw, gb, Some(gt), Some(gr), gy16)
            .unwrap();
        gpu.conv2d_backward_data(s, gdy, gw, gdx, true).unwrap();
        gpu.conv2d_backward_weight(s, gx, gdy, gdw, gdb).unwrap();
        // Both forwards and the weight gradient; the input gradient where c is a multiple of 128 (its
        // tile's columns), else on version 3.
        let want = 3 + u64::from(s.c % 128 == 0);
        assert_eq!(
            gpu.v8_launches() - before,
            want,
            "version 8's GEMMs of {what}"
        );
        let err = |gpu: &mut CudaBackend, cpu: &mut CpuBackend<f32>, g: Tensor, c: Tensor| {
            scaled_error(&gpu.download(g).unwrap(), &cpu.download(c).unwrap())
        };
        let want_y16: Vec<f32> = cpu
            .download(cy)
            .unwrap()
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        for (name, e, tol) in [
            ("forward", err(&mut gpu, &mut cpu, gy, cy), TOL_BF16_EXACT),
            // Rounded to bf16 in the epilogue: within one bf16 rounding of the CPU's rounding.
            (
                "forward, bf16 output",
                scaled_error(&gpu.download(gy16).unwrap(), &want_y16),
                1e-2,
            ),
            (
                "input gradient",
                err(&mut gpu, &mut cpu, gdx, cdx),
                TOL_BF16_EXACT,
            ),
            (
                "weight gradient",
                err(&mut gpu, &mut cpu, gdw, cdw),
                TOL_BF16_EXACT,
            ),
            (
                "bias gradient",
                err(&mut gpu, &mut cpu, gdb, cdb),
                TOL_BF16_EXACT,
            ),
        ] {
            eprintln!("v8 {what} {name}: error {e:.2e}");
            assert!(
                e <= tol,
                "v8 {what} {name}: error {e:e} (tolerance {tol:e})"
            );
        }
    }
    // The attention projection: m pixels x c channels, in and out.
    for (m, c) in [(200, 128), (256, 256)] {
        let mut cpu = CpuBackend::<f32>::new();
        let (x, w) = (bf16_values(m * c, 1.0, 8), bf16_values(c * c, 0.1, 9));
        let (b, r, dy) = (
            bf16_values(c, 0.5, 10),
            bf16_values(m * c, 1.0, 11),
            bf16_values(m * c, 1.0, 12),
        );
        let up = |be: &mut dyn Backend, v: &[f32]| {
            let t = be.alloc(v.len()).unwrap();
            be.upload(t, v).unwrap();
            t
        };
        let (cx, cw, cb, cr, cdy) = (
            up(&mut cpu, &x),
            up(&mut cpu, &w),
            up(&mut cpu, &b),
            up(&mut cpu, &r),
            up(&mut cpu, &dy),
        );
        let (cy, cdx, cdw, cdb) = (
            cpu.alloc(m * c).unwrap(),
            cpu.alloc(m * c).unwrap(),
            cpu.alloc(c * c).unwrap(),
            cpu.alloc(c).unwrap(),
        );
        cpu.linear_forward_fused(m, c, c, cx, cw, cb, cr, cy)
            .unwrap();
        cpu.linear_backward(m, c, c, cx, cw, cdy, Some(cdx), cdw, cdb, false)
            .unwrap();
        let gx = aligned_tensor(&mut gpu, &x, true);
        let gw = aligned_tensor(&mut gpu, &w, false);
        let gb = aligned_tensor(&mut gpu, &b, false);
        let gr = aligned_tensor(&mut gpu, &r, true);
        let gdy = aligned_tensor(&mut gpu, &dy, false);
        let gy = aligned_tensor(&mut gpu, &vec![f32::NAN; m * c], false);
        let gdx = aligned_tensor(&mut gpu, &vec![f32::NAN; m * c], false);
        let gdw = aligned_tensor(&mut gpu, &vec![f32::NAN; c * c], false);
        let gdb = aligned_tensor(&mut gpu, &vec![f32::NAN; c], false);
        let before = gpu.v8_launches();
        gpu.linear_forward_fused(m, c, c, gx, gw, gb, gr, gy)
            .unwrap();
        gpu.linear_backward(m, c, c, gx, gw, gdy, Some(gdx), gdw, gdb, false)
            .unwrap();
        assert_eq!(
            gpu.v8_launches() - before,
            3,
            "version 8 ran the projection {m} x {c}"
        );
        for (name, g, cc) in [
            ("forward", gy, cy),
            ("input gradient", gdx, cdx),
            ("weight gradient", gdw, cdw),
            ("bias gradient", gdb, cdb),
        ] {
            let e = scaled_error(&gpu.download(g).unwrap(), &cpu.download(cc).unwrap());
            eprintln!("v8 projection {m} x {c} {name}: error {e:.2e}");
            assert!(
                e <= TOL_BF16_EXACT,
                "v8 projection {m} x {c} {name}: error {e:e}"
            );
        }
    }
}

/// A group norm of `groups` groups over the input of convolution `s`.
fn input_norm(s: &ConvShape, groups: usize) -> GroupNormShape {
    GroupNormShape {
        n: s.n,
        hw: s.h * s.w,
        c: s.c,
        groups,
        eps: 1e-6,
    }
}

/// A convolution of `silu(group_norm(x))` (or of `group_norm(x)`), then dropout when `dropout`, as a
/// ResNet block runs it: on the device the normalisation (and the dropout mask) is applied as the operand
/// is loaded, forward and in the weight gradient; the CPU writes the normalised input and convolves it.
/// The device must never write `normed` or `dropped` (they stay poisoned): the fusion is real, not a
/// hidden copy.
fn normed_conv_case(
    p: &mut Pair,
    s: ConvShape,
    groups: usize,
    silu: bool,
    dropout: bool,
    tol: f64,
) {
    let what = format!(
        "{:?} n{} {}x{} {}->{} groups {groups} silu {silu} dropout {dropout}",
        s.kind, s.n, s.h, s.w, s.c, s.o
    );
    let gn = input_norm(&s, groups);
    let input = NormedInput {
        s: gn,
        x: p.input(s.x_len(), 1.5, 0.3),
        gamma: p.input(s.c, 0.5, 1.0),
        beta: p.input(s.c, 0.3, 0.0),
        mean: p.output(gn.stats_len()),
        rstd: p.output(gn.stats_len()),
        silu,
        normed: p.output(s.x_len()),
        // The masks of block 3 at training step 17, drawn from the clock on the device.
        dropout: dropout.then(|| DropoutAfter {
            p: 0.3,
            seed: 5,
            stream: Stream::per_step(rng::Purpose::Dropout, 1 << 10, 3),
            dropped: p.output(s.x_len()),
        }),
    };
    p.run(|be| be.clock_set(17));
    let w = p.input(s.w_len(), 0.2, 0.0);
    let b = p.input(s.o, 0.5, 0.0);
    let (t, r) = (p.input(s.n * s.o, 0.5, 0.0), p.input(s.y_len(), 1.0, 0.0));
    let y = p.output(s.y_len());
    p.run(|be| be.group_norm_conv2d_forward(s, input, w, b, Some(t), Some(r), y));
    p.check(&format!("normed conv forward {what}"), y, tol);
    p.check(&format!("normed conv mean {what}"), input.mean, 1e-6);
    p.check(&format!("normed conv rstd {what}"), input.rstd, 1e-5);
    for t in [Some(input.normed), input.dropout.map(|d| d.dropped)]
        .into_iter()
        .flatten()
    {
        assert!(
            p.gpu.download(t).unwrap().iter().all(|v| v.is_nan()),
            "the device wrote the normalised input: {what}"
        );
    }
    let dy = p.input(s.y_len(), 1.0, 0.0);
    let (dw, db) = (p.output(s.w_len()), p.output(s.o));
    p.run(|be| be.conv2d_backward_weight_normed(s, input, dy, dw, db));
    p.check(&format!("normed conv weight grad {what}"), dw, tol);
    p.check(&format!("normed conv bias grad {what}"), db, tol);
}

fn normed_conv_shapes() -> Vec<(ConvShape, usize, bool, bool)> {
    let shape = |n, h, w, c, o, kind| ConvShape {
        n,
        h,
        w,
        c,
        o,
        kind,
    };
    vec![
        (shape(3, 7, 5, 6, 7, ConvKind::K3S1), 3, true, false),
        (shape(3, 7, 5, 6, 7, ConvKind::K3S1), 3, true, true),
        (shape(3, 5, 7, 9, 13, ConvKind::K1), 3, false, false),
        (shape(2, 9, 6, 4, 11, ConvKind::K3S2), 2, true, true),
        // The paper's widths: many tiles, split-K in the weight gradient.
        (shape(4, 16, 16, 128, 256, ConvKind::K3S1), 32, true, true),
    ]
}

#[test]
#[ignore = "needs a CUDA device"]
fn normalising_convolutions_match_the_cpu() {
    // fp32: the statistics differ by fp32 rounding (the CPU sums in fp64), then the same convolution.
    let mut p = Pair::new();
    for (s, groups, silu, dropout) in normed_conv_shapes() {
        normed_conv_case(&mut p, s, groups, silu, dropout, TOL);
    }
    // bf16: the normalised operand is rounded to bf16 as it is staged (it is never a bf16 number, so
    // there is no exact case): TOL_BF16.
    let mut p = Pair::bf16();
    for (s, groups, silu, dropout) in normed_conv_shapes() {
        normed_conv_case(&mut p, s, groups, silu, dropout, TOL_BF16);
    }
}

/// In bf16 precision with the normalisation scratch reserved (as every U-Net placed on the device does),
/// a normalised convolution writes its input once in bf16 into the scratch and convolves that
/// (`group_norm_forward_*` for the statistics, `group_norm_apply_*`, then a plain convolution): the
/// scratch holds, bit for bit, the bf16 rounding of what the separate fp32 ops write (group norm + SiLU,
/// then dropout), the statistics it writes (poisoned before; the backward reads them) are those of the
/// path that normalises as it loads, and the convolution's output and weight gradient are bit for bit
/// those of the loaders that normalise as they load (the same operand values reach the same core in the
/// same order). Shapes whose channels come in runs of 8 (the scratch's
/// kernels need them), with and without SiLU and dropout, one at the paper's widths; inputs in fp32 and
/// in bf16 storage.
#[test]
#[ignore = "needs a CUDA device"]
fn normalising_into_the_scratch_is_the_fused_path_bit_for_bit() {
    let shape = |n, h, w, c, o, kind| ConvShape {
        n,
        h,
        w,
        c,
        o,
        kind,
    };
    let cases = [
        (shape(3, 7, 5, 16, 7, ConvKind::K3S1), 4, true, true),
        (shape(2, 5, 6, 24, 9, ConvKind::K1), 3, false, false),
        (shape(2, 9, 6, 8, 11, ConvKind::K3S2), 2, true, false),
        (shape(2, 16, 16, 128, 256, ConvKind::K3S1), 32, true, true),
    ];
    for (s, groups, silu, dropout) in cases {
        for stored_bf16 in [false, true] {
            let what =
                format!("{s:?} groups {groups} silu {silu} dropout {dropout} bf16 x {stored_bf16}");
            let mut be = device_in(Precision::Bf16);
            let gn = input_norm(&s, groups);
            let values: Vec<f32> = (0..s.x_len())
                .map(|i| 0.3 + 1.5 * rng::normal(3, 1, i as u64))
                .collect();
            let x = match stored_bf16 {
                true => bf16_tensor(&mut be, &values, 0),
                false => f32_tensor(&mut be, &values),
            };
            let param = |be: &mut CudaBackend, len: usize, scale: f32, shift: f32, stream: u64| {
                let v: Vec<f32> = (0..len)
                    .map(|i| shift + scale * rng::normal(3, stream, i as u64))
                    .collect();
                f32_tensor(be, &v)
            };
            let gamma = param(&mut be, s.c, 0.5, 1.0, 2);
            let beta = param(&mut be, s.c, 0.3, 0.0, 3);
            let w = param(&mut be, s.w_len(), 0.2, 0.0, 4);
            let b = param(&mut be, s.o, 0.5, 0.0, 5);
            let dy = param(&mut be, s.y_len(), 1.0, 0.0, 6);
            let mean = be.alloc(gn.stats_len()).unwrap();
            let rstd = be.alloc(gn.stats_len()).unwrap();
            let stream = Stream::per_step(rng::Purpose::Dropout, 1 << 10, 3);
            let input = NormedInput {
                s: gn,
                x,
                gamma,
                beta,
                mean,
                rstd,
                silu,
                normed: be.alloc(s.x_len()).unwrap(),
                dropout: dropout.then(|| DropoutAfter {
                    p: 0.3,
                    seed: 5,
                    stream,
                    dropped: be.alloc(s.x_len()).unwrap(),
                }),
            };
            be.clock_set(17).unwrap();
            // The separate fp32 ops, for the scratch's contents.
            let (y32, d32) = (be.alloc(s.x_len()).unwrap(), be.alloc(s.x_len()).unwrap());
            be.group_norm_forward(gn, x, gamma, beta, y32, mean, rstd, silu)
                .unwrap();
            let conv_input = match dropout {
                true => {
                    be.dropout_forward(y32, d32, 0.3, 5, stream).unwrap();
                    d32
                }
                false => y32,
            };
            let want: Vec<f32> = be
                .download(conv_input)
                .unwrap()
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect();
            let run = |be: &mut CudaBackend| {
                let (y, dw, db) = (
                    be.alloc(s.y_len()).unwrap(),
                    be.alloc(s.w_len()).unwrap(),
                    be.alloc(s.o).unwrap(),
                );
                be.group_norm_conv2d_forward(s, input, w, b, None, None, y)
                    .unwrap();
                be.conv2d_backward_weight_normed(s, input, dy, dw, db)
                    .unwrap();
                (be.download(y).unwrap(), be.download(dw).unwrap())
            };
            let fused = run(&mut be);
            let stats =
                |be: &mut CudaBackend| (be.download(mean).unwrap(), be.download(rstd).unwrap());
            let fused_stats = stats(&mut be);
            assert!(be.norm_scratch().is_none());
            be.reserve_norm_scratch(s.x_len()).unwrap();
            let scratch = be.norm_scratch().expect("a scratch in bf16 precision");
            be.upload(scratch, &vec![f32::NAN; scratch.len]).unwrap();
            // The statistics too: the path through the scratch must write them, as the backward reads them.
            for t in [mean, rstd] {
                be.upload(t, &vec![f32::NAN; t.len]).unwrap();
            }
            let through_scratch = run(&mut be);
            let scratch_stats = stats(&mut be);
            let bits_of = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(
                bits_of(&scratch_stats.0) == bits_of(&fused_stats.0)
                    && bits_of(&scratch_stats.1) == bits_of(&fused_stats.1),
                "the statistics through the scratch differ: {what}"
            );
            let got = be.download(scratch.slice(0, s.x_len())).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(&got) == bits(&want),
                "the scratch is not the rounding of the fp32 path: {what}"
            );
            assert!(
                bits(&through_scratch.0) == bits(&fused.0),
                "forward through the scratch differs: {what}"
            );
            assert!(
                bits(&through_scratch.1) == bits(&fused.1),
                "weight gradient through the scratch differs: {what}"
            );
            eprintln!("{what}: scratch, forward and weight gradient bit for bit");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn group_norm_matches_the_cpu() {
    let mut p = Pair::new();
    for (n, hw, c, groups, silu) in [
        (3, 35, 12, 4, true),
        (2, 9, 6, 3, false),
        (2, 256, 256, 32, true),
        (1, 1024, 128, 32, false),
        // 12 channels a group (the up path's 384-wide concatenations): 252 of the 256 threads walk
        // the group, 4 only join the sums.
        (2, 64, 384, 32, true),
        // 300 channels a group, more than the block's threads: dgamma and dbeta one channel at a time.
        (2, 5, 600, 2, true),
        // 19 images: the finishing sum of dgamma and dbeta gives each of its 8 warps 2 or 3 of them; 72
        // channels, 2 full blocks of 32 and a part.
        (19, 16, 72, 8, true),
    ] {
        let s = GroupNormShape {
            n,
            hw,
            c,
            groups,
            eps: 1e-6,
        };
        let what = format!("n{n} hw{hw} c{c} g{groups} silu {silu}");
        let x = p.input(s.len(), 2.0, 0.5);
        let (gamma, beta) = (p.input(c, 0.3, 1.0), p.input(c, 0.3, 0.0));
        let (y, mean, rstd) = (
            p.output(s.len()),
            p.output(s.stats_len()),
            p.output(s.stats_len()),
        );
        p.run(|be| be.group_norm_forward(s, x, gamma, beta, y, mean, rstd, silu));
        p.check(&format!("group norm forward {what}"), y, TOL);
        p.check(&format!("group norm mean {what}"), mean, TOL);
        p.check(&format!("group norm rstd {what}"), rstd, TOL);
        let dy = p.input(s.len(), 1.0, 0.0);
        let (dx, dg, db) = (p.output(s.len()), p.output(c), p.output(c));
        for acc in [false, true] {
            p.run(|be| {
                be.group_norm_backward(s, x, gamma, beta, mean, rstd, dy, dx, dg, db, silu, acc)
            });
            p.check(&format!("group norm dx (accumulate {acc}) {what}"), dx, TOL);
            p.check(&format!("group norm dgamma {what}"), dg, TOL);
            p.check(&format!("group norm dbeta {what}"), db, TOL);
        }
    }
}

/// `values` rounded to bf16 in a bf16 tensor on `be`, starting `skew` words past a 16-byte boundary of the
/// arena (0: where the kernels read runs of 8 with one 16-byte load; 1: their element-by-element
/// fallback).
fn bf16_tensor(be: &mut CudaBackend, values: &[f32], skew: usize) -> Tensor {
    let words = be.alloc(values.len().div_ceil(2) + 4 + skew).unwrap();
    let t = Tensor::bf16(words.off.next_multiple_of(4) + skew, values.len());
    be.upload(t, values).unwrap();
    t
}

/// An fp32 tensor on `be` holding `values`.
fn f32_tensor(be: &mut CudaBackend, values: &[f32]) -> Tensor {
    let t = be.alloc(values.len()).unwrap();
    be.upload(t, values).unwrap();
    t
}

/// The ResNet blocks' hidden activation stored in bf16 (`Backend::stores_bf16_activations`), op by op, against
/// the fp32 path on the same values: the group norm's forward and backward and the normalising
/// convolution's forward and weight gradient reading it (widened to fp32, then the same arithmetic: held to
/// 1e-6 of scale, which leaves room only for the compiler contracting the two instantiations' arithmetic
/// differently; a wrong half of a word or a wrong index is O(1)), and the normalising forward writing it
/// (bit for bit the bf16 rounding of what the fp32 kernel writes: the same sums, rounded once). Channels
/// 6 (runs of 8 gathered element by element) and 64 (16-byte loads where aligned), each at both
/// alignments, and the dropout on. Then the refusals: an op with no bf16 kernel, and fp32 precision.
#[test]
#[ignore = "needs a CUDA device"]
fn bf16_hidden_activations_are_read_and_written_as_their_rounding() {
    let mut be = device_in(Precision::Bf16);
    let mut stream = 0;
    let mut draw = |len: usize, scale: f32, shift: f32| -> Vec<f32> {
        stream += 1;
        (0..len)
            .map(|i| shift + scale * rng::normal(11, stream, i as u64))
            .map(|v| half::bf16::from_f32(v).to_f32())
            .collect()
    };
    let shape = |n, h, w, c, o| ConvShape {
        n,
        h,
        w,
        c,
        o,
        kind: ConvKind::K3S1,
    };
    let same = |what: &str, a: &[f32], b: &[f32]| {
        let e = scaled_error(a, b);
        eprintln!("{what:<56} error {e:.2e}");
        assert!(e <= 1e-6, "{what}: error {e:e}");
    };
    be.clock_set(4).unwrap();
    for (s, groups) in [(shape(3, 7, 5, 6, 7), 3), (shape(2, 8, 8, 64, 32), 8)] {
        for skew in [0, 1] {
            let what = format!("c{} skew {skew}", s.c);
            let gn = input_norm(&s, groups);
            let xv = draw(s.x_len(), 1.5, 0.3);
            let (x32, x16) = (f32_tensor(&mut be, &xv), bf16_tensor(&mut be, &xv, skew));
            let gamma = f32_tensor(&mut be, &draw(s.c, 0.5, 1.0));
            let beta = f32_tensor(&mut be, &draw(s.c, 0.3, 0.0));
            let dy_gn = f32_tensor(&mut be, &draw(gn.len(), 1.0, 0.0));
            let w = f32_tensor(&mut be, &draw(s.w_len(), 0.2, 0.0));
            be.keep_weight_copy(w).unwrap();
            let b = f32_tensor(&mut be, &draw(s.o, 0.5, 0.0));
            let t = f32_tensor(&mut be, &draw(s.n * s.o, 0.5, 0.0));
            let dy = f32_tensor(&mut be, &draw(s.y_len(), 1.0, 0.0));
            let outputs = |be: &mut CudaBackend, x: Tensor| -> Vec<Vec<f32>> {
                let mut out = |len| be.alloc(len).unwrap();
                let (y, mean, rstd) = (out(gn.len()), out(gn.stats_len()), out(gn.stats_len()));
                let (dx, dg, db) = (out(gn.len()), out(s.c), out(s.c));
                let (normed, dropped, yc) = (out(s.x_len()), out(s.x_len()), out(s.y_len()));
                let (dw, dbc) = (out(s.w_len()), out(s.o));
                be.group_norm_forward(gn, x, gamma, beta, y, mean, rstd, true)
                    .unwrap();
                be.group_norm_backward(
                    gn, x, gamma, beta, mean, rstd, dy_gn, dx, dg, db, true, false,
                )
                .unwrap();
                let input = NormedInput {
                    s: gn,
                    x,
                    gamma,
                    beta,
                    mean,
                    rstd,
                    silu: true,
                    normed,
                    dropout: Some(DropoutAfter {
                        p: 0.2,
                        seed: 9,
                        stream: Stream::per_step(rng::Purpose::Dropout, 1 << 10, 1),
                        dropped,
                    }),
                };
                be.group_norm_conv2d_forward(s, input, w, b, Some(t), None, yc)
                    .unwrap();
                be.conv2d_backward_weight_normed(s, input, dy, dw, dbc)
                    .unwrap();
                [y, mean, rstd, dx, dg, db, yc, dw, dbc]
                    .map(|t| be.download(t).unwrap())
                    .to_vec()
            };
            let want = outputs(&mut be, x32);
            let got = outputs(&mut be, x16);
            let names = [
                "group norm y",
                "group norm mean",
                "group norm rstd",
                "group norm dx",
                "group norm dgamma",
                "group norm dbeta",
                "normalising conv forward",
                "normalising conv weight grad",
                "normalising conv bias grad",
            ];
            for ((name, a), b) in names.iter().zip(&got).zip(&want) {
                same(&format!("bf16 x: {name} {what}"), a, b);
            }

            // Writing it: the first convolution of a block, its output rounded to bf16.
            let mean = be.alloc(gn.stats_len()).unwrap();
            let rstd = be.alloc(gn.stats_len()).unwrap();
            let input = NormedInput {
                s: gn,
                x: x32,
                gamma,
                beta,
                mean,
                rstd,
                silu: true,
                normed: be.alloc(s.x_len()).unwrap(),
                dropout: None,
            };
            let y32 = be.alloc(s.y_len()).unwrap();
            let y16 = bf16_tensor(&mut be, &vec![f32::NAN; s.y_len()], skew);
            be.group_norm_conv2d_forward(s, input, w, b, Some(t), None, y32)
                .unwrap();
            be.group_norm_conv2d_forward(s, input, w, b, Some(t), None, y16)
                .unwrap();
            let rounded: Vec<f32> = be
                .download(y32)
                .unwrap()
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect();
            let stored = be.download(y16).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&stored), bits(&rounded), "bf16 y {what}");
            eprintln!("bf16 y: normalising conv forward {what:<26} bit for bit");

            // What has no kernel: an op not taught bf16, both input and output in bf16, fp32 precision.
            let scratch = be.alloc(s.x_len()).unwrap();
            let refused = |r: ddpm_cuda::Result<()>, case: &str| {
                let e = r.expect_err(case).to_string();
                assert!(e.contains("bf16"), "{case}: {e}");
            };
            refused(be.silu_forward(x16, scratch), "SiLU of a bf16 tensor");
            let both = NormedInput { x: x16, ..input };
            be.set_precision(Precision::Fp32).unwrap();
            refused(
                be.group_norm_conv2d_forward(s, both, w, b, Some(t), None, y32),
                "bf16 input in fp32",
            );
            let (dw, db) = (be.alloc(s.w_len()).unwrap(), be.alloc(s.o).unwrap());
            refused(
                be.conv2d_backward_weight_normed(s, both, dy, dw, db),
                "bf16 input in fp32, weight gradient",
            );
            be.set_precision(Precision::Bf16).unwrap();
        }
    }
}

/// The ops of the residual stream with each activation they meet stored in fp32 or in bf16
/// (`Backend::stores_bf16_activations`), on the same bf16-representable values: the convolutions (plain
/// and normalising; 3x3, 1x1 and the 3x3 stride-2 downsampler) with every storage of input, residual
/// (none, fp32, bf16) and output, the plain weight gradient, the attention projection with every storage
/// of input, residual and output and its gradients, and the concatenation and upsampling.
/// - Reading bf16 (an input or a residual): held to 1e-6 of scale against the all-fp32 launch. The values
///   are the same, widened exactly; the kernels differ (the `_io` kernels' two pointers, `_bf16in`'s
///   loads), which leaves room only for the compiler contracting the arithmetic differently, while a
///   wrong half of a word or a wrong index is O(1).
/// - Writing bf16: bit for bit the bf16 rounding of the same launch writing fp32 (the same sums,
///   rounded once in the epilogue). NaN-poisoned outputs catch an element never written.
/// - The copies: exactly their inputs.
///
/// Then the refusals: a copy with its tensors stored unlike, and bf16 in fp32 precision.
#[test]
#[ignore = "needs a CUDA device"]
fn residual_stream_ops_take_each_activation_in_either_storage() {
    let mut be = device_in(Precision::Bf16);
    let mut stream = 100;
    let mut draw = |len: usize, scale: f32, shift: f32| -> Vec<f32> {
        stream += 1;
        (0..len)
            .map(|i| shift + scale * rng::normal(12, stream, i as u64))
            .map(|v| half::bf16::from_f32(v).to_f32())
            .collect()
    };
    let same = |what: &str, a: &[f32], b: &[f32]| {
        let e = scaled_error(a, b);
        eprintln!("{what:<64} error {e:.2e}");
        assert!(e <= 1e-6, "{what}: error {e:e}");
    };
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    let rounded = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect()
    };
    // Both storages of the same values: [fp32, bf16].
    let stored = |be: &mut CudaBackend, v: &[f32], skew: usize| -> [Tensor; 2] {
        [f32_tensor(be, v), bf16_tensor(be, v, skew)]
    };
    let poisoned = |be: &mut CudaBackend, len: usize, bf16: bool, skew: usize| -> Tensor {
        let nan = vec![f32::NAN; len];
        match bf16 {
            true => bf16_tensor(be, &nan, skew),
            false => f32_tensor(be, &nan),
        }
    };
    be.clock_set(3).unwrap();
    let shape = |n, h, c, o, kind| ConvShape {
        n,
        h,
        w: h,
        c,
        o,
        kind,
    };
    let cases = [
        (shape(2, 6, 6, 10, ConvKind::K3S1), 3),
        (shape(2, 8, 64, 32, ConvKind::K1), 8),
        (shape(1, 9, 16, 24, ConvKind::K3S2), 4),
    ];
    for (case, (s, groups)) in cases.into_iter().enumerate() {
        let skew = case % 2;
        let what = format!("{:?} c{} o{}", s.kind, s.c, s.o);
        let x = stored(&mut be, &draw(s.x_len(), 1.5, 0.2), skew);
        let r = stored(&mut be, &draw(s.y_len(), 1.0, 0.0), 1 - skew);
        let w = f32_tensor(&mut be, &draw(s.w_len(), 0.2, 0.0));
        be.keep_weight_copy(w).unwrap();
        let b = f32_tensor(&mut be, &draw(s.o, 0.5, 0.0));
        let t = f32_tensor(&mut be, &draw(s.n * s.o, 0.5, 0.0));
        let gn = input_norm(&s, groups);
        let gamma = f32_tensor(&mut be, &draw(s.c, 0.5, 1.0));
        let beta = f32_tensor(&mut be, &draw(s.c, 0.3, 0.0));
        for normed in [false, true] {
            let run = |be: &mut CudaBackend, x: Tensor, r: Option<Tensor>, y: Tensor| {
                if normed {
                    let input = NormedInput {
                        s: gn,
                        x,
                        gamma,
                        beta,
                        mean: be.alloc(gn.stats_len()).unwrap(),
                        rstd: be.alloc(gn.stats_len()).unwrap(),
                        silu: true,
                        normed: be.alloc(s.x_len()).unwrap(),
                        dropout: None,
                    };
                    be.group_norm_conv2d_forward(s, input, w, b, Some(t), r, y)
                } else {
                    be.conv2d_forward_fused(s, x, w, b, Some(t), r, y)
                }
                .unwrap();
                be.download(y).unwrap()
            };
            let kind = if normed { "normalising conv" } else { "conv" };
            let residuals = [None, Some(r[0]), Some(r[1])];
            for (ri, res) in residuals.into_iter().enumerate() {
                let y32 = be.alloc(s.y_len()).unwrap();
                let base = run(&mut be, x[0], residuals[ri.min(1)], y32);
                for x in x {
                    let how = format!(
                        "{kind} {what}: x {:?}, residual {:?}",
                        x.dtype,
                        res.map(|r| r.dtype)
                    );
                    let y = poisoned(&mut be, s.y_len(), false, 0);
                    let wide = run(&mut be, x, res, y);
                    same(&how, &wide, &base);
                    let y16 = poisoned(&mut be, s.y_len(), true, skew);
                    let narrow = run(&mut be, x, res, y16);
                    assert_eq!(bits(&narrow), bits(&rounded(&wide)), "{how}, y bf16");
                }
            }
        }
        // The plain weight gradient over a bf16 input.
        let dy = f32_tensor(&mut be, &draw(s.y_len(), 1.0, 0.0));
        let grads = |be: &mut CudaBackend, x: Tensor| {
            let (dw, db) = (be.alloc(s.w_len()).unwrap(), be.alloc(s.o).unwrap());
            be.conv2d_backward_weight(s, x, dy, dw, db).unwrap();
            [dw, db].map(|t| be.download(t).unwrap())
        };
        let (want, got) = (grads(&mut be, x[0]), grads(&mut be, x[1]));
        same(
            &format!("conv weight grad {what}: x bf16"),
            &got[0],
            &want[0],
        );
        same(&format!("conv bias grad {what}: x bf16"), &got[1], &want[1]);
        eprintln!("conv {what}: every bf16 output bit for bit");
    }

    // The attention projection: its input (the attention output), the residual (the block's input) and
    // the output (the block's output); and its weight gradient over the input.
    for (m, k, n) in [(130, 24, 136), (37, 19, 23)] {
        let what = format!("projection {m}x{k} -> {n}");
        let x = stored(&mut be, &draw(m * k, 1.0, 0.0), 0);
        let w = f32_tensor(&mut be, &draw(n * k, 0.3, 0.0));
        be.keep_weight_copy(w).unwrap();
        let b = f32_tensor(&mut be, &draw(n, 0.5, 0.0));
        let r = stored(&mut be, &draw(m * n, 1.0, 0.0), 1);
        let run = |be: &mut CudaBackend, x: Tensor, r: Tensor, y16: bool| {
            let y = poisoned(be, m * n, y16, 0);
            be.linear_forward_fused(m, k, n, x, w, b, r, y).unwrap();
            be.download(y).unwrap()
        };
        let base = run(&mut be, x[0], r[0], false);
        for x in x {
            for r in r {
                let how = format!("{what}: x {:?}, residual {:?}", x.dtype, r.dtype);
                let wide = run(&mut be, x, r, false);
                same(&how, &wide, &base);
                let narrow = run(&mut be, x, r, true);
                assert_eq!(bits(&narrow), bits(&rounded(&wide)), "{how}, y bf16");
            }
        }
        let dy = f32_tensor(&mut be, &draw(m * n, 1.0, 0.0));
        let grads = |be: &mut CudaBackend, x: Tensor| {
            let (dx, dw, db) = (
                be.alloc(m * k).unwrap(),
                be.alloc(n * k).unwrap(),
                be.alloc(n).unwrap(),
            );
            be.linear_backward(m, k, n, x, w, dy, Some(dx), dw, db, false)
                .unwrap();
            [dx, dw, db].map(|t| be.download(t).unwrap())
        };
        let (want, got) = (grads(&mut be, x[0]), grads(&mut be, x[1]));
        for ((name, a), b) in ["dx", "dw", "db"].iter().zip(&got).zip(&want) {
            same(&format!("{what}: {name}, x bf16"), a, b);
        }
        eprintln!("{what}: bf16 output bit for bit");
    }

    // The copies, at both alignments of their output.
    let (n, h, w, c) = (2, 3, 5, 7);
    let xv = draw(n * h * w * c, 1.0, 0.0);
    let x = stored(&mut be, &xv, 1);
    let up32 = be.alloc(4 * xv.len()).unwrap();
    be.upsample2x_forward(n, h, w, c, x[0], up32).unwrap();
    let want = be.download(up32).unwrap();
    for skew in [0, 1] {
        let up16 = poisoned(&mut be, 4 * xv.len(), true, skew);
        be.upsample2x_forward(n, h, w, c, x[1], up16).unwrap();
        assert_eq!(
            bits(&be.download(up16).unwrap()),
            bits(&want),
            "upsample skew {skew}"
        );
    }
    let (pixels, ca, cb) = (13, 5, 6);
    let a = stored(&mut be, &draw(pixels * ca, 1.0, 0.0), 0);
    let bb = stored(&mut be, &draw(pixels * cb, 1.0, 0.0), 1);
    let cat32 = be.alloc(pixels * (ca + cb)).unwrap();
    be.concat_forward(pixels, ca, cb, a[0], bb[0], cat32)
        .unwrap();
    let want = be.download(cat32).unwrap();
    for skew in [0, 1] {
        let cat16 = poisoned(&mut be, pixels * (ca + cb), true, skew);
        be.concat_forward(pixels, ca, cb, a[1], bb[1], cat16)
            .unwrap();
        assert_eq!(
            bits(&be.download(cat16).unwrap()),
            bits(&want),
            "concat skew {skew}"
        );
    }
    eprintln!("upsample and concat in bf16: exact copies");

    // What has no kernel: a copy between storages, and bf16 in fp32 precision.
    let refused = |r: ddpm_cuda::Result<()>, case: &str| {
        let e = r.expect_err(case).to_string();
        assert!(e.contains("bf16"), "{case}: {e}");
    };
    refused(
        be.concat_forward(pixels, ca, cb, a[1], bb[0], cat32),
        "concat of bf16 and fp32",
    );
    refused(
        be.upsample2x_forward(n, h, w, c, x[1], up32),
        "upsample of bf16 into fp32",
    );
    be.set_precision(Precision::Fp32).unwrap();
    let (s, _) = cases[0];
    let xs = bf16_tensor(&mut be, &vec![0.0; s.x_len()], 0);
    let (w, b) = (
        f32_tensor(&mut be, &vec![0.0; s.w_len()]),
        f32_tensor(&mut be, &vec![0.0; s.o]),
    );
    let y = be.alloc(s.y_len()).unwrap();
    refused(be.conv2d_forward(s, xs, w, b, y), "bf16 input in fp32");
    let (dw, db) = (be.alloc(s.w_len()).unwrap(), be.alloc(s.o).unwrap());
    let dy = be.alloc(s.y_len()).unwrap();
    refused(
        be.conv2d_backward_weight(s, xs, dy, dw, db),
        "bf16 input in fp32, weight gradient",
    );
    be.set_precision(Precision::Bf16).unwrap();
}

/// Linear layers of awkward sizes, and the attention projections' shape (many rows).
/// (45, 24, 40) has every dimension a multiple of 8, which the tensor-core core loads 8 at a time, in partial
/// tiles; (130, 20, 136) rows of 20, 16-byte aligned but not a multiple of 8 long.
const LINEARS: [(usize, usize, usize); 6] = [
    (37, 19, 23),
    (2, 128, 512),
    (4096, 64, 192),
    (1, 3, 1),
    (45, 24, 40),
    (130, 20, 136),
];

fn linear_case(p: &mut Pair, m: usize, k: usize, n: usize, tol: f64) {
    let what = format!("{m}x{k} -> {n}");
    let x = p.input(m * k, 1.0, 0.0);
    let (w, b) = (p.input(n * k, 0.3, 0.0), p.input(n, 0.5, 0.0));
    let y = p.output(m * n);
    p.run(|be| be.linear_forward(m, k, n, x, w, b, y));
    p.check(&format!("linear forward {what}"), y, tol);
    let (r, yf) = (p.input(m * n, 1.0, 0.0), p.output(m * n));
    p.run(|be| be.linear_forward_fused(m, k, n, x, w, b, r, yf));
    p.check(&format!("linear forward + residual {what}"), yf, tol);
    let dy = p.input(m * n, 1.0, 0.0);
    let (dx, dw, db) = (p.output(m * k), p.output(n * k), p.output(n));
    for acc in [false, true] {
        p.run(|be| be.linear_backward(m, k, n, x, w, dy, Some(dx), dw, db, acc));
        p.check(&format!("linear dx (accumulate {acc}) {what}"), dx, tol);
        p.check(&format!("linear dw {what}"), dw, tol);
        p.check(&format!("linear db {what}"), db, tol);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn bf16_linears_are_exact_on_bf16_inputs_and_close_on_any() {
    let mut p = Pair::bf16();
    p.bf16_inputs = true;
    for (m, k, n) in LINEARS {
        linear_case(&mut p, m, k, n, TOL_BF16_EXACT);
    }
    p.bf16_inputs = false;
    linear_case(&mut p, 4096, 64, 192, TOL_BF16);
}

#[test]
#[ignore = "needs a CUDA device"]
fn linear_and_attention_match_the_cpu() {
    let mut p = Pair::new();
    for (m, k, n) in LINEARS {
        linear_case(&mut p, m, k, n, TOL);
    }
    let attentions: &[(usize, usize, usize)] = &[
        (2, 13, 20),
        (3, 64, 64),
        (2, 256, 256),
        (4, 16, 256),
        (1, 9, 3),
    ];
    for &(n, l, c) in attentions {
        let s = AttentionShape { n, l, c };
        let what = format!("n{n} l{l} c{c}");
        let qkv = p.input(n * l * 3 * c, 1.0, 0.0);
        let (out, lse) = (p.output(n * l * c), p.output(n * l));
        p.run(|be| be.attention_forward(s, qkv, out, lse));
        p.check(&format!("attention out {what}"), out, TOL);
        p.check(&format!("attention lse {what}"), lse, TOL);
        let dout = p.input(n * l * c, 1.0, 0.0);
        let dqkv = p.output(n * l * 3 * c);
        p.run(|be| be.attention_backward(s, qkv, out, lse, dout, dqkv));
        p.check(&format!("attention dqkv {what}"), dqkv, TOL);
    }
}

/// The bf16 attention kernels (tensor cores for every product, the softmax and its gradient terms in fp32)
/// against the CPU's fp32, forward and backward, on widths they take (multiples of 16, one tile or many,
/// lengths that are not multiples of the tiles) and one they leave to the fp32 kernels (3).
///
/// Tolerances. The scores s = q.k / sqrt(c) have unit scale here and come out of bf16 products with an
/// error ~2^-8 of that scale (TOL_BF16); a softmax weight exp(s - m) inherits it as a relative error, and P
/// itself is rounded to bf16 (2^-9) before P v, whose v is rounded too: the output, an average of v rows,
/// is off by ~2^-8 relative to its scale, and lse (the log of a sum of such weights) by ~2^-8 absolute on
/// a scale of log l + max s ~ 5. Output 2e-2, lse 5e-3. The gradients are sums of products of such P (or
/// dS, whose dP = dout.v is a bf16 product too) with bf16 rows: ~2^-8 of their scale as well, 3e-2.
#[test]
#[ignore = "needs a CUDA device"]
fn bf16_attention_tracks_fp32() {
    let mut p = Pair::bf16();
    for (n, l, c) in [
        (2, 13, 32),
        (3, 64, 64),
        (2, 256, 256),
        (4, 16, 256),
        (1, 9, 3),
        (2, 100, 48),
    ] {
        let s = AttentionShape { n, l, c };
        let what = format!("bf16 n{n} l{l} c{c}");
        let qkv = p.input(n * l * 3 * c, 1.0, 0.0);
        let (out, lse) = (p.output(n * l * c), p.output(n * l));
        p.run(|be| be.attention_forward(s, qkv, out, lse));
        p.check(&format!("attention out {what}"), out, 2e-2);
        p.check(&format!("attention lse {what}"), lse, 5e-3);
        let dout = p.input(n * l * c, 1.0, 0.0);
        let dqkv = p.output(n * l * 3 * c);
        p.run(|be| be.attention_backward(s, qkv, out, lse, dout, dqkv));
        // Each of dq, dk and dv against its own scale (they differ), from their columns of [n, l, 3c].
        let (a, b) = (p.gpu.download(dqkv).unwrap(), p.cpu.download(dqkv).unwrap());
        for (third, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let cols = |v: &[f32]| -> Vec<f32> {
                v.chunks(3 * c)
                    .flat_map(|r| r[third * c..(third + 1) * c].to_vec())
                    .collect()
            };
            let e = scaled_error(&cols(&a), &cols(&b));
            eprintln!("attention {name} {what:<38} error {e:.2e}");
            assert!(
                e <= 3e-2,
                "attention {name} {what}: error {e:e} (tolerance 3e-2)"
            );
        }
    }
}

/// On a device with an A100's 163 KiB of shared memory per block the bf16 forward (132 KiB at c = 256) still
/// runs on tensor cores and the backward, whose kernels need 187-190 KiB there, on the fp32 kernels from the
/// forward's lse; on an sm_86 / sm_89 card's 99 KiB both passes take the fp32 kernels. The launches say
/// which kernels ran, and the results keep the tolerances of `bf16_attention_tracks_fp32` (the fp32 passes
/// only tighten them).
#[test]
#[ignore = "needs a CUDA device"]
fn attention_on_smaller_devices_runs_the_passes_that_fit_on_tensor_cores() {
    for (kib, forward) in [
        (163, "attention_forward_bf16"),
        (99, "attention_forward_f32"),
    ] {
        let mut gpu = device_in(Precision::Bf16);
        gpu.limit_shared_memory(kib << 10);
        let mut p = Pair::with(gpu);
        let (n, l, c) = (2, 40, 256);
        let s = AttentionShape { n, l, c };
        let qkv = p.input(n * l * 3 * c, 1.0, 0.0);
        let (out, lse) = (p.output(n * l * c), p.output(n * l));
        let dout = p.input(n * l * c, 1.0, 0.0);
        let dqkv = p.output(n * l * 3 * c);
        assert!(p.gpu.profile_begin().unwrap());
        p.run(|be| be.attention_forward(s, qkv, out, lse));
        p.run(|be| be.attention_backward(s, qkv, out, lse, dout, dqkv));
        let kernels: Vec<&str> = p
            .gpu
            .profile_end()
            .unwrap()
            .iter()
            .map(|l| l.kernel)
            .collect();
        assert_eq!(
            kernels,
            [
                forward,
                "attention_backward_dq_f32",
                "attention_backward_dkv_f32"
            ],
            "at {kib} KiB"
        );
        p.check(&format!("attention out on {kib} KiB"), out, 2e-2);
        p.check(&format!("attention lse on {kib} KiB"), lse, 5e-3);
        p.check(&format!("attention dqkv on {kib} KiB"), dqkv, 3e-2);
    }
}

/// Attention reading q, k, v stored in bf16 (the projection's output in bf16 precision,
/// `Backend::stores_bf16_activations`) against the same kernels reading the same values in fp32: forward and
/// backward, on the fp32 kernels (fp32 precision, and in bf16 a width the tensor-core kernels do not take)
/// and the tensor-core ones. The values widen exactly and the arithmetic is the same, so 1e-6 of scale
/// leaves room only for the two instantiations being compiled apart; reading the wrong half of a word,
/// or a k or v third from the wrong place, is O(1). Then the output stored in bf16 as well.
#[test]
#[ignore = "needs a CUDA device"]
fn attention_reads_bf16_qkv_as_its_fp32_values() {
    for (p, n, l, c) in [
        (Precision::Fp32, 2, 13, 24),
        (Precision::Bf16, 2, 13, 24),
        (Precision::Bf16, 2, 70, 32),
    ] {
        let mut be = device_in(p);
        let s = AttentionShape { n, l, c };
        let len = n * l * 3 * c;
        let values: Vec<f32> = (0..len)
            .map(|i| half::bf16::from_f32(rng::normal(13, 1, i as u64)).to_f32())
            .collect();
        let dout_values: Vec<f32> = (0..n * l * c)
            .map(|i| rng::normal(13, 2, i as u64))
            .collect();
        let dout = f32_tensor(&mut be, &dout_values);
        let run = |be: &mut CudaBackend, qkv: Tensor| -> [Vec<f32>; 3] {
            let (out, lse) = (be.alloc(n * l * c).unwrap(), be.alloc(n * l).unwrap());
            let dqkv = be.alloc(len).unwrap();
            be.attention_forward(s, qkv, out, lse).unwrap();
            be.attention_backward(s, qkv, out, lse, dout, dqkv).unwrap();
            [out, lse, dqkv].map(|t| be.download(t).unwrap())
        };
        let qkv32 = f32_tensor(&mut be, &values);
        let want = run(&mut be, qkv32);
        for skew in [0, 1] {
            let qkv16 = bf16_tensor(&mut be, &values, skew);
            let got = run(&mut be, qkv16);
            for ((name, a), b) in ["out", "lse", "dqkv"].iter().zip(&got).zip(&want) {
                let e = scaled_error(a, b);
                let what = format!("{} n{n} l{l} c{c} skew {skew}", p.name());
                eprintln!("attention of bf16 qkv: {name} {what:<30} error {e:.2e}");
                assert!(
                    e <= 1e-6,
                    "attention of bf16 qkv: {name} {what}: error {e:e}"
                );
            }
        }
        // And the output stored in bf16 too (`_bf16io`): the forward writes the bf16 rounding of what the
        // same launch writes in fp32, bit for bit (the same sums, rounded once as stored); the backward
        // over it matches the backward over those rounded values stored in fp32 (dq reads out for its
        // row terms), to 1e-6 as above.
        let qkv16 = bf16_tensor(&mut be, &values, 0);
        let (out32, lse) = (be.alloc(n * l * c).unwrap(), be.alloc(n * l).unwrap());
        be.attention_forward(s, qkv16, out32, lse).unwrap();
        let rounded: Vec<f32> = be
            .download(out32)
            .unwrap()
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        let out_rounded = f32_tensor(&mut be, &rounded);
        let dqkv_want = be.alloc(len).unwrap();
        be.attention_backward(s, qkv16, out_rounded, lse, dout, dqkv_want)
            .unwrap();
        let dqkv_want = be.download(dqkv_want).unwrap();
        for skew in [0, 1] {
            let what = format!("{} n{n} l{l} c{c} skew {skew}", p.name());
            let out16 = bf16_tensor(&mut be, &vec![f32::NAN; n * l * c], skew);
            let (lse16, dqkv) = (be.alloc(n * l).unwrap(), be.alloc(len).unwrap());
            be.attention_forward(s, qkv16, out16, lse16).unwrap();
            let bits = |v: Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(be.download(out16).unwrap()),
                bits(rounded.clone()),
                "bf16 out {what}"
            );
            assert_eq!(
                bits(be.download(lse16).unwrap()),
                bits(be.download(lse).unwrap()),
                "lse {what}"
            );
            be.attention_backward(s, qkv16, out16, lse16, dout, dqkv)
                .unwrap();
            let e = scaled_error(&be.download(dqkv).unwrap(), &dqkv_want);
            eprintln!("attention of bf16 qkv and out: dqkv {what:<26} error {e:.2e}");
            assert!(e <= 1e-6, "attention bf16 out: dqkv {what}: error {e:e}");
        }
        // No kernel writes a bf16 output from fp32 q, k, v.
        let out16 = bf16_tensor(&mut be, &vec![0.0; n * l * c], 0);
        let e = be.attention_forward(s, qkv32, out16, lse).unwrap_err();
        assert!(e.to_string().contains("bf16"), "{e}");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn small_ops_match_the_cpu() {
    let mut p = Pair::new();
    let (n, h, w, c) = (3, 5, 7, 11);
    let len = n * h * w * c;
    let x = p.input(len, 2.0, 0.0);
    let y = p.output(len);
    p.run(|be| be.silu_forward(x, y));
    p.check("silu forward", y, TOL);
    let dy = p.input(len, 1.0, 0.0);
    let dx = p.output(len);
    for acc in [false, true] {
        p.run(|be| be.silu_backward(x, dy, dx, acc));
        p.check(&format!("silu backward (accumulate {acc})"), dx, TOL);
    }
    let up = p.output(4 * len);
    p.run(|be| be.upsample2x_forward(n, h, w, c, x, up));
    p.check("upsample forward", up, 0.0);
    let dup = p.input(4 * len, 1.0, 0.0);
    for acc in [false, true] {
        p.run(|be| be.upsample2x_backward(n, h, w, c, dup, dx, acc));
        p.check(&format!("upsample backward (accumulate {acc})"), dx, TOL);
    }
    let (pixels, ca, cb) = (n * h * w, 5, 9);
    let (a, b) = (
        p.input(pixels * ca, 1.0, 0.0),
        p.input(pixels * cb, 1.0, 0.0),
    );
    let cat = p.output(pixels * (ca + cb));
    p.run(|be| be.concat_forward(pixels, ca, cb, a, b, cat));
    p.check("concat forward", cat, 0.0);
    let dcat = p.input(pixels * (ca + cb), 1.0, 0.0);
    let (da, db) = (p.output(pixels * ca), p.output(pixels * cb));
    for (acc_a, acc_b) in [(false, false), (true, false), (false, true)] {
        p.run(|be| be.concat_backward(pixels, ca, cb, dcat, da, db, acc_a, acc_b));
        p.check("concat backward a", da, TOL);
        p.check("concat backward b", db, TOL);
    }
    let bias = p.input(n * c, 1.0, 0.0);
    let yb = p.input(len, 1.0, 0.0);
    p.run(|be| be.add_image_bias(n, h * w, c, yb, bias));
    p.check("add image bias", yb, TOL);
    let dbias = p.output(n * c);
    p.run(|be| be.image_bias_backward(n, h * w, c, dy, dbias));
    p.check("image bias backward", dbias, TOL);
    let steps = p.alloc(4);
    for be in [&mut p.cpu as &mut dyn Backend, &mut p.gpu] {
        be.upload(steps, &[0.0, 1.0, 517.0, 999.0]).unwrap();
    }
    for dim in [128, 7] {
        let emb = p.output(4 * dim);
        p.run(|be| be.timestep_embedding(4, dim, steps, emb));
        // fp64 on both sides, rounded once: a last-bit difference of fp64 sin/cos at most.
        p.check(&format!("timestep embedding dim {dim}"), emb, 1e-7);
    }
    // The masks of block 5 at training step 31: the stream comes from the clock on the device.
    let drop = p.output(len);
    let stream = Stream::per_step(rng::Purpose::Dropout, 1 << 10, 5);
    p.run(|be| {
        be.clock_set(31)?;
        be.dropout_forward(x, drop, 0.3, 5, stream)
    });
    p.check("dropout forward (same Philox mask)", drop, 1e-7);
    for acc in [false, true] {
        p.run(|be| be.dropout_backward(dy, dx, 0.3, 5, stream, acc));
        p.check(&format!("dropout backward (accumulate {acc})"), dx, 1e-6);
    }
    let (sum, add_y) = (p.output(len), p.output(len));
    p.run(|be| be.add(x, dy, add_y));
    p.check("add", add_y, 0.0);
    p.run(|be| be.copy(x, sum));
    p.check("copy", sum, 0.0);
    p.run(|be| be.accumulate(dy, sum, true));
    p.check("accumulate", sum, 0.0);
    p.run(|be| be.fill(sum, 2.5));
    p.check("fill", sum, 0.0);
}

#[test]
#[ignore = "needs a CUDA device"]
fn loss_optimizer_and_diffusion_ops_match_the_cpu() {
    let mut p = Pair::new();
    // Sizes that are not multiples of 4 exercise the Philox blocks' edges; a first element that is not
    // one either.
    let len = 3 * 9 * 7 * 3 + 2;
    let (pred, target) = (p.input(len, 1.0, 0.0), p.input(len, 1.0, 0.2));
    let (loss, dpred) = (p.output(1), p.output(len));
    p.run(|be| be.mse_loss(pred, target, loss, dpred));
    p.check("mse loss", loss, 1e-6);
    p.check("mse gradient", dpred, 1e-6);

    let n = 1_000_003;
    let (params, grads) = (p.input(n, 1.0, 0.0), p.input(n, 0.01, 0.0));
    let (m, v) = (p.input(n, 0.001, 0.0), p.input(n, 0.0, 0.0001));
    let norm = p.output(1);
    p.run(|be| be.global_norm(grads, norm));
    p.check("global norm", norm, 1e-6);
    // Update 5 of a 10-step warmup: the device resolves the learning rate and bias corrections from
    // its clock (fp64, rounded once, as the CPU does).
    let hp = AdamHyper {
        lr: 2e-4,
        warmup: 10,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
    };
    p.run(|be| {
        be.clock_set(4)?;
        be.adam_step(params, grads, m, v, norm, hp)
    });
    p.check("adam params", params, 1e-6);
    p.check("adam m", m, 1e-6);
    p.check("adam v", v, 1e-6);
    let ema = p.input(n, 1.0, 0.0);
    p.run(|be| be.ema_update(ema, params, 0.999));
    p.check("ema", ema, 1e-6);
    // A non-finite norm skips the step on both sides.
    for be in [&mut p.cpu as &mut dyn Backend, &mut p.gpu] {
        be.fill(norm, f32::INFINITY).unwrap();
    }
    let before = p.gpu.download(params).unwrap();
    p.run(|be| be.adam_step(params, grads, m, v, norm, hp));
    assert_eq!(
        p.gpu.download(params).unwrap(),
        before,
        "a non-finite norm must skip the step"
    );

    let s = Schedule::paper();
    let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    let (sa, s1) = (p.alloc(1000), p.alloc(1000));
    for be in [&mut p.cpu as &mut dyn Backend, &mut p.gpu] {
        be.upload(sa, &f32s(&s.sqrt_alphas_cumprod)).unwrap();
        be.upload(s1, &f32s(&s.sqrt_one_minus_alphas_cumprod))
            .unwrap();
    }
    let per_image = 7 * 5 * 3;
    let x0 = p.input(3 * per_image, 0.5, 0.0);
    let ts = p.alloc(3);
    for be in [&mut p.cpu as &mut dyn Backend, &mut p.gpu] {
        be.upload(ts, &[0.0, 500.0, 999.0]).unwrap();
    }
    let (xt, eps) = (p.output(x0.len), p.output(x0.len));
    let noise = Stream::per_step(rng::Purpose::TrainNoise, 1, 0);
    p.run(|be| {
        be.clock_set(123_457)?;
        be.noise_add(x0, ts, sa, s1, xt, eps, per_image, 6, 42, noise)
    });
    // One seed draws the same noise on both: Box-Muller in fp64, rounded once.
    p.check("noise_add eps (same Philox draws)", eps, 1e-7);
    p.check("noise_add x_t", xt, 1e-6);
    let z = p.output(1001);
    p.run(|be| be.normal(z, 13, 42, 10));
    p.check("normal draws", z, 1e-7);
    // Training timesteps of step 123457, then of the next step.
    let drawn = p.output(1001);
    let stream = Stream::per_step(rng::Purpose::Timesteps, 1, 0);
    for step in 0..2 {
        p.run(|be| be.clock_set(123_457 + step));
        p.run(|be| be.draw_timesteps(drawn, 1000, 42, stream));
        p.check(&format!("training timesteps, step {step}"), drawn, 0.0);
    }
    // The log ring: three slots of two; clock 123459 writes slot 0, and so on around.
    let (entry, bump, ring) = (p.input(2, 1.0, 0.0), p.input(2, 1.0, 0.0), p.alloc(6));
    for be in [&mut p.cpu as &mut dyn Backend, &mut p.gpu] {
        be.fill(ring, 0.0).unwrap();
    }
    for step in 0..4 {
        p.run(|be| {
            be.clock_set(123_459 + step)?;
            be.log_at_clock(entry, ring)?;
            be.accumulate(bump, entry, true)
        });
    }
    p.check("log ring", ring, 0.0);

    for clip in [true, false] {
        let rows = ddpm_table(&s, Variance::FixedLarge);
        let (x, e, out) = (
            p.input(len, 1.0, 0.0),
            p.input(len, 1.0, 0.0),
            p.output(len),
        );
        p.run(|be| {
            be.sampler_load(&rows)?;
            let rs = ReverseStep {
                first_element: 5,
                clip,
                seed: 3,
                stream_base: 1 << 40,
                guidance: None,
            };
            be.sampler_step(x, e, out, rs)?;
            be.sampler_advance()?;
            be.sampler_step(out, e, out, rs)
        });
        p.check(&format!("two sampler steps, clip {clip}"), out, 1e-5);
        let t = p.output(4);
        p.run(|be| be.sampler_timesteps(t));
        p.check("sampler timesteps", t, 0.0);
        assert_eq!(p.gpu.sampler_position().unwrap(), Some(998));
    }
}

/// A small model of the paper's family with every code path: two levels, attention at the second,
/// odd group sizes, dropout.
fn small_config() -> UNetConfig {
    common::two_level(8, [12, 24], 2, 4, 0.1)
}

/// small_config at widths 16 and 32: multiples of 8 and 16 (the tensor-core attention takes them, and
/// the TMA rungs' tensor maps), and of 32 at the second level (v6's swizzled input gradient).
fn wider_config() -> UNetConfig {
    UNetConfig {
        block_out_channels: vec![16, 32],
        ..small_config()
    }
}

/// The U-Net's output and every parameter gradient on the two sides, for a batch of 3 at timesteps
/// 3, 500 and 999, with weights at a scale where every path matters (the paper's init zeroes some layers).
/// Asserts the output within `out_tol` of its scale and each gradient tensor within `grad_tol`.
fn unet_case(p: &mut Pair, config: &UNetConfig, out_tol: f64, grad_tol: f64) {
    let batch = 3;
    let pixels = batch * config.sample_size * config.sample_size;
    // Inputs first, at the same handles on both sides: the nets differ in layout after them (the device
    // stores no normalised input: `Backend::fuses_normalisation`), so each side uses its own net's.
    let input = p.input(pixels * config.in_channels, 1.0, 0.0);
    let target = p.input(pixels * config.out_channels, 1.0, 0.0);
    let loss = p.output(1);
    let mut net_cpu = UNet::new(&mut p.cpu, config, batch).unwrap();
    let mut net_gpu = UNet::new(&mut p.gpu, config, batch).unwrap();
    assert!(
        net_gpu.activation_len() < net_cpu.activation_len(),
        "the device stores no normalised input"
    );
    let weights: Vec<f32> = (0..net_cpu.num_params())
        .map(|i| 0.05 * rng::normal(3, 3, i as u64))
        .collect();
    let ts = [3.0, 500.0, 999.0];
    for (be, net) in [
        (&mut p.cpu as &mut dyn Backend, &net_cpu),
        (&mut p.gpu, &net_gpu),
    ] {
        be.upload(net.params, &weights).unwrap();
        be.copy(input, net.input).unwrap();
        be.upload(net.timesteps, &ts).unwrap();
    }
    if let Some(c) = &config.classes {
        // Two images of the first class (their embedding gradients add) and one of the last row.
        let labels = [0, c.embeds - 1, 0];
        net_cpu.set_labels(&mut p.cpu, &labels).unwrap();
        net_gpu.set_labels(&mut p.gpu, &labels).unwrap();
    }
    p.gpu.fill(net_gpu.output(), f32::NAN).unwrap();
    p.gpu.fill(net_gpu.grads, f32::NAN).unwrap();
    // Dropout masks of seed 1 at training step 2.
    p.cpu.clock_set(2).unwrap();
    p.gpu.clock_set(2).unwrap();
    net_cpu.forward(&mut p.cpu, Some(1)).unwrap();
    net_gpu.forward(&mut p.gpu, Some(1)).unwrap();
    let name = format!("{:?}", config.block_out_channels);
    let (out_gpu, out_cpu) = (net_gpu.output(), net_cpu.output());
    p.check_apart(&format!("U-Net {name} output"), out_gpu, out_cpu, out_tol);
    p.cpu
        .mse_loss(out_cpu, target, loss, net_cpu.output_grad())
        .unwrap();
    p.gpu
        .mse_loss(out_gpu, target, loss, net_gpu.output_grad())
        .unwrap();
    net_cpu.backward(&mut p.cpu).unwrap();
    net_gpu.backward(&mut p.gpu).unwrap();
    let (a, b) = (
        p.gpu.download(net_gpu.grads).unwrap(),
        p.cpu.download(net_cpu.grads).unwrap(),
    );
    // Some gradients are exactly zero in exact arithmetic (a key bias shifts every score of a query
    // alike, and softmax ignores that), so both sides hold rounding noise there: each tensor's error is
    // measured against its own scale or 1e-3 of the largest gradient anywhere, whichever is larger.
    let floor = 1e-3 * b.iter().fold(0.0f64, |m, v| m.max(f64::from(v.abs())));
    let mut worst = (0.0, String::new());
    for spec in net_cpu.specs() {
        let r = spec.offset..spec.offset + spec.len;
        let e = floored_error(&a[r.clone()], &b[r], floor);
        if e > worst.0 {
            worst = (e, spec.name.clone());
        }
    }
    eprintln!(
        "U-Net {name}: worst gradient error {:.2e} in {}",
        worst.0, worst.1
    );
    assert!(
        worst.0 < grad_tol,
        "worst gradient error {:e} in {}",
        worst.0,
        worst.1
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn unet_output_and_every_gradient_match_the_cpu() {
    // Gradients pass through ~40 layers of fp32 sums in two different orders: 1e-4 of each tensor's scale.
    for config in [small_config(), UNetConfig::preset("ddpm-cifar10").unwrap()] {
        unet_case(&mut Pair::new(), &config, TOL, 1e-4);
    }
}

/// Class conditioning on the device: the embedding's add and its gradient (a batch where classes repeat
/// and one is absent), the whole conditional network with every gradient, and the guided reverse step,
/// whose fused guidance combination must be the CPU's.
#[test]
#[ignore = "needs a CUDA device"]
fn class_conditioning_and_the_guided_step_match_the_cpu() {
    let mut p = Pair::new();
    let s = ClassEmbedShape {
        n: 5,
        classes: 4,
        dim: 24,
    };
    let table = p.input(s.classes * s.dim, 1.0, 0.0);
    let labels = p.alloc(s.n);
    for be in [&mut p.cpu as &mut dyn Backend, &mut p.gpu] {
        be.upload(labels, &[2.0, 0.0, 2.0, 3.0, 2.0]).unwrap();
    }
    let y = p.input(s.n * s.dim, 1.0, 0.0);
    p.run(|be| be.class_embedding_add(s, table, labels, y));
    // An add of two f32 values: the same rounding on both sides.
    p.check("class embedding add", y, 0.0);
    let (dy, dtable) = (p.input(s.n * s.dim, 1.0, 0.0), p.output(s.classes * s.dim));
    p.run(|be| be.class_embedding_backward(s, labels, dy, dtable));
    // The same sums in the same (image) order: exact.
    p.check("class embedding gradient", dtable, 0.0);

    let sched = Schedule::paper();
    let rows = ddpm_table(&sched, Variance::FixedLarge);
    let len = 3 * 1000 + 2;
    for w in [0.0f32, 3.0] {
        let (x, e) = (p.input(2 * len, 1.0, 0.0), p.input(2 * len, 1.0, 0.0));
        p.run(|be| {
            be.sampler_load(&rows)?;
            let rs = ReverseStep {
                first_element: 7,
                clip: true,
                seed: 3,
                stream_base: 1 << 40,
                guidance: Some(w),
            };
            be.sampler_step(x, e, x, rs)?;
            be.sampler_advance()?;
            be.sampler_step(x, e, x, rs)
        });
        // Two steps of a few flops each in the same order; the noise draw's log and sqrt differ in the
        // last bits between the device's and the host's libm: 1e-5 as for the unguided step.
        p.check(&format!("two guided sampler steps, w {w}"), x, 1e-5);
        let both = p.gpu.download(x).unwrap();
        assert_eq!(
            both[..len],
            both[len..],
            "both halves get the guided step's result"
        );
    }

    // Last: the nets of each side lay out their tensors differently, so handles part after this.
    let mut config = small_config();
    config.classes = Some(ddpm_cuda::model::Classes::with_null(3, None));
    unet_case(&mut p, &config, TOL, 1e-4);
}

/// The network with its convolutions and linear layers in bf16 against the CPU's fp32. Each GEMM is within
/// ~2e-3 of its output's scale (TOL_BF16's derivation); through the network's ~20 GEMMs deep path those
/// errors add up like a random walk (normalisations keep each layer's scale), ~1e-2. Tolerances: 3e-2 for
/// the output, 6e-2 for each gradient (the backward pass has twice the GEMMs on its path).
#[test]
#[ignore = "needs a CUDA device"]
fn bf16_unet_output_and_every_gradient_track_fp32() {
    // Widths 12 and 24 leave attention to the fp32 kernel; 16 and 32 run its bf16 forward too.
    let wider = wider_config();
    for config in [small_config(), wider] {
        unet_case(&mut Pair::bf16(), &config, 3e-2, 6e-2);
    }
}

fn ten_steps_options() -> TrainOptions {
    TrainOptions {
        batch: 4,
        lr: 1e-3,
        warmup: 3,
        max_grad_norm: 1.0,
        ema_decay: 0.9,
        flip: true,
        cond_drop: 0.0,
        seed: 11,
    }
}

/// The losses of the first ten training steps of the small network on synthetic data.
fn ten_losses<B: Backend>(be: &mut B, opts: &TrainOptions) -> Vec<f32> {
    ten_losses_of(be, &small_config(), opts)
}

fn ten_losses_of<B: Backend>(be: &mut B, config: &UNetConfig, opts: &TrainOptions) -> Vec<f32> {
    let data = ddpm_cuda::data::synthetic(8, 64, 3);
    let mut tr = Trainer::new(be, config, Schedule::paper(), opts.clone()).unwrap();
    tr.init(be).unwrap();
    let mut l = Vec::new();
    while tr.step < 10 {
        let images = data.batch(opts.seed, tr.step, opts.batch, opts.flip);
        let t = tr.step(be, &images).unwrap();
        l.push(be.download(t).unwrap()[0]);
    }
    l
}

/// Asserts that each loss of `got` is within `rel` (relative) of `want`'s.
fn losses_track(want: &[f32], got: &[f32], rel: f32) {
    eprintln!("cpu  {want:?}\ncuda {got:?}");
    assert_eq!(want.len(), got.len());
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        assert!(
            (a - b).abs() <= rel * a.abs(),
            "step {i}: cpu {a}, cuda {b} (tolerance {rel} relative)"
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn ten_training_steps_track_the_cpu() {
    let opts = ten_steps_options();
    let cpu = ten_losses(&mut CpuBackend::<f32>::new(), &opts);
    // Same data, noise, timesteps and dropout masks; only rounding differs, and Adam amplifies it
    // slowly: 1e-3 relative over ten steps.
    losses_track(&cpu, &ten_losses(&mut device(), &opts), 1e-3);
}

#[test]
#[ignore = "needs a CUDA device"]
fn ten_bf16_training_steps_track_the_fp32_losses() {
    let opts = ten_steps_options();
    let cpu = ten_losses(&mut CpuBackend::<f32>::new(), &opts);
    let mut gpu = device();
    gpu.set_precision(Precision::Bf16).unwrap();
    // The network's output is within ~2e-3 of fp32 per element (bf16_unet_output_and_every_gradient_track_
    // fp32), and a loss is the mean of 768 squared errors, over which those independent rounding errors
    // average out (~1e-4 relative); the updates are clipped to norm 1 at lr 1e-3 and differ by as little.
    // Tolerance 2e-3 relative (measured on the emulator: 1.3e-5).
    losses_track(&cpu, &ten_losses(&mut gpu, &opts), 2e-3);
}

/// The whole network on each rung of the convolution ladder the bf16 kernels do not run on (v2 WMMA, v4
/// wgmma, v5 and v6 wgmma + TMA), as `ddpm-cuda bench` times it: ten training steps track the fp32
/// losses as version 3's do (tolerance and reasoning as in ten_bf16_training_steps_track_the_fp32_losses:
/// every rung rounds the same operands to bf16 and sums in fp32, in another order). With the activations
/// stored in bf16 (ladder v7), every forward and weight gradient that reads or writes one runs on
/// version 3's `_io` and `_bf16in` kernels whatever the rung (no other rung has kernels for bf16
/// storage), so what the rungs run of this network is its input gradients (and the weight gradient of
/// conv_in, whose input is the fp32 image). Widths 16 and 32, so v5 and v6 copy the weights of every
/// input gradient whose c and o are multiples of 8 by TMA, which the launch counters must show; v6's
/// 64-byte swizzle also needs c and o multiples of 32 and weights 128-byte aligned, which this network's
/// 16- and 32-element norm parameters shift off such boundaries, so it may have none here
/// (`bf16_convolutions_are_exact_on_bf16_inputs_and_close_on_any` counts v6's swizzled launches).
#[test]
#[ignore = "needs a CUDA device"]
fn ten_bf16_training_steps_on_every_rung_track_the_fp32_losses() {
    let config = wider_config();
    let opts = ten_steps_options();
    let cpu = ten_losses_of(&mut CpuBackend::<f32>::new(), &config, &opts);
    for rung in Rung::ALL {
        let mut gpu = device_in(Precision::Bf16);
        if !gpu.set_rung(Some(rung)).unwrap() {
            assert!(rung.needs_sm90a(), "every bf16 device has the WMMA core");
            eprintln!("{}: not on this device", rung.name());
            continue;
        }
        eprintln!("on {}:", rung.name());
        losses_track(&cpu, &ten_losses_of(&mut gpu, &config, &opts), 2e-3);
        let (tma, swizzled) = (gpu.tma_launches(), gpu.swizzled_tma_launches());
        eprintln!("  {tma} convolutions copied their weights by TMA, {swizzled} of them swizzled");
        assert_eq!(tma > 0, rung.uses_tma(), "TMA launches on {}", rung.name());
        assert!(
            swizzled <= tma && (swizzled == 0 || rung == Rung::WgmmaTmaSwizzled),
            "swizzled TMA launches on {}",
            rung.name()
        );
    }
}

/// Ceilings of 1 GB/s and 1 TFLOP/s, for tests of the bench's rows: what they check does not depend on
/// the ceilings, and measuring them on the emulator would take its time for nothing.
fn unit_ceilings() -> ddpm_cuda::bench::Ceilings {
    ddpm_cuda::bench::Ceilings {
        copy_gb_s: 1.0,
        peak_fp32: Some(1.0),
        peak_bf16: Some(1.0),
    }
}

/// `ddpm-cuda bench`'s ladder rows: the network's training and sampling steps timed on v3 and on every
/// other rung the device has, re-recording the graphs as the rung changes, each a timing (finite and
/// positive) and none a `failed` row.
#[test]
#[ignore = "needs a CUDA device"]
fn the_bench_times_the_network_on_every_rung() {
    let config = wider_config();
    let mut gpu = device();
    let own = gpu.precision();
    let ceilings = unit_ceilings();
    let mut lines = Vec::new();
    ddpm_cuda::bench::rungs(&mut gpu, &config, 2, 1, 2, &ceilings, &mut |l| {
        lines.push(l)
    })
    .unwrap();
    let rungs = 1 + Rung::ALL
        .into_iter()
        .filter(|&r| gpu.set_rung(Some(r)).unwrap())
        .count();
    gpu.set_rung(None).unwrap();
    for l in &lines {
        eprintln!("{l}");
    }
    assert_eq!(
        lines.len(),
        2 * rungs,
        "a training and a sampling row per rung"
    );
    for l in &lines {
        assert!(
            l.ms > 0.0 && l.ms.is_finite() && l.rate > 0.0 && l.unit == "TFLOP/s",
            "{l}"
        );
    }
    assert_eq!(gpu.precision(), own, "the bench restores the precision");
}

/// The ceilings `ddpm-cuda bench` measures first (`Ceilings::measure`: a device copy and the two peak
/// loops of `kernels/peak.cu`): each a finite positive rate. On a device that states its peaks, each
/// measured peak lies between a quarter of the stated one and 5% over it: the stated one is the
/// instruction's rate at the highest clock, so a loop past it counts its FLOPs wrong (a factor of 2 is
/// the likely slip), and one under a quarter of it is not the rate of the instruction (the mma.sync loop
/// reaches about two thirds of the wgmma rate the sm_90 figure states).
#[test]
#[ignore = "needs a CUDA device"]
fn the_bench_measures_its_ceilings() {
    let mut gpu = device();
    let c = ddpm_cuda::bench::Ceilings::measure(&mut gpu).unwrap();
    eprintln!("{c:?}");
    assert!(c.copy_gb_s > 0.0 && c.copy_gb_s.is_finite(), "{c:?}");
    for p in [Precision::Fp32, Precision::Bf16] {
        let peak = c.peak(p).expect("a peak measured in each precision");
        assert!(peak > 0.0 && peak.is_finite(), "{} peak {peak}", p.name());
        if let Some(stated) = gpu.stated_peak_tflops(p) {
            let ratio = peak / stated;
            eprintln!(
                "{}: measured {peak:.1} TFLOP/s, stated {stated:.1}: {ratio:.2}",
                p.name()
            );
            assert!(
                (0.25..=1.05).contains(&ratio),
                "{} peak {peak} against {stated}",
                p.name()
            );
        }
    }
}

/// `ddpm-cuda bench`'s network rows in each precision (the wider test U-Net at batch 2, one step), the
/// first thing the bench runs on a device: the graph-replayed and the launched-one-by-one training step,
/// the memory, the sampling step, and the two kernel profiles, each row a finite positive figure.
#[test]
#[ignore = "needs a CUDA device"]
fn the_bench_times_the_network_in_each_precision() {
    let config = wider_config();
    for p in [Precision::Fp32, Precision::Bf16] {
        let mut gpu = device_in(p);
        let ceilings = unit_ceilings();
        let mut lines = Vec::new();
        ddpm_cuda::bench::model(&mut gpu, &config, 2, 1, &ceilings, &mut |l| lines.push(l))
            .unwrap();
        for l in &lines {
            eprintln!("{}: {l}", p.name());
            assert!(l.rate > 0.0 && l.rate.is_finite(), "{l}");
            assert!(l.unit == "GiB" || (l.ms > 0.0 && l.ms.is_finite()), "{l}");
        }
        let rows = |part: &str| lines.iter().filter(|l| l.what.starts_with(part)).count();
        assert_eq!(rows("train step, batch 2, ops launched one by one"), 1);
        assert_eq!(rows("train step, batch 2"), 3, "graph, one by one, FLOPs");
        assert_eq!(rows("train memory, batch 2"), 1);
        assert_eq!(rows("sampling step, batch 2"), 2);
        // Each profile: its total row, then its kernels.
        assert!(rows("kernels of a train step, batch 2") >= 2);
        assert!(rows("kernels of a sampling forward, batch 2") >= 2);
        assert_eq!(gpu.precision(), p);
    }
}

/// `ddpm-cuda bench`'s kernel rows in bf16 at batch 1, one timed launch each, as the GPU check runs them
/// first on a device: every row is a timing (finite and positive) and none a `failed` one; both
/// precisions' convolution rows are there, the rows of the activations stored in bf16 (v7's three and
/// group norm's two), and at least the forward and input gradient of every rung the device has.
#[test]
#[ignore = "needs a CUDA device"]
fn the_bench_times_every_kernel_row() {
    let mut gpu = device_in(Precision::Bf16);
    let ceilings = unit_ceilings();
    let mut lines = Vec::new();
    ddpm_cuda::bench::kernels(&mut gpu, 1, 1, &ceilings, &mut |l| lines.push(l)).unwrap();
    for l in &lines {
        eprintln!("{l}");
    }
    for l in &lines {
        assert!(
            l.ms > 0.0 && l.ms.is_finite() && l.rate > 0.0 && l.rate.is_finite(),
            "{l}"
        );
    }
    let rows = |part: &str| lines.iter().filter(|l| l.what.contains(part)).count();
    let conv = "conv 3x3 16x16 256->256";
    assert_eq!(rows(&format!("{conv} fp32, batch 1")), 5, "fp32 (v1) rows");
    assert_eq!(rows(&format!("{conv} bf16, batch 1")), 5, "bf16 (v3) rows");
    assert_eq!(rows("bf16 activations (v7)"), 4, "v7 rows");
    // Version 8 as the U-Net runs it, where the device has it, its GEMMs really on version 8.
    let v8 = format!("bf16 activations on {}", Rung::Pipelined.name());
    if gpu.set_rung(Some(Rung::Pipelined)).unwrap() {
        assert_eq!(rows(&v8), 4, "v8 rows");
        assert!(gpu.v8_launches() > 0, "the v8 rows ran version 8");
    }
    assert_eq!(rows("bf16 input, batch 1"), 2, "group norm rows over bf16");
    assert_eq!(rows("attention l=256 c=256 bf16"), 2, "attention rows");
    for want in ["gradient norm", "Adam", "EMA"] {
        assert_eq!(rows(want), 1, "{want} row");
    }
    for r in Rung::ALL {
        if gpu.set_rung(Some(r)).unwrap() {
            assert!(rows(r.name()) >= 2, "{} rows", r.name());
        }
    }
    gpu.set_rung(None).unwrap();
    assert_eq!(
        gpu.precision(),
        Precision::Bf16,
        "the bench restores the precision"
    );
}

/// The kernel profile (`Backend::profile_begin` and `profile_end`, which `ddpm-cuda bench`'s "kernels of"
/// rows report): one training step run op by op gives every launch, each with a time, in the numbers the
/// step runs them; nothing outside the profile is timed; a recording cannot start inside one; and the
/// bench's rows add up to the total.
#[test]
#[ignore = "needs a CUDA device"]
fn the_profile_times_every_kernel_of_a_training_step() {
    let config = small_config();
    let opts = ten_steps_options();
    // bf16, the CLI's default on the device, where the activations are stored in bf16.
    let mut gpu = device_in(Precision::Bf16);
    let data = ddpm_cuda::data::synthetic(8, 64, 3);
    let mut tr = Trainer::new(&mut gpu, &config, Schedule::paper(), opts.clone()).unwrap();
    tr.init(&mut gpu).unwrap();
    tr.record = false;
    let images = data.batch(opts.seed, 0, opts.batch, opts.flip);
    tr.step(&mut gpu, &images).unwrap();
    assert!(gpu.profile_begin().unwrap(), "the CUDA backend profiles");
    tr.step(&mut gpu, &images).unwrap();
    let launches = gpu.profile_end().unwrap();
    let count = |k: &str| launches.iter().filter(|l| l.kernel == k).count();
    eprintln!("{} launches of {} kernels", launches.len(), {
        let mut names: Vec<_> = launches.iter().map(|l| l.kernel).collect();
        names.sort_unstable();
        names.dedup();
        names.len()
    });
    // Events resolve ~0.5 us: a short kernel may read 0.
    for l in &launches {
        assert!(l.ms >= 0.0 && l.ms.is_finite(), "{l:?}");
    }
    for k in [
        "draw_timesteps_f32",
        "noise_add_f32",
        "adam_step_f32",
        "ema_update_f32",
        "log_at_clock_f32",
    ] {
        assert_eq!(count(k), 1, "{k} launches in one step");
    }
    // In bf16 every activation of the residual stream is stored in bf16, and so are the ResNet blocks'
    // hidden activations and the attention blocks' q, k, v: every kernel that reads or writes one runs
    // its bf16 twin, and the fp32-storage kernels run only where the input is the noisy image (conv_in).
    let named = |f: &dyn Fn(&str) -> bool| tr.net.specs().iter().filter(|s| f(&s.name)).count();
    let blocks = named(&|n| n.ends_with(".conv1.weight"));
    let attention = named(&|n| n.ends_with(".to_q.weight"));
    let up_blocks = named(&|n| n.starts_with("up_blocks.") && n.ends_with(".conv1.weight"));
    let upsamplers = named(&|n| n.ends_with("upsamplers.0.conv.weight"));
    let plain =
        named(&|n| n.ends_with(".conv_shortcut.weight") || n.ends_with("samplers.0.conv.weight"));
    assert!(blocks > 0 && attention > 0 && up_blocks > 0 && upsamplers > 0 && plain > upsamplers);
    // Two normalisations per ResNet block, one per attention block, and the output's; those whose
    // channels come in runs of 8 are written into the scratch (forward, and again for the weight
    // gradient) and convolved plainly, the others normalised as their convolutions load them.
    let widths: Vec<usize> = tr
        .net
        .specs()
        .iter()
        .filter(|s| {
            [".norm1.weight", ".norm2.weight", ".group_norm.weight"]
                .iter()
                .any(|e| s.name.ends_with(e))
                || s.name == "conv_norm_out.weight"
        })
        .map(|s| s.len)
        .collect();
    let normalising = 2 * blocks + attention + 1;
    assert_eq!(widths.len(), normalising);
    let scratch = widths.iter().filter(|c| *c % 8 == 0).count();
    let fused = normalising - scratch;
    assert!(scratch > 0 && fused > 0, "the small config has both");
    for (k, want) in [
        ("group_norm_forward_bf16in", normalising),
        ("group_norm_backward_bf16in", normalising),
        ("group_norm_apply_bf16_bf16in", 2 * scratch),
        ("conv2d_forward_normed_bf16_io_bf16in", fused),
        ("conv2d_backward_weight_normed_bf16_bf16in", fused),
        ("conv2d_forward_bf16_io", 1),
        ("conv2d_backward_weight_bf16", 1),
        ("conv2d_forward_bf16_io_bf16in", plain + scratch),
        ("conv2d_backward_weight_bf16_bf16in", plain + scratch),
        // The time embedding's two layers and each ResNet block's projection of it: fp32 throughout.
        ("linear_forward_bf16", 2 + blocks),
        ("linear_forward_bf16_io_bf16in", attention),
        ("linear_backward_weight_bf16_bf16in", attention),
        ("concat_forward_bf16", up_blocks),
        ("upsample2x_forward_bf16", upsamplers),
        ("attention_forward_f32_bf16io", attention),
        ("attention_backward_dq_f32_bf16io", attention),
        ("attention_backward_dkv_f32_bf16in", attention),
    ] {
        assert_eq!(count(k), want, "{k} launches in one step");
    }
    for k in [
        "group_norm_forward_f32",
        "group_norm_backward_f32",
        "conv2d_forward_normed_bf16",
        "conv2d_forward_normed_bf16_io",
        "conv2d_backward_weight_normed_bf16",
        "conv2d_forward_bf16",
        "concat_forward_f32",
        "upsample2x_forward_f32",
        "attention_forward_f32",
        "attention_forward_f32_bf16in",
        "linear_forward_bf16_io",
    ] {
        assert_eq!(count(k), 0, "{k}: no kernel reads an fp32 copy of these");
    }
    tr.step(&mut gpu, &images).unwrap();
    assert!(
        gpu.profile_end().unwrap().is_empty(),
        "nothing timed after the profile"
    );
    assert!(gpu.profile_begin().unwrap());
    assert!(
        gpu.capture_begin(Sequence::Training).is_err(),
        "no recording inside a profile"
    );
    assert!(gpu.profile_begin().is_err(), "no profile inside a profile");
    gpu.profile_end().unwrap();
    // A recorded step replays, but not inside a profile (its kernels would go untimed).
    tr.record = true;
    tr.step(&mut gpu, &images).unwrap();
    assert!(gpu.profile_begin().unwrap());
    assert!(
        tr.step(&mut gpu, &images).is_err(),
        "no replay inside a profile"
    );
    gpu.profile_end().unwrap();

    let mut lines = Vec::new();
    ddpm_cuda::bench::profile_lines("p", &launches, &mut |l| lines.push(l));
    for l in &lines {
        eprintln!("{l}");
    }
    let total: f64 = launches.iter().map(|l| l.ms).sum();
    let rows = &lines[1..];
    let (ms, share) = rows
        .iter()
        .fold((0.0, 0.0), |(m, s), l| (m + l.ms, s + l.rate));
    // Sums of the same positive times in another order: equal to ~1e-12 relative.
    assert!((lines[0].ms - total).abs() <= 1e-9 * total, "{}", lines[0]);
    assert!(
        (ms - total).abs() <= 1e-9 * total,
        "rows add up to {ms}, not {total}"
    );
    assert!((share - 100.0).abs() <= 1e-6, "shares add up to {share}%");
}

/// Asserts that the bf16 copy of `t` on the device is the bf16 rounding (to nearest even) of `t`'s fp32
/// values, bit for bit.
fn copy_is_rounding(be: &mut CudaBackend, t: Tensor, what: &str) {
    let want: Vec<f32> = be
        .download(t)
        .unwrap()
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    let got = be
        .weight_copy(t)
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: no bf16 copy of the declared weights"));
    let wrong = want
        .iter()
        .zip(&got)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    if let Some(i) = (0..want.len()).find(|&i| want[i].to_bits() != got[i].to_bits()) {
        eprintln!("{what}: element {i}: copy {} for {}", got[i], want[i]);
    }
    eprintln!("{what:<48} {wrong} of {} elements differ", want.len());
    assert_eq!(wrong, 0, "{what}: the bf16 copy is stale");
}

/// The bf16 copy of the declared weights, which every bf16 convolution and linear layer reads, equals the
/// bf16 rounding of the fp32 weights after anything writes them: the initialisation, training steps
/// recorded and replayed (Adam writes the copy itself), a copy of the EMA into a sampler's network, an
/// upload, a fill, a recorded copy replayed. And the U-Net's GEMMs never round a weight of their own
/// (every weight they read is declared).
#[test]
#[ignore = "needs a CUDA device"]
fn the_weights_bf16_copy_follows_every_write() {
    let mut be = device_in(Precision::Bf16);
    let opts = ten_steps_options();
    let data = ddpm_cuda::data::synthetic(8, 64, 3);
    let mut tr = Trainer::new(&mut be, &small_config(), Schedule::paper(), opts.clone()).unwrap();
    let grid = UNet::new_inference(&mut be, &small_config(), 2).unwrap();
    tr.init(&mut be).unwrap();
    let first = be.download(tr.net.params).unwrap();
    copy_is_rounding(&mut be, tr.net.params, "initialised");
    for s in 0..3 {
        tr.step(&mut be, &data.batch(opts.seed, s, opts.batch, opts.flip))
            .unwrap();
        copy_is_rounding(&mut be, tr.net.params, &format!("after step {s}"));
    }
    assert!(
        be.recording_id(ddpm_cuda::backend::Sequence::Training)
            .is_some(),
        "the steps were recorded and replayed"
    );
    assert_ne!(
        be.download(tr.net.params).unwrap(),
        first,
        "the steps changed the weights"
    );
    be.copy(tr.ema, grid.params).unwrap();
    copy_is_rounding(&mut be, grid.params, "the EMA copied into a sampler's net");
    let part = tr.net.params.slice(1000, 3000);
    let values: Vec<f32> = (0..part.len).map(|i| rng::normal(5, 1, i as u64)).collect();
    be.upload(part, &values).unwrap();
    copy_is_rounding(&mut be, tr.net.params, "after an upload into part of it");
    be.fill(grid.params.slice(17, 100), 0.3).unwrap();
    copy_is_rounding(&mut be, grid.params, "after a fill of part of it");
    // A recorded write into the weights other than Adam's: the recording rounds the copy itself, so a
    // replay after its source changed leaves the copy right.
    let src = be.alloc(grid.params.len).unwrap();
    let draws = |stream| -> Vec<f32> {
        (0..src.len)
            .map(|i| rng::normal(6, stream, i as u64))
            .collect()
    };
    be.upload(src, &draws(1)).unwrap();
    let seq = ddpm_cuda::backend::Sequence::Sampling;
    assert!(be.capture_begin(seq).unwrap());
    be.copy(src, grid.params).unwrap();
    be.capture_end().unwrap();
    be.upload(src, &draws(2)).unwrap();
    be.replay(seq).unwrap();
    assert_eq!(be.download(grid.params).unwrap(), draws(2));
    copy_is_rounding(&mut be, grid.params, "after a replayed copy into it");
    // One copy per weight: a declaration overlapping declared weights is refused.
    let e = be
        .keep_weight_copy(tr.net.params.slice(5, 10))
        .unwrap_err()
        .to_string();
    assert!(e.contains("overlap"), "{e}");
    // Activations are no weights: they have no copy.
    assert_eq!(be.weight_copy(grid.input).unwrap(), None);
    assert_eq!(
        be.loose_weight_roundings(),
        0,
        "a GEMM of the U-Net read a weight outside the declared weights"
    );
}

/// The training step recorded once as a graph and replayed equals the same ops launched one by one, bit
/// for bit: everything that changes from step to step (timesteps, noise, dropout masks, Adam's schedule,
/// the log slot) comes from the clock on the device. One trainer alone on its device records at the
/// first step and replays the same graph for the others; two more share one backend, stepping in turn,
/// so each must notice the other's recording replaced its own (and record again, never replaying it).
#[test]
#[ignore = "needs a CUDA device"]
fn a_recorded_training_step_replays_exactly_like_its_ops() {
    let opts = ten_steps_options();
    let other = TrainOptions {
        seed: 99,
        ..ten_steps_options()
    };
    let data = ddpm_cuda::data::synthetic(8, 64, 3);
    let mut shared = device();
    let mut a = Trainer::new(
        &mut shared,
        &small_config(),
        Schedule::paper(),
        opts.clone(),
    )
    .unwrap();
    let mut b = Trainer::new(
        &mut shared,
        &small_config(),
        Schedule::paper(),
        other.clone(),
    )
    .unwrap();
    a.init(&mut shared).unwrap();
    b.init(&mut shared).unwrap();
    let mut alone = device();
    let mut want =
        Trainer::new(&mut alone, &small_config(), Schedule::paper(), opts.clone()).unwrap();
    want.record = false;
    want.init(&mut alone).unwrap();
    let mut own = device();
    let mut solo =
        Trainer::new(&mut own, &small_config(), Schedule::paper(), opts.clone()).unwrap();
    solo.init(&mut own).unwrap();
    let steps = 6;
    let mut first_recording = None;
    for s in 0..steps {
        solo.step(&mut own, &data.batch(opts.seed, s, opts.batch, opts.flip))
            .unwrap();
        let id = own.recording_id(ddpm_cuda::backend::Sequence::Training);
        assert!(id.is_some(), "the device recorded the training step");
        assert_eq!(
            *first_recording.get_or_insert(id),
            id,
            "step {s} recorded again instead of replaying"
        );
        a.step(
            &mut shared,
            &data.batch(opts.seed, s, opts.batch, opts.flip),
        )
        .unwrap();
        b.step(
            &mut shared,
            &data.batch(other.seed, s, other.batch, other.flip),
        )
        .unwrap();
        want.step(&mut alone, &data.batch(opts.seed, s, opts.batch, opts.flip))
            .unwrap();
    }
    let want_log = want.read_log(&mut alone, 0).unwrap();
    let want_state = want.state(&mut alone, "synthetic").unwrap();
    assert!(want_log.iter().all(|(l, n)| l.is_finite() && n.is_finite()));
    let log = a.read_log(&mut shared, 0).unwrap();
    for (who, tr, be) in [("alone", &solo, &mut own), ("shared", &a, &mut shared)] {
        let got = tr.read_log(be, 0).unwrap();
        eprintln!("recorded ({who}) {got:?}\none by one {want_log:?}");
        assert_eq!(got, want_log, "losses and gradient norms ({who})");
        assert!(
            tr.state(be, "synthetic").unwrap() == want_state,
            "weights, EMA or Adam moments differ between the recorded and the launched step ({who})"
        );
    }
    // New options make a new recording: the old one keeps the values it was made with.
    let before = own.recording_id(ddpm_cuda::backend::Sequence::Training);
    solo.opts.ema_decay = 0.5;
    solo.step(
        &mut own,
        &data.batch(opts.seed, steps, opts.batch, opts.flip),
    )
    .unwrap();
    assert_ne!(
        own.recording_id(ddpm_cuda::backend::Sequence::Training),
        before
    );
    // The other trainer really trained on its own seed (it did not replay a's step, nor a its).
    let b_log = b.read_log(&mut shared, 0).unwrap();
    assert_ne!(b_log, log);
}

/// The samplers on the device, driven by the closed-form predictor (tests/common): the exact moments.
#[test]
#[ignore = "needs a CUDA device"]
fn device_samplers_have_their_exact_moments() {
    use common::{exact_moments, gaussian_moments, moments_match, Kind};
    let s = Schedule::paper();
    let cases: Vec<(&str, Vec<SamplerRow>, Kind, usize)> = vec![
        (
            "ddpm fixed_large",
            ddpm_table(&s, Variance::FixedLarge),
            Kind::Ddpm { small: false },
            1000,
        ),
        (
            "ddpm fixed_small",
            ddpm_table(&s, Variance::FixedSmall),
            Kind::Ddpm { small: true },
            1000,
        ),
        (
            "ddpm respaced 100",
            ddpm_respaced_table(&s, 100, Variance::FixedLarge).unwrap(),
            Kind::Ddpm { small: false },
            100,
        ),
        (
            "ddim eta 0",
            ddim_table(&s, 100, 0.0).unwrap(),
            Kind::Ddim { eta: 0.0 },
            100,
        ),
        (
            "ddim eta 1",
            ddim_table(&s, 1000, 1.0).unwrap(),
            Kind::Ddim { eta: 1.0 },
            1000,
        ),
    ];
    for (what, rows, kind, steps) in cases {
        let exact = exact_moments(kind, &leading_timesteps(1000, steps).unwrap());
        let got = gaussian_moments(&mut device(), &rows);
        assert!(
            moments_match(what, got, exact),
            "{what}: {got:?} vs {exact:?}"
        );
    }
}

/// A sampling run recorded as a CUDA graph gives what the CPU gives from the same seed; so does a
/// class-conditional one with guidance (a doubled batch, the combination fused into the update kernel,
/// each batch's labels set before its graph replays).
#[test]
#[ignore = "needs a CUDA device"]
fn graph_sampling_matches_the_cpu() {
    let plain = small_config();
    let mut conditional = small_config();
    conditional.classes = Some(ddpm_cuda::model::Classes::with_null(3, None));
    let guided = ddpm_cuda::sample::Conditioning {
        class: None,
        real: 3,
        guidance: Some((3.0, 3)),
    };
    let steps = 20;
    let rows = ddim_table(&Schedule::paper(), steps, 0.0).unwrap();
    fn run<B: Backend>(
        be: &mut B,
        config: &UNetConfig,
        w: &[f32],
        rows: &[SamplerRow],
        cond: Option<&ddpm_cuda::sample::Conditioning>,
    ) -> Vec<f32> {
        // Batches of 3 images; guided, 2 images twice each in a net of 4.
        let batch = if cond.is_some() { 4 } else { 3 };
        let mut net = UNet::new_inference(be, config, batch).unwrap();
        be.upload(net.params, w).unwrap();
        ddpm_cuda::sample::collect(be, &mut net, rows, 5, 9, true, cond, None).unwrap()
    }
    for (config, cond) in [(&plain, None), (&conditional, Some(&guided))] {
        let weights: Vec<f32> = {
            let mut be = CpuBackend::<f32>::new();
            let net = UNet::new(&mut be, config, 1).unwrap();
            (0..net.num_params())
                .map(|i| 0.05 * rng::normal(4, 4, i as u64))
                .collect()
        };
        let cpu = run(&mut CpuBackend::<f32>::new(), config, &weights, &rows, cond);
        // fp32: the same arithmetic in another order, 1e-4. bf16: each step's noise prediction is within
        // ~2e-3 of fp32 (the U-Net tests); DDIM with eta 0 carries each step's error forward with a factor
        // near 1 and adds the next, so over 20 steps ~20 x 2e-3 in the worst case: 5e-2. Guidance at
        // w = 3 scales the difference of two predictions by 3, their errors with it: 3e-4 and 1.5e-1.
        let scale = if cond.is_some() { 3.0 } else { 1.0 };
        for (p, tol) in [(Precision::Fp32, 1e-4), (Precision::Bf16, 5e-2)] {
            let gpu = run(&mut device_in(p), config, &weights, &rows, cond);
            let e = scaled_error(&gpu, &cpu);
            let name = format!(
                "{}{}",
                p.name(),
                if cond.is_some() { ", guided" } else { "" }
            );
            eprintln!("{steps}-step DDIM, 5 images, {name}: error {e:.2e}");
            assert!(
                e < scale * tol,
                "{name} graph sampling differs from the CPU by {e}"
            );
        }
    }
}

/// Exact resume on the device: k steps, the state saved and restored into a fresh backend, then on to
/// n, equals n steps straight, bit for bit (deterministic kernels: no atomics, fixed reduction orders).
#[test]
#[ignore = "needs a CUDA device"]
fn resume_on_the_device_is_bit_identical() {
    // In both precisions: every kernel is deterministic (no atomics), so bf16 resumes exactly too.
    for p in [Precision::Fp32, Precision::Bf16] {
        resume_case(p);
    }
}

fn resume_case(precision: Precision) {
    let opts = TrainOptions {
        batch: 3,
        lr: 1e-3,
        warmup: 2,
        max_grad_norm: 1.0,
        ema_decay: 0.9,
        flip: true,
        cond_drop: 0.0,
        seed: 5,
    };
    let data = ddpm_cuda::data::synthetic(8, 50, 2);
    let run = |tr: &mut Trainer, be: &mut CudaBackend, until: u64| {
        while tr.step < until {
            let images = data.batch(opts.seed, tr.step, opts.batch, opts.flip);
            tr.step(be, &images).unwrap();
        }
    };
    let mut be = device_in(precision);
    let mut straight =
        Trainer::new(&mut be, &small_config(), Schedule::paper(), opts.clone()).unwrap();
    straight.init(&mut be).unwrap();
    let (k, n) = (3, 7);
    run(&mut straight, &mut be, n);
    let want = straight.state(&mut be, "synthetic").unwrap();

    let mut be1 = device_in(precision);
    let mut first =
        Trainer::new(&mut be1, &small_config(), Schedule::paper(), opts.clone()).unwrap();
    first.init(&mut be1).unwrap();
    run(&mut first, &mut be1, k);
    let saved = first.state(&mut be1, "synthetic").unwrap();
    let mut be2 = device_in(precision);
    let mut resumed =
        Trainer::new(&mut be2, &small_config(), Schedule::paper(), opts.clone()).unwrap();
    resumed.restore(&mut be2, &saved).unwrap();
    run(&mut resumed, &mut be2, n);
    assert!(
        resumed.state(&mut be2, "synthetic").unwrap() == want,
        "resume differs on the device ({})",
        precision.name()
    );
}

/// A batch too large for the device is refused before training starts, naming what it needs, what is
/// free and the largest batch that fits.
#[test]
#[ignore = "needs a CUDA device"]
fn a_batch_that_does_not_fit_the_device_is_refused_up_front() {
    let mut be = device();
    let config = UNetConfig::preset("ddpm-cifar10").unwrap();
    let e = ddpm_cuda::backend::check_fits(&be, "training", 8192, |b| {
        ddpm_cuda::train::arena_len(&config, b, 36, 1000, Layout::of(&be))
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("needs") && e.contains("largest batch that fits is"),
        "{e}"
    );
    // Nothing was allocated: a small run still fits afterwards.
    let t = be.alloc(1 << 20).unwrap();
    be.fill(t, 1.0).unwrap();
    assert_eq!(be.download(t).unwrap()[12345], 1.0);
}

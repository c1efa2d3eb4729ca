//! `ddpm-cuda bench`: throughput of training and sampling for a model on one backend, and the time of the
//! model's dominant kernels, each against a measured or stated ceiling.
//!
//! - Training: images/s over timed steps after warm-up (the loss read once at the end), and model
//!   TFLOP/s from the forward multiply-adds x 3 (forward and backward).
//! - Sampling: the time of one recorded step (forward + fused update) replayed; images/s for the full
//!   1000-step sampler follow from it.
//! - Profiles (on a backend with kernels): one training step and one sampling forward run op by op,
//!   every kernel timed on the device; the longest kernels by name with their launches and share.
//! - Kernels: a 3x3 convolution of the paper's widest 16x16 layer (forward, input and weight gradients)
//!   in every precision the backend has, and on every rung of the convolution ladder it keeps (v1 fp32
//!   SIMT, v2 bf16 WMMA, v3 bf16 mma.sync; v4 wgmma, v5 and v6 wgmma + TMA on sm_90a:
//!   dev/conv/README.md), group norm, attention, the optimizer, each as time, TFLOP/s or GB/s, and the
//!   ratio to the ceiling: the device-to-device copy bandwidth and the arithmetic peak of the precision,
//!   both measured here (the peak from the specification where the backend cannot measure it).
//! - Rungs: the network's training and sampling steps in bf16 on each rung of that ladder.
//!
//! Each function hands its lines to `emit` as it measures them, so a failure part-way (a kernel faulting
//! on a device it never ran on) keeps what came before.

use crate::backend::{
    AdamHyper, AttentionShape, Backend, ConvKind, ConvShape, GroupNormShape, Launch, NormedInput,
    Precision, Rung, Sequence, Tensor,
};
use crate::error::Result;
use crate::model::{UNet, UNetConfig};
use crate::sample::{self, Draw, Start};
use crate::schedule::Schedule;
use crate::train::{TrainOptions, Trainer};
use std::time::Instant;

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Line {
    pub what: String,
    /// Milliseconds per iteration.
    pub ms: f64,
    /// The figure of merit and its unit ("images/s", "TFLOP/s", "GB/s").
    pub rate: f64,
    pub unit: &'static str,
    /// `rate` as a fraction of the ceiling, when one applies.
    pub of_ceiling: Option<f64>,
}

impl Line {
    /// The row of a measurement that failed (a rung the bench merely compares), saying why.
    fn failed(what: String, e: &crate::error::Error) -> Self {
        Self {
            what: format!("{what}: failed: {e}"),
            ms: 0.0,
            rate: f64::NAN,
            unit: "(failed)",
            of_ceiling: None,
        }
    }
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = self
            .of_ceiling
            .map_or(String::from("-"), |r| format!("{:.1}%", 100.0 * r));
        let time = match self.ms > 0.0 {
            true => format!("{:.3} ms", self.ms),
            false => "-".into(), // not a timing (memory)
        };
        write!(
            f,
            "{:<60} {:>13} {:>12.2} {:<9} {:>7}",
            self.what, time, self.rate, self.unit, pct
        )
    }
}

/// Times `iters` calls of `f` after one warm-up call, waiting for the backend before and after.
fn time<B: Backend>(
    be: &mut B,
    iters: usize,
    mut f: impl FnMut(&mut B) -> Result<()>,
) -> Result<f64> {
    f(be)?;
    be.synchronize()?;
    let start = Instant::now();
    for _ in 0..iters {
        f(be)?;
    }
    be.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1e3 / iters as f64)
}

/// What the report compares against: the device copy bandwidth (measured) and the arithmetic peak of each
/// precision (measured where the backend can, else stated).
#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    pub copy_gb_s: f64,
    pub peak_fp32: Option<f64>,
    pub peak_bf16: Option<f64>,
}

impl Ceilings {
    /// Measures what the backend can measure; the peaks fall back to its stated ones.
    pub fn measure<B: Backend>(be: &mut B) -> Result<Self> {
        let peak = |be: &mut B, p| -> Result<Option<f64>> {
            Ok(be.measure_peak_tflops(p)?.or(be.stated_peak_tflops(p)))
        };
        Ok(Self {
            copy_gb_s: copy_bandwidth(be)?,
            peak_fp32: peak(be, Precision::Fp32)?,
            peak_bf16: peak(be, Precision::Bf16)?,
        })
    }

    pub fn peak(&self, p: Precision) -> Option<f64> {
        match p {
            Precision::Fp32 => self.peak_fp32,
            Precision::Bf16 => self.peak_bf16,
        }
    }
}

/// Measures the device-to-device copy bandwidth with a 256 MiB copy (bytes read + written).
pub fn copy_bandwidth<B: Backend>(be: &mut B) -> Result<f64> {
    let n = 64 << 20;
    let (a, b) = (be.alloc(n)?, be.alloc(n)?);
    be.fill(a, 1.0)?;
    let ms = time(be, 10, |be| be.copy(a, b))?;
    Ok(8.0 * n as f64 / (ms * 1e-3) / 1e9)
}

/// The paper's training options at `batch`, as the bench trains.
fn bench_options(batch: usize) -> TrainOptions {
    TrainOptions {
        batch,
        lr: 2e-4,
        warmup: 100,
        max_grad_norm: 1.0,
        ema_decay: 0.9999,
        flip: true,
        cond_drop: 0.0,
        seed: 0,
    }
}

/// Training and sampling throughput of `config` at `batch`.
pub fn model<B: Backend>(
    be: &mut B,
    config: &UNetConfig,
    batch: usize,
    train_steps: usize,
    ceilings: &Ceilings,
    emit: &mut dyn FnMut(Line),
) -> Result<()> {
    let opts = bench_options(batch);
    let (tensors_before, _) = be.bytes_held();
    let mut tr = Trainer::new(be, config, Schedule::paper(), opts)?;
    tr.init(be)?;
    let per_image = tr.net.input.len / batch;
    let images = vec![0.1f32; batch * per_image];
    let flop = 2.0 * tr.net.macs_per_image() as f64;
    let peak = ceilings.peak(be.precision());
    // As a run trains (recorded once and replayed, where the backend records), then, for what the graph
    // buys, with every op launched from the host.
    let ms = train_ms(be, &mut tr, &images, train_steps)?;
    if be.recording_id(Sequence::Training).is_some() {
        tr.record = false;
        let stepwise_ms = train_ms(be, &mut tr, &images, train_steps)?;
        emit(Line {
            what: format!("train step, batch {batch}, ops launched one by one"),
            ms: stepwise_ms,
            rate: batch as f64 / (stepwise_ms * 1e-3),
            unit: "images/s",
            of_ceiling: None,
        });
    }
    let train_flop = 3.0 * flop * batch as f64;
    let tflops = train_flop / (ms * 1e-3) / 1e12;
    emit(Line {
        what: format!("train step, batch {batch}"),
        ms,
        rate: batch as f64 / (ms * 1e-3),
        unit: "images/s",
        of_ceiling: None,
    });
    emit(Line {
        what: format!("train step, batch {batch} (model FLOPs, fwd + bwd = 3x fwd)"),
        ms,
        rate: tflops,
        unit: "TFLOP/s",
        of_ceiling: peak.map(|p| tflops / p),
    });
    // Everything the trainer allocated (weights, gradients, Adam, EMA, activations for the backward pass),
    // plus the kernels' scratch: what PyTorch's max_memory_allocated counts (neither includes the CUDA
    // context).
    let (tensors, scratch) = be.bytes_held();
    let gib = (tensors - tensors_before + scratch) as f64 / f64::from(1u32 << 30);
    emit(Line {
        what: format!("train memory, batch {batch} (tensors + scratch)"),
        ms: 0.0,
        rate: gib,
        unit: "GiB",
        of_ceiling: None,
    });
    // Where a step's time goes: one step run op by op, each kernel timed on the device.
    tr.record = false;
    let what = format!("kernels of a train step, batch {batch}");
    profiled(be, &what, emit, |be| tr.step(be, &images).map(|_| ()))?;
    drop(tr);
    let mut net = UNet::new_inference(be, config, batch)?;
    net.init(be, 0)?;
    let step_ms = sampling_step_ms(be, &mut net, per_image, SAMPLING_ROWS)?;
    let sample_tflops = flop * batch as f64 / (step_ms * 1e-3) / 1e12;
    emit(Line {
        what: format!("sampling step, batch {batch} (1000-step images/s)"),
        ms: step_ms,
        rate: batch as f64 / (1000.0 * step_ms * 1e-3),
        unit: "images/s",
        of_ceiling: None,
    });
    emit(Line {
        what: format!("sampling step, batch {batch} (model FLOPs)"),
        ms: step_ms,
        rate: sample_tflops,
        unit: "TFLOP/s",
        of_ceiling: peak.map(|p| sample_tflops / p),
    });
    // The sampler's step is this forward and one fused update.
    let what = format!("kernels of a sampling forward, batch {batch}");
    profiled(be, &what, emit, |be| net.forward(be, None).map(|_| ()))
}

/// The launches of one training step and of one sampling forward of `config` at `batch`, in the
/// bench's options, as [`model`] profiles them ("kernels of a train step", "kernels of a sampling
/// forward"): for the static model, on a planned device ([`crate::backend::cuda::CudaBackend::planned`]).
pub fn profile_launches<B: Backend>(
    be: &mut B,
    config: &UNetConfig,
    batch: usize,
) -> Result<(Vec<Launch>, Vec<Launch>)> {
    let opts = bench_options(batch);
    let mut tr = Trainer::new(be, config, Schedule::paper(), opts)?;
    tr.init(be)?;
    tr.record = false;
    let images = vec![0.1f32; batch * (tr.net.input.len / batch)];
    let train = launches_of(be, |be| tr.step(be, &images).map(|_| ()))?;
    drop(tr);
    let mut net = UNet::new_inference(be, config, batch)?;
    net.init(be, 0)?;
    let sample = launches_of(be, |be| net.forward(be, None).map(|_| ()))?;
    Ok((train, sample))
}

/// The launches `f` makes, profiled.
fn launches_of<B: Backend>(
    be: &mut B,
    f: impl FnOnce(&mut B) -> Result<()>,
) -> Result<Vec<Launch>> {
    if !be.profile_begin()? {
        return Ok(Vec::new());
    }
    let ran = f(be);
    let launches = be.profile_end()?;
    ran?;
    Ok(launches)
}

/// Runs `f` once with every kernel it launches timed, and reports them ([`profile_lines`]); on a backend
/// without kernels to time, nothing.
fn profiled<B: Backend>(
    be: &mut B,
    what: &str,
    emit: &mut dyn FnMut(Line),
    f: impl FnOnce(&mut B) -> Result<()>,
) -> Result<()> {
    // The profile ends even when `f` failed, so the backend is left as it was.
    let launches = launches_of(be, f)?;
    if !launches.is_empty() {
        profile_lines(what, &launches, emit);
    }
    Ok(())
}

/// The kernels a profile names one by one; the others share a row.
pub const PROFILE_ROWS: usize = 12;

/// The report of a profile (`launches`: kernel and milliseconds, in launch order): the kernels' total,
/// then the [`PROFILE_ROWS`] kernels that took longest, each with its launch count, its time and its share
/// of the total, then the rest in one row. A kernel's time runs from an event recorded before its launch
/// to one after it, so where the device waits for the host to launch it, that wait counts too (the host
/// gaps of a step run op by op; a recorded step replays without them).
pub fn profile_lines(what: &str, launches: &[Launch], emit: &mut dyn FnMut(Line)) {
    let mut kernels: Vec<(&'static str, usize, f64)> = Vec::new();
    for &Launch {
        kernel: name, ms, ..
    } in launches
    {
        match kernels.iter_mut().find(|k| k.0 == name) {
            Some(k) => (k.1, k.2) = (k.1 + 1, k.2 + ms),
            None => kernels.push((name, 1, ms)),
        }
    }
    // Longest first; a stable sort keeps kernels of equal time in launch order.
    kernels.sort_by(|a, b| b.2.total_cmp(&a.2));
    let total: f64 = kernels.iter().map(|k| k.2).sum();
    let line = |what: String, ms: f64| Line {
        what,
        ms,
        rate: if total > 0.0 { 100.0 * ms / total } else { 0.0 },
        unit: "% kernels",
        of_ceiling: None,
    };
    emit(line(
        format!(
            "{what}: all {} launches of {} kernels",
            launches.len(),
            kernels.len()
        ),
        total,
    ));
    let named = kernels.len().min(PROFILE_ROWS);
    for &(name, count, ms) in &kernels[..named] {
        emit(line(format!("{what}: {name} x{count}"), ms));
    }
    let rest = &kernels[named..];
    if !rest.is_empty() {
        let (count, ms) = rest.iter().fold((0, 0.0), |(c, t), k| (c + k.1, t + k.2));
        emit(line(
            format!("{what}: {} other kernels x{count}", rest.len()),
            ms,
        ));
    }
}

/// Milliseconds per training step over `steps` steps, after one.
fn train_ms<B: Backend>(be: &mut B, tr: &mut Trainer, images: &[f32], steps: usize) -> Result<f64> {
    time(be, steps, |be| tr.step(be, images).map(|_| ()))
}

/// The steps of the 1000 the bench times the sampler over: the same kernels and the same work per step
/// as the full run, which would take minutes.
pub const SAMPLING_ROWS: usize = 50;

/// Milliseconds per step of the sampler (the network's forward and the fused update, recorded once and
/// replayed where the backend records), over `steps` respaced steps, after one such run.
fn sampling_step_ms<B: Backend>(
    be: &mut B,
    net: &mut UNet,
    per_image: usize,
    steps: usize,
) -> Result<f64> {
    let rows = sample::ddpm_respaced_table(
        &Schedule::paper(),
        steps,
        crate::sample::Variance::FixedLarge,
    )?;
    let draw = Draw {
        seed: 0,
        first_image: 0,
        per_image,
        clip: true,
        start: Start::Noise,
        guidance: None,
    };
    let (x, eps, ts) = (net.input, net.output(), net.timesteps);
    let run_ms = time(be, 1, |be| {
        sample::run(
            be,
            &rows,
            x,
            eps,
            draw,
            |be| {
                be.sampler_timesteps(ts)?;
                net.forward(be, None).map(|_| ())
            },
            |_, _| {},
        )
    })?;
    Ok(run_ms / rows.len() as f64)
}

/// The network's training and sampling steps at `batch` (`train_steps` and `sampling_rows` of them timed)
/// in bf16 on each rung of the convolution ladder
/// the backend has (`dev/conv/README.md`): version 3, which the bf16 kernels run on, then the others
/// (v2 WMMA; v4, v5, v6 on sm_90a), so the ladder shows what each rung buys the whole network, not only
/// its convolution. A rung that fails (its kernels never ran on this device before) gets a `failed` row,
/// and the others go on. Nothing on a backend without bf16.
pub fn rungs<B: Backend>(
    be: &mut B,
    config: &UNetConfig,
    batch: usize,
    train_steps: usize,
    sampling_rows: usize,
    ceilings: &Ceilings,
    emit: &mut dyn FnMut(Line),
) -> Result<()> {
    let own = be.precision();
    if be.set_precision(Precision::Bf16).is_err() {
        return Ok(());
    }
    let opts = bench_options(batch);
    let mut tr = Trainer::new(be, config, Schedule::paper(), opts)?;
    tr.init(be)?;
    let per_image = tr.net.input.len / batch;
    let images = vec![0.1f32; batch * per_image];
    let mut net = UNet::new_inference(be, config, batch)?;
    net.init(be, 0)?;
    let flop = 2.0 * net.macs_per_image() as f64 * batch as f64;
    let peak = ceilings.peak(Precision::Bf16);
    for rung in [None].into_iter().chain(Rung::ALL.map(Some)) {
        if !be.set_rung(rung)? {
            continue;
        }
        let core = rung.map_or("mma.sync (ladder v3)", Rung::name);
        let mut row = |what: String, ms: Result<f64>, flop: f64| {
            emit(match ms {
                Ok(ms) => {
                    let tflops = flop / (ms * 1e-3) / 1e12;
                    Line {
                        what,
                        ms,
                        rate: tflops,
                        unit: "TFLOP/s",
                        of_ceiling: peak.map(|p| tflops / p),
                    }
                }
                Err(e) => Line::failed(what, &e),
            })
        };
        row(
            format!("bf16 train step, batch {batch}, on {core}"),
            train_ms(be, &mut tr, &images, train_steps),
            3.0 * flop,
        );
        row(
            format!("bf16 sampling step, batch {batch}, on {core}"),
            sampling_step_ms(be, &mut net, per_image, sampling_rows),
            flop,
        );
    }
    be.set_rung(None)?;
    be.set_precision(own)
}

/// Launches timed per kernel row of `ddpm-cuda bench`, after one untimed.
pub const KERNEL_ITERS: usize = 10;

/// The dominant kernels of the paper's network at `batch`, each timed over `iters` launches after one
/// untimed (`ddpm-cuda bench`: [`KERNEL_ITERS`]).
pub fn kernels<B: Backend>(
    be: &mut B,
    batch: usize,
    iters: usize,
    ceilings: &Ceilings,
    emit: &mut dyn FnMut(Line),
) -> Result<()> {
    let tflop_line = |what: String, ms: f64, flop: f64, p: Precision| {
        let rate = flop / (ms * 1e-3) / 1e12;
        Line {
            what,
            ms,
            rate,
            unit: "TFLOP/s",
            of_ceiling: ceilings.peak(p).map(|peak| rate / peak),
        }
    };
    let gbs_line = |what: String, ms: f64, bytes: f64| {
        let rate = bytes / (ms * 1e-3) / 1e9;
        Line {
            what,
            ms,
            rate,
            unit: "GB/s",
            of_ceiling: Some(rate / ceilings.copy_gb_s),
        }
    };
    let alloc_filled = |be: &mut B, len: usize, v: f32| -> Result<Tensor> {
        let t = be.alloc(len)?;
        be.fill(t, v)?;
        Ok(t)
    };
    // The same in bf16 storage, 16-byte aligned as the U-Net places it (`Backend::stores_bf16_activations`).
    let bf16_filled = |be: &mut B, len: usize, v: f32| -> Result<Tensor> {
        let words = be.alloc(len.div_ceil(2) + 4)?;
        let t = Tensor::bf16(words.off.next_multiple_of(4), len);
        be.upload(t, &vec![v; len])?;
        Ok(t)
    };

    let s = ConvShape {
        n: batch,
        h: 16,
        w: 16,
        c: 256,
        o: 256,
        kind: ConvKind::K3S1,
    };
    let (x, w, b) = (
        alloc_filled(be, s.x_len(), 0.5)?,
        alloc_filled(be, s.w_len(), 0.01)?,
        alloc_filled(be, s.o, 0.0)?,
    );
    // Declared as the U-Net declares its weights: the bf16 rows then read the bf16 copy as in the model.
    be.keep_weight_copy(w)?;
    let (y, dy) = (
        alloc_filled(be, s.y_len(), 0.0)?,
        alloc_filled(be, s.y_len(), 0.1)?,
    );
    let (dx, dw, db) = (
        alloc_filled(be, s.x_len(), 0.0)?,
        alloc_filled(be, s.w_len(), 0.0)?,
        alloc_filled(be, s.o, 0.0)?,
    );
    let flop = 2.0 * s.macs() as f64;
    let g = GroupNormShape {
        n: batch,
        hw: 256,
        c: 256,
        groups: 32,
        eps: 1e-6,
    };
    let (gamma, beta) = (alloc_filled(be, 256, 1.0)?, alloc_filled(be, 256, 0.0)?);
    let (mean, rstd) = (
        alloc_filled(be, g.stats_len(), 0.0)?,
        alloc_filled(be, g.stats_len(), 0.0)?,
    );
    let normed = NormedInput {
        s: g,
        x,
        gamma,
        beta,
        mean,
        rstd,
        silu: true,
        normed: dx,
        dropout: None,
    };
    // Every precision this backend has, on the same shape: on CUDA, versions 1 (fp32 SIMT) and 3 (bf16
    // mma.sync) of the convolution ladder (dev/conv/README.md), and last the rungs the bf16 kernels do
    // not use (v2 WMMA; v4 wgmma, v5 wgmma + TMA and v6 wgmma + swizzled TMA on sm_90a). With versions 1
    // and 3, a ResNet block's group norm + SiLU and its convolution, one after the other and with the
    // normalisation applied as the convolution loads its input (the same on a backend that does not fuse
    // them).
    let own = be.precision();
    let conv_rows = |be: &mut B,
                     emit: &mut dyn FnMut(Line),
                     runs: &[(Precision, Option<Rung>)]|
     -> Result<()> {
        for &(p, rung) in runs {
            if be.set_precision(p).is_err() || !be.set_rung(rung)? {
                continue;
            }
            let core = rung.map_or(String::new(), |r| format!(" on {}", r.name()));
            let what = format!("conv 3x3 16x16 256->256 {}{core}, batch {batch}", p.name());
            // A rung the bench merely compares may fail where the driver refuses something of it (v5's
            // and v6's tensor maps): its row says so and the rest of the bench goes on.
            let mut row = |op: &str, ms: Result<f64>| -> Result<()> {
                match ms {
                    Ok(ms) => emit(tflop_line(format!("{what}: {op}"), ms, flop, p)),
                    Err(e) if rung.is_some() => emit(Line::failed(format!("{what}: {op}"), &e)),
                    Err(e) => return Err(e),
                }
                Ok(())
            };
            row(
                "forward",
                time(be, iters, |be| be.conv2d_forward(s, x, w, b, y)),
            )?;
            row(
                "input grad",
                time(be, iters, |be| be.conv2d_backward_data(s, dy, w, dx, false)),
            )?;
            if rung.is_some_and(Rung::uses_tma) {
                continue; // v5 and v6 leave the weight gradient to v4: that row is v4's
            }
            row(
                "weight grad",
                time(be, iters, |be| be.conv2d_backward_weight(s, x, dy, dw, db)),
            )?;
            if rung.is_some() {
                continue; // the other rungs run the normalising convolutions on v3: those rows are v3's
            }
            let ms = time(be, iters, |be| {
                be.group_norm_forward(g, x, gamma, beta, dx, mean, rstd, true)?;
                be.conv2d_forward(s, dx, w, b, y)
            })?;
            emit(tflop_line(
                format!("{what}: group norm + SiLU, then forward"),
                ms,
                flop,
                p,
            ));
            let ms = time(be, iters, |be| {
                be.group_norm_conv2d_forward(s, normed, w, b, None, None, y)
            })?;
            emit(tflop_line(
                format!("{what}: forward normalising its input"),
                ms,
                flop,
                p,
            ));
        }
        Ok(())
    };
    // Versions 1 and 3 here; the rungs the bf16 kernels do not use come after everything else (below):
    // their kernels have run on no device yet, and one that faults takes the device's later work with it.
    conv_rows(
        be,
        emit,
        &[(Precision::Fp32, None), (Precision::Bf16, None)],
    )?;
    be.set_rung(None)?;
    be.set_precision(own)?;
    // Version 3 as the U-Net runs it in bf16 (ladder v7): the input read in bf16, the output written in
    // bf16 (the forwards), beside the rows above, which read and write fp32.
    let activations = match be.stores_bf16_activations() {
        true => Some((
            bf16_filled(be, s.x_len(), 0.5)?,
            bf16_filled(be, s.y_len(), 0.0)?,
        )),
        false => None,
    };
    let bf16_rows = |be: &mut B, emit: &mut dyn FnMut(Line), core: &str| -> Result<()> {
        let Some((x16, y16)) = activations else {
            return Ok(());
        };
        let what = format!("conv 3x3 16x16 256->256 bf16, bf16 activations{core}, batch {batch}");
        for (op, ms) in [
            (
                "forward",
                time(be, iters, |be| be.conv2d_forward(s, x16, w, b, y16))?,
            ),
            (
                "input grad",
                time(be, iters, |be| be.conv2d_backward_data(s, dy, w, dx, false))?,
            ),
            (
                "weight grad",
                time(be, iters, |be| {
                    be.conv2d_backward_weight(s, x16, dy, dw, db)
                })?,
            ),
            (
                "forward normalising its input",
                time(be, iters, |be| {
                    let input = NormedInput { x: x16, ..normed };
                    be.group_norm_conv2d_forward(s, input, w, b, None, None, y16)
                })?,
            ),
        ] {
            emit(tflop_line(
                format!("{what}: {op}"),
                ms,
                flop,
                Precision::Bf16,
            ));
        }
        Ok(())
    };
    bf16_rows(be, emit, " (v7)")?;
    // The group norm over x in fp32, and where the backend stores bf16 activations over the same x in
    // bf16, as the U-Net stores its activations (`Backend::stores_bf16_activations`). Counted as the
    // traffic the op cannot avoid, so the ratio to the copy bandwidth says how close the kernel comes to
    // it: forward x read and y written once (8 bytes per element, 6 from bf16; the kernel reads x twice:
    // the statistics, then y), backward x and dy read and dx written once (12, or 10; it reads x and dy
    // twice).
    let mut inputs = vec![(x, "", 4.0)];
    if be.stores_bf16_activations() {
        inputs.push((bf16_filled(be, g.len(), 0.5)?, ", bf16 input", 2.0));
    }
    let (dg, dbeta) = (alloc_filled(be, 256, 0.0)?, alloc_filled(be, 256, 0.0)?);
    for (x, input, x_bytes) in inputs {
        let ms = time(be, iters, |be| {
            be.group_norm_forward(g, x, gamma, beta, y, mean, rstd, true)
        })?;
        emit(gbs_line(
            format!("group norm + SiLU 16x16x256{input}, batch {batch}"),
            ms,
            (x_bytes + 4.0) * g.len() as f64,
        ));
        let ms = time(be, iters, |be| {
            be.group_norm_backward(
                g, x, gamma, beta, mean, rstd, dy, dx, dg, dbeta, true, false,
            )
        })?;
        emit(gbs_line(
            format!("group norm + SiLU backward{input}, batch {batch}"),
            ms,
            (x_bytes + 8.0) * g.len() as f64,
        ));
    }

    let a = AttentionShape {
        n: batch,
        l: 256,
        c: 256,
    };
    let qkv = alloc_filled(be, a.n * a.l * 3 * a.c, 0.1)?;
    let (out, lse) = (
        alloc_filled(be, a.n * a.l * a.c, 0.0)?,
        alloc_filled(be, a.n * a.l, 0.0)?,
    );
    let att_flop = 4.0 * (a.n * a.l * a.l * a.c) as f64;
    let ms = time(be, iters, |be| be.attention_forward(a, qkv, out, lse))?;
    emit(tflop_line(
        format!(
            "attention l=256 c=256 {}, batch {batch}: forward",
            own.name()
        ),
        ms,
        att_flop,
        own, // bf16 on tensor cores in bf16, where the width is one those kernels take (256 is)
    ));
    let dqkv = alloc_filled(be, qkv.len, 0.0)?;
    let ms = time(be, iters, |be| {
        be.attention_backward(a, qkv, out, lse, out, dqkv)
    })?;
    emit(tflop_line(
        format!(
            "attention l=256 c=256 {}, batch {batch}: backward",
            own.name()
        ),
        ms,
        2.5 * att_flop,
        own,
    ));

    let n = 35_746_307;
    let (p, gr, m, v, nrm) = (
        alloc_filled(be, n, 0.1)?,
        alloc_filled(be, n, 0.01)?,
        alloc_filled(be, n, 0.0)?,
        alloc_filled(be, n, 0.0)?,
        alloc_filled(be, 1, 0.5)?,
    );
    // Declared weights, as in training: a backend that keeps a bf16 copy has Adam write it too.
    be.keep_weight_copy(p)?;
    let ms = time(be, iters, |be| be.global_norm(gr, nrm))?;
    emit(gbs_line(
        "gradient norm, 35.7 M parameters".into(),
        ms,
        4.0 * n as f64,
    ));
    let hp = AdamHyper {
        lr: 1e-4,
        warmup: 0,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
    };
    let ms = time(be, iters, |be| be.adam_step(p, gr, m, v, nrm, hp))?;
    // Read p, g, m, v; write p, m, v; and the bf16 copy where there is one.
    let copy = if be.keeps_weight_copies() { 2.0 } else { 0.0 };
    emit(gbs_line(
        "Adam, 35.7 M parameters".into(),
        ms,
        (28.0 + copy) * n as f64,
    ));
    let ms = time(be, iters, |be| be.ema_update(m, p, 0.999))?;
    emit(gbs_line(
        "EMA, 35.7 M parameters".into(),
        ms,
        12.0 * n as f64,
    ));
    let rungs: Vec<_> = Rung::ALL.map(|r| (Precision::Bf16, Some(r))).to_vec();
    conv_rows(be, emit, &rungs)?;
    // Version 8 as the U-Net runs it: its forward and weight gradient need the bf16 activations.
    if be.set_precision(Precision::Bf16).is_ok() && be.set_rung(Some(Rung::Pipelined))? {
        bf16_rows(be, emit, &format!(" on {}", Rung::Pipelined.name()))?;
    }
    be.set_rung(None)?;
    be.set_precision(own)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ceilings of 1 GB/s and 1 TFLOP/s: a rate's share of them is the rate.
    const UNIT: Ceilings = Ceilings {
        copy_gb_s: 1.0,
        peak_fp32: Some(1.0),
        peak_bf16: Some(1.0),
    };

    /// `ddpm-cuda bench`'s network rows on the CPU backend (the tiny preset at batch 2, one step): the
    /// training and sampling rows are timings, the memory row a size; the CPU records no graph and times
    /// no kernel, so there is no launched-one-by-one row and no profile.
    #[test]
    fn the_network_rows_run_on_the_cpu_backend() {
        let mut be = crate::backend::cpu::CpuBackend::<f32>::new();
        let config = UNetConfig::preset("tiny").unwrap();
        let ceilings = UNIT;
        let mut lines = Vec::new();
        model(&mut be, &config, 2, 1, &ceilings, &mut |l| lines.push(l)).unwrap();
        let what: Vec<&str> = lines.iter().map(|l| l.what.as_str()).collect();
        assert_eq!(
            what,
            [
                "train step, batch 2",
                "train step, batch 2 (model FLOPs, fwd + bwd = 3x fwd)",
                "train memory, batch 2 (tensors + scratch)",
                "sampling step, batch 2 (1000-step images/s)",
                "sampling step, batch 2 (model FLOPs)",
            ]
        );
        for l in &lines {
            assert!(l.rate > 0.0 && l.rate.is_finite(), "{l}");
            assert!(l.unit == "GiB" || (l.ms > 0.0 && l.ms.is_finite()), "{l}");
        }
        // The FLOP rows against the stated peak: rate / 1 TFLOP/s.
        assert_eq!(lines[1].of_ceiling, Some(lines[1].rate));
    }

    /// `ddpm-cuda bench`'s kernel rows on the CPU backend at batch 1, one timed launch each: every row the
    /// backend has (fp32 only: no bf16 row, no rung) is a timing, none failed, and each family is there.
    #[test]
    fn the_kernel_rows_run_on_the_cpu_backend() {
        let mut be = crate::backend::cpu::CpuBackend::<f32>::new();
        let ceilings = UNIT;
        let mut lines = Vec::new();
        kernels(&mut be, 1, 1, &ceilings, &mut |l| lines.push(l)).unwrap();
        for l in &lines {
            assert!(l.ms > 0.0 && l.ms.is_finite(), "{l}");
            assert!(l.rate > 0.0 && l.rate.is_finite(), "{l}");
            assert!(
                !l.what.contains("bf16") && !l.what.contains("ladder"),
                "{l}"
            );
        }
        for want in [
            "conv 3x3 16x16 256->256 fp32, batch 1: forward",
            "conv 3x3 16x16 256->256 fp32, batch 1: input grad",
            "conv 3x3 16x16 256->256 fp32, batch 1: weight grad",
            "conv 3x3 16x16 256->256 fp32, batch 1: group norm + SiLU, then forward",
            "conv 3x3 16x16 256->256 fp32, batch 1: forward normalising its input",
            "group norm + SiLU 16x16x256, batch 1",
            "group norm + SiLU backward, batch 1",
            "attention l=256 c=256 fp32, batch 1: forward",
            "attention l=256 c=256 fp32, batch 1: backward",
            "gradient norm, 35.7 M parameters",
            "Adam, 35.7 M parameters",
            "EMA, 35.7 M parameters",
        ] {
            let n = lines.iter().filter(|l| l.what == want).count();
            assert_eq!(n, 1, "rows named {want:?} in {:#?}", lines);
        }
        assert_eq!(lines.len(), 12, "{lines:#?}");
    }

    /// Launches are added by kernel, the longest named first with their counts, and the kernels past
    /// [`PROFILE_ROWS`] share one row.
    #[test]
    fn a_profile_names_the_longest_kernels_and_folds_the_rest() {
        const NAMES: [&str; 14] = [
            "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9", "k10", "k11", "k12", "k13",
        ];
        // Kernel i launched once for i ms, and k1 three more times (4 ms in all, after k3).
        let launch = |kernel, ms| Launch {
            kernel,
            ms,
            blocks: 1,
            threads: 32,
            shared: 0,
            tile: None,
            staged: 0.0,
            flops: 0.0,
            bytes: 0.0,
            issued_macs: 0.0,
        };
        let mut launches: Vec<Launch> = NAMES
            .iter()
            .enumerate()
            .map(|(i, &k)| launch(k, i as f64))
            .collect();
        launches.extend([launch("k1", 1.0); 3]);
        let mut lines = Vec::new();
        profile_lines("step", &launches, &mut |l| lines.push(l));
        let total = (0..14).sum::<usize>() as f64 + 3.0;
        assert_eq!(lines[0].what, "step: all 17 launches of 14 kernels");
        assert_eq!(lines[0].ms, total);
        let named: Vec<&str> = lines[1..=PROFILE_ROWS]
            .iter()
            .map(|l| l.what.as_str())
            .collect();
        assert_eq!(named[..3], ["step: k13 x1", "step: k12 x1", "step: k11 x1"]);
        // k1 and k4 (4 ms each) keep the order of their first launches.
        assert_eq!(named[9..], ["step: k1 x4", "step: k4 x1", "step: k3 x1"]);
        assert_eq!(lines[1 + PROFILE_ROWS].what, "step: 2 other kernels x2");
        assert_eq!(lines[1 + PROFILE_ROWS].ms, 2.0);
        assert_eq!(lines.len(), PROFILE_ROWS + 2);
        assert!((lines[1].rate - 100.0 * 13.0 / total).abs() < 1e-9);
    }
}

//! CUDA backend benchmarks (criterion), on a GPU machine: every kernel family at the paper's dominant shapes
//! in each precision (the convolutions also on each rung of the ladder, dev/conv/README.md), and the U-Net's forward and training step. Without a device it says so and measures
//! nothing.
//!
//!     cargo bench --bench gpu                     # here, with a GPU
//!     gpu-carry/gpu-bench --bench                 # the binary scripts/gpu-prepare.sh carries
//!
//! Each sample queues its iterations and waits for the device once (`iter_custom`), so the time is the
//! device's, not the launch overhead's. Throughput is in elements where criterion prints "elem/s": FLOP for
//! the arithmetic kernels, bytes moved for the bandwidth-bound ones (set against the `ddpm-cuda bench`
//! ceilings of the same run).

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use ddpm_cuda::backend::cuda::CudaBackend;
use ddpm_cuda::backend::{
    AdamHyper, AttentionShape, Backend, ConvKind, ConvShape, GroupNormShape, Precision, Rung,
    Tensor,
};
use ddpm_cuda::model::{UNet, UNetConfig};
use std::time::{Duration, Instant};

/// The device, or None (saying why) when there is none.
fn device() -> Option<CudaBackend> {
    match CudaBackend::new() {
        Ok(be) => Some(be),
        Err(e) => {
            eprintln!("gpu benches skipped: {e}");
            None
        }
    }
}

fn filled(be: &mut CudaBackend, len: usize, v: f32) -> Tensor {
    let t = be.alloc(len).unwrap();
    be.fill(t, v).unwrap();
    t
}

/// Times `f` as the device runs it: `iters` calls queued, one wait.
fn device_time(be: &mut CudaBackend, iters: u64, f: &mut impl FnMut(&mut CudaBackend)) -> Duration {
    be.synchronize().unwrap();
    let start = Instant::now();
    for _ in 0..iters {
        f(be);
    }
    be.synchronize().unwrap();
    start.elapsed()
}

fn bench(
    g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    be: &mut CudaBackend,
    name: &str,
    mut f: impl FnMut(&mut CudaBackend),
) {
    g.bench_function(name, |b| {
        b.iter_custom(|iters| device_time(be, iters, &mut f))
    });
}

fn configure(g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
}

fn precisions(be: &CudaBackend) -> Vec<Precision> {
    let mut p = vec![Precision::Fp32];
    if be.supports_bf16() {
        p.push(Precision::Bf16);
    }
    p
}

/// The 3x3 convolutions that dominate the network (16x16 at 256 channels, 32x32 at 128), batch 128.
fn convolutions(c: &mut Criterion) {
    let Some(mut be) = device() else { return };
    for (hw, ch) in [(16, 256), (32, 128)] {
        let s = ConvShape {
            n: 128,
            h: hw,
            w: hw,
            c: ch,
            o: ch,
            kind: ConvKind::K3S1,
        };
        let (x, w, b) = (
            filled(&mut be, s.x_len(), 0.5),
            filled(&mut be, s.w_len(), 0.01),
            filled(&mut be, s.o, 0.0),
        );
        // Declared as the U-Net declares its weights, so the bf16 runs read the bf16 copy.
        be.keep_weight_copy(w).unwrap();
        let (y, dy) = (
            filled(&mut be, s.y_len(), 0.0),
            filled(&mut be, s.y_len(), 0.1),
        );
        let (dx, dw, db) = (
            filled(&mut be, s.x_len(), 0.0),
            filled(&mut be, s.w_len(), 0.0),
            filled(&mut be, s.o, 0.0),
        );
        // Each precision on its own core, then bf16 on the ladder's other rungs the device has.
        let mut runs: Vec<(Precision, Option<Rung>)> =
            precisions(&be).into_iter().map(|p| (p, None)).collect();
        if be.supports_bf16() {
            runs.extend(Rung::ALL.map(|r| (Precision::Bf16, Some(r))));
        }
        for (p, rung) in runs {
            be.set_precision(p).unwrap();
            if !be.set_rung(rung).unwrap() {
                continue;
            }
            let core = rung.map_or("", |r| match r {
                Rung::Wmma => "_wmma",
                Rung::Wgmma => "_wgmma",
                Rung::WgmmaTma => "_wgmma_tma",
                Rung::WgmmaTmaSwizzled => "_wgmma_tma_sw64",
                // fp32 activations here: version 8 runs the input gradient (its x must be bf16 for
                // the forward and the weight gradient, which fall back to version 3).
                Rung::Pipelined => "_v8",
            });
            let mut g =
                c.benchmark_group(format!("conv3x3_{hw}x{hw}x{ch}_b128_{}{core}", p.name()));
            configure(&mut g);
            g.throughput(Throughput::Elements(2 * s.macs() as u64));
            bench(&mut g, &mut be, "forward", |be| {
                be.conv2d_forward(s, x, w, b, y).unwrap()
            });
            bench(&mut g, &mut be, "input_grad", |be| {
                be.conv2d_backward_data(s, dy, w, dx, false).unwrap()
            });
            if rung.is_some_and(Rung::uses_tma) {
                g.finish(); // v5 and v6 leave the weight gradient to v4
                continue;
            }
            bench(&mut g, &mut be, "weight_grad", |be| {
                be.conv2d_backward_weight(s, x, dy, dw, db).unwrap()
            });
            g.finish();
        }
        be.set_rung(None).unwrap();
    }
}

/// Attention at the 16x16 layers (256 positions, 256 channels), batch 128.
fn attention(c: &mut Criterion) {
    let Some(mut be) = device() else { return };
    let s = AttentionShape {
        n: 128,
        l: 256,
        c: 256,
    };
    let qkv = filled(&mut be, s.n * s.l * 3 * s.c, 0.1);
    let (out, lse) = (
        filled(&mut be, s.n * s.l * s.c, 0.0),
        filled(&mut be, s.n * s.l, 0.0),
    );
    let dqkv = filled(&mut be, qkv.len, 0.0);
    let flop = 4 * (s.n * s.l * s.l * s.c) as u64;
    for p in precisions(&be) {
        be.set_precision(p).unwrap();
        let mut g = c.benchmark_group(format!("attention_l256_c256_b128_{}", p.name()));
        configure(&mut g);
        g.throughput(Throughput::Elements(flop));
        bench(&mut g, &mut be, "forward", |be| {
            be.attention_forward(s, qkv, out, lse).unwrap()
        });
        g.throughput(Throughput::Elements(flop * 5 / 2));
        bench(&mut g, &mut be, "backward", |be| {
            be.attention_backward(s, qkv, out, lse, out, dqkv).unwrap()
        });
        g.finish();
    }
}

/// The bandwidth-bound kernels: group norm + SiLU (16x16x256, batch 128) and Adam and EMA over the
/// paper network's 35.7 M parameters. Throughput in bytes moved.
fn bandwidth(c: &mut Criterion) {
    let Some(mut be) = device() else { return };
    let s = GroupNormShape {
        n: 128,
        hw: 256,
        c: 256,
        groups: 32,
        eps: 1e-6,
    };
    let (x, y, dy, dx) = (
        filled(&mut be, s.len(), 0.5),
        filled(&mut be, s.len(), 0.0),
        filled(&mut be, s.len(), 0.1),
        filled(&mut be, s.len(), 0.0),
    );
    let (gamma, beta) = (filled(&mut be, 256, 1.0), filled(&mut be, 256, 0.0));
    let (dg, dbeta) = (filled(&mut be, 256, 0.0), filled(&mut be, 256, 0.0));
    let (mean, rstd) = (
        filled(&mut be, s.stats_len(), 0.0),
        filled(&mut be, s.stats_len(), 1.0),
    );
    let mut g = c.benchmark_group("bandwidth");
    configure(&mut g);
    // Forward: x read three times (two statistics passes and the normalisation), y written once.
    g.throughput(Throughput::Bytes(16 * s.len() as u64));
    bench(&mut g, &mut be, "group_norm_silu_forward", |be| {
        be.group_norm_forward(s, x, gamma, beta, y, mean, rstd, true)
            .unwrap()
    });
    g.throughput(Throughput::Bytes(28 * s.len() as u64));
    bench(&mut g, &mut be, "group_norm_silu_backward", |be| {
        be.group_norm_backward(
            s, x, gamma, beta, mean, rstd, dy, dx, dg, dbeta, true, false,
        )
        .unwrap()
    });
    let n = 35_746_307;
    let (p, gr, m, v, ema) = (
        filled(&mut be, n, 0.1),
        filled(&mut be, n, 0.01),
        filled(&mut be, n, 0.0),
        filled(&mut be, n, 0.0),
        filled(&mut be, n, 0.1),
    );
    let norm = filled(&mut be, 1, 1.0);
    let hp = AdamHyper {
        lr: 2e-4,
        warmup: 0,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
    };
    // Adam reads parameters, gradients and both moments and writes three of them back.
    g.throughput(Throughput::Bytes(28 * n as u64));
    bench(&mut g, &mut be, "adam_35.7M", |be| {
        be.adam_step(p, gr, m, v, norm, hp).unwrap()
    });
    g.throughput(Throughput::Bytes(12 * n as u64));
    bench(&mut g, &mut be, "ema_35.7M", |be| {
        be.ema_update(ema, p, 0.9999).unwrap()
    });
    g.finish();
}

/// The paper's network: a forward pass (one sampling step's network work) and a forward + backward, batch
/// 128, in each precision.
fn unet(c: &mut Criterion) {
    let Some(mut be) = device() else { return };
    let config = UNetConfig::preset("ddpm-cifar10").unwrap();
    let batch = 128;
    let mut net = UNet::new(&mut be, &config, batch).unwrap();
    net.init(&mut be, 0).unwrap();
    be.fill(net.input, 0.1).unwrap();
    be.fill(net.timesteps, 500.0).unwrap();
    let flop = 2 * (net.macs_per_image() * batch) as u64;
    for p in precisions(&be) {
        be.set_precision(p).unwrap();
        let mut g = c.benchmark_group(format!("ddpm_cifar10_b128_{}", p.name()));
        configure(&mut g);
        g.throughput(Throughput::Elements(flop));
        bench(&mut g, &mut be, "forward", |be| {
            net.forward(be, None).unwrap();
        });
        g.throughput(Throughput::Elements(3 * flop));
        bench(&mut g, &mut be, "forward_backward", |be| {
            let out = net.forward(be, Some(0)).unwrap();
            be.copy(out, net.output_grad()).unwrap();
            net.backward(be).unwrap();
        });
        g.finish();
    }
}

criterion_group!(benches, convolutions, attention, bandwidth, unet);
criterion_main!(benches);

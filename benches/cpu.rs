//! CPU backend benchmarks: a convolution of the paper's network and one training step of the tiny model.
//! Throughput is reported in GFLOP/s (criterion's `Throughput::Elements` counts FLOP here), to compare
//! with the machine's peak.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ddpm_cuda::backend::cpu::CpuBackend;
use ddpm_cuda::backend::{Backend, ConvKind, ConvShape};
use ddpm_cuda::model::{UNet, UNetConfig};

fn conv(c: &mut Criterion) {
    // down_blocks.1: 16x16, 256 -> 256 channels, batch 8.
    let s = ConvShape {
        n: 8,
        h: 16,
        w: 16,
        c: 256,
        o: 256,
        kind: ConvKind::K3S1,
    };
    let mut be = CpuBackend::<f32>::new();
    let (x, w, b, y) = (
        be.alloc(s.x_len()).unwrap(),
        be.alloc(s.w_len()).unwrap(),
        be.alloc(s.o).unwrap(),
        be.alloc(s.y_len()).unwrap(),
    );
    be.fill(x, 0.5).unwrap();
    be.fill(w, 0.01).unwrap();
    let mut g = c.benchmark_group("conv3x3_16x16x256_b8");
    g.throughput(Throughput::Elements(2 * s.macs() as u64));
    g.sample_size(10);
    g.bench_function("forward", |bch| {
        bch.iter(|| be.conv2d_forward(s, x, w, b, y).unwrap())
    });
    g.finish();
}

fn unet_step(c: &mut Criterion) {
    let cfg = UNetConfig::preset("tiny").unwrap();
    let batch = 16;
    let mut be = CpuBackend::<f32>::new();
    let mut net = UNet::new(&mut be, &cfg, batch).unwrap();
    net.init(&mut be, 0).unwrap();
    be.fill(net.input, 0.1).unwrap();
    be.fill(net.timesteps, 500.0).unwrap();
    let mut g = c.benchmark_group("tiny_unet_b16");
    g.throughput(Throughput::Elements(
        6 * (net.macs_per_image() * batch) as u64,
    ));
    g.sample_size(10);
    g.bench_function("forward_backward", |bch| {
        bch.iter(|| {
            let out = net.forward(&mut be, None).unwrap();
            be.copy(out, net.output_grad()).unwrap();
            net.backward(&mut be).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, conv, unet_step);
criterion_main!(benches);

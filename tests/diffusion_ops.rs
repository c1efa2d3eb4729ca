//! The fused diffusion ops of the CPU backend against their definitions, with the Philox draws the kernels
//! make (same seed, stream and element numbering), and independent of how a batch is split.

use ddpm_cuda::backend::cpu::CpuBackend;
use ddpm_cuda::backend::{AdamHyper, Backend, ReverseStep, SamplerRow, Stream};
use ddpm_cuda::rng;
use ddpm_cuda::schedule::Schedule;

#[test]
fn noise_add_is_the_forward_process_with_philox_eps() {
    let sched = Schedule::paper();
    let mut be = CpuBackend::<f32>::new();
    let (per_image, n) = (2 * 3 * 5, 3);
    let x0v: Vec<f32> = (0..n * per_image)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    let sa: Vec<f32> = sched
        .sqrt_alphas_cumprod
        .iter()
        .map(|&v| v as f32)
        .collect();
    let s1: Vec<f32> = sched
        .sqrt_one_minus_alphas_cumprod
        .iter()
        .map(|&v| v as f32)
        .collect();
    let [x0, ts, tsa, ts1, xt, eps] =
        [x0v.len(), n, 1000, 1000, x0v.len(), x0v.len()].map(|l| be.alloc(l).unwrap());
    be.upload(x0, &x0v).unwrap();
    be.upload(ts, &[0.0, 499.0, 999.0]).unwrap();
    be.upload(tsa, &sa).unwrap();
    be.upload(ts1, &s1).unwrap();
    // The stream of training step 5, reached through the clock.
    let (seed, first) = (77, 3);
    let stream = rng::stream(rng::Purpose::TrainNoise, 5);
    let per_step = Stream::per_step(rng::Purpose::TrainNoise, 1, 0);
    be.clock_set(5).unwrap();
    be.noise_add(x0, ts, tsa, ts1, xt, eps, per_image, first, seed, per_step)
        .unwrap();
    let (x, e) = (be.download(xt).unwrap(), be.download(eps).unwrap());
    for i in 0..x0v.len() {
        let t = [0, 499, 999][i / per_image];
        let z = rng::normal(seed, stream, first + i as u64);
        assert_eq!(e[i], z);
        let want = sched.sqrt_alphas_cumprod[t] * f64::from(x0v[i])
            + sched.sqrt_one_minus_alphas_cumprod[t] * f64::from(z);
        // f32 arithmetic on f32-rounded coefficients: a few ulp of values of size ~1.
        assert!((f64::from(x[i]) - want).abs() < 1e-6, "{i}");
    }
    // The second image alone, numbered from its first element, draws the same noise as in the batch.
    let [x1, t1, xt1, e1] = [per_image, 1, per_image, per_image].map(|l| be.alloc(l).unwrap());
    be.upload(x1, &x0v[per_image..2 * per_image]).unwrap();
    be.upload(t1, &[499.0]).unwrap();
    be.noise_add(
        x1,
        t1,
        tsa,
        ts1,
        xt1,
        e1,
        per_image,
        first + per_image as u64,
        seed,
        Stream::fixed(stream),
    )
    .unwrap();
    assert_eq!(be.download(xt1).unwrap(), x[per_image..2 * per_image]);
    // A timestep outside the table is an error, not a panic.
    be.upload(ts, &[0.0, 1000.0, 3.0]).unwrap();
    assert!(be
        .noise_add(x0, ts, tsa, ts1, xt, eps, per_image, 0, seed, per_step)
        .is_err());
}

#[test]
fn sampler_step_applies_its_row_and_walks_the_table_down() {
    let mut be = CpuBackend::<f32>::new();
    let row = |t: f32, sigma: f32| SamplerRow {
        t,
        x0_from_xt: 2.0,
        x0_from_eps: 0.5,
        c_x0: 0.25,
        c_xt: 0.5,
        c_eps: 0.125,
        sigma,
        unused: 0.0,
    };
    be.sampler_load(&[row(0.0, 0.0), row(7.0, 0.1)]).unwrap();
    let [x, e, ts] = [5, 5, 2].map(|l| be.alloc(l).unwrap());
    let xv = [0.1f32, -0.9, 0.6, 2.0, -3.0];
    let ev = [0.3f32, 0.2, -0.1, 0.0, 1.0];
    be.upload(x, &xv).unwrap();
    be.upload(e, &ev).unwrap();
    assert_eq!(be.sampler_position().unwrap(), Some(1));
    be.sampler_timesteps(ts).unwrap();
    assert_eq!(be.download(ts).unwrap(), vec![7.0, 7.0]);
    let (seed, base) = (5, rng::stream(rng::Purpose::SamplerNoise, 0));
    let rs = |first_element, clip| ReverseStep {
        first_element,
        clip,
        seed,
        stream_base: base,
        guidance: None,
    };
    be.sampler_step(x, e, x, rs(10, true)).unwrap();
    let got = be.download(x).unwrap();
    for i in 0..5 {
        let x0 = (2.0 * xv[i] - 0.5 * ev[i]).clamp(-1.0, 1.0);
        let z = rng::normal(seed, base + 1, 10 + i as u64);
        let want = 0.25 * x0 + 0.5 * xv[i] + 0.125 * ev[i] + 0.1 * z;
        assert!((got[i] - want).abs() < 1e-6, "{i}: {} vs {want}", got[i]);
    }
    be.sampler_advance().unwrap();
    assert_eq!(be.sampler_position().unwrap(), Some(0));
    // Last row: sigma = 0, no noise; clipping off.
    be.upload(x, &xv).unwrap();
    be.sampler_step(x, e, x, rs(0, false)).unwrap();
    let got = be.download(x).unwrap();
    for i in 0..5 {
        let want = 0.25 * (2.0 * xv[i] - 0.5 * ev[i]) + 0.5 * xv[i] + 0.125 * ev[i];
        assert!((got[i] - want).abs() < 1e-6);
    }
    be.sampler_advance().unwrap();
    assert_eq!(be.sampler_position().unwrap(), None);
    assert!(be.sampler_step(x, e, x, rs(0, false)).is_err());
}

fn hyper(lr: f32, warmup: u64, max_grad_norm: f32) -> AdamHyper {
    AdamHyper {
        lr,
        warmup,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        max_grad_norm,
    }
}

#[test]
fn adam_clips_and_skips_non_finite_steps() {
    let mut be = CpuBackend::<f32>::new();
    let [p, g, m, v, nrm] = [3, 3, 3, 3, 1].map(|l| be.alloc(l).unwrap());
    be.upload(p, &[1.0, 2.0, 3.0]).unwrap();
    be.upload(g, &[3.0, 4.0, 0.0]).unwrap();
    be.global_norm(g, nrm).unwrap();
    assert_eq!(be.download(nrm).unwrap(), vec![5.0]);
    let hp = hyper(0.1, 0, 1.0);
    be.clock_set(0).unwrap();
    be.adam_step(p, g, m, v, nrm, hp).unwrap();
    // Clipped gradient g / 5; first step of Adam moves each coordinate by lr * sign(g) (m_hat / sqrt(v_hat) = +-1).
    let got = be.download(p).unwrap();
    for (a, b) in got.iter().zip([0.9f32, 1.9, 3.0]) {
        assert!((a - b).abs() < 1e-6, "{got:?}");
    }
    assert!((be.download(m).unwrap()[0] - 0.1 * 0.6).abs() < 1e-7);
    be.upload(nrm, &[f32::NAN]).unwrap();
    be.adam_step(p, g, m, v, nrm, hp).unwrap();
    assert_eq!(
        be.download(p).unwrap(),
        got,
        "a non-finite norm skips the step"
    );
}

#[test]
fn adam_takes_its_update_number_and_warmup_from_the_clock() {
    // From zero moments, update t moves a coordinate with gradient g by
    // lr_t * ((1 - b1) g / bc1) / sqrt((1 - b2) g^2 / bc2), lr_t = lr min(t / warmup, 1), bc = 1 - b^t.
    for (clock, warmup) in [(0u64, 10u64), (4, 10), (4, 0), (999, 500)] {
        let mut be = CpuBackend::<f32>::new();
        let [p, g, m, v, nrm] = [2, 2, 2, 2, 1].map(|l| be.alloc(l).unwrap());
        be.upload(p, &[0.0, 0.0]).unwrap();
        be.upload(g, &[0.5, -2.0]).unwrap();
        be.upload(nrm, &[1.0]).unwrap();
        be.clock_set(clock).unwrap();
        be.adam_step(p, g, m, v, nrm, hyper(0.01, warmup, 0.0))
            .unwrap();
        let t = (clock + 1) as f64;
        let lr = 0.01 * (t / warmup.max(1) as f64).min(1.0);
        let (bc1, bc2) = (1.0 - 0.9f64.powf(t), 1.0 - 0.999f64.powf(t));
        let step = lr * (0.1 / bc1) / (0.001f64 / bc2).sqrt();
        let got = be.download(p).unwrap();
        // f32 arithmetic of a result of size <= 0.03: well under 1e-6 relative.
        for (x, sign) in got.iter().zip([-1.0, 1.0]) {
            let want = sign * step;
            assert!(
                (f64::from(*x) - want).abs() < 1e-6 * want.abs(),
                "clock {clock} warmup {warmup}: {x} vs {want}"
            );
        }
    }
}

#[test]
fn training_timesteps_are_uniform_draws_of_the_clocks_stream() {
    let mut be = CpuBackend::<f32>::new();
    let ts = be.alloc(300).unwrap();
    let stream = Stream::per_step(rng::Purpose::Timesteps, 1, 0);
    for clock in [0u64, 7, 123_456] {
        be.clock_set(clock).unwrap();
        be.draw_timesteps(ts, 1000, 9, stream).unwrap();
        let got = be.download(ts).unwrap();
        let id = rng::stream(rng::Purpose::Timesteps, clock);
        for (i, t) in got.iter().enumerate() {
            assert_eq!(
                *t,
                rng::below(9, id, i as u64, 1000) as f32,
                "clock {clock}, {i}"
            );
        }
    }
    // The draws cover the range: 300 draws of 0..1000 land in all ten hundreds (each misses with
    // probability 0.9^300 < 1e-13).
    let got = be.download(ts).unwrap();
    for h in 0..10 {
        assert!(got.iter().any(|&t| (t / 100.0) as usize == h), "{h}");
    }
    assert!(got
        .iter()
        .all(|&t| (0.0..1000.0).contains(&t) && t.fract() == 0.0));
    assert!(be.draw_timesteps(ts, 0, 9, stream).is_err());
}

#[test]
fn the_log_ring_takes_each_step_at_the_clocks_slot() {
    let mut be = CpuBackend::<f32>::new();
    let (now, ring) = (be.alloc(2).unwrap(), be.alloc(6).unwrap());
    for step in 0..5u64 {
        be.clock_set(step).unwrap();
        be.upload(now, &[step as f32, -(step as f32)]).unwrap();
        be.log_at_clock(now, ring).unwrap();
    }
    // Slots 0, 1, 2 last written by steps 3, 4, 2.
    assert_eq!(
        be.download(ring).unwrap(),
        vec![3.0, -3.0, 4.0, -4.0, 2.0, -2.0]
    );
    let odd = be.alloc(5).unwrap();
    assert!(be.log_at_clock(now, odd).is_err());
    be.clock_set(5).unwrap();
    be.upload(now, &[9.0, 9.0]).unwrap();
    be.log_at_clock(now, ring).unwrap();
    // Clock 5 of 3 slots: slot 2.
    assert_eq!(
        be.download(ring).unwrap(),
        vec![3.0, -3.0, 4.0, -4.0, 9.0, 9.0]
    );
}

//! The samplers' math with no network in the way: for Gaussian data x0 ~ N(mu, s^2 I) the optimal noise
//! predictor is closed-form,
//!     eps*(x_t, t) = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu) / (ab_t s^2 + 1 - ab_t),
//! so driving a sampler with it must give samples with mean mu and variance s^2. The harness takes any
//! backend and any sampler table, so DDIM and the CUDA sampler get the same test.

use ddpm_cuda::backend::cpu::CpuBackend;
use ddpm_cuda::backend::{Backend, SamplerRow};
use ddpm_cuda::sample::{self, ddim_table, ddpm_table, Draw, Variance};
use ddpm_cuda::schedule::Schedule;

const MU: f64 = 0.3;
const S2: f64 = 0.25;
const N: usize = 16_384;

/// Sample mean and variance of N independent draws from `rows`.
pub fn gaussian_moments<B: Backend>(
    be: &mut B,
    sched: &Schedule,
    rows: &[SamplerRow],
) -> (f64, f64) {
    let x = be.alloc(N).unwrap();
    let eps = be.alloc(N).unwrap();
    let ts = be.alloc(1).unwrap();
    let draw = Draw {
        seed: 2024,
        first_image: 0,
        per_image: N,
        clip: false,
    };
    sample::run(
        be,
        rows,
        x,
        eps,
        draw,
        |be| {
            be.sampler_timesteps(ts)?;
            let t = be.download(ts)?[0] as usize;
            let ab = sched.alphas_cumprod[t];
            let xs = be.download(x)?;
            let e: Vec<f32> = xs
                .iter()
                .map(|&v| {
                    ((1.0 - ab).sqrt() * (f64::from(v) - ab.sqrt() * MU) / (ab * S2 + 1.0 - ab))
                        as f32
                })
                .collect();
            be.upload(eps, &e)
        },
        |_, _| {},
    )
    .unwrap();
    let xs = be.download(x).unwrap();
    let mean = xs.iter().map(|&v| f64::from(v)).sum::<f64>() / N as f64;
    let var = xs
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / (N - 1) as f64;
    (mean, var)
}

/// Bounds: the standard error of the mean is s / sqrt(N) = 0.0039 and of the variance
/// s^2 sqrt(2 / (N - 1)) = 0.0028; five of each, plus 0.01 on the variance for the sampler's own
/// discretisation (fixed_large adds slightly more noise than the exact reverse process).
fn assert_moments(what: &str, (mean, var): (f64, f64)) {
    eprintln!("{what}: mean {mean:.4} (want {MU}), variance {var:.4} (want {S2})");
    assert!((mean - MU).abs() < 5.0 * 0.0039, "{what}: mean {mean}");
    assert!(
        (var - S2).abs() < 5.0 * 0.0028 + 0.01,
        "{what}: variance {var}"
    );
}

#[test]
fn ddpm_fixed_large_recovers_gaussian_data() {
    let s = Schedule::paper();
    assert_moments(
        "fixed_large",
        gaussian_moments(
            &mut CpuBackend::<f32>::new(),
            &s,
            &ddpm_table(&s, Variance::FixedLarge),
        ),
    );
}

#[test]
fn ddpm_fixed_small_recovers_gaussian_data() {
    let s = Schedule::paper();
    assert_moments(
        "fixed_small",
        gaussian_moments(
            &mut CpuBackend::<f32>::new(),
            &s,
            &ddpm_table(&s, Variance::FixedSmall),
        ),
    );
}

#[test]
fn ddim_recovers_gaussian_data() {
    let s = Schedule::paper();
    assert_moments(
        "ddim eta=0 100 steps",
        gaussian_moments(
            &mut CpuBackend::<f32>::new(),
            &s,
            &ddim_table(&s, 100, 0.0).unwrap(),
        ),
    );
    // eta = 1 over every step is the ancestral sampler with the posterior variance.
    assert_moments(
        "ddim eta=1 1000 steps",
        gaussian_moments(
            &mut CpuBackend::<f32>::new(),
            &s,
            &ddim_table(&s, 1000, 1.0).unwrap(),
        ),
    );
}

/// The test can fail: a sampler with the wrong variance (no noise at all) collapses the spread.
#[test]
fn a_broken_sampler_fails_the_moment_check() {
    let s = Schedule::paper();
    let mut rows = ddpm_table(&s, Variance::FixedLarge);
    for r in &mut rows {
        r.sigma *= 0.5;
    }
    let (_, var) = gaussian_moments(&mut CpuBackend::<f32>::new(), &s, &rows);
    assert!(
        (var - S2).abs() > 5.0 * 0.0028 + 0.01,
        "variance {var} should be off"
    );
}

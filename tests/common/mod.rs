//! The samplers' math with no network in the way, shared by the CPU and GPU sampler tests.
//!
//! For Gaussian data x0 ~ N(mu, s^2 I) the optimal noise predictor is closed-form,
//!     eps*(x_t, t) = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu) / (ab_t s^2 + 1 - ab_t),
//! and with it every reverse step (no clipping) is an affine map of x_t plus independent noise. So the
//! mean and variance of the final samples follow from a two-number recursion written out here from
//! REFERENCE.md's formulas, with nothing from the library: the sampler's empirical moments must match
//! them within their standard errors. For the 1000-step samplers they also land on (mu, s^2).

#![allow(dead_code)]

pub mod cli;

use ddpm_cuda::backend::{Backend, SamplerRow};
use ddpm_cuda::model::UNetConfig;
use ddpm_cuda::sample::{self, Draw};

pub const MU: f64 = 0.3;
pub const S2: f64 = 0.25;
pub const N: usize = 16_384;

/// The paper's cumulative alphas, written out.
pub fn alphas_cumprod() -> Vec<f64> {
    let mut acc = 1.0;
    (0..1000)
        .map(|i| {
            acc *= 1.0 - (1e-4 + (0.02 - 1e-4) * i as f64 / 999.0);
            acc
        })
        .collect()
}

/// What one step of a sampler does, in the schedule's terms.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// Ancestral: posterior mean from x0_hat, variance beta' (large) or beta~ (small).
    Ddpm { small: bool },
    /// DDIM with this eta.
    Ddim { eta: f64 },
}

/// The exact mean and variance after running `kind` over `timesteps` (increasing; run from the last).
pub fn exact_moments(kind: Kind, timesteps: &[usize]) -> (f64, f64) {
    let ab = alphas_cumprod();
    let (mut m, mut v) = (0.0, 1.0);
    for (i, &t) in timesteps.iter().enumerate().rev() {
        let a = ab[t];
        let ap = if i == 0 { 1.0 } else { ab[timesteps[i - 1]] };
        // eps* = k (x - sqrt(a) mu); x0_hat = (x - sqrt(1 - a) eps*) / sqrt(a) = p x + q.
        let k = (1.0 - a).sqrt() / (a * S2 + 1.0 - a);
        let p = (1.0 - (1.0 - a).sqrt() * k) / a.sqrt();
        let q = (1.0 - a).sqrt() * k * MU;
        // x_prev = g x + h + sigma z.
        let (g, h, var) = match kind {
            Kind::Ddpm { small } => {
                let beta = 1.0 - a / ap;
                let c1 = ap.sqrt() * beta / (1.0 - a);
                let c2 = (1.0 - beta).sqrt() * (1.0 - ap) / (1.0 - a);
                let var = if t == 0 {
                    0.0
                } else if small {
                    ((1.0 - ap) / (1.0 - a) * beta).max(1e-20)
                } else {
                    beta
                };
                (c1 * p + c2, c1 * q, var)
            }
            Kind::Ddim { eta } => {
                let var = eta * eta * (1.0 - ap) / (1.0 - a) * (1.0 - a / ap);
                let d = (1.0 - ap - var).max(0.0).sqrt();
                (
                    ap.sqrt() * p + d * k,
                    ap.sqrt() * q - d * k * a.sqrt() * MU,
                    var,
                )
            }
        };
        m = g * m + h;
        v = g * g * v + var;
    }
    (m, v)
}

/// Sample mean and variance of N independent draws from `rows` on `be`, driven by eps*.
pub fn gaussian_moments<B: Backend>(be: &mut B, rows: &[SamplerRow]) -> (f64, f64) {
    let ab = alphas_cumprod();
    let x = be.alloc(N).unwrap();
    let eps = be.alloc(N).unwrap();
    let ts = be.alloc(1).unwrap();
    let draw = Draw {
        seed: 2024,
        first_image: 0,
        per_image: N,
        clip: false,
        start: sample::Start::Noise,
        guidance: None,
    };
    sample::run_stepwise(
        be,
        rows,
        x,
        eps,
        draw,
        |be| {
            be.sampler_timesteps(ts)?;
            let a = ab[be.download(ts)?[0] as usize];
            let e: Vec<f32> = be
                .download(x)?
                .iter()
                .map(|&v| {
                    ((1.0 - a).sqrt() * (f64::from(v) - a.sqrt() * MU) / (a * S2 + 1.0 - a)) as f32
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

/// Empirical moments within five standard errors of the exact ones: `s / sqrt(N)` for the mean,
/// `v sqrt(2 / (N - 1))` for the variance. Returns whether they are.
pub fn moments_match(what: &str, got: (f64, f64), exact: (f64, f64)) -> bool {
    let (mean, var) = got;
    let (em, ev) = exact;
    let (se_m, se_v) = ((ev / N as f64).sqrt(), ev * (2.0 / (N - 1) as f64).sqrt());
    eprintln!(
        "{what}: mean {mean:.4} (exact {em:.4} +- {:.4}), variance {var:.4} (exact {ev:.4} +- {:.4})",
        5.0 * se_m,
        5.0 * se_v
    );
    (mean - em).abs() < 5.0 * se_m && (var - ev).abs() < 5.0 * se_v
}

/// A two-level U-Net of the paper's family (attention at the second level, both block kinds, eps 1e-6)
/// of `size` x `size` RGB images, with the widths, ResNet blocks per level, groups and dropout given; no
/// classes.
pub fn two_level(
    size: usize,
    widths: [usize; 2],
    layers: usize,
    groups: usize,
    dropout: f64,
) -> UNetConfig {
    UNetConfig {
        sample_size: size,
        in_channels: 3,
        out_channels: 3,
        block_out_channels: widths.to_vec(),
        down_block_types: vec!["DownBlock2D".into(), "AttnDownBlock2D".into()],
        up_block_types: vec!["AttnUpBlock2D".into(), "UpBlock2D".into()],
        layers_per_block: layers,
        norm_num_groups: groups,
        norm_eps: 1e-6,
        dropout,
        classes: None,
    }
}

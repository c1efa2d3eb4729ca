//! The variational bound with no network in the way: for Gaussian data x0 ~ N(mu, s^2 I) the optimal
//! noise predictor is closed-form (see tests/sampler.rs), and under it every term of the bound has a value
//! the test computes directly, from the betas, without the library's tables:
//! - L_T is a KL between Gaussians, exact for each image;
//! - each L_t has a closed-form expectation, since x0 - E[x0 | x_t] has variance
//!   V_t = s^2 (1 - ab_t) / (ab_t s^2 + 1 - ab_t), and so does the eps error (ab_t s^2 / (ab_t s^2 + 1 - ab_t));
//! - L_0 is recomputed from the same draws of x_1 with the decoder written out again here.

use ddpm_cuda::eval::{Bound, Evaluator};
use ddpm_cuda::rng::{self, Purpose};
use ddpm_cuda::sample::Variance;
use ddpm_cuda::schedule::Schedule;

const MU: f64 = 0.1;
const S2: f64 = 0.04;
const DIMS: usize = 3 * 16 * 16;
const IMAGES: usize = 8;

/// The betas of the paper, written out, and the cumulative products.
fn paper_alphas_cumprod() -> (Vec<f64>, Vec<f64>) {
    let betas: Vec<f64> = (0..1000)
        .map(|i| 1e-4 + (0.02 - 1e-4) * i as f64 / 999.0)
        .collect();
    let mut ab = Vec::new();
    let mut acc = 1.0;
    for b in &betas {
        acc *= 1.0 - b;
        ab.push(acc);
    }
    (betas, ab)
}

/// Data: Philox normals scaled to N(MU, S2) (any independent draw would do).
fn data() -> Vec<f32> {
    (0..DIMS * IMAGES)
        .map(|i| (MU + S2.sqrt() * f64::from(rng::normal(99, 1, i as u64))) as f32)
        .collect()
}

fn run(variance: Variance) -> (Vec<Bound>, Vec<f32>) {
    let (_, ab) = paper_alphas_cumprod();
    let x0 = data();
    let ev = Evaluator::new(Schedule::paper(), variance, false, 11);
    let bounds = ev
        .batch(
            &x0,
            DIMS,
            0,
            |x_t, t| {
                let a = ab[t];
                Ok(x_t
                    .iter()
                    .map(|&x| {
                        ((1.0 - a).sqrt() * (f64::from(x) - a.sqrt() * MU) / (a * S2 + 1.0 - a))
                            as f32
                    })
                    .collect())
            },
            || {},
        )
        .unwrap();
    (bounds, x0)
}

/// The discretised decoder of the paper, written out: bins of width 2/255 around each level, the edges
/// open, and the tanh approximation of the normal CDF.
fn decoder_nll(x: f64, mean: f64, var: f64) -> f64 {
    let cdf = |z: f64| {
        0.5 * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (z + 0.044715 * z * z * z)).tanh())
    };
    let sd = var.sqrt();
    let upper = cdf((x - mean + 1.0 / 255.0) / sd);
    let lower = cdf((x - mean - 1.0 / 255.0) / sd);
    let p = if x < -0.999 {
        upper
    } else if x > 0.999 {
        1.0 - lower
    } else {
        upper - lower
    };
    -p.max(1e-12).ln()
}

fn check(variance: Variance) {
    let (betas, ab) = paper_alphas_cumprod();
    let (bounds, x0) = run(variance);
    let ln2 = std::f64::consts::LN_2;
    let big_t = 1000;
    // Posterior variance beta~_t (t >= 1) and the model's variance at t >= 1.
    let post = |t: usize| betas[t] * (1.0 - ab[t - 1]) / (1.0 - ab[t]);
    let model_var = |t: usize| match variance {
        Variance::FixedLarge => betas[t],
        Variance::FixedSmall => post(t),
    };

    // L_T, image by image: KL(N(sqrt(ab) x, 1 - ab) || N(0, 1)) = (ab x^2 - ab - ln(1 - ab)) / 2 per dim.
    let a = ab[big_t - 1];
    for (i, b) in bounds.iter().enumerate() {
        let kl: f64 = x0[i * DIMS..(i + 1) * DIMS]
            .iter()
            .map(|&x| 0.5 * (a * f64::from(x).powi(2) - a - (1.0 - a).ln()))
            .sum();
        let want = kl / (DIMS as f64 * ln2);
        assert!(
            (b.prior - want).abs() < 1e-12 * want.abs().max(1.0),
            "prior {} vs {want}",
            b.prior
        );
    }

    // Sum of L_t: the expectation, and a bound on the Monte Carlo error (5 standard errors, adding the
    // terms' errors as if fully correlated, since x0 is shared across t).
    let mean = Bound::mean(&bounds);
    let (mut expect, mut err) = (0.0, 0.0);
    for t in 1..big_t {
        let (vq, vp) = (post(t), model_var(t));
        let c1 = betas[t] * ab[t - 1].sqrt() / (1.0 - ab[t]);
        let v = S2 * (1.0 - ab[t]) / (ab[t] * S2 + 1.0 - ab[t]);
        let spread = 0.5 * c1 * c1 * v / vp;
        expect += 0.5 * ((vp / vq).ln() + vq / vp - 1.0) + spread;
        err += spread * (2.0 / (DIMS * IMAGES) as f64).sqrt();
    }
    let (expect, err) = (expect / ln2, 5.0 * err / ln2);
    eprintln!(
        "{variance:?}: sum of L_t {:.5} bits/dim, expected {expect:.5} +- {err:.5}",
        mean.terms
    );
    assert!(
        (mean.terms - expect).abs() < err,
        "sum of L_t {} vs {expect} +- {err}",
        mean.terms
    );

    // L_0 from the same draws of x_1 (Philox, Eval stream of t = 0).
    // The decoder's variance is beta~_1 for both choices (the paper's code uses it at t = 0 for fixed_large,
    // and the clipped log-variance of fixed_small is the same number).
    let a1 = ab[0];
    let mut nll = 0.0;
    for (j, &x) in x0.iter().enumerate() {
        let z = f64::from(rng::normal(11, rng::stream(Purpose::Eval, 0), j as u64));
        let x1 = f64::from((a1.sqrt() * f64::from(x) + (1.0 - a1).sqrt() * z) as f32);
        let eps_hat =
            f64::from(((1.0 - a1).sqrt() * (x1 - a1.sqrt() * MU) / (a1 * S2 + 1.0 - a1)) as f32);
        // At t = 0 the posterior mean is x0_hat itself (ab_prev = 1).
        let mean0 = (x1 - (1.0 - a1).sqrt() * eps_hat) / a1.sqrt();
        nll += decoder_nll(f64::from(x), mean0, post(1));
    }
    let want = nll / ((DIMS * IMAGES) as f64 * ln2);
    assert!(
        (mean.decoder - want).abs() < 1e-9,
        "L_0 {} vs {want}",
        mean.decoder
    );

    // L_simple: the mean over t of the eps error's expectation, with 5 standard errors of chi-square noise.
    let e_mse: f64 = (0..big_t)
        .map(|t| ab[t] * S2 / (ab[t] * S2 + 1.0 - ab[t]))
        .sum::<f64>()
        / big_t as f64;
    assert!(
        (mean.mse - e_mse).abs() < 5.0 * e_mse * (2.0 / (DIMS * IMAGES) as f64).sqrt(),
        "mse {} vs {e_mse}",
        mean.mse
    );
}

#[test]
fn bound_of_gaussian_data_fixed_large() {
    check(Variance::FixedLarge);
}

#[test]
fn bound_of_gaussian_data_fixed_small() {
    check(Variance::FixedSmall);
}

/// The check can fail: a predictor that is slightly off raises the sum of the L_t well past its bound.
#[test]
fn a_worse_predictor_raises_the_bound() {
    let (_, ab) = paper_alphas_cumprod();
    let x0 = data();
    let ev = Evaluator::new(Schedule::paper(), Variance::FixedSmall, false, 11);
    let good = Bound::mean(&run(Variance::FixedSmall).0);
    let off = ev
        .batch(
            &x0,
            DIMS,
            0,
            |x_t, t| {
                let a = ab[t];
                Ok(x_t
                    .iter()
                    .map(|&x| {
                        (1.05 * (1.0 - a).sqrt() * (f64::from(x) - a.sqrt() * MU)
                            / (a * S2 + 1.0 - a)) as f32
                    })
                    .collect())
            },
            || {},
        )
        .unwrap();
    let off = Bound::mean(&off);
    assert!(
        off.terms > good.terms + 0.01,
        "{} vs {}",
        off.terms,
        good.terms
    );
}

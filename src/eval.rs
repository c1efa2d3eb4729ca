//! The variational bound on the negative log-likelihood, in bits per dimension, as the paper reports it
//! (REFERENCE.md §1): `L = L_T + sum_{t>=1} L_t + L_0` for each image, where
//!
//! - `L_T = KL(q(x_T | x_0) || N(0, I))` (the prior term, no network),
//! - `L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))` at one draw of `x_t ~ q(x_t | x_0)` for every
//!   code timestep `t = 1 .. T-1` (the true posterior has the clipped log-variance; the model's mean comes
//!   from its eps prediction, its variance is fixed: `beta_t` for fixed_large, with `beta_tilde_1` at
//!   `t = 1`, as the paper's code does, or `beta_tilde_t` for fixed_small),
//! - `L_0 = -log p(x_0 | x_1)`, the discretised Gaussian decoder over 256 bins of [-1, 1] (with the
//!   paper's tanh approximation of the normal CDF).
//!
//! Every term is averaged over the dimensions and divided by ln 2. The noise of `(image, t)` is Philox
//! `(seed, Eval stream t, image * dims + j)`, so results do not depend on the batch size.

use crate::backend::Backend;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::UNet;
use crate::progress::Progress;
use crate::rng::{self, Purpose};
use crate::sample::Variance;
use crate::schedule::Schedule;
use std::f64::consts::LN_2;

/// One image's bound (or a mean over images), in bits per dimension.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Bound {
    /// `L_T`.
    pub prior: f64,
    /// `sum_{t=1}^{T-1} L_t`.
    pub terms: f64,
    /// `L_0`.
    pub decoder: f64,
    /// The mean over `t` of `||eps - eps_hat||^2 / dims` (L_simple), not in bits.
    pub mse: f64,
}

impl Bound {
    pub fn total(&self) -> f64 {
        self.prior + self.terms + self.decoder
    }

    /// The mean of several bounds.
    pub fn mean(all: &[Bound]) -> Bound {
        let n = all.len().max(1) as f64;
        let sum = |f: fn(&Bound) -> f64| all.iter().map(f).sum::<f64>() / n;
        Bound {
            prior: sum(|b| b.prior),
            terms: sum(|b| b.terms),
            decoder: sum(|b| b.decoder),
            mse: sum(|b| b.mse),
        }
    }
}

/// `KL(N(m1, e^lv1) || N(m2, e^lv2))` per dimension, in nats.
pub fn normal_kl(m1: f64, lv1: f64, m2: f64, lv2: f64) -> f64 {
    0.5 * (-1.0 + lv2 - lv1 + (lv1 - lv2).exp() + (m1 - m2).powi(2) * (-lv2).exp())
}

/// The standard normal CDF as the paper's code approximates it: `0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
fn approx_cdf(x: f64) -> f64 {
    0.5 * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

/// `log p(x)` of a pixel `x` in [-1, 1] (one of 256 levels) under `N(mean, e^{2 log_scale})` discretised
/// to bins of width 2/255, the edge bins extended to infinity.
pub fn discretized_log_likelihood(x: f64, mean: f64, log_scale: f64) -> f64 {
    let inv = (-log_scale).exp();
    let centered = x - mean;
    let cdf_plus = approx_cdf(inv * (centered + 1.0 / 255.0));
    let cdf_min = approx_cdf(inv * (centered - 1.0 / 255.0));
    if x < -0.999 {
        cdf_plus.max(1e-12).ln()
    } else if x > 0.999 {
        (1.0 - cdf_min).max(1e-12).ln()
    } else {
        (cdf_plus - cdf_min).max(1e-12).ln()
    }
}

/// The bound's fixed parts: the schedule's tables and the model's variance.
pub struct Evaluator {
    schedule: Schedule,
    /// The model's log-variance of `p(x_{t-1} | x_t)` at every `t`.
    model_log_var: Vec<f64>,
    clip: bool,
    seed: u64,
}

impl Evaluator {
    pub fn new(schedule: Schedule, variance: Variance, clip: bool, seed: u64) -> Self {
        let model_log_var = match variance {
            Variance::FixedLarge => (0..schedule.len())
                .map(|t| {
                    let v = if t == 0 {
                        schedule.posterior_variance[1]
                    } else {
                        schedule.betas[t]
                    };
                    v.ln()
                })
                .collect(),
            Variance::FixedSmall => schedule.posterior_log_variance_clipped.clone(),
        };
        Self {
            schedule,
            model_log_var,
            clip,
            seed,
        }
    }

    pub fn timesteps(&self) -> usize {
        self.schedule.len()
    }

    /// The bound of every image of `x0` (NHWC images of `dims` values in [-1, 1], numbered from
    /// `first_image`). `denoise(x_t, t)` returns the model's eps prediction for all of them at timestep `t`;
    /// it is called once per timestep, from `T - 1` down to 0, and `progress` after each.
    pub fn batch(
        &self,
        x0: &[f32],
        dims: usize,
        first_image: u64,
        mut denoise: impl FnMut(&[f32], usize) -> Result<Vec<f32>>,
        mut progress: impl FnMut(),
    ) -> Result<Vec<Bound>> {
        if dims == 0 || !x0.len().is_multiple_of(dims) {
            return Err(Error::shape(
                "eval batch",
                format!("images of {dims} values"),
                x0.len(),
            ));
        }
        let s = &self.schedule;
        let big_t = s.len();
        let images = x0.len() / dims;
        let mut out = vec![Bound::default(); images];
        let (ab_last, first) = (s.alphas_cumprod[big_t - 1], first_image * dims as u64);
        for (i, b) in out.iter_mut().enumerate() {
            b.prior = x0[i * dims..(i + 1) * dims]
                .iter()
                .map(|&x| {
                    normal_kl(
                        ab_last.sqrt() * f64::from(x),
                        (1.0 - ab_last).ln(),
                        0.0,
                        0.0,
                    )
                })
                .sum();
        }
        let mut eps = vec![0.0f32; x0.len()];
        let mut x_t = vec![0.0f32; x0.len()];
        for t in (0..big_t).rev() {
            rng::fill_normal(
                self.seed,
                rng::stream(Purpose::Eval, t as u64),
                first,
                &mut eps,
            );
            let (sa, s1) = (s.sqrt_alphas_cumprod[t], s.sqrt_one_minus_alphas_cumprod[t]);
            for ((xt, &x), &e) in x_t.iter_mut().zip(x0).zip(&eps) {
                *xt = (sa * f64::from(x) + s1 * f64::from(e)) as f32;
            }
            let eps_hat = denoise(&x_t, t)?;
            if eps_hat.len() != x0.len() {
                return Err(Error::shape("eps prediction", x0.len(), eps_hat.len()));
            }
            for (i, b) in out.iter_mut().enumerate() {
                let r = i * dims..(i + 1) * dims;
                let (term, mse) = self.term(
                    t,
                    &x0[r.clone()],
                    &x_t[r.clone()],
                    &eps[r.clone()],
                    &eps_hat[r],
                );
                if t == 0 {
                    b.decoder = term;
                } else {
                    b.terms += term;
                }
                b.mse += mse;
            }
            progress();
        }
        let d = dims as f64;
        for b in &mut out {
            b.prior /= d * LN_2;
            b.terms /= d * LN_2;
            b.decoder /= d * LN_2;
            b.mse /= d * big_t as f64;
        }
        Ok(out)
    }

    /// One image's term at `t` in nats, summed over dimensions (the KL for `t > 0`, the decoder's negative
    /// log-likelihood at `t = 0`), and its summed squared eps error.
    fn term(&self, t: usize, x0: &[f32], x_t: &[f32], eps: &[f32], eps_hat: &[f32]) -> (f64, f64) {
        let s = &self.schedule;
        let (c1, c2) = (s.posterior_mean_coef1[t], s.posterior_mean_coef2[t]);
        let (lv_q, lv_p) = (s.posterior_log_variance_clipped[t], self.model_log_var[t]);
        let (ra, rb) = (
            1.0 / s.sqrt_alphas_cumprod[t],
            s.sqrt_one_minus_alphas_cumprod[t] / s.sqrt_alphas_cumprod[t],
        );
        let (mut total, mut mse) = (0.0, 0.0);
        for j in 0..x0.len() {
            let (x, xt, e, eh) = (
                f64::from(x0[j]),
                f64::from(x_t[j]),
                f64::from(eps[j]),
                f64::from(eps_hat[j]),
            );
            let mut x0_hat = ra * xt - rb * eh;
            if self.clip {
                x0_hat = x0_hat.clamp(-1.0, 1.0);
            }
            let model_mean = c1 * x0_hat + c2 * xt;
            total += if t == 0 {
                -discretized_log_likelihood(x, model_mean, 0.5 * lv_p)
            } else {
                normal_kl(c1 * x + c2 * xt, lv_q, model_mean, lv_p)
            };
            mse += (e - eh).powi(2);
        }
        (total, mse)
    }
}

/// The bound of the first `limit` images of `data` (all when `None`) under the U-Net in `net` (its
/// weights loaded), in batches of `net.batch`, with a progress bar. Returns one bound per image (after a
/// stop request, those of the batches that finished).
/// A class-conditional model is evaluated for each image's label in the data.
pub fn evaluate<B: Backend>(
    be: &mut B,
    net: &mut UNet,
    ev: &Evaluator,
    data: &Dataset,
    limit: Option<usize>,
) -> Result<Vec<Bound>> {
    let count = limit.unwrap_or(data.len).min(data.len);
    if count == 0 {
        return Err(Error::Invalid("no images to evaluate".into()));
    }
    let dims = net.input.len / net.batch;
    // A class-conditional model is evaluated for the data's own labels: the bound of p(x | class).
    let labels = match &net.config.classes {
        Some(c) => Some(data.labels_for(c)?),
        None => None,
    };
    let batches = count.div_ceil(net.batch);
    let mut bar = Progress::new("eval", "steps", (batches * ev.timesteps()) as u64);
    let mut done = 0u64;
    let mut all = Vec::with_capacity(count);
    for b in 0..batches {
        let first = b * net.batch;
        let take = (count - first).min(net.batch);
        let x0: Vec<f32> = (first..first + take)
            .flat_map(|i| data.image(i).to_vec())
            .collect();
        if let Some(l) = labels {
            let mut batch: Vec<usize> = (first..first + take).map(|i| l[i] as usize).collect();
            batch.resize(net.batch, 0);
            net.set_labels(be, &batch)?;
        }
        let (input, timesteps, output, batch) = (net.input, net.timesteps, net.output(), net.batch);
        let bounds = match ev.batch(
            &x0,
            dims,
            first as u64,
            |x_t, t| {
                if crate::interrupt::requested() {
                    return Err(Error::Interrupted(format!("evaluation stopped at t = {t}")));
                }
                let mut padded = x_t.to_vec();
                padded.resize(input.len, 0.0);
                be.upload(input, &padded)?;
                be.upload(timesteps, &vec![t as f32; batch])?;
                net.forward(be, None)?;
                let mut eps = be.download(output)?;
                eps.truncate(x_t.len());
                Ok(eps)
            },
            || {
                done += 1;
                bar.update(done, 1.0, "");
            },
        ) {
            Ok(bounds) => bounds,
            // A stop request: the images finished so far are the result.
            Err(Error::Interrupted(_)) => break,
            Err(e) => return Err(e),
        };
        all.extend(bounds);
    }
    Ok(all)
}

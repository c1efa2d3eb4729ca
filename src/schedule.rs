//! Noise schedules and every table derived from them, in f64 (REFERENCE.md §1).
//!
//! Index `t` runs over `0..T`; `alphas_cumprod[t] = prod_{s <= t} (1 - betas[s])`.

use serde::{Deserialize, Serialize};

/// How the betas are laid out over the `T` diffusion steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, T)` (the paper's: 1e-4 to 0.02).
    Linear,
    /// Nichol & Dhariwal's cosine schedule, `s = 0.008`, betas capped at 0.999
    /// (diffusers calls it `squaredcos_cap_v2`).
    #[serde(rename = "squaredcos_cap_v2", alias = "cosine")]
    Cosine,
}

impl std::str::FromStr for BetaSchedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "linear" => Ok(Self::Linear),
            "cosine" | "squaredcos_cap_v2" => Ok(Self::Cosine),
            other => Err(format!(
                "unknown beta schedule {other:?}: expected linear or cosine (squaredcos_cap_v2)"
            )),
        }
    }
}

/// The schedule and its derived tables.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub betas: Vec<f64>,
    pub alphas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    /// `alphas_cumprod[t - 1]`, and 1 at `t = 0`.
    pub alphas_cumprod_prev: Vec<f64>,
    pub sqrt_alphas_cumprod: Vec<f64>,
    pub sqrt_one_minus_alphas_cumprod: Vec<f64>,
    /// Variance of `q(x_{t-1} | x_t, x_0)`: `beta_t (1 - ab_{t-1}) / (1 - ab_t)`; 0 at `t = 0`.
    pub posterior_variance: Vec<f64>,
    /// `log(posterior_variance)` with the `t = 0` entry (a log of 0) replaced by the `t = 1` entry, as the
    /// paper's code does.
    pub posterior_log_variance_clipped: Vec<f64>,
    /// Posterior mean `= coef1 * x_0 + coef2 * x_t`.
    pub posterior_mean_coef1: Vec<f64>,
    pub posterior_mean_coef2: Vec<f64>,
}

impl Schedule {
    /// The paper's schedule: linear from 1e-4 to 0.02 over 1000 steps.
    pub fn paper() -> Self {
        Self::linear(1000, 1e-4, 0.02)
    }

    pub fn linear(steps: usize, beta_start: f64, beta_end: f64) -> Self {
        assert!(steps >= 2, "a schedule needs at least two steps");
        let betas = (0..steps)
            .map(|i| beta_start + (beta_end - beta_start) * i as f64 / (steps - 1) as f64)
            .collect();
        Self::from_betas(betas)
    }

    pub fn cosine(steps: usize) -> Self {
        let s = 0.008;
        let f = |t: usize| {
            (((t as f64 / steps as f64) + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2)
                .cos()
                .powi(2)
        };
        let betas = (0..steps)
            .map(|i| (1.0 - f(i + 1) / f(i)).min(0.999))
            .collect();
        Self::from_betas(betas)
    }

    pub fn new(kind: BetaSchedule, steps: usize, beta_start: f64, beta_end: f64) -> Self {
        match kind {
            BetaSchedule::Linear => Self::linear(steps, beta_start, beta_end),
            BetaSchedule::Cosine => Self::cosine(steps),
        }
    }

    pub fn from_betas(betas: Vec<f64>) -> Self {
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod = Vec::with_capacity(alphas.len());
        let mut acc = 1.0;
        for a in &alphas {
            acc *= a;
            alphas_cumprod.push(acc);
        }
        let alphas_cumprod_prev: Vec<f64> = std::iter::once(1.0)
            .chain(alphas_cumprod[..alphas_cumprod.len() - 1].iter().copied())
            .collect();
        let n = betas.len();
        let mut posterior_variance = vec![0.0; n];
        let mut coef1 = vec![0.0; n];
        let mut coef2 = vec![0.0; n];
        for t in 0..n {
            let (ab, abp) = (alphas_cumprod[t], alphas_cumprod_prev[t]);
            posterior_variance[t] = betas[t] * (1.0 - abp) / (1.0 - ab);
            coef1[t] = betas[t] * abp.sqrt() / (1.0 - ab);
            coef2[t] = (1.0 - abp) * alphas[t].sqrt() / (1.0 - ab);
        }
        let mut posterior_log_variance_clipped: Vec<f64> =
            posterior_variance.iter().map(|v| v.ln()).collect();
        posterior_log_variance_clipped[0] = posterior_variance[1].ln();
        Self {
            sqrt_alphas_cumprod: alphas_cumprod.iter().map(|a| a.sqrt()).collect(),
            sqrt_one_minus_alphas_cumprod: alphas_cumprod
                .iter()
                .map(|a| (1.0 - a).sqrt())
                .collect(),
            betas,
            alphas,
            alphas_cumprod,
            alphas_cumprod_prev,
            posterior_variance,
            posterior_log_variance_clipped,
            posterior_mean_coef1: coef1,
            posterior_mean_coef2: coef2,
        }
    }

    pub fn len(&self) -> usize {
        self.betas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-300)
    }

    // Reference values computed with numpy (float64): np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)) etc.
    // Agreement to 1e-12 relative: both are f64 products of 1000 terms (error ~1000 ulp at worst).
    #[test]
    fn linear_matches_numpy() {
        let s = Schedule::paper();
        assert_eq!(s.len(), 1000);
        assert!(close(s.alphas_cumprod[0], 0.9999, 1e-15));
        assert!(close(s.alphas_cumprod[499], 0.07858724288177824, 1e-12));
        assert!(close(s.alphas_cumprod[999], 4.035829765375676e-05, 1e-11));
        assert!(close(
            s.posterior_variance[1],
            5.4531876613021935e-05,
            1e-12
        ));
        assert!(close(s.posterior_variance[999], 0.01999998352656061, 1e-12));
        assert_eq!(s.betas[0], 1e-4);
        assert!(close(s.betas[999], 0.02, 1e-15));
    }

    // numpy: betas from f(t) = cos(((t/T + s)/(1 + s)) pi/2)^2 with float division (an integer t/T would
    // make every beta but the last zero).
    #[test]
    fn cosine_matches_numpy_and_is_not_degenerate() {
        let s = Schedule::cosine(1000);
        assert!(close(s.betas[0], 4.128422482196914e-05, 1e-10));
        assert_eq!(s.betas[999], 0.999);
        assert!(close(s.alphas_cumprod[499], 0.4938435904406382, 1e-11));
        assert!(close(s.alphas_cumprod[999], 2.4287669070348567e-09, 1e-8));
        assert!(
            s.betas.windows(2).all(|w| w[1] >= w[0]),
            "cosine betas increase"
        );
    }

    // Each derived table against its definition, written out again here on the raw betas.
    #[test]
    fn derived_tables_follow_their_definitions() {
        for s in [
            Schedule::paper(),
            Schedule::cosine(100),
            Schedule::linear(7, 0.01, 0.3),
        ] {
            let mut ab = 1.0;
            for t in 0..s.len() {
                let abp = ab;
                ab *= 1.0 - s.betas[t];
                assert!(close(s.alphas_cumprod[t], ab, 1e-14));
                assert!(close(s.alphas_cumprod_prev[t], abp, 1e-14));
                assert!(close(s.sqrt_alphas_cumprod[t].powi(2), ab, 1e-14));
                assert!(close(
                    s.sqrt_one_minus_alphas_cumprod[t].powi(2),
                    1.0 - ab,
                    1e-12
                ));
                let c1 = abp.sqrt() * s.betas[t] / (1.0 - ab);
                let c2 = (1.0 - s.betas[t]).sqrt() * (1.0 - abp) / (1.0 - ab);
                assert!(close(s.posterior_mean_coef1[t], c1, 1e-12));
                assert!(close(s.posterior_mean_coef2[t], c2, 1e-12) || c2 == 0.0);
                let var = (1.0 - abp) / (1.0 - ab) * s.betas[t];
                assert!(close(s.posterior_variance[t], var, 1e-12) || var == 0.0);
            }
            assert_eq!(s.posterior_variance[0], 0.0);
            assert_eq!(
                s.posterior_log_variance_clipped[0],
                s.posterior_variance[1].ln()
            );
            assert!(close(
                s.posterior_log_variance_clipped[3],
                s.posterior_variance[3].ln(),
                1e-14
            ));
        }
    }

    // The posterior of the forward process is a proper Gaussian: mixing x_0 and x_t with the coefficients
    // gives back a consistent marginal. E[x_{t-1}] under q(x_t | x_0) with x_t = sqrt(ab_t) x_0 equals
    // sqrt(ab_{t-1}) x_0.
    #[test]
    fn posterior_mean_is_consistent_with_marginals() {
        let s = Schedule::paper();
        for t in [1, 10, 500, 999] {
            let mean =
                s.posterior_mean_coef1[t] + s.posterior_mean_coef2[t] * s.sqrt_alphas_cumprod[t];
            assert!(
                close(mean, s.alphas_cumprod_prev[t].sqrt(), 1e-12),
                "t = {t}"
            );
        }
    }
}

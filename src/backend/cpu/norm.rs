//! Group norm over NHWC, optionally fused with SiLU. Statistics are accumulated in f64 whatever `T` is.

use super::real::Real;
use crate::backend::GroupNormShape;
use rayon::prelude::*;

#[inline]
fn silu_grad<T: Real>(z: T) -> T {
    let s = z.sigmoid();
    s * (T::ONE + z * (T::ONE - s))
}

pub fn forward<T: Real>(
    s: &GroupNormShape,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    y: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    silu: bool,
) {
    let (hw, c, g) = (s.hw, s.c, s.groups);
    let cpg = c / g;
    let count = (hw * cpg) as f64;
    y.par_chunks_mut(hw * c)
        .zip(x.par_chunks(hw * c))
        .zip(mean.par_chunks_mut(g).zip(rstd.par_chunks_mut(g)))
        .for_each(|((yi, xi), (mi, ri))| {
            for grp in 0..g {
                let chans = grp * cpg..(grp + 1) * cpg;
                let mut sum = 0.0;
                for p in 0..hw {
                    sum += xi[p * c + chans.start..p * c + chans.end]
                        .iter()
                        .map(|v| v.to_f64())
                        .sum::<f64>();
                }
                let mu = sum / count;
                let mut ss = 0.0;
                for p in 0..hw {
                    ss += xi[p * c + chans.start..p * c + chans.end]
                        .iter()
                        .map(|v| (v.to_f64() - mu).powi(2))
                        .sum::<f64>();
                }
                let r = 1.0 / (ss / count + f64::from(s.eps)).sqrt();
                mi[grp] = T::from_f64(mu);
                ri[grp] = T::from_f64(r);
            }
            for p in 0..hw {
                for ch in 0..c {
                    let grp = ch / cpg;
                    let z = (xi[p * c + ch] - mi[grp]) * ri[grp] * gamma[ch] + beta[ch];
                    yi[p * c + ch] = if silu { z * z.sigmoid() } else { z };
                }
            }
        });
}

#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    s: &GroupNormShape,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    mean: &[T],
    rstd: &[T],
    dy: &[T],
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
    silu: bool,
    accumulate: bool,
) {
    let (hw, c, g) = (s.hw, s.c, s.groups);
    let cpg = c / g;
    let count = (hw * cpg) as f64;
    // Per image: dx, plus that image's share of dgamma and dbeta (summed over images in order below).
    let partials: Vec<Vec<f64>> = dx
        .par_chunks_mut(hw * c)
        .enumerate()
        .map(|(img, dxi)| {
            let xi = &x[img * hw * c..(img + 1) * hw * c];
            let dyi = &dy[img * hw * c..(img + 1) * hw * c];
            let mut part = vec![0.0f64; 2 * c];
            // dn = dL/d(normalised x) = dy_pre * gamma, where dy_pre is the gradient before the SiLU.
            let mut sum_dn = vec![0.0f64; g];
            let mut sum_dn_xhat = vec![0.0f64; g];
            for p in 0..hw {
                for ch in 0..c {
                    let grp = ch / cpg;
                    let i = p * c + ch;
                    let xhat = (xi[i] - mean[img * g + grp]) * rstd[img * g + grp];
                    let mut d = dyi[i];
                    if silu {
                        d *= silu_grad(xhat * gamma[ch] + beta[ch]);
                    }
                    part[ch] += (d * xhat).to_f64();
                    part[c + ch] += d.to_f64();
                    let dn = (d * gamma[ch]).to_f64();
                    sum_dn[grp] += dn;
                    sum_dn_xhat[grp] += dn * xhat.to_f64();
                }
            }
            for p in 0..hw {
                for ch in 0..c {
                    let grp = ch / cpg;
                    let i = p * c + ch;
                    let r = rstd[img * g + grp];
                    let xhat = (xi[i] - mean[img * g + grp]) * r;
                    let mut d = dyi[i];
                    if silu {
                        d *= silu_grad(xhat * gamma[ch] + beta[ch]);
                    }
                    let dn = (d * gamma[ch]).to_f64();
                    let v = r.to_f64()
                        * (dn - sum_dn[grp] / count - xhat.to_f64() * sum_dn_xhat[grp] / count);
                    let v = T::from_f64(v);
                    dxi[i] = if accumulate { dxi[i] + v } else { v };
                }
            }
            part
        })
        .collect();
    let mut total = vec![0.0f64; 2 * c];
    for part in partials {
        for (t, v) in total.iter_mut().zip(part) {
            *t += v;
        }
    }
    for ch in 0..c {
        dgamma[ch] = T::from_f64(total[ch]);
        dbeta[ch] = T::from_f64(total[c + ch]);
    }
}

//! Group norm over NHWC, optionally fused with SiLU. Statistics are accumulated in f64 whatever `T` is.
//!
//! Every pass runs over channel-contiguous rows (one pixel's `c` values), so its inner loop is a plain loop
//! over channels that the compiler vectorises, with no division or group lookup per element: sums are kept
//! per channel and folded into groups afterwards, and the normalisation is one multiply-add per element with
//! per-channel coefficients. The work is cut into parts of a fixed number of pixels ([`part_pixels`]), run on
//! the thread pool and summed in a fixed order, so a batch of one image keeps every core busy and no result
//! depends on the number of threads.

use super::real::Real;
use crate::backend::GroupNormShape;
use rayon::prelude::*;

#[inline]
fn silu_grad<T: Real>(z: T) -> T {
    let s = z.sigmoid();
    s * (T::ONE + z * (T::ONE - s))
}

/// Pixels per part: about 16 K elements (64 KiB in f32), at least one pixel. Part of the summation order,
/// so fixed by the shape alone.
fn part_pixels(c: usize) -> usize {
    (16_384 / c.max(1)).max(1)
}

/// Per-channel sums over each part of each image, `f(img, at, sums)` adding the row of the pixel whose
/// first element is `at` into `sums`
/// (`width` f64 per channel); then, per image, the parts summed in order: `n` vectors of `width * c`.
fn channel_sums(
    s: &GroupNormShape,
    width: usize,
    f: impl Fn(usize, usize, &mut [f64]) + Sync,
) -> Vec<Vec<f64>> {
    let (hw, c) = (s.hw, s.c);
    let pp = part_pixels(c);
    let parts = hw.div_ceil(pp);
    let partial: Vec<Vec<f64>> = (0..s.n * parts)
        .into_par_iter()
        .map(|job| {
            let (img, part) = (job / parts, job % parts);
            let mut sums = vec![0.0f64; width * c];
            for p in part * pp..((part + 1) * pp).min(hw) {
                f(img, (img * hw + p) * c, &mut sums);
            }
            sums
        })
        .collect();
    partial
        .chunks(parts)
        .map(|image| {
            let mut total = vec![0.0f64; width * c];
            for part in image {
                for (t, v) in total.iter_mut().zip(part) {
                    *t += v;
                }
            }
            total
        })
        .collect()
}

/// Each group's mean of a per-channel sum vector (`sums[ch]` over the image's pixels), in f64.
fn group_means(s: &GroupNormShape, sums: &[f64]) -> Vec<f64> {
    let cpg = s.c / s.groups;
    let count = (s.hw * cpg) as f64;
    sums.chunks(cpg)
        .map(|g| g.iter().sum::<f64>() / count)
        .collect()
}

/// Runs `f(img, first_element, rows)` over every part of every image on the thread pool, `rows` the part's
/// pixels of `y` (`c` values each).
fn for_parts<T: Real>(s: &GroupNormShape, y: &mut [T], f: impl Fn(usize, usize, &mut [T]) + Sync) {
    let (hw, c) = (s.hw, s.c);
    let pp = part_pixels(c);
    y.par_chunks_mut(hw * c).enumerate().for_each(|(img, yi)| {
        yi.par_chunks_mut(pp * c)
            .enumerate()
            .for_each(|(part, rows)| f(img, img * hw * c + part * pp * c, rows));
    });
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
    let (c, g) = (s.c, s.groups);
    let cpg = c / g;
    // Two passes, the mean and then the squared deviations from it (no cancellation of E[x^2] - E[x]^2).
    let sums = channel_sums(s, 1, |_, at, acc| {
        for (a, v) in acc.iter_mut().zip(&x[at..at + c]) {
            *a += v.to_f64();
        }
    });
    let means: Vec<Vec<f64>> = sums.iter().map(|sm| group_means(s, sm)).collect();
    // The mean of each channel's group, per image, for a channel-wise inner loop.
    let chan_mean: Vec<Vec<f64>> = means
        .iter()
        .map(|m| (0..c).map(|ch| m[ch / cpg]).collect())
        .collect();
    let dev = channel_sums(s, 1, |img, at, acc| {
        let mu = &chan_mean[img];
        for ((a, v), m) in acc.iter_mut().zip(&x[at..at + c]).zip(mu) {
            let d = v.to_f64() - m;
            *a += d * d;
        }
    });
    // y = x a + b per channel: a = rstd gamma, b = beta - mean a.
    let mut coef = vec![(T::ZERO, T::ZERO); s.n * c];
    for img in 0..s.n {
        let var = group_means(s, &dev[img]);
        for grp in 0..g {
            let r = 1.0 / (var[grp] + f64::from(s.eps)).sqrt();
            mean[img * g + grp] = T::from_f64(means[img][grp]);
            rstd[img * g + grp] = T::from_f64(r);
        }
        for ch in 0..c {
            let grp = ch / cpg;
            let a = rstd[img * g + grp] * gamma[ch];
            coef[img * c + ch] = (a, beta[ch] - mean[img * g + grp] * a);
        }
    }
    for_parts(s, y, |img, at, rows| {
        let cf = &coef[img * c..(img + 1) * c];
        for (p, row) in rows.chunks_mut(c).enumerate() {
            let xr = &x[at + p * c..at + (p + 1) * c];
            for ((o, &v), &(a, b)) in row.iter_mut().zip(xr).zip(cf) {
                let z = v * a + b;
                *o = if silu { z * z.sigmoid() } else { z };
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
    let (c, g) = (s.c, s.groups);
    let cpg = c / g;
    let count = (s.hw * cpg) as f64;
    // Per image and channel: the group's mean and rstd, so x-hat = (x - m) r is channel-wise.
    let mr: Vec<(T, T)> = (0..s.n * c)
        .map(|i| {
            let (img, ch) = (i / c, i % c);
            (mean[img * g + ch / cpg], rstd[img * g + ch / cpg])
        })
        .collect();
    // d is the gradient before the SiLU: dy times SiLU's derivative at the normalised value.
    let grad = |xv: T, dyv: T, (m, r): (T, T), gm: T, bt: T| {
        let xhat = (xv - m) * r;
        let d = if silu {
            dyv * silu_grad(xhat * gm + bt)
        } else {
            dyv
        };
        (xhat, d)
    };
    // One pixel's row zipped with its channels' constants (group mean and rstd, gamma, beta): a loop the
    // compiler vectorises (no indexing).
    let row = |img: usize, at: usize| {
        x[at..at + c]
            .iter()
            .zip(&dy[at..at + c])
            .zip(&mr[img * c..(img + 1) * c])
            .zip(gamma.iter().zip(beta))
            .map(move |(((&xv, &dyv), &cm), (&gm, &bt))| grad(xv, dyv, cm, gm, bt))
    };
    // Per image and channel, S1 = sum d (dbeta's share) in the first c sums and S2 = sum d x-hat
    // (dgamma's) in the next c.
    let sums = channel_sums(s, 2, |img, at, acc| {
        let (s1, s2) = acc.split_at_mut(c);
        for ((a1, a2), (xhat, d)) in s1.iter_mut().zip(s2).zip(row(img, at)) {
            *a1 += d.to_f64();
            *a2 += (d * xhat).to_f64();
        }
    });
    // dx = r (d gamma - A - x-hat B), A and B the group's means of gamma d and gamma d x-hat:
    // dx = d P - x-hat Q - R with P = r gamma, Q = r B, R = r A per channel.
    let mut coef = vec![(T::ZERO, T::ZERO, T::ZERO); s.n * c];
    for img in 0..s.n {
        let sm = &sums[img];
        for grp in 0..g {
            let chans = grp * cpg..(grp + 1) * cpg;
            let a: f64 = chans
                .clone()
                .map(|ch| gamma[ch].to_f64() * sm[ch])
                .sum::<f64>()
                / count;
            let b: f64 = chans
                .clone()
                .map(|ch| gamma[ch].to_f64() * sm[c + ch])
                .sum::<f64>()
                / count;
            let r = rstd[img * g + grp].to_f64();
            for ch in chans {
                coef[img * c + ch] = (
                    T::from_f64(r * gamma[ch].to_f64()),
                    T::from_f64(r * b),
                    T::from_f64(r * a),
                );
            }
        }
    }
    for_parts(s, dx, |img, at, rows| {
        let cf = &coef[img * c..(img + 1) * c];
        for (p, out) in rows.chunks_mut(c).enumerate() {
            for ((o, (xhat, d)), &(pc, q, r)) in out.iter_mut().zip(row(img, at + p * c)).zip(cf) {
                let v = d * pc - xhat * q - r;
                *o = if accumulate { *o + v } else { v };
            }
        }
    });
    for ch in 0..c {
        dgamma[ch] = T::from_f64(sums.iter().map(|sm| sm[c + ch]).sum());
        dbeta[ch] = T::from_f64(sums.iter().map(|sm| sm[ch]).sum());
    }
}

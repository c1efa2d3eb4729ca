//! The small ops: linear, SiLU, upsample, concat, the time-embedding add, timestep embedding, dropout,
//! MSE, the forward-process noise-add, the sampler update and the optimizer.

use super::real::{gemm, Mat, Real};
use super::reduce::grouped_sum;
use crate::backend::{AdamStep, ReverseStep, SamplerRow};
use crate::error::{Error, Result};
use crate::rng;
use rayon::prelude::*;

/// Elements per parallel task of the elementwise loops.
const GRAIN: usize = 1 << 14;

#[inline]
fn put<T: Real>(dst: &mut T, v: T, accumulate: bool) {
    *dst = if accumulate { *dst + v } else { v };
}

pub fn linear_forward<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    x: &[T],
    w: &[T],
    b: &[T],
    y: &mut [T],
) {
    let rows = (GRAIN / n.max(1)).max(1);
    y.par_chunks_mut(rows * n).enumerate().for_each(|(ci, yc)| {
        let (first, count) = (ci * rows, yc.len() / n);
        for row in yc.chunks_mut(n) {
            row.copy_from_slice(b);
        }
        gemm(
            T::ONE,
            Mat::rows(&x[first * k..(first + count) * k], count, k, k),
            Mat::transposed(w, k, n, k),
            T::ONE,
            yc,
            n,
        );
    });
    debug_assert_eq!(y.len(), m * n);
}

#[allow(clippy::too_many_arguments)]
pub fn linear_backward<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    x: &[T],
    w: &[T],
    dy: &[T],
    dx: Option<&mut [T]>,
    dw: &mut [T],
    db: &mut [T],
    accumulate: bool,
) {
    if let Some(dx) = dx {
        let beta = if accumulate { T::ONE } else { T::ZERO };
        let rows = (GRAIN / k.max(1)).max(1);
        dx.par_chunks_mut(rows * k)
            .enumerate()
            .for_each(|(ci, dxc)| {
                let (first, count) = (ci * rows, dxc.len() / k);
                gemm(
                    T::ONE,
                    Mat::rows(&dy[first * n..(first + count) * n], count, n, n),
                    Mat::rows(w, n, k, k),
                    beta,
                    dxc,
                    k,
                );
            });
    }
    let rows = (GRAIN / k.max(1)).max(16);
    let acc = grouped_sum(m, rows, n * k + n, |first, count, acc| {
        let (aw, ab) = acc.split_at_mut(n * k);
        let dyc = &dy[first * n..(first + count) * n];
        gemm(
            T::ONE,
            Mat::transposed(dyc, n, count, n),
            Mat::rows(&x[first * k..(first + count) * k], count, k, k),
            T::ONE,
            aw,
            k,
        );
        for row in dyc.chunks(n) {
            for (b, &g) in ab.iter_mut().zip(row) {
                *b += g;
            }
        }
    });
    dw.copy_from_slice(&acc[..n * k]);
    db.copy_from_slice(&acc[n * k..]);
}

pub fn silu_forward<T: Real>(x: &[T], y: &mut [T]) {
    y.par_chunks_mut(GRAIN)
        .zip(x.par_chunks(GRAIN))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x * x.sigmoid();
            }
        });
}

pub fn silu_backward<T: Real>(x: &[T], dy: &[T], dx: &mut [T], accumulate: bool) {
    dx.par_chunks_mut(GRAIN)
        .zip(x.par_chunks(GRAIN).zip(dy.par_chunks(GRAIN)))
        .for_each(|(dx, (x, dy))| {
            for ((d, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
                let s = x.sigmoid();
                put(d, g * s * (T::ONE + x * (T::ONE - s)), accumulate);
            }
        });
}

pub fn upsample2x_forward<T: Real>(h: usize, w: usize, c: usize, x: &[T], y: &mut [T]) {
    y.par_chunks_mut(2 * w * c)
        .enumerate()
        .for_each(|(row, yr)| {
            let (img, oy) = (row / (2 * h), row % (2 * h));
            let src = &x[(img * h + oy / 2) * w * c..(img * h + oy / 2 + 1) * w * c];
            for ox in 0..2 * w {
                yr[ox * c..(ox + 1) * c].copy_from_slice(&src[(ox / 2) * c..(ox / 2 + 1) * c]);
            }
        });
}

pub fn upsample2x_backward<T: Real>(
    h: usize,
    w: usize,
    c: usize,
    dy: &[T],
    dx: &mut [T],
    accumulate: bool,
) {
    dx.par_chunks_mut(w * c).enumerate().for_each(|(row, dxr)| {
        let (img, iy) = (row / h, row % h);
        for ix in 0..w {
            for ch in 0..c {
                let mut s = T::ZERO;
                for (dy2, dx2) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    s += dy[((img * 2 * h + 2 * iy + dy2) * 2 * w + 2 * ix + dx2) * c + ch];
                }
                put(&mut dxr[ix * c + ch], s, accumulate);
            }
        }
    });
}

pub fn concat_forward<T: Real>(ca: usize, cb: usize, a: &[T], b: &[T], y: &mut [T]) {
    y.par_chunks_mut(ca + cb).enumerate().for_each(|(p, yp)| {
        yp[..ca].copy_from_slice(&a[p * ca..(p + 1) * ca]);
        yp[ca..].copy_from_slice(&b[p * cb..(p + 1) * cb]);
    });
}

#[allow(clippy::too_many_arguments)]
pub fn concat_backward<T: Real>(
    ca: usize,
    cb: usize,
    dy: &[T],
    da: &mut [T],
    db: &mut [T],
    acc_a: bool,
    acc_b: bool,
) {
    da.par_chunks_mut(ca)
        .zip(db.par_chunks_mut(cb))
        .enumerate()
        .for_each(|(p, (a, b))| {
            let row = &dy[p * (ca + cb)..(p + 1) * (ca + cb)];
            for (d, &g) in a.iter_mut().zip(&row[..ca]) {
                put(d, g, acc_a);
            }
            for (d, &g) in b.iter_mut().zip(&row[ca..]) {
                put(d, g, acc_b);
            }
        });
}

pub fn add_image_bias<T: Real>(hw: usize, c: usize, y: &mut [T], bias: &[T]) {
    y.par_chunks_mut(hw * c).enumerate().for_each(|(img, yi)| {
        let b = &bias[img * c..(img + 1) * c];
        for row in yi.chunks_mut(c) {
            for (v, &bb) in row.iter_mut().zip(b) {
                *v += bb;
            }
        }
    });
}

pub fn image_bias_backward<T: Real>(hw: usize, c: usize, dy: &[T], dbias: &mut [T]) {
    dbias.par_chunks_mut(c).enumerate().for_each(|(img, db)| {
        db.fill(T::ZERO);
        for row in dy[img * hw * c..(img + 1) * hw * c].chunks(c) {
            for (d, &g) in db.iter_mut().zip(row) {
                *d += g;
            }
        }
    });
}

/// The embedding is computed in f64 and rounded once (the kernel does the same).
pub fn timestep_embedding<T: Real>(dim: usize, t: &[T], y: &mut [T]) {
    let half = dim / 2;
    for (row, &tt) in y.chunks_mut(dim).zip(t) {
        for i in 0..half {
            let f = (-(10000f64.ln()) * i as f64 / (half as f64 - 1.0)).exp();
            let a = tt.to_f64() * f;
            row[i] = T::from_f64(a.sin());
            row[half + i] = T::from_f64(a.cos());
        }
        if dim % 2 == 1 {
            row[dim - 1] = T::ZERO;
        }
    }
}

fn keep_scale<T: Real>(p: f32, seed: u64, stream: u64, e: u64) -> T {
    if rng::uniform(seed, stream, e) >= p {
        T::from_f64(1.0 / (1.0 - f64::from(p)))
    } else {
        T::ZERO
    }
}

pub fn dropout_forward<T: Real>(x: &[T], y: &mut [T], p: f32, seed: u64, stream: u64) {
    y.par_chunks_mut(GRAIN).enumerate().for_each(|(ci, yc)| {
        for (j, v) in yc.iter_mut().enumerate() {
            let e = ci * GRAIN + j;
            *v = x[e] * keep_scale(p, seed, stream, e as u64);
        }
    });
}

pub fn dropout_backward<T: Real>(
    dy: &[T],
    dx: &mut [T],
    p: f32,
    seed: u64,
    stream: u64,
    accumulate: bool,
) {
    dx.par_chunks_mut(GRAIN).enumerate().for_each(|(ci, dxc)| {
        for (j, v) in dxc.iter_mut().enumerate() {
            let e = ci * GRAIN + j;
            put(v, dy[e] * keep_scale(p, seed, stream, e as u64), accumulate);
        }
    });
}

/// Returns the loss (accumulated in f64) and writes the gradient.
pub fn mse_loss<T: Real>(pred: &[T], target: &[T], dpred: &mut [T]) -> f64 {
    let n = pred.len() as f64;
    let scale = T::from_f64(2.0 / n);
    let mut sum = 0.0;
    for ((d, &p), &t) in dpred.iter_mut().zip(pred).zip(target) {
        let diff = p - t;
        sum += diff.to_f64() * diff.to_f64();
        *d = scale * diff;
    }
    sum / n
}

#[allow(clippy::too_many_arguments)]
pub fn noise_add<T: Real>(
    x0: &[T],
    timesteps: &[T],
    sqrt_ab: &[T],
    sqrt_1m_ab: &[T],
    x_t: &mut [T],
    eps: &mut [T],
    per_image: usize,
    first: u64,
    seed: u64,
    stream: u64,
) {
    x_t.par_chunks_mut(GRAIN)
        .zip(eps.par_chunks_mut(GRAIN))
        .enumerate()
        .for_each(|(ci, (xc, ec))| {
            for j in 0..xc.len() {
                let i = ci * GRAIN + j;
                let t = timesteps[i / per_image].to_f64() as usize;
                let z = T::from_f32(rng::normal(seed, stream, first + i as u64));
                ec[j] = z;
                xc[j] = sqrt_ab[t] * x0[i] + sqrt_1m_ab[t] * z;
            }
        });
}

pub fn normal<T: Real>(x: &mut [T], first: u64, seed: u64, stream: u64) {
    x.par_chunks_mut(GRAIN).enumerate().for_each(|(ci, c)| {
        for (j, v) in c.iter_mut().enumerate() {
            *v = T::from_f32(rng::normal(seed, stream, first + (ci * GRAIN + j) as u64));
        }
    });
}

/// A class label stored as a float: an integer in `0..classes`, or an error.
pub fn label<T: Real>(v: T, classes: usize) -> Result<usize> {
    let f = v.to_f64();
    if f >= 0.0 && f < classes as f64 && f.fract() == 0.0 {
        Ok(f as usize)
    } else {
        Err(Error::Invalid(format!(
            "class label {f} is not an integer in 0..{classes}"
        )))
    }
}

/// One reverse step, in place: `x` holds x_t on entry and x_{t-1} on exit.
/// One element of a reverse step (the formula of `SamplerRow`), given its noise draw `z`.
#[inline]
pub fn reverse_update<T: Real>(row: &SamplerRow, x_t: T, eps_hat: T, z: T, clip: bool) -> T {
    let f = T::from_f32;
    let mut x0 = f(row.x0_from_xt) * x_t - f(row.x0_from_eps) * eps_hat;
    if clip {
        let (lo, hi) = (-T::ONE, T::ONE);
        x0 = if x0 < lo {
            lo
        } else if x0 > hi {
            hi
        } else {
            x0
        };
    }
    f(row.c_x0) * x0 + f(row.c_xt) * x_t + f(row.c_eps) * eps_hat + f(row.sigma) * z
}

/// One reverse step in place (`x` holds x_t on entry), guided where `rs` says so (see
/// [`ReverseStep`]: then `x` and `eps_hat` are doubled and both halves of `x` get the result).
pub fn sampler_step<T: Real>(
    x: &mut [T],
    eps_hat: &[T],
    row: &SamplerRow,
    rs: &ReverseStep,
    stream: u64,
) {
    let total = rs.images_len(x.len()).expect("checked by the caller");
    let (x, twin) = x.split_at_mut(total);
    let draw = |i: usize| {
        if row.sigma > 0.0 {
            T::from_f32(rng::normal(rs.seed, stream, rs.first_element + i as u64))
        } else {
            T::ZERO
        }
    };
    match rs.guidance {
        None => x.par_chunks_mut(GRAIN).enumerate().for_each(|(ci, xc)| {
            for (j, v) in xc.iter_mut().enumerate() {
                let i = ci * GRAIN + j;
                *v = reverse_update(row, *v, eps_hat[i], draw(i), rs.clip);
            }
        }),
        Some(w) => {
            let (w, (cond, null)) = (T::from_f32(w), eps_hat.split_at(total));
            x.par_chunks_mut(GRAIN)
                .zip(twin.par_chunks_mut(GRAIN))
                .enumerate()
                .for_each(|(ci, (xc, tc))| {
                    for (j, (v, t)) in xc.iter_mut().zip(tc).enumerate() {
                        let i = ci * GRAIN + j;
                        let e = null[i] + w * (cond[i] - null[i]);
                        *v = reverse_update(row, *v, e, draw(i), rs.clip);
                        *t = *v;
                    }
                })
        }
    }
}

pub fn sum_squares<T: Real>(x: &[T]) -> f64 {
    let acc = grouped_sum::<f64>(x.len(), GRAIN, 1, |first, count, acc| {
        acc[0] += x[first..first + count]
            .iter()
            .map(|&v| v.to_f64() * v.to_f64())
            .sum::<f64>();
    });
    acc[0]
}

pub fn adam_step<T: Real>(
    params: &mut [T],
    grads: &[T],
    m: &mut [T],
    v: &mut [T],
    norm: f32,
    hp: &AdamStep,
) {
    if !norm.is_finite() {
        return;
    }
    let clip = if hp.max_grad_norm > 0.0 && norm > hp.max_grad_norm {
        hp.max_grad_norm / norm
    } else {
        1.0
    };
    let f = T::from_f32;
    let (clip, b1, b2, c1, c2, bc1, bc2, lr, eps, wd) = (
        f(clip),
        f(hp.beta1),
        f(hp.beta2),
        f(hp.one_minus_beta1),
        f(hp.one_minus_beta2),
        f(hp.bias_correction1),
        f(hp.bias_correction2),
        f(hp.lr),
        f(hp.eps),
        f(hp.weight_decay),
    );
    params
        .par_chunks_mut(GRAIN)
        .zip(grads.par_chunks(GRAIN))
        .zip(m.par_chunks_mut(GRAIN).zip(v.par_chunks_mut(GRAIN)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let g = g[i] * clip;
                m[i] = b1 * m[i] + c1 * g;
                v[i] = b2 * v[i] + c2 * g * g;
                let mhat = m[i] / bc1;
                let vhat = v[i] / bc2;
                p[i] -= lr * (mhat / (vhat.sqrt() + eps) + wd * p[i]);
            }
        });
}

pub fn ema_update<T: Real>(ema: &mut [T], params: &[T], decay: f32) {
    let d = T::from_f32(decay);
    ema.par_chunks_mut(GRAIN)
        .zip(params.par_chunks(GRAIN))
        .for_each(|(e, p)| {
            for (e, &p) in e.iter_mut().zip(p) {
                *e = d * *e + (T::ONE - d) * p;
            }
        });
}

//! Single-head self-attention over the positions of each image. The forward pass saves one log-sum-exp per
//! query row; the backward pass rebuilds the probabilities from it, as a flash-attention kernel does.

use super::real::{gemm, Mat, Real};
use crate::backend::AttentionShape;
use rayon::prelude::*;

fn scale<T: Real>(c: usize) -> T {
    T::from_f64(1.0 / (c as f64).sqrt())
}

/// `p = exp(q k^T * scale - lse)` for one image; with `lse = None` computes the log-sum-exp into `lse_out`.
fn probabilities<T: Real>(
    qkv: &[T],
    l: usize,
    c: usize,
    p: &mut [T],
    lse_in: Option<&[T]>,
    lse_out: Option<&mut [T]>,
) {
    let q = Mat::rows(qkv, l, c, 3 * c);
    let kt = Mat::transposed(&qkv[c..], c, l, 3 * c);
    gemm(scale(c), q, kt, T::ZERO, p, l);
    match (lse_in, lse_out) {
        (Some(lse), _) => {
            for (row, &m) in p.chunks_mut(l).zip(lse) {
                for v in row {
                    *v = (*v - m).exp();
                }
            }
        }
        (None, Some(lse)) => {
            for (row, out) in p.chunks_mut(l).zip(lse) {
                let mut m = row[0];
                for &v in row.iter() {
                    if v > m {
                        m = v;
                    }
                }
                let mut sum = T::ZERO;
                for v in row.iter_mut() {
                    *v = (*v - m).exp();
                    sum += *v;
                }
                let inv = T::ONE / sum;
                for v in row.iter_mut() {
                    *v *= inv;
                }
                *out = m + T::from_f64(sum.to_f64().ln());
            }
        }
        (None, None) => unreachable!("probabilities needs the log-sum-exp in or out"),
    }
}

pub fn forward<T: Real>(s: &AttentionShape, qkv: &[T], out: &mut [T], lse: &mut [T]) {
    let (l, c) = (s.l, s.c);
    out.par_chunks_mut(l * c)
        .zip(lse.par_chunks_mut(l))
        .enumerate()
        .for_each(|(img, (o, lse))| {
            let x = &qkv[img * l * 3 * c..(img + 1) * l * 3 * c];
            let mut p = vec![T::ZERO; l * l];
            probabilities(x, l, c, &mut p, None, Some(lse));
            gemm(
                T::ONE,
                Mat::rows(&p, l, l, l),
                Mat::rows(&x[2 * c..], l, c, 3 * c),
                T::ZERO,
                o,
                c,
            );
        });
}

pub fn backward<T: Real>(
    s: &AttentionShape,
    qkv: &[T],
    out: &[T],
    lse: &[T],
    dout: &[T],
    dqkv: &mut [T],
) {
    let (l, c) = (s.l, s.c);
    dqkv.par_chunks_mut(l * 3 * c)
        .enumerate()
        .for_each(|(img, dx)| {
            let x = &qkv[img * l * 3 * c..(img + 1) * l * 3 * c];
            let o = &out[img * l * c..(img + 1) * l * c];
            let d_o = &dout[img * l * c..(img + 1) * l * c];
            let mut p = vec![T::ZERO; l * l];
            probabilities(x, l, c, &mut p, Some(&lse[img * l..(img + 1) * l]), None);
            // dP = dO v^T; dS = P * (dP - rowsum(dO * O))
            let mut ds = vec![T::ZERO; l * l];
            gemm(
                T::ONE,
                Mat::rows(d_o, l, c, c),
                Mat::transposed(&x[2 * c..], c, l, 3 * c),
                T::ZERO,
                &mut ds,
                l,
            );
            for i in 0..l {
                let delta: T = o[i * c..(i + 1) * c]
                    .iter()
                    .zip(&d_o[i * c..(i + 1) * c])
                    .map(|(&a, &b)| a * b)
                    .sum();
                for j in 0..l {
                    ds[i * l + j] = p[i * l + j] * (ds[i * l + j] - delta);
                }
            }
            let sc = scale::<T>(c);
            let mut tmp = vec![T::ZERO; l * c];
            // dq = scale dS k
            gemm(
                sc,
                Mat::rows(&ds, l, l, l),
                Mat::rows(&x[c..], l, c, 3 * c),
                T::ZERO,
                &mut tmp,
                c,
            );
            scatter(dx, &tmp, l, c, 0);
            // dk = scale dS^T q
            gemm(
                sc,
                Mat::transposed(&ds, l, l, l),
                Mat::rows(x, l, c, 3 * c),
                T::ZERO,
                &mut tmp,
                c,
            );
            scatter(dx, &tmp, l, c, 1);
            // dv = P^T dO
            gemm(
                T::ONE,
                Mat::transposed(&p, l, l, l),
                Mat::rows(d_o, l, c, c),
                T::ZERO,
                &mut tmp,
                c,
            );
            scatter(dx, &tmp, l, c, 2);
        });
}

fn scatter<T: Real>(dqkv: &mut [T], part: &[T], l: usize, c: usize, which: usize) {
    for i in 0..l {
        dqkv[i * 3 * c + which * c..i * 3 * c + (which + 1) * c]
            .copy_from_slice(&part[i * c..(i + 1) * c]);
    }
}

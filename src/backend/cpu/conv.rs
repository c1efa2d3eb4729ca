//! Convolution as GEMM over chunks of output pixels (NHWC, weights `[o, kh, kw, c]`).
//!
//! Forward: for a chunk of output pixels, gather the patches into `cols [p, kh*kw*c]` (im2col), then
//! `y = cols w^T + b` in one packed, vectorised GEMM; chunks run on the thread pool. The input gradient
//! gathers `dy` the same way around each *input* pixel and multiplies by the weights rearranged to
//! `[kh, kw, o, c]`; the weight gradient sums `dy^T cols` over a fixed number of pixel groups (in a fixed
//! order, so the result does not depend on the number of threads).

use super::real::{gemm, gemm_with, Mat, Real};
use super::reduce::grouped_sum;
use crate::backend::{ConvKind, ConvShape};
use rayon::prelude::*;

/// Output pixels per GEMM of the forward pass and the input gradient: about 1 MiB of patches (which
/// stay in L2 while the kernel reads them), the weights packed once per call for all chunks
/// ([`Real::prepare`]). A row's sums do not depend on the rows beside it: no result changes with this.
fn chunk_pixels(k: usize) -> usize {
    // A multiple of 12, the widest kernel's rows, so that only a layer's last chunk has an edge tile.
    (262_144 / k.max(1)).clamp(24, 1024) / 12 * 12
}

/// Pixels per term of the weight gradient's sum, which are the depth of its GEMMs: at most about 1 MiB of
/// patches, and no more than a 16th of all pixels so that [`grouped_sum`]'s 16 groups keep the threads
/// busy. Part of the summation order, so a function of the shape alone.
fn sum_chunk_pixels(k: usize, pixels: usize) -> usize {
    pixels
        .div_ceil(super::reduce::GROUPS)
        .min(262_144 / k.max(1))
        .max(16)
}

/// Fills `cols` (`pixels x k`) with the patches of output pixels `first .. first + pixels`.
fn im2col<T: Real>(s: &ConvShape, x: &[T], first: usize, pixels: usize, cols: &mut [T]) {
    let (oh, ow) = s.out_hw();
    let (taps, stride, pad) = (s.kind.taps(), s.kind.stride(), s.kind.pad_before());
    let k = s.k();
    for p in 0..pixels {
        let q = first + p;
        let (img, rest) = (q / (oh * ow), q % (oh * ow));
        let (y0, x0) = (rest / ow, rest % ow);
        let row = &mut cols[p * k..(p + 1) * k];
        for r in 0..taps {
            let ih = (y0 * stride + r) as isize - pad as isize;
            for t in 0..taps {
                let iw = (x0 * stride + t) as isize - pad as isize;
                let dst = &mut row[(r * taps + t) * s.c..(r * taps + t + 1) * s.c];
                if ih < 0 || iw < 0 || ih >= s.h as isize || iw >= s.w as isize {
                    dst.fill(T::ZERO);
                } else {
                    let src = ((img * s.h + ih as usize) * s.w + iw as usize) * s.c;
                    dst.copy_from_slice(&x[src..src + s.c]);
                }
            }
        }
    }
}

pub fn forward<T: Real>(s: &ConvShape, x: &[T], w: &[T], b: &[T], y: &mut [T]) {
    let k = s.k();
    let chunk = chunk_pixels(k);
    let direct = s.kind == ConvKind::K1;
    let wt = T::prepare(Mat::transposed(w, k, s.o, k));
    y.par_chunks_mut(chunk * s.o)
        .enumerate()
        .for_each(|(ci, yc)| {
            let first = ci * chunk;
            let pixels = yc.len() / s.o;
            for row in yc.chunks_mut(s.o) {
                row.copy_from_slice(b);
            }
            if direct {
                let a = Mat::rows(&x[first * s.c..(first + pixels) * s.c], pixels, k, k);
                gemm_with(T::ONE, a, &wt, T::ONE, yc, s.o);
            } else {
                T::with_scratch(pixels * k, |cols| {
                    im2col(s, x, first, pixels, cols);
                    gemm_with(T::ONE, Mat::rows(cols, pixels, k, k), &wt, T::ONE, yc, s.o);
                });
            }
        });
}

/// The output row (or column) whose tap `tap` reads input row `i`: `yo * stride + tap - pad = i`;
/// `usize::MAX` where none does.
fn reader(i: usize, tap: usize, pad: usize, stride: usize) -> usize {
    let num = (i + pad) as isize - tap as isize;
    if num >= 0 && (num as usize).is_multiple_of(stride) {
        num as usize / stride
    } else {
        usize::MAX
    }
}

/// `dx (+)= conv^T(dy, w)`.
pub fn backward_data<T: Real>(s: &ConvShape, dy: &[T], w: &[T], dx: &mut [T], accumulate: bool) {
    let beta = if accumulate { T::ONE } else { T::ZERO };
    let (o, c) = (s.o, s.c);
    if s.kind == ConvKind::K1 {
        let chunk = chunk_pixels(o);
        let w = T::prepare(Mat::rows(w, o, c, c));
        dx.par_chunks_mut(chunk * c)
            .enumerate()
            .for_each(|(ci, dxc)| {
                let (first, pixels) = (ci * chunk, dxc.len() / c);
                let a = Mat::rows(&dy[first * o..(first + pixels) * o], pixels, o, o);
                gemm_with(T::ONE, a, &w, beta, dxc, c);
            });
        return;
    }
    let (taps, stride, pad) = (s.kind.taps(), s.kind.stride(), s.kind.pad_before());
    let (oh, ow) = s.out_hw();
    // wr[(r, t, o), c] = w[o, r, t, c]
    let kk = taps * taps * o;
    let mut wr = vec![T::ZERO; kk * c];
    for oo in 0..o {
        for rt in 0..taps * taps {
            let src = (oo * taps * taps + rt) * c;
            let dst = (rt * o + oo) * c;
            wr[dst..dst + c].copy_from_slice(&w[src..src + c]);
        }
    }
    let chunk = chunk_pixels(kk);
    let wr = T::prepare(Mat::rows(&wr, kk, c, c));
    dx.par_chunks_mut(chunk * c)
        .enumerate()
        .for_each(|(ci, dxc)| {
            let (first, pixels) = (ci * chunk, dxc.len() / c);
            T::with_scratch(pixels * kk, |g| {
                for p in 0..pixels {
                    let q = first + p;
                    let (img, rest) = (q / (s.h * s.w), q % (s.h * s.w));
                    let (ih, iw) = (rest / s.w, rest % s.w);
                    let row = &mut g[p * kk..(p + 1) * kk];
                    for r in 0..taps {
                        let yo = reader(ih, r, pad, stride);
                        for t in 0..taps {
                            let xo = reader(iw, t, pad, stride);
                            let dst = &mut row[(r * taps + t) * o..(r * taps + t + 1) * o];
                            if yo < oh && xo < ow {
                                let src = ((img * oh + yo) * ow + xo) * o;
                                dst.copy_from_slice(&dy[src..src + o]);
                            } else {
                                dst.fill(T::ZERO);
                            }
                        }
                    }
                }
                gemm_with(T::ONE, Mat::rows(g, pixels, kk, kk), &wr, beta, dxc, c);
            });
        });
}

/// `dw = dy^T cols`, `db = sum dy` (both overwritten).
pub fn backward_weight<T: Real>(s: &ConvShape, x: &[T], dy: &[T], dw: &mut [T], db: &mut [T]) {
    let (k, o) = (s.k(), s.o);
    let (oh, ow) = s.out_hw();
    let total = s.n * oh * ow;
    let chunk = sum_chunk_pixels(k, total);
    let direct = s.kind == ConvKind::K1;
    let acc = grouped_sum(total, chunk, o * k + o, |first, pixels, acc| {
        let (accw, accb) = acc.split_at_mut(o * k);
        let dyc = &dy[first * o..(first + pixels) * o];
        let a = Mat::transposed(dyc, o, pixels, o);
        if direct {
            gemm(
                T::ONE,
                a,
                Mat::rows(&x[first * s.c..(first + pixels) * s.c], pixels, k, k),
                T::ONE,
                accw,
                k,
            );
        } else {
            T::with_scratch(pixels * k, |cols| {
                im2col(s, x, first, pixels, cols);
                gemm(T::ONE, a, Mat::rows(cols, pixels, k, k), T::ONE, accw, k);
            });
        }
        for row in dyc.chunks(o) {
            for (b, &g) in accb.iter_mut().zip(row) {
                *b += g;
            }
        }
    });
    dw.copy_from_slice(&acc[..o * k]);
    db.copy_from_slice(&acc[o * k..]);
}

//! Convolution as GEMM over chunks of output pixels (NHWC, weights `[o, kh, kw, c]`).
//!
//! Forward: for a chunk of output pixels, gather the patches into `cols [p, kh*kw*c]` (im2col), then
//! `y = cols w^T + b` in one packed, vectorised GEMM; chunks run on the thread pool. The input gradient
//! gathers `dy` the same way around each *input* pixel and multiplies by the weights rearranged to
//! `[kh, kw, o, c]`; the weight gradient sums `dy^T cols` over all pixels in a fixed order, in parallel
//! over tiles of its columns (so the result does not depend on the number of threads).

use super::real::{gemm_with, Mat, Real};
use super::reduce::grouped_sum;
use super::sgemm;
use crate::backend::{ConvKind, ConvShape};
use rayon::prelude::*;

/// Output pixels per GEMM of the forward pass and the input gradient: about 1 MiB of patches (which
/// stay in L2 while the kernel reads them), the weights packed once per call for all chunks
/// ([`Real::prepare`]). A row's sums do not depend on the rows beside it: no result changes with this.
fn chunk_pixels(k: usize) -> usize {
    // A multiple of 12, the widest kernel's rows, so that only a layer's last chunk has an edge tile.
    (262_144 / k.max(1)).clamp(24, 1024) / 12 * 12
}

/// Pixels per term of the weight gradient's sum over pixels: one block of the GEMM's depth
/// ([`sgemm::KC`]), so summing the terms into `dw` is the same arithmetic as one GEMM over all pixels. Part
/// of the summation order, so fixed.
const SUM_PIXELS: usize = sgemm::KC;

/// Columns `j0 .. j0 + width` of the patches of output pixels `first .. first + pixels`, into `cols`
/// (`pixels x width`); all `k` columns is im2col.
#[allow(clippy::too_many_arguments)]
fn im2col<T: Real>(
    s: &ConvShape,
    x: &[T],
    first: usize,
    pixels: usize,
    j0: usize,
    width: usize,
    cols: &mut [T],
) {
    let (oh, ow) = s.out_hw();
    let (taps, stride, pad, c) = (s.kind.taps(), s.kind.stride(), s.kind.pad_before(), s.c);
    let j1 = j0 + width;
    for (p, row) in cols.chunks_exact_mut(width).take(pixels).enumerate() {
        let q = first + p;
        let (img, rest) = (q / (oh * ow), q % (oh * ow));
        let (y0, x0) = (rest / ow, rest % ow);
        // Each tap (r, t) is columns (r taps + t) c .. + c: the part of it inside j0 .. j1.
        for tap in j0 / c..j1.div_ceil(c) {
            let (r, t) = (tap / taps, tap % taps);
            let (lo, hi) = ((tap * c).max(j0), ((tap + 1) * c).min(j1));
            let dst = &mut row[lo - j0..hi - j0];
            let ih = (y0 * stride + r) as isize - pad as isize;
            let iw = (x0 * stride + t) as isize - pad as isize;
            if ih < 0 || iw < 0 || ih >= s.h as isize || iw >= s.w as isize {
                dst.fill(T::ZERO);
            } else {
                let src = ((img * s.h + ih as usize) * s.w + iw as usize) * c + lo - tap * c;
                dst.copy_from_slice(&x[src..src + (hi - lo)]);
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
                    im2col(s, x, first, pixels, 0, k, cols);
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
///
/// In parallel over tiles of `dw`'s columns, each summing over all pixels, [`SUM_PIXELS`] at a time, into
/// its columns of `dw`: a tile's accumulator (o x at most 256) stays in L2, and no per-thread copies of
/// `dw` are summed afterwards. An element's sum is over the same pixels in the same order whatever the
/// tiles are (see sgemm's note), so the result does not depend on them or on the threads.
pub fn backward_weight<T: Real>(s: &ConvShape, x: &[T], dy: &[T], dw: &mut [T], db: &mut [T]) {
    let (k, o) = (s.k(), s.o);
    let (oh, ow) = s.out_hw();
    let total = s.n * oh * ow;
    assert!(
        dw.len() == o * k && dy.len() >= total * o,
        "conv weight gradient shapes"
    );
    // About 8 tiles (the work of 8 threads), whole 32-column panels, at most 256 columns.
    let tile = k.div_ceil(8).next_multiple_of(32).clamp(32, 256);
    let direct = s.kind == ConvKind::K1;
    let out = Shared(dw.as_mut_ptr());
    (0..k.div_ceil(tile)).into_par_iter().for_each(|t| {
        let (j0, width) = (t * tile, tile.min(k - t * tile));
        for (term, first) in (0..total).step_by(SUM_PIXELS).enumerate() {
            let pixels = SUM_PIXELS.min(total - first);
            let beta = if term == 0 { T::ZERO } else { T::ONE };
            let dyc = &dy[first * o..(first + pixels) * o];
            // dw[:, j0 .. j0 + width] (+)= dyc^T b, b the pixels' columns j0 .. j0 + width of the patches.
            let product = |b: &[T], ldb: usize| {
                debug_assert!(b.len() >= (pixels - 1) * ldb + width);
                // SAFETY: dyc^T is o x pixels inside dyc, b pixels x width inside b (its length checked
                // by the callers' slicing), and this task alone writes columns j0 .. j0 + width of dw's
                // o rows of k (asserted above); nothing else reads dw meanwhile.
                unsafe {
                    T::gemm_raw(
                        o,
                        pixels,
                        width,
                        T::ONE,
                        dyc.as_ptr(),
                        1,
                        o as isize,
                        b.as_ptr(),
                        ldb as isize,
                        1,
                        beta,
                        out.at(j0),
                        k as isize,
                        1,
                    )
                }
            };
            if direct {
                product(&x[first * k + j0..(first + pixels) * k], k);
            } else {
                T::with_scratch(pixels * width, |cols| {
                    im2col(s, x, first, pixels, j0, width, cols);
                    product(cols, width);
                });
            }
        }
    });
    let sums = grouped_sum(total, SUM_PIXELS, o, |first, pixels, acc| {
        for row in dy[first * o..(first + pixels) * o].chunks(o) {
            for (b, &g) in acc.iter_mut().zip(row) {
                *b += g;
            }
        }
    });
    db.copy_from_slice(&sums);
}

/// `dw`'s pointer, shared by the column tiles of [`backward_weight`], which write disjoint columns.
struct Shared<T>(*mut T);

// SAFETY: the tasks that share it write disjoint elements (see backward_weight).
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn at(&self, offset: usize) -> *mut T {
        // SAFETY: offset < dw.len() (a column index of its first row).
        unsafe { self.0.add(offset) }
    }
}

//! The scalar types the CPU backend runs in: f32 (the engine) and f64 (finite-difference checks).

use super::sgemm;
use std::cell::RefCell;
use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

pub trait Real:
    Copy
    + Send
    + Sync
    + Debug
    + Default
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + Sum
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;

    /// `c = alpha * a b + beta * c` with `a` m x k, `b` k x n, `c` m x n, each given by (row stride, column
    /// stride). With `beta = 0`, `c` is not read.
    ///
    /// # Safety
    /// Every addressed element must lie inside the pointed-to allocations, and `c` must not alias `a`, `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );

    /// `b` made ready for many GEMMs with it ([`gemm_with`]): packed once in f32, kept as it is in f64.
    fn prepare(b: Mat<'_, Self>) -> Prepared<'_, Self> {
        Prepared::Plain(b)
    }

    /// [`Real::gemm_raw`] with `b` packed ([`Prepared::Packed`], made only by an f32 [`Real::prepare`]).
    ///
    /// # Safety
    /// As [`Real::gemm_raw`]'s.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_packed_raw(
        _m: usize,
        _alpha: Self,
        _a: *const Self,
        _rsa: isize,
        _csa: isize,
        _b: &sgemm::PackedB,
        _beta: Self,
        _c: *mut Self,
        _rsc: isize,
    ) {
        unreachable!("only f32 packs a GEMM operand")
    }

    /// Runs `f` on a scratch buffer of `len` elements owned by this thread (kept between calls, so a
    /// step allocates nothing once warm). Its contents are whatever the last user left: write before
    /// reading. Not reentrant: `f` must not call it again.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;

    fn sigmoid(self) -> Self {
        Self::ONE / (Self::ONE + (-self).exp())
    }
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    fn prepare(b: Mat<'_, Self>) -> Prepared<'_, Self> {
        assert!(b.last() <= b.data.len(), "gemm operand out of bounds");
        let op = sgemm::Operand::new(b.data.as_ptr(), b.rs as isize, b.cs as isize);
        // SAFETY: b's extent was checked above.
        Prepared::Packed(unsafe { sgemm::PackedB::new(b.rows, b.cols, op) })
    }
    unsafe fn gemm_packed_raw(
        m: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: &sgemm::PackedB,
        beta: f32,
        c: *mut f32,
        rsc: isize,
    ) {
        let a = sgemm::Operand::new(a, rsa, csa);
        unsafe { sgemm::sgemm_packed(m, alpha, a, b, beta, c, rsc, 1) }
    }
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
        thread_local! {
            static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        }
        scratch_of(&SCRATCH, len, f)
    }
    const ONE: Self = 1.0;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn exp(self) -> Self {
        exp_f32(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        let (a, b) = (
            sgemm::Operand::new(a, rsa, csa),
            sgemm::Operand::new(b, rsb, csb),
        );
        unsafe { sgemm::sgemm(m, k, n, alpha, a, b, beta, c, rsc, csc) }
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
        thread_local! {
            static SCRATCH: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
        }
        scratch_of(&SCRATCH, len, f)
    }
    const ONE: Self = 1.0;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f32(x: f32) -> Self {
        f64::from(x)
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        unsafe {
            matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

/// `e^x` in f32 without a library call, so that loops of it (SiLU, softmax) inline and vectorise: the
/// classic range reduction `x = n ln 2 + r`, |r| <= ln 2 / 2, with ln 2 split in two (the first part exact
/// in a few bits, so `n * LN2_HI` is exact), a degree-5 minimax polynomial for `e^r` (Cephes' `expf`
/// coefficients) and `2^n` built in the exponent bits. Within 2 ulp of the true value over the whole range
/// (`tests::exp_f32_is_accurate`); +-inf and NaN come out as e^x does; results below f32's smallest normal
/// (x < -87.3) are flushed to 0, which no activation of the network notices.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 355 / 512, exact in 9 bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Beyond these e^x is inf in f32, or below the smallest normal (2^-126).
    const HI: f32 = 88.72283;
    const LO: f32 = -87.33654;
    let xc = x.clamp(LO, HI);
    // Round to nearest by adding and taking away 1.5 * 2^23 (no rounding instruction before SSE4.1).
    const ROUND: f32 = 12_582_912.0;
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let er = p * r2 + r + 1.0;
    // n is in [-126, 128]: 2^n as an f32 is (n + 127) << 23, except n = 128, split as 2 * 2^127.
    let ni = n as i32;
    let (ni, twice) = if ni > 127 { (127, 2.0) } else { (ni, 1.0) };
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let y = er * scale * twice;
    if x > HI {
        f32::INFINITY
    } else if x < LO {
        0.0
    } else {
        // NaN reaches here and stays NaN through the polynomial.
        y
    }
}

/// A strided matrix view: `rows x cols`, element (i, j) at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major with leading dimension `ld`.
    pub fn rows(data: &'a [T], rows: usize, cols: usize, ld: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: ld,
            cs: 1,
        }
    }
    /// The transpose of a row-major `cols x rows` matrix with leading dimension `ld`.
    pub fn transposed(data: &'a [T], rows: usize, cols: usize, ld: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: 1,
            cs: ld,
        }
    }
    fn last(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// A right operand made ready for many GEMMs ([`Real::prepare`]).
pub enum Prepared<'a, T> {
    Plain(Mat<'a, T>),
    Packed(sgemm::PackedB),
}

impl<T> Prepared<'_, T> {
    /// (rows, columns)
    fn dims(&self) -> (usize, usize) {
        match self {
            Prepared::Plain(b) => (b.rows, b.cols),
            Prepared::Packed(b) => (b.rows(), b.cols()),
        }
    }
}

/// `c = alpha * a b + beta * c`, with `c` row-major (leading dimension `ldc`). Panics (a bug, not bad input)
/// if a view reaches outside its slice.
pub fn gemm<T: Real>(alpha: T, a: Mat<T>, b: Mat<T>, beta: T, c: &mut [T], ldc: usize) {
    gemm_with(alpha, a, &Prepared::Plain(b), beta, c, ldc)
}

/// [`gemm`] with a prepared right operand: the same result, without repacking `b` per call.
pub fn gemm_with<T: Real>(alpha: T, a: Mat<T>, b: &Prepared<T>, beta: T, c: &mut [T], ldc: usize) {
    let (k, n) = b.dims();
    assert_eq!(a.cols, k, "gemm inner dimensions");
    let m = a.rows;
    if m == 0 || n == 0 {
        return;
    }
    let b_inside = match b {
        Prepared::Plain(b) => b.last() <= b.data.len(),
        Prepared::Packed(_) => true, // checked when packed
    };
    assert!(
        a.last() <= a.data.len() && b_inside,
        "gemm operand out of bounds"
    );
    assert!((m - 1) * ldc + n <= c.len(), "gemm output out of bounds");
    if k == 0 {
        for i in 0..m {
            for v in &mut c[i * ldc..i * ldc + n] {
                *v = if beta == T::ZERO { T::ZERO } else { beta * *v };
            }
        }
        return;
    }
    let (pa, rsa, csa) = (a.data.as_ptr(), a.rs as isize, a.cs as isize);
    let (pc, rsc) = (c.as_mut_ptr(), ldc as isize);
    // SAFETY: the bounds of every operand were checked above; `c` is a unique borrow, so it aliases nothing.
    unsafe {
        match b {
            Prepared::Plain(b) => {
                let (pb, rsb, csb) = (b.data.as_ptr(), b.rs as isize, b.cs as isize);
                T::gemm_raw(m, k, n, alpha, pa, rsa, csa, pb, rsb, csb, beta, pc, rsc, 1)
            }
            Prepared::Packed(b) => T::gemm_packed_raw(m, alpha, pa, rsa, csa, b, beta, pc, rsc),
        }
    }
}

/// [`Real::with_scratch`] on one of the per-thread buffers.
fn scratch_of<T: Copy + Default, R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with_borrow_mut(|v| {
        if v.len() < len {
            v.resize(len, T::default());
        }
        f(&mut v[..len])
    })
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    /// Distance in ulps (units in the last place of the true value, as an f32) between `got` and `want`.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = (f32::from_bits(w.to_bits() + 1) - w) as f64;
        (got as f64 - want).abs() / ulp
    }

    #[test]
    fn exp_f32_is_accurate() {
        // A dense sweep of the whole normal range against f64's exp: at most 2 ulp (libm's expf is within
        // 1; the polynomial's own error is about 1 ulp and the rounding of r, p and the product add to it).
        let mut worst: f64 = 0.0;
        let (lo, hi) = (-87.33f32, 88.72f32);
        let steps = 2_000_000;
        for i in 0..=steps {
            let x = lo + (hi - lo) * (i as f32 / steps as f32);
            worst = worst.max(ulps(exp_f32(x), (x as f64).exp()));
        }
        for x in [
            0.0f32, -0.0, 1e-8, -1e-8, 0.5, -0.5, 1.0, 10.0, -10.0, 88.0, -87.0,
        ] {
            worst = worst.max(ulps(exp_f32(x), (x as f64).exp()));
        }
        assert!(worst <= 2.0, "exp_f32 is {worst} ulp from exp");
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn exp_f32_edges() {
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(-88.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        // The largest finite result: e^88.72 = 3.39e38, below f32::MAX.
        let top = exp_f32(88.72);
        assert!(top.is_finite() && ulps(top, f64::from(88.72f32).exp()) <= 2.0);
    }
}

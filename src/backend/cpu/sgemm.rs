//! Our f32 GEMM: `c = alpha a b + beta c` for strided operands, in the shape of BLIS and GotoBLAS.
//!
//! `b` is packed a block of [`KC`] rows at a time into panels of `NR` columns (`kc x NR`, row by row), `a`
//! into panels of `MR` rows (`kc x MR`, column by column), both padded with zeros to whole panels, so the
//! microkernel reads two contiguous streams: per step of k it loads one row of the `b` panel into vector
//! registers, broadcasts the `MR` values of the `a` panel's column and accumulates an `MR x NR` tile in
//! registers with fused multiply-adds. The `a` panel (12 KiB at `KC` = 256 for AVX-512) stays in L1 while
//! the kernel walks every `b` panel of the block, which sits in L2.
//!
//! Microkernels, chosen once at run time: AVX-512 (12 x 32, 24 of the 32 zmm registers accumulating), AVX2
//! with FMA (6 x 16, 12 of 16 ymm), and a portable one (4 x 8) for other CPUs. The callers run one GEMM
//! per thread (chunks of pixels, images), so the GEMM itself is serial.
//!
//! **The result of an element does not depend on the shape around it.** Each element is accumulated over
//! k in order, one fused multiply-add per step, restarted from zero at every block of [`KC`] and added to
//! `c` block by block: the same arithmetic whatever `m` and `n` are, where the element falls in its tile,
//! and whether the machine runs the AVX-512 or the AVX2 kernel. So an image's output does not depend on
//! the batch it is in (sampling 16 images at once or 4 at a time draws the same images), and a run gives
//! the same bits on any x86 CPU with FMA. (The portable kernel rounds the products apart, so a machine
//! without FMA gets other bits.)

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::{Mutex, OnceLock};

/// Depth of a packed block: the rows of `b` (and columns of `a`) one pass of the microkernel covers. Part
/// of the summation order (see the module's note), so a constant.
pub const KC: usize = 256;

/// The microkernel the CPU runs, widest first (the order `Ord` compares by).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The widest this CPU has; `DDPM_CPU_GEMM=avx2|portable` asks for a narrower one (for tests and
    /// benchmarks; a wider one than the CPU has is refused and the detected one used).
    pub fn get() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::detect();
            match std::env::var("DDPM_CPU_GEMM").as_deref() {
                Ok("portable") => Isa::Portable,
                Ok("avx2") if best != Isa::Portable => Isa::Avx2,
                _ => best,
            }
        })
    }

    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// The ones this CPU can run, widest first.
    pub fn available() -> Vec<Isa> {
        let best = Isa::detect();
        [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|&i| i >= best)
            .collect()
    }

    /// Columns of the kernel's tile (the width of a packed panel of `b`).
    fn nr(self) -> usize {
        match self {
            Isa::Avx512 => 32,
            Isa::Avx2 => 16,
            Isa::Portable => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "AVX-512 12x32",
            Isa::Avx2 => "AVX2+FMA 6x16",
            Isa::Portable => "portable 4x8",
        }
    }
}

/// A strided f32 operand: element (i, j) at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Operand {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Operand {
    pub fn new(ptr: *const f32, rs: isize, cs: isize) -> Self {
        Self { ptr, rs, cs }
    }
}

/// `kernel(kc, a, lda, b_panel, c, ldc, alpha, beta)`: the `MR x NR` tile at `c` (rows `ldc` apart) becomes
/// [`update`]`(c, alpha acc, beta)`, `acc` the product over `kc` of `MR` rows of `a` (`lda` apart) and the
/// packed `b` panel.
type Kernel = unsafe fn(usize, *const f32, isize, *const f32, *mut f32, isize, f32, f32);

/// How a tile's sum `acc` (already times alpha) goes into `c`: `beta = 0` overwrites (c is not read),
/// `beta = 1` adds, else `beta c + acc`. Every kernel does this same arithmetic (no fused multiply-add
/// here), so an edge tile updated by element gets the bits a full tile gets.
#[inline(always)]
fn update(c: f32, acc: f32, beta: f32) -> f32 {
    if beta == 0.0 {
        acc
    } else if beta == 1.0 {
        c + acc
    } else {
        beta * c + acc
    }
}

thread_local! {
    /// Packed `a` and `b` blocks and where each panel of `a` is read from, reused by every GEMM on this
    /// thread: no allocation once warm.
    #[allow(clippy::type_complexity)]
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>, Vec<(*const f32, isize)>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// `c = alpha a b + beta c`, `a` m x k, `b` k x n, `c` m x n at (`rsc`, `csc`); with `beta = 0`, `c` is
/// not read. On the CPU's widest kernel ([`Isa::get`]).
///
/// # Safety
/// Every addressed element must lie inside the pointed-to allocations, and `c` must not alias `a`, `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: Operand,
    b: Operand,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) {
    unsafe { sgemm_on(Isa::get(), m, k, n, alpha, a, b, beta, c, rsc, csc) }
}

/// [`sgemm`] on a given kernel (which the CPU must have: see [`Isa::available`]).
///
/// # Safety
/// As [`sgemm`]'s, and `isa` must be one of [`Isa::available`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_on(
    isa: Isa,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: Operand,
    b: Operand,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let args = (m, k, n, alpha, a, Rhs::Strided(b), beta, c, rsc, csc);
    unsafe { dispatch(isa, args) }
}

type Args<'a> = (
    usize,
    usize,
    usize,
    f32,
    Operand,
    Rhs<'a>,
    f32,
    *mut f32,
    isize,
    isize,
);

/// The right operand of a GEMM: strided (packed block by block as the GEMM goes) or packed beforehand.
#[derive(Clone, Copy)]
enum Rhs<'a> {
    Strided(Operand),
    Packed(&'a PackedB),
}

/// The buffers of dropped [`PackedB`]s, for the next ones: a layer's weights are packed on every call,
/// and a fresh buffer of megabytes is fresh pages from the kernel, page faults each time.
static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// Buffers [`POOL`] keeps at most (a few layers' weights).
const POOL_BUFFERS: usize = 8;

impl Drop for PackedB {
    fn drop(&mut self) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_BUFFERS {
            pool.push(std::mem::take(&mut self.data));
        }
    }
}

/// A right operand (`k x n`) packed once for many GEMMs with it (a layer's weights, shared by every chunk
/// of pixels): the layout [`sgemm`] packs into block by block, all blocks at once.
pub struct PackedB {
    isa: Isa,
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// Packs `b` (`k x n`) for the kernel [`Isa::get`] picks, into a buffer a dropped one left
    /// ([`POOL`]) when there is one.
    ///
    /// # Safety
    /// Every element of `b` must lie inside its allocation.
    pub unsafe fn new(k: usize, n: usize, b: Operand) -> Self {
        let isa = Isa::get();
        let nr = isa.nr();
        let n_pad = n.div_ceil(nr) * nr;
        let mut data = {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            let fits = pool.iter().position(|v| v.capacity() >= k * n_pad);
            fits.map(|i| pool.swap_remove(i))
                .or_else(|| pool.pop())
                .unwrap_or_default()
        };
        // Every element is written below (padding too): the zeros are only for the length.
        data.clear();
        data.resize(k * n_pad, 0.0);
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            let block = &mut data[p0 * n_pad..(p0 + kc) * n_pad];
            for (panel, out) in block.chunks_exact_mut(kc * nr).enumerate() {
                let j0 = panel * nr;
                unsafe {
                    match nr {
                        32 => pack_b::<32>(b, p0, kc, j0, nr.min(n - j0), out),
                        16 => pack_b::<16>(b, p0, kc, j0, nr.min(n - j0), out),
                        _ => pack_b::<8>(b, p0, kc, j0, nr.min(n - j0), out),
                    }
                }
            }
        }
        Self { isa, k, n, data }
    }

    pub fn rows(&self) -> usize {
        self.k
    }

    pub fn cols(&self) -> usize {
        self.n
    }
}

/// `c = alpha a b + beta c` with `b` packed beforehand: `a` m x `b.rows()`, `c` m x `b.cols()`. Bit for bit
/// what [`sgemm`] gives with `b` unpacked.
///
/// # Safety
/// As [`sgemm`]'s for `a` and `c`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_packed(
    m: usize,
    alpha: f32,
    a: Operand,
    b: &PackedB,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) {
    if m == 0 || b.n == 0 {
        return;
    }
    let args = (m, b.k, b.n, alpha, a, Rhs::Packed(b), beta, c, rsc, csc);
    unsafe { dispatch(b.isa, args) }
}

unsafe fn dispatch(isa: Isa, args: Args) {
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => drive::<12, 32>(kernel_avx512, args),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => drive::<6, 16>(kernel_avx2, args),
            _ => drive::<4, 8>(kernel_portable::<4, 8>, args),
        }
    }
}

/// A 64-byte aligned window of `len` floats in `v` (grown as needed).
fn aligned(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len + 16 {
        v.resize(len + 16, 0.0);
    }
    let skip = v.as_ptr().align_offset(64).min(15);
    &mut v[skip..skip + len]
}

/// The blocked loops around a `MR x NR` kernel.
unsafe fn drive<const MR: usize, const NR: usize>(kernel: Kernel, args: Args) {
    let (m, k, n, alpha, a, b, beta, c, rsc, csc) = args;
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let at = unsafe { c.offset(i as isize * rsc + j as isize * csc) };
                unsafe { *at = if beta == 0.0 { 0.0 } else { beta * *at } };
            }
        }
        return;
    }
    let n_panels = n.div_ceil(NR);
    SCRATCH.with_borrow_mut(|(pa, pb, apanel)| {
        let pb = match b {
            Rhs::Strided(_) => aligned(pb, KC * n_panels * NR),
            Rhs::Packed(_) => &mut [],
        };
        let pa = aligned(pa, KC * m.div_ceil(MR) * MR);
        apanel.clear();
        apanel.resize(m.div_ceil(MR), (std::ptr::null(), 0));
        let mut tile = [0.0f32; 12 * 32];
        for (block, p0) in (0..k).step_by(KC).enumerate() {
            let kc = KC.min(k - p0);
            let pb: &[f32] = match b {
                Rhs::Strided(b) => {
                    for panel in 0..n_panels {
                        let j0 = panel * NR;
                        let out = &mut pb[panel * kc * NR..];
                        unsafe { pack_b::<NR>(b, p0, kc, j0, NR.min(n - j0), out) };
                    }
                    pb
                }
                Rhs::Packed(packed) => &packed.data[p0 * n_panels * NR..],
            };
            // Block 0 sets c (alpha acc + beta c), later blocks add to it (beta 1).
            let beta = if block == 0 { beta } else { 1.0 };
            // Every panel of a for this block: read in place when its rows are contiguous and all
            // there, else copied.
            for (ap, slot) in apanel.iter_mut().enumerate() {
                let r0 = ap * MR;
                let rows = MR.min(m - r0);
                *slot = if a.cs == 1 && rows == MR {
                    (
                        unsafe { a.ptr.offset(r0 as isize * a.rs + p0 as isize) },
                        a.rs,
                    )
                } else {
                    let out = &mut pa[ap * MR * kc..(ap + 1) * MR * kc];
                    unsafe { pack_a::<MR>(a, r0, rows, p0, kc, out) };
                    (out.as_ptr(), kc as isize)
                };
            }
            let mut tile_at = |ap: usize, panel: usize| {
                let (aptr, lda) = apanel[ap];
                let (r0, j0) = (ap * MR, panel * NR);
                let (rows, cols) = (MR.min(m - r0), NR.min(n - j0));
                let bp = pb[panel * kc * NR..].as_ptr();
                let at = unsafe { c.offset(r0 as isize * rsc + j0 as isize * csc) };
                if rows == MR && cols == NR && csc == 1 {
                    unsafe { kernel(kc, aptr, lda, bp, at, rsc, alpha, beta) };
                    return;
                }
                // An edge tile (or a strided c): the tile alone, then the same update by element.
                unsafe { kernel(kc, aptr, lda, bp, tile.as_mut_ptr(), NR as isize, 1.0, 0.0) };
                for i in 0..rows {
                    for j in 0..cols {
                        let at = unsafe { at.offset(i as isize * rsc + j as isize * csc) };
                        let acc = alpha * tile[i * NR + j];
                        unsafe { *at = update(*at, acc, beta) };
                    }
                }
            };
            // Which operand stays in L2 while the other's panel sits in L1: b's block when it fits in
            // half of a 1 MiB L2 (each panel of a then meets every panel of b), else a's. The same
            // arithmetic either way, only the order of the tiles differs.
            if kc * n_panels * NR * 4 <= 512 << 10 {
                for ap in 0..apanel.len() {
                    for panel in 0..n_panels {
                        tile_at(ap, panel);
                    }
                }
            } else {
                for panel in 0..n_panels {
                    for ap in 0..apanel.len() {
                        tile_at(ap, panel);
                    }
                }
            }
        }
    });
}

/// Copies rows `r0 .. r0 + rows` of `a`, columns `p0 .. p0 + kc`, as `MR` rows of `kc`, rows past `rows`
/// zero.
unsafe fn pack_a<const MR: usize>(
    a: Operand,
    r0: usize,
    rows: usize,
    p0: usize,
    kc: usize,
    out: &mut [f32],
) {
    let out = &mut out[..kc * MR];
    out[rows * kc..].fill(0.0);
    for (i, row) in out.chunks_exact_mut(kc).take(rows).enumerate() {
        let src = unsafe { a.ptr.offset((r0 + i) as isize * a.rs + p0 as isize * a.cs) };
        if a.cs == 1 {
            row.copy_from_slice(unsafe { std::slice::from_raw_parts(src, kc) });
        } else {
            for (p, v) in row.iter_mut().enumerate() {
                *v = unsafe { *src.offset(p as isize * a.cs) };
            }
        }
    }
}

/// Packs columns `j0 .. j0 + cols` of `b`, rows `p0 .. p0 + kc`, as `kc x NR` (row by row), columns past
/// `cols` zero.
unsafe fn pack_b<const NR: usize>(
    b: Operand,
    p0: usize,
    kc: usize,
    j0: usize,
    cols: usize,
    out: &mut [f32],
) {
    let out = &mut out[..kc * NR];
    if cols < NR {
        out.fill(0.0);
    }
    let base = unsafe { b.ptr.offset(p0 as isize * b.rs + j0 as isize * b.cs) };
    if b.cs == 1 {
        for p in 0..kc {
            let src = unsafe { std::slice::from_raw_parts(base.offset(p as isize * b.rs), cols) };
            out[p * NR..p * NR + cols].copy_from_slice(src);
        }
    } else {
        for j in 0..cols {
            let col = unsafe { base.offset(j as isize * b.cs) };
            for p in 0..kc {
                out[p * NR + j] = unsafe { *col.offset(p as isize * b.rs) };
            }
        }
    }
}

/// The portable kernel: products rounded, then added (no fused multiply-add without hardware for it).
unsafe fn kernel_portable<const MR: usize, const NR: usize>(
    kc: usize,
    a: *const f32,
    lda: isize,
    b: *const f32,
    c: *mut f32,
    ldc: isize,
    alpha: f32,
    beta: f32,
) {
    let mut acc = [[0.0f32; NR]; MR];
    let b = unsafe { std::slice::from_raw_parts(b, kc * NR) };
    for (p, br) in b.chunks_exact(NR).enumerate() {
        for (i, row) in acc.iter_mut().enumerate() {
            let av = unsafe { *a.offset(i as isize * lda + p as isize) };
            for (v, &bv) in row.iter_mut().zip(br) {
                *v += av * bv;
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let at = unsafe { c.offset(i as isize * ldc + j as isize) };
            unsafe { *at = update(*at, alpha * v, beta) };
        }
    }
}

/// The FMA kernel of one vector width `W`, `MR x 2W`: per step of k two loads of `b`'s panel row, `MR`
/// broadcasts of `a`, `2 MR` FMAs into as many registers (AVX-512: 12 x 32 in 24 of the 32 zmm; AVX2:
/// 6 x 16 in 12 of the 16 ymm); then [`update`] a vector at a time. And the FMA chains that measure the
/// peak with the same instructions.
macro_rules! fma_kernel {
    ($kernel:ident, $chains:ident, $feature:literal, $mr:literal, $w:literal,
     $zero:ident, $set1:ident, $load:ident, $store:ident, $fmadd:ident, $mul:ident, $add:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $kernel(
            kc: usize,
            a: *const f32,
            lda: isize,
            b: *const f32,
            c: *mut f32,
            ldc: isize,
            alpha: f32,
            beta: f32,
        ) {
            let mut acc = [[$zero(); 2]; $mr];
            for p in 0..kc {
                let bp = unsafe { b.add(p * 2 * $w) };
                let (b0, b1) = unsafe { ($load(bp), $load(bp.add($w))) };
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = $set1(unsafe { *a.offset(i as isize * lda + p as isize) });
                    row[0] = $fmadd(av, b0, row[0]);
                    row[1] = $fmadd(av, b1, row[1]);
                }
            }
            let (va, vb) = ($set1(alpha), $set1(beta));
            for (i, row) in acc.iter().enumerate() {
                for (h, &v) in row.iter().enumerate() {
                    let at = unsafe { c.offset(i as isize * ldc + (h * $w) as isize) };
                    let v = $mul(va, v);
                    let v = if beta == 0.0 {
                        v
                    } else if beta == 1.0 {
                        $add(unsafe { $load(at) }, v)
                    } else {
                        $add($mul(vb, unsafe { $load(at) }), v)
                    };
                    unsafe { $store(at, v) };
                }
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $chains(iters: usize) -> f32 {
            let (x, y) = ($set1(0.999_999), $set1(1e-7));
            let mut acc = [$set1(1.0); 12];
            for _ in 0..iters {
                for a in acc.iter_mut() {
                    *a = $fmadd(*a, x, y);
                }
            }
            let mut lanes = [0.0f32; $w];
            let mut sum = 0.0;
            for a in acc {
                unsafe { $store(lanes.as_mut_ptr(), a) };
                sum += lanes.iter().sum::<f32>();
            }
            sum
        }
    };
}

#[rustfmt::skip]
fma_kernel!(kernel_avx512, fma_chains_avx512, "avx512f", 12, 16, _mm512_setzero_ps, _mm512_set1_ps,
    _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps, _mm512_mul_ps, _mm512_add_ps);
#[rustfmt::skip]
fma_kernel!(kernel_avx2, fma_chains_avx2, "avx2,fma", 6, 8, _mm256_setzero_ps, _mm256_set1_ps,
    _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, _mm256_mul_ps, _mm256_add_ps);

/// The machine's fp32 multiply-add rate with `isa`'s instructions, measured: every thread of the pool runs
/// 12 independent chains of fused multiply-adds (enough to cover the latency of two FMA pipes) for about
/// 0.05 s, all at once, best of 5 rounds. In GFLOP/s (an FMA is 2 FLOPs). What [`sgemm`] is judged against.
pub fn fma_peak_gflops(isa: Isa) -> f64 {
    let iters: usize = 1 << 20;
    let lanes = match isa {
        Isa::Avx512 => 16,
        Isa::Avx2 => 8,
        Isa::Portable => 1,
    };
    let run = || {
        let t = std::time::Instant::now();
        let v = match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { fma_chains_avx512(iters) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { fma_chains_avx2(iters) },
            _ => fma_chains_portable(iters),
        };
        std::hint::black_box(v);
        t.elapsed().as_secs_f64()
    };
    // Once to warm the clocks, then the best of 5 rounds: a shared machine's neighbours only ever slow a
    // round down.
    run();
    (0..5)
        .map(|_| {
            let secs: Vec<f64> = rayon::broadcast(|_| run());
            let slowest = secs.iter().cloned().fold(0.0, f64::max);
            (secs.len() * iters * 12 * lanes * 2) as f64 / slowest / 1e9
        })
        .fold(0.0, f64::max)
}

fn fma_chains_portable(iters: usize) -> f32 {
    let mut acc = [1.0f32; 12];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = std::hint::black_box(*a) * 0.999_999 + 1e-7;
        }
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain triple loop in f64: the reference every kernel is checked against.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: &[f32],
        (rsa, csa): (usize, usize),
        b: &[f32],
        (rsb, csb): (usize, usize),
        beta: f32,
        c: &[f32],
    ) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| f64::from(a[i * rsa + p * csa]) * f64::from(b[p * rsb + j * csb]))
                    .sum();
                let prior = if beta == 0.0 {
                    0.0
                } else {
                    f64::from(beta) * f64::from(c[i * n + j])
                };
                out[i * n + j] = f64::from(alpha) * dot + prior;
            }
        }
        out
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len)
            .map(|i| crate::rng::normal(seed, 0, i as u64))
            .collect()
    }

    /// Every kernel the CPU has, on shapes around the tile and block edges (m, n not multiples of MR, NR;
    /// k across KC), with both layouts of each operand and alpha, beta as the backend uses them, against
    /// the f64 triple loop. Tolerance: f32 accumulation of k products of unit normals has an error of about
    /// sqrt(k) * 2^-24 * |terms|; 2e-6 * sqrt(k + 1) of the sum of |products| bounds it with room
    /// (a wrong index or a lost block is off by whole terms).
    #[test]
    fn every_kernel_matches_the_plain_product() {
        let shapes = [
            (1, 1, 1),
            (5, 3, 7),
            (13, 37, 33),
            (12, 256, 32),
            (25, 257, 70),
            (97, 600, 17),
            (3, 513, 100),
        ];
        for isa in Isa::available() {
            for &(m, k, n) in &shapes {
                for (a_rm, b_rm, alpha, beta) in [
                    (true, true, 1.0, 0.0),
                    (true, false, 1.0, 1.0),
                    (false, true, 0.5, 0.0),
                    (false, false, 1.0, 1.0),
                ] {
                    let a = values(m * k, 1);
                    let b = values(k * n, 2);
                    let c0 = values(m * n, 3);
                    let sa = if a_rm { (k, 1) } else { (1, m) };
                    let sb = if b_rm { (n, 1) } else { (1, k) };
                    let want = reference(m, k, n, alpha, &a, sa, &b, sb, beta, &c0);
                    let mut c = c0.clone();
                    let op = |v: &[f32], (rs, cs): (usize, usize)| {
                        Operand::new(v.as_ptr(), rs as isize, cs as isize)
                    };
                    unsafe {
                        sgemm_on(
                            isa,
                            m,
                            k,
                            n,
                            alpha,
                            op(&a, sa),
                            op(&b, sb),
                            beta,
                            c.as_mut_ptr(),
                            n as isize,
                            1,
                        )
                    };
                    for i in 0..m {
                        for j in 0..n {
                            let mag: f64 = (0..k)
                                .map(|p| {
                                    (f64::from(a[i * sa.0 + p * sa.1])
                                        * f64::from(b[p * sb.0 + j * sb.1]))
                                    .abs()
                                })
                                .sum::<f64>()
                                + f64::from(c0[i * n + j]).abs();
                            let err = (f64::from(c[i * n + j]) - want[i * n + j]).abs();
                            assert!(
                                err <= 2e-6 * (k as f64 + 1.0).sqrt() * mag + 1e-30,
                                "{isa:?} m {m} k {k} n {n} a row-major {a_rm} b row-major {b_rm}: c[{i},{j}] = {} want {} (err {err:.3e}, scale {mag:.3e})",
                                c[i * n + j],
                                want[i * n + j]
                            );
                        }
                    }
                }
            }
        }
    }

    /// An element's bits do not depend on the rows and columns around it (the batch invariance the module
    /// promises): row 2 of a 3-row product equals row 0 of a 1-row one and row 40 of a 50-row one, and the
    /// FMA kernels agree with each other bit for bit.
    #[test]
    fn an_element_does_not_depend_on_its_neighbours() {
        let (k, n) = (700, 45);
        let a = values(50 * k, 4);
        let b = values(k * n, 5);
        let run = |isa: Isa, rows: usize, first: usize, cols: usize| {
            let mut c = vec![0.0f32; rows * cols];
            let op_a = Operand::new(a[first * k..].as_ptr(), k as isize, 1);
            let op_b = Operand::new(b.as_ptr(), n as isize, 1);
            unsafe {
                sgemm_on(
                    isa,
                    rows,
                    k,
                    cols,
                    1.0,
                    op_a,
                    op_b,
                    0.0,
                    c.as_mut_ptr(),
                    cols as isize,
                    1,
                )
            };
            c
        };
        let fma: Vec<Isa> = Isa::available()
            .into_iter()
            .filter(|&i| i != Isa::Portable)
            .collect();
        for &isa in Isa::available().iter() {
            let alone = run(isa, 1, 40, n);
            let in_three = run(isa, 3, 38, n);
            let in_fifty = run(isa, 50, 0, n);
            let narrow = run(isa, 1, 40, 7);
            assert_eq!(alone, in_three[2 * n..3 * n], "{isa:?}: 1 row vs 3");
            assert_eq!(alone, in_fifty[40 * n..41 * n], "{isa:?}: 1 row vs 50");
            assert_eq!(alone[..7], narrow[..], "{isa:?}: 45 columns vs 7");
        }
        if fma.len() == 2 {
            assert_eq!(
                run(fma[0], 50, 0, n),
                run(fma[1], 50, 0, n),
                "AVX-512 and AVX2 differ"
            );
        }
    }
}

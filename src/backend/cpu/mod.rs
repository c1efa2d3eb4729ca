//! The reference backend: every op in plain Rust, multi-threaded with rayon, convolution and attention as
//! packed, vectorised GEMM (our own in f32, [`sgemm`]; matrixmultiply in f64). Generic over the scalar: `CpuBackend<f32>` runs the engine,
//! `CpuBackend<f64>` runs gradient checks.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod norm;
pub mod real;
pub mod reduce;
pub mod sgemm;

use self::real::Real;
use super::{
    check_arg, check_args, checks, AdamHyper, Arg, AttentionShape, Backend, ClassEmbedShape,
    ConvShape, GroupNormShape, ReverseStep, SamplerRow, Stream, Tensor, ALLOC_ALIGN,
};
use crate::error::{Error, Result};
use crate::rng;

/// The slices of one op: inputs shared, outputs unique.
type Views<'a, T, const R: usize, const W: usize> = ([&'a [T]; R], [&'a mut [T]; W]);

pub struct CpuBackend<T: Real = f32> {
    data: Vec<T>,
    sampler: Vec<SamplerRow>,
    /// The row the next sampler step uses; `None` once the table is exhausted.
    step: Option<usize>,
    /// The training clock.
    clock: u64,
}

impl<T: Real> Default for CpuBackend<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Real> CpuBackend<T> {
    pub fn new() -> Self {
        Self {
            data: Vec::new(),
            sampler: Vec::new(),
            step: None,
            clock: 0,
        }
    }

    /// Elements reserved so far.
    pub fn capacity(&self) -> usize {
        self.data.len()
    }

    /// Host access in the backend's own precision (gradient checks).
    pub fn slice(&self, t: Tensor) -> Result<&[T]> {
        self.check(("tensor", t, t.len))?;
        Ok(&self.data[t.off..t.end()])
    }

    pub fn slice_mut(&mut self, t: Tensor) -> Result<&mut [T]> {
        self.check(("tensor", t, t.len))?;
        Ok(&mut self.data[t.off..t.end()])
    }

    fn check(&self, arg: Arg) -> Result<()> {
        check_arg(arg, self.data.len(), "cpu")
    }

    /// Resolves the handles of one op to slices: inputs shared, outputs unique. Checks lengths, bounds, and
    /// that no output overlaps an input or another output ([`check_args`]), which is what makes handing
    /// out the `&mut` slices below sound.
    fn views<const R: usize, const W: usize>(
        &mut self,
        op: &'static str,
        ins: [Arg; R],
        outs: [Arg; W],
    ) -> Result<Views<'_, T, R, W>> {
        check_args(op, self.data.len(), "cpu", &ins, &outs)?;
        let base = self.data.as_mut_ptr();
        // SAFETY: every range is inside `data` (checked above), outputs are pairwise disjoint and disjoint from
        // every input, and all the slices live no longer than the unique borrow of `self`.
        let r = std::array::from_fn(|i| unsafe {
            std::slice::from_raw_parts(base.add(ins[i].1.off), ins[i].1.len)
        });
        let w = std::array::from_fn(|i| unsafe {
            std::slice::from_raw_parts_mut(base.add(outs[i].1.off), outs[i].1.len)
        });
        Ok((r, w))
    }
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

impl<T: Real> Backend for CpuBackend<T> {
    fn describe(&self) -> String {
        format!(
            "cpu ({} threads, {}, GEMM kernel {})",
            rayon::current_num_threads(),
            std::any::type_name::<T>(),
            sgemm::Isa::get().name()
        )
    }
    fn measure_peak_tflops(&mut self, p: super::Precision) -> Result<Option<f64>> {
        // The f32 engine's GEMM instructions on every thread; bf16 is not a CPU precision.
        let f32_engine = std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>();
        Ok((p == super::Precision::Fp32 && f32_engine)
            .then(|| sgemm::fma_peak_gflops(sgemm::Isa::get()) / 1e3))
    }

    fn alloc(&mut self, len: usize) -> Result<Tensor> {
        let t = Tensor::new(self.data.len().next_multiple_of(ALLOC_ALIGN), len);
        let bytes = len.saturating_mul(std::mem::size_of::<T>());
        let short = |avail: usize| {
            Error::Memory(format!(
                "reserving {:.2} GiB on the CPU, {:.2} GiB available",
                gib(bytes),
                gib(avail.saturating_mul(std::mem::size_of::<T>()))
            ))
        };
        if let Some(avail) = self.memory_available() {
            if len > avail {
                return Err(short(avail));
            }
        }
        self.data
            .try_reserve_exact(t.end() - self.data.len())
            .map_err(|_| short(0))?;
        self.data.resize(t.end(), T::ZERO);
        Ok(t)
    }

    /// `MemAvailable` of /proc/meminfo, in elements (Linux; elsewhere unknown).
    fn bytes_held(&self) -> (usize, usize) {
        (self.data.len() * std::mem::size_of::<T>(), 0)
    }

    fn memory_available(&self) -> Option<usize> {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let kb: usize = info
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb.saturating_mul(1024) / std::mem::size_of::<T>())
    }

    fn upload(&mut self, dst: Tensor, src: &[f32]) -> Result<()> {
        let ([], [d]) = self.views("upload", [], [("dst", dst, src.len())])?;
        for (d, &s) in d.iter_mut().zip(src) {
            *d = T::from_f32(s);
        }
        Ok(())
    }

    fn download(&mut self, src: Tensor) -> Result<Vec<f32>> {
        Ok(self.slice(src)?.iter().map(|v| v.to_f32()).collect())
    }

    fn fill(&mut self, dst: Tensor, value: f32) -> Result<()> {
        self.slice_mut(dst)?.fill(T::from_f32(value));
        Ok(())
    }

    fn copy(&mut self, src: Tensor, dst: Tensor) -> Result<()> {
        let ([s], [d]) = self.views("copy", [("src", src, src.len)], [("dst", dst, src.len)])?;
        d.copy_from_slice(s);
        Ok(())
    }

    fn accumulate(&mut self, src: Tensor, dst: Tensor, accumulate: bool) -> Result<()> {
        let ([s], [d]) = self.views(
            "accumulate",
            [("src", src, src.len)],
            [("dst", dst, src.len)],
        )?;
        if accumulate {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d += s);
        } else {
            d.copy_from_slice(s);
        }
        Ok(())
    }

    fn add(&mut self, a: Tensor, b: Tensor, y: Tensor) -> Result<()> {
        let ([a, b], [y]) =
            self.views("add", [("a", a, a.len), ("b", b, a.len)], [("y", y, a.len)])?;
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *y = a + b;
        }
        Ok(())
    }

    fn conv2d_forward(
        &mut self,
        s: ConvShape,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        y: Tensor,
    ) -> Result<()> {
        let ([x, w, b], [y]) = self.views(
            "conv2d_forward",
            [
                ("x", x, s.x_len()),
                ("weight", w, s.w_len()),
                ("bias", b, s.o),
            ],
            [("y", y, s.y_len())],
        )?;
        conv::forward(&s, x, w, b, y);
        Ok(())
    }

    fn conv2d_backward_data(
        &mut self,
        s: ConvShape,
        dy: Tensor,
        w: Tensor,
        dx: Tensor,
        accumulate: bool,
    ) -> Result<()> {
        let ([dy, w], [dx]) = self.views(
            "conv2d_backward_data",
            [("dy", dy, s.y_len()), ("weight", w, s.w_len())],
            [("dx", dx, s.x_len())],
        )?;
        conv::backward_data(&s, dy, w, dx, accumulate);
        Ok(())
    }

    fn conv2d_backward_weight(
        &mut self,
        s: ConvShape,
        x: Tensor,
        dy: Tensor,
        dw: Tensor,
        db: Tensor,
    ) -> Result<()> {
        let ([x, dy], [dw, db]) = self.views(
            "conv2d_backward_weight",
            [("x", x, s.x_len()), ("dy", dy, s.y_len())],
            [("dweight", dw, s.w_len()), ("dbias", db, s.o)],
        )?;
        conv::backward_weight(&s, x, dy, dw, db);
        Ok(())
    }

    fn group_norm_forward(
        &mut self,
        s: GroupNormShape,
        x: Tensor,
        gamma: Tensor,
        beta: Tensor,
        y: Tensor,
        mean: Tensor,
        rstd: Tensor,
        silu: bool,
    ) -> Result<()> {
        checks::groups(&s)?;
        let ([x, g, b], [y, m, r]) = self.views(
            "group_norm_forward",
            [
                ("x", x, s.len()),
                ("gamma", gamma, s.c),
                ("beta", beta, s.c),
            ],
            [
                ("y", y, s.len()),
                ("mean", mean, s.stats_len()),
                ("rstd", rstd, s.stats_len()),
            ],
        )?;
        norm::forward(&s, x, g, b, y, m, r, silu);
        Ok(())
    }

    fn group_norm_backward(
        &mut self,
        s: GroupNormShape,
        x: Tensor,
        gamma: Tensor,
        beta: Tensor,
        mean: Tensor,
        rstd: Tensor,
        dy: Tensor,
        dx: Tensor,
        dgamma: Tensor,
        dbeta: Tensor,
        silu: bool,
        accumulate: bool,
    ) -> Result<()> {
        checks::groups(&s)?;
        let ([x, g, b, m, r, dy], [dx, dg, db]) = self.views(
            "group_norm_backward",
            [
                ("x", x, s.len()),
                ("gamma", gamma, s.c),
                ("beta", beta, s.c),
                ("mean", mean, s.stats_len()),
                ("rstd", rstd, s.stats_len()),
                ("dy", dy, s.len()),
            ],
            [
                ("dx", dx, s.len()),
                ("dgamma", dgamma, s.c),
                ("dbeta", dbeta, s.c),
            ],
        )?;
        norm::backward(&s, x, g, b, m, r, dy, dx, dg, db, silu, accumulate);
        Ok(())
    }

    fn silu_forward(&mut self, x: Tensor, y: Tensor) -> Result<()> {
        let ([x], [y]) = self.views("silu_forward", [("x", x, x.len)], [("y", y, x.len)])?;
        elementwise::silu_forward(x, y);
        Ok(())
    }

    fn silu_backward(&mut self, x: Tensor, dy: Tensor, dx: Tensor, accumulate: bool) -> Result<()> {
        let ([x, dy], [dx]) = self.views(
            "silu_backward",
            [("x", x, x.len), ("dy", dy, x.len)],
            [("dx", dx, x.len)],
        )?;
        elementwise::silu_backward(x, dy, dx, accumulate);
        Ok(())
    }

    fn linear_forward(
        &mut self,
        m: usize,
        k: usize,
        n: usize,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        y: Tensor,
    ) -> Result<()> {
        let ([x, w, b], [y]) = self.views(
            "linear_forward",
            [("x", x, m * k), ("weight", w, n * k), ("bias", b, n)],
            [("y", y, m * n)],
        )?;
        elementwise::linear_forward(m, k, n, x, w, b, y);
        Ok(())
    }

    fn linear_backward(
        &mut self,
        m: usize,
        k: usize,
        n: usize,
        x: Tensor,
        w: Tensor,
        dy: Tensor,
        dx: Option<Tensor>,
        dw: Tensor,
        db: Tensor,
        accumulate: bool,
    ) -> Result<()> {
        let ins = [("x", x, m * k), ("weight", w, n * k), ("dy", dy, m * n)];
        match dx {
            Some(dx) => {
                let ([x, w, dy], [dx, dw, db]) = self.views(
                    "linear_backward",
                    ins,
                    [("dx", dx, m * k), ("dweight", dw, n * k), ("dbias", db, n)],
                )?;
                elementwise::linear_backward(m, k, n, x, w, dy, Some(dx), dw, db, accumulate);
            }
            None => {
                let ([x, w, dy], [dw, db]) = self.views(
                    "linear_backward",
                    ins,
                    [("dweight", dw, n * k), ("dbias", db, n)],
                )?;
                elementwise::linear_backward(m, k, n, x, w, dy, None, dw, db, accumulate);
            }
        }
        Ok(())
    }

    fn attention_forward(
        &mut self,
        s: AttentionShape,
        qkv: Tensor,
        out: Tensor,
        lse: Tensor,
    ) -> Result<()> {
        let ([qkv], [out, lse]) = self.views(
            "attention_forward",
            [("qkv", qkv, s.n * s.l * 3 * s.c)],
            [("out", out, s.n * s.l * s.c), ("lse", lse, s.n * s.l)],
        )?;
        attention::forward(&s, qkv, out, lse);
        Ok(())
    }

    fn attention_backward(
        &mut self,
        s: AttentionShape,
        qkv: Tensor,
        out: Tensor,
        lse: Tensor,
        dout: Tensor,
        dqkv: Tensor,
    ) -> Result<()> {
        let ([qkv, out, lse, dout], [dqkv]) = self.views(
            "attention_backward",
            [
                ("qkv", qkv, s.n * s.l * 3 * s.c),
                ("out", out, s.n * s.l * s.c),
                ("lse", lse, s.n * s.l),
                ("dout", dout, s.n * s.l * s.c),
            ],
            [("dqkv", dqkv, s.n * s.l * 3 * s.c)],
        )?;
        attention::backward(&s, qkv, out, lse, dout, dqkv);
        Ok(())
    }

    fn upsample2x_forward(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        x: Tensor,
        y: Tensor,
    ) -> Result<()> {
        let len = n * h * w * c;
        let ([x], [y]) = self.views("upsample2x_forward", [("x", x, len)], [("y", y, 4 * len)])?;
        elementwise::upsample2x_forward(h, w, c, x, y);
        Ok(())
    }

    fn upsample2x_backward(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        dy: Tensor,
        dx: Tensor,
        accumulate: bool,
    ) -> Result<()> {
        let len = n * h * w * c;
        let ([dy], [dx]) = self.views(
            "upsample2x_backward",
            [("dy", dy, 4 * len)],
            [("dx", dx, len)],
        )?;
        elementwise::upsample2x_backward(h, w, c, dy, dx, accumulate);
        Ok(())
    }

    fn concat_forward(
        &mut self,
        pixels: usize,
        ca: usize,
        cb: usize,
        a: Tensor,
        b: Tensor,
        y: Tensor,
    ) -> Result<()> {
        let ([a, b], [y]) = self.views(
            "concat_forward",
            [("a", a, pixels * ca), ("b", b, pixels * cb)],
            [("y", y, pixels * (ca + cb))],
        )?;
        elementwise::concat_forward(ca, cb, a, b, y);
        Ok(())
    }

    fn concat_backward(
        &mut self,
        pixels: usize,
        ca: usize,
        cb: usize,
        dy: Tensor,
        da: Tensor,
        db: Tensor,
        accumulate_a: bool,
        accumulate_b: bool,
    ) -> Result<()> {
        let ([dy], [da, db]) = self.views(
            "concat_backward",
            [("dy", dy, pixels * (ca + cb))],
            [("da", da, pixels * ca), ("db", db, pixels * cb)],
        )?;
        elementwise::concat_backward(ca, cb, dy, da, db, accumulate_a, accumulate_b);
        Ok(())
    }

    fn add_image_bias(
        &mut self,
        n: usize,
        hw: usize,
        c: usize,
        y: Tensor,
        bias: Tensor,
    ) -> Result<()> {
        let ([bias], [y]) = self.views(
            "add_image_bias",
            [("bias", bias, n * c)],
            [("y", y, n * hw * c)],
        )?;
        elementwise::add_image_bias(hw, c, y, bias);
        Ok(())
    }

    fn image_bias_backward(
        &mut self,
        n: usize,
        hw: usize,
        c: usize,
        dy: Tensor,
        dbias: Tensor,
    ) -> Result<()> {
        let ([dy], [db]) = self.views(
            "image_bias_backward",
            [("dy", dy, n * hw * c)],
            [("dbias", dbias, n * c)],
        )?;
        elementwise::image_bias_backward(hw, c, dy, db);
        Ok(())
    }

    fn class_embedding_add(
        &mut self,
        s: ClassEmbedShape,
        table: Tensor,
        labels: Tensor,
        y: Tensor,
    ) -> Result<()> {
        let (ins, outs) = s.add_args(table, labels, y);
        let ([table, labels], [y]) = self.views("class_embedding_add", ins, outs)?;
        for (i, row) in y.chunks_mut(s.dim).enumerate() {
            let k = elementwise::label(labels[i], s.classes)?;
            for (v, &e) in row.iter_mut().zip(&table[k * s.dim..(k + 1) * s.dim]) {
                *v += e;
            }
        }
        Ok(())
    }

    fn class_embedding_backward(
        &mut self,
        s: ClassEmbedShape,
        labels: Tensor,
        dy: Tensor,
        dtable: Tensor,
    ) -> Result<()> {
        let (ins, outs) = s.backward_args(labels, dy, dtable);
        let ([labels, dy], [dt]) = self.views("class_embedding_backward", ins, outs)?;
        dt.fill(T::ZERO);
        for (i, row) in dy.chunks(s.dim).enumerate() {
            let k = elementwise::label(labels[i], s.classes)?;
            for (d, &g) in dt[k * s.dim..(k + 1) * s.dim].iter_mut().zip(row) {
                *d += g;
            }
        }
        Ok(())
    }

    fn timestep_embedding(&mut self, n: usize, dim: usize, t: Tensor, y: Tensor) -> Result<()> {
        checks::embedding_width(dim)?;
        let ([t], [y]) = self.views(
            "timestep_embedding",
            [("timesteps", t, n)],
            [("y", y, n * dim)],
        )?;
        elementwise::timestep_embedding(dim, t, y);
        Ok(())
    }

    fn dropout_forward(
        &mut self,
        x: Tensor,
        y: Tensor,
        p: f32,
        seed: u64,
        stream: Stream,
    ) -> Result<()> {
        checks::dropout(p)?;
        let stream = stream.at(self.clock);
        let ([x], [y]) = self.views("dropout_forward", [("x", x, x.len)], [("y", y, x.len)])?;
        elementwise::dropout_forward(x, y, p, seed, stream);
        Ok(())
    }

    fn dropout_backward(
        &mut self,
        dy: Tensor,
        dx: Tensor,
        p: f32,
        seed: u64,
        stream: Stream,
        accumulate: bool,
    ) -> Result<()> {
        checks::dropout(p)?;
        let stream = stream.at(self.clock);
        let ([dy], [dx]) = self.views(
            "dropout_backward",
            [("dy", dy, dy.len)],
            [("dx", dx, dy.len)],
        )?;
        elementwise::dropout_backward(dy, dx, p, seed, stream, accumulate);
        Ok(())
    }

    fn mse_loss(
        &mut self,
        pred: Tensor,
        target: Tensor,
        loss: Tensor,
        dpred: Tensor,
    ) -> Result<()> {
        let ([p, t], [l, d]) = self.views(
            "mse_loss",
            [("pred", pred, pred.len), ("target", target, pred.len)],
            [("loss", loss, 1), ("dpred", dpred, pred.len)],
        )?;
        l[0] = T::from_f64(elementwise::mse_loss(p, t, d));
        Ok(())
    }

    fn noise_add(
        &mut self,
        x0: Tensor,
        timesteps: Tensor,
        sqrt_ab: Tensor,
        sqrt_1m_ab: Tensor,
        x_t: Tensor,
        eps: Tensor,
        per_image: usize,
        first_element: u64,
        seed: u64,
        stream: Stream,
    ) -> Result<()> {
        checks::images(x0.len, per_image)?;
        let stream = stream.at(self.clock);
        let ([x0s, ts, sa, s1], [xt, e]) = self.views(
            "noise_add",
            [
                ("x0", x0, x0.len),
                ("timesteps", timesteps, x0.len / per_image),
                ("sqrt_alphas_cumprod", sqrt_ab, sqrt_ab.len),
                ("sqrt_one_minus_alphas_cumprod", sqrt_1m_ab, sqrt_ab.len),
            ],
            [("x_t", x_t, x0.len), ("eps", eps, x0.len)],
        )?;
        if let Some(bad) = ts
            .iter()
            .find(|t| !(t.to_f64() >= 0.0 && (t.to_f64() as usize) < sa.len()))
        {
            return Err(Error::Invalid(format!(
                "noise_add: timestep {bad:?} outside 0..{}",
                sa.len()
            )));
        }
        elementwise::noise_add(
            x0s,
            ts,
            sa,
            s1,
            xt,
            e,
            per_image,
            first_element,
            seed,
            stream,
        );
        Ok(())
    }

    fn normal(&mut self, x: Tensor, first_element: u64, seed: u64, stream: u64) -> Result<()> {
        elementwise::normal(self.slice_mut(x)?, first_element, seed, stream);
        Ok(())
    }

    fn draw_timesteps(
        &mut self,
        timesteps: Tensor,
        steps: usize,
        seed: u64,
        stream: Stream,
    ) -> Result<()> {
        checks::timestep_count(steps)?;
        let stream = stream.at(self.clock);
        for (i, t) in self.slice_mut(timesteps)?.iter_mut().enumerate() {
            *t = T::from_f64(rng::below(seed, stream, i as u64, steps as u64) as f64);
        }
        Ok(())
    }

    fn clock_set(&mut self, step: u64) -> Result<()> {
        self.clock = step;
        Ok(())
    }

    fn log_at_clock(&mut self, src: Tensor, ring: Tensor) -> Result<()> {
        let slots = checks::ring_slots(src.len, ring.len)?;
        let at = (self.clock % slots as u64) as usize * src.len;
        let ([s], [r]) = self.views(
            "log_at_clock",
            [("src", src, src.len)],
            [("ring", ring.slice(at, src.len), src.len)],
        )?;
        r.copy_from_slice(s);
        Ok(())
    }

    fn sampler_load(&mut self, rows: &[SamplerRow]) -> Result<()> {
        if rows.is_empty() {
            return Err(Error::Invalid(
                "a sampler table needs at least one row".into(),
            ));
        }
        self.sampler = rows.to_vec();
        self.step = Some(rows.len() - 1);
        Ok(())
    }

    fn sampler_position(&mut self) -> Result<Option<usize>> {
        Ok(self.step)
    }

    fn sampler_timesteps(&mut self, timesteps: Tensor) -> Result<()> {
        let row = self.current_row()?;
        self.slice_mut(timesteps)?.fill(T::from_f32(row.t));
        Ok(())
    }

    fn sampler_step(
        &mut self,
        x_t: Tensor,
        eps_hat: Tensor,
        x_prev: Tensor,
        rs: ReverseStep,
    ) -> Result<()> {
        let row = self.current_row()?;
        let step = self.step.unwrap_or(0) as u64;
        rs.images_len(x_t.len)?;
        if x_prev != x_t {
            self.copy(x_t, x_prev)?;
        }
        let ([e], [x]) = self.views(
            "sampler_step",
            [("eps_hat", eps_hat, x_t.len)],
            [("x_prev", x_prev, x_t.len)],
        )?;
        let stream = rs.stream_base + step;
        elementwise::sampler_step(x, e, &row, &rs, stream);
        Ok(())
    }

    fn sampler_advance(&mut self) -> Result<()> {
        self.step = match self.step {
            Some(0) | None => None,
            Some(s) => Some(s - 1),
        };
        Ok(())
    }

    fn global_norm(&mut self, grads: Tensor, out: Tensor) -> Result<()> {
        let ([g], [o]) = self.views(
            "global_norm",
            [("grads", grads, grads.len)],
            [("out", out, 1)],
        )?;
        o[0] = T::from_f64(elementwise::sum_squares(g).sqrt());
        Ok(())
    }

    fn adam_step(
        &mut self,
        params: Tensor,
        grads: Tensor,
        m: Tensor,
        v: Tensor,
        norm: Tensor,
        hp: AdamHyper,
    ) -> Result<()> {
        let hp = hp.at(self.clock + 1);
        let len = params.len;
        let ([g, nrm], [p, m, v]) = self.views(
            "adam_step",
            [("grads", grads, len), ("norm", norm, 1)],
            [
                ("params", params, len),
                ("adam_m", m, len),
                ("adam_v", v, len),
            ],
        )?;
        elementwise::adam_step(p, g, m, v, nrm[0].to_f32(), &hp);
        Ok(())
    }

    fn ema_update(&mut self, ema: Tensor, params: Tensor, decay: f32) -> Result<()> {
        let ([p], [e]) = self.views(
            "ema_update",
            [("params", params, params.len)],
            [("ema", ema, params.len)],
        )?;
        elementwise::ema_update(e, p, decay);
        Ok(())
    }
}

impl<T: Real> CpuBackend<T> {
    fn current_row(&self) -> Result<SamplerRow> {
        match self.step {
            Some(s) if s < self.sampler.len() => Ok(self.sampler[s]),
            _ => Err(Error::Invalid(
                "the sampler table is exhausted or was never loaded".into(),
            )),
        }
    }
}

//! Launchers of `kernels/linear.cu`: fully connected layers on the GEMM core.

use super::conv::{gemm_cfg, split_k};
use super::elementwise::dims;
use super::{launch, CudaBackend};
use crate::backend::Tensor;
use crate::error::Result;

impl CudaBackend {
    /// `y[m, n] = x[m, k] w[n, k]^T + b[n] (+ residual[m, n])`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear(
        &mut self,
        m: usize,
        k: usize,
        n: usize,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        residual: Option<Tensor>,
        y: Tensor,
    ) -> Result<()> {
        let mut ins = vec![("x", x, m * k), ("weight", w, n * k), ("bias", b, n)];
        if let Some(r) = residual {
            ins.push(("residual", r, m * n));
        }
        // An attention block's output projection reads the attention output, adds the block's input
        // and writes its output, any of which may be stored in bf16 (see `UNet`).
        self.args_stored(
            "linear_forward",
            &ins,
            &[("y", y, m * n)],
            &["x", "residual", "y"],
        )?;
        let (px, pw, pb) = (self.ptr(x), self.weight_ptr(w)?, self.ptr(b));
        let cfg = gemm_cfg(self.tile(), m, n, 1);
        self.count_gemm(m * n * k, self.tile(), m, n, 1, k);
        let [mi, ki, ni] = dims([m, k, n])?;
        let mut stored = vec![x, y];
        stored.extend(residual);
        if self.stores_bf16("linear_forward", &stored)? {
            let [pr, pr16] = self.ptr_by_dtype(residual);
            let [py, py16] = self.ptr_by_dtype(Some(y));
            if self.v8_linear([m, k, n], x, pw, [pb, pr, pr16, py, py16])? {
                return Ok(());
            }
            let kernel = match x.is_bf16() {
                true => "linear_forward_bf16_io_bf16in",
                false => "linear_forward_bf16_io",
            };
            return launch!(self, kernel, cfg, px, pw, pb, pr, pr16, py, py16, mi, ki, ni);
        }
        let (pr, py) = (residual.map_or(0, |r| self.ptr(r)), self.ptr(y));
        let kernel = self.pick("linear_forward_f32", "linear_forward_bf16");
        launch!(self, kernel, cfg, px, pw, pb, pr, py, mi, ki, ni)
    }

    /// `dx (+)= dy w` (when asked), `dw = dy^T x` (split-K), `db = column sums of dy`.
    pub(super) fn linear_grad(
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
        acc: bool,
    ) -> Result<()> {
        let ins = [("x", x, m * k), ("weight", w, n * k), ("dy", dy, m * n)];
        let mut grads = vec![("dweight", dw, n * k), ("dbias", db, n)];
        grads.extend(dx.map(|dx| ("dx", dx, m * k)));
        // The attention projection's input may be stored in bf16 (see `UNet`).
        self.args_stored("linear_backward", &ins, &grads, &["x"])?;
        let weight_kernel = match self.stores_bf16("linear_backward", &[x])? {
            true => "linear_backward_weight_bf16_bf16in",
            false => self.pick("linear_backward_weight_f32", "linear_backward_weight_bf16"),
        };
        let [mi, ki, ni] = dims([m, k, n])?;
        // The op's bytes go with its first launch; the weight gradient counts its own GEMM.
        let bytes = self.work.bytes;
        if let Some(dx) = dx {
            let (pdy, pw, pdx) = (self.ptr(dy), self.weight_ptr(w)?, self.ptr(dx));
            self.count_bytes(bytes as usize);
            if !self.v8_linear_backward_data([m, k, n], dy, pw, dx, acc)? {
                self.count_gemm(m * n * k, self.tile(), m, k, 1, n);
                self.count_bytes(bytes as usize);
                let acc = acc as i32;
                launch!(
                    self,
                    self.pick("linear_backward_data_f32", "linear_backward_data_bf16"),
                    gemm_cfg(self.tile(), m, k, 1),
                    pdy,
                    pw,
                    pdx,
                    mi,
                    ki,
                    ni,
                    acc
                )?;
            }
        }
        let (px, pdy, pdw, ws) = (
            self.ptr(x),
            self.ptr(dy),
            self.ptr(dw),
            self.workspace_ptr(),
        );
        if dx.is_none() {
            self.count_bytes(bytes as usize);
        }
        if self.v8_linear_backward_weight([m, k, n], x, dy, pdw)? {
            return self.column_sums(dy, m, n, db);
        }
        let (splits, chunk) = split_k(self.tile(), n, k, m, self.props.sms);
        let [chunk_i] = dims([chunk])?;
        self.count_gemm(m * n * k, self.tile(), n, k, splits, chunk);
        if dx.is_none() {
            self.count_bytes(bytes as usize);
        }
        if splits > 1 {
            self.work.bytes += (4 * splits * n * k) as f64;
        }
        launch!(
            self,
            weight_kernel,
            gemm_cfg(self.tile(), n, k, splits),
            px,
            pdy,
            pdw,
            ws,
            chunk_i,
            mi,
            ki,
            ni
        )?;
        if splits > 1 {
            self.reduce_splits(splits, n, k, pdw, 0, false)?;
        }
        self.column_sums(dy, m, n, db)
    }
}

//! Training: L_simple with t uniform, Adam with linear warmup and gradient clipping at a global norm, an EMA
//! of the weights, dropout and flips. One step is: upload a batch, draw t and eps, noise-add, forward, MSE,
//! backward, gradient norm, Adam, EMA, all through the `Backend`, so the same code drives the device.

use crate::backend::{AdamStep, Backend, Tensor};
use crate::error::{Error, Result};
use crate::model::{UNet, UNetConfig};
use crate::rng::{self, Purpose};
use crate::schedule::Schedule;
use serde::{Deserialize, Serialize};

/// Training options (saved with the training state, so a resumed run uses the same).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub batch: usize,
    pub lr: f32,
    pub warmup: u64,
    pub max_grad_norm: f32,
    pub ema_decay: f32,
    pub flip: bool,
    pub seed: u64,
}

/// The optimizer state and the network, placed in one backend.
pub struct Trainer {
    pub net: UNet,
    pub opts: TrainOptions,
    pub schedule: Schedule,
    pub ema: Tensor,
    m: Tensor,
    v: Tensor,
    norm: Tensor,
    loss: Tensor,
    x0: Tensor,
    eps: Tensor,
    sqrt_ab: Tensor,
    sqrt_1m_ab: Tensor,
    /// Steps done so far.
    pub step: u64,
}

impl Trainer {
    pub fn new<B: Backend>(
        be: &mut B,
        config: &UNetConfig,
        schedule: Schedule,
        opts: TrainOptions,
    ) -> Result<Self> {
        if opts.batch == 0 {
            return Err(Error::Invalid("--batch must be at least 1".into()));
        }
        let net = UNet::new(be, config, opts.batch)?;
        let np = net.num_params();
        let (ema, m, v) = (be.alloc(np)?, be.alloc(np)?, be.alloc(np)?);
        let (norm, loss) = (be.alloc(1)?, be.alloc(1)?);
        let (x0, eps) = (be.alloc(net.input.len)?, be.alloc(net.input.len)?);
        let (sqrt_ab, sqrt_1m_ab) = (be.alloc(schedule.len())?, be.alloc(schedule.len())?);
        be.upload(
            sqrt_ab,
            &schedule
                .sqrt_alphas_cumprod
                .iter()
                .map(|&x| x as f32)
                .collect::<Vec<_>>(),
        )?;
        be.upload(
            sqrt_1m_ab,
            &schedule
                .sqrt_one_minus_alphas_cumprod
                .iter()
                .map(|&x| x as f32)
                .collect::<Vec<_>>(),
        )?;
        Ok(Self {
            net,
            opts,
            schedule,
            ema,
            m,
            v,
            norm,
            loss,
            x0,
            eps,
            sqrt_ab,
            sqrt_1m_ab,
            step: 0,
        })
    }

    /// Fresh weights (the paper's initialisation), EMA equal to them, zero moments.
    pub fn init<B: Backend>(&mut self, be: &mut B) -> Result<()> {
        self.net.init(be, self.opts.seed)?;
        be.copy(self.net.params, self.ema)?;
        be.fill(self.m, 0.0)?;
        be.fill(self.v, 0.0)?;
        self.step = 0;
        Ok(())
    }

    /// One step on `images` (`batch` NHWC images in [-1, 1]). Returns the loss handle (read it only when it
    /// is logged: on a device that is a synchronisation).
    pub fn step<B: Backend>(&mut self, be: &mut B, images: &[f32]) -> Result<Tensor> {
        let o = &self.opts;
        let (seed, step, n) = (o.seed, self.step, o.batch);
        be.upload(self.x0, images)?;
        let big_t = self.schedule.len() as u64;
        let ts: Vec<f32> = (0..n)
            .map(|i| {
                rng::below(seed, rng::stream(Purpose::Timesteps, step), i as u64, big_t) as f32
            })
            .collect();
        be.upload(self.net.timesteps, &ts)?;
        let per_image = self.net.input.len / n;
        be.noise_add(
            self.x0,
            self.net.timesteps,
            self.sqrt_ab,
            self.sqrt_1m_ab,
            self.net.input,
            self.eps,
            per_image,
            0,
            seed,
            rng::stream(Purpose::TrainNoise, step),
        )?;
        let out = self.net.forward(be, Some((seed, step)))?;
        be.mse_loss(out, self.eps, self.loss, self.net.output_grad())?;
        self.net.backward(be)?;
        be.global_norm(self.net.grads, self.norm)?;
        let t = (step + 1) as f64;
        let lr = o.lr as f64 * (t / o.warmup.max(1) as f64).min(1.0);
        let hp = AdamStep {
            lr: lr as f32,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            bias_correction1: (1.0 - 0.9f64.powf(t)) as f32,
            bias_correction2: (1.0 - 0.999f64.powf(t)) as f32,
            max_grad_norm: o.max_grad_norm,
        };
        be.adam_step(
            self.net.params,
            self.net.grads,
            self.m,
            self.v,
            self.norm,
            hp,
        )?;
        be.ema_update(self.ema, self.net.params, o.ema_decay)?;
        self.step += 1;
        Ok(self.loss)
    }

    /// Raw weights, EMA weights and the two Adam moments, flat.
    pub fn state<B: Backend>(&self, be: &mut B) -> Result<[Vec<f32>; 4]> {
        Ok([
            be.download(self.net.params)?,
            be.download(self.ema)?,
            be.download(self.m)?,
            be.download(self.v)?,
        ])
    }

    pub fn restore<B: Backend>(&mut self, be: &mut B, state: [&[f32]; 4], step: u64) -> Result<()> {
        for (t, data) in [self.net.params, self.ema, self.m, self.v]
            .into_iter()
            .zip(state)
        {
            if data.len() != t.len {
                return Err(Error::shape("training state vector", t.len, data.len()));
            }
            be.upload(t, data)?;
        }
        self.step = step;
        Ok(())
    }
}

//! Training: L_simple with t uniform, Adam with linear warmup and gradient clipping at a global norm, an EMA
//! of the weights, dropout and flips. One step is: upload a batch, draw t and eps, noise-add, forward, MSE,
//! backward, gradient norm, Adam, EMA, all through the `Backend`, so the same code drives the device.
//!
//! Everything after the upload depends on the step number only through the backend's training clock
//! (the random streams, Adam's schedule, the log slot), so on a backend that records (CUDA) the step is
//! recorded once as a graph and replayed: the host's work per step is the batch upload and one launch.
//! The loss of every step lands in a small ring on the backend and is read back a chunk at a time, so a
//! device run does not synchronise with the host every step.

use crate::backend::{AdamHyper, Backend, Layout, Sequence, Stream, Tensor};
use crate::checkpoint::{self, SchedulerConfig, TrainState};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::files;
use crate::image;
use crate::model::{Classes, UNet, UNetConfig};
use crate::progress::Progress;
use crate::rng::Purpose;
use crate::sample::{self, Draw};
use crate::schedule::Schedule;
use std::path::{Path, PathBuf};

/// Steps whose losses are kept on the backend between reads.
pub const LOSS_CHUNK: u64 = 25;

pub use crate::checkpoint::TrainOptions;

/// The optimizer state and the network, placed in one backend.
pub struct Trainer {
    pub net: UNet,
    pub opts: TrainOptions,
    pub schedule: Schedule,
    pub ema: Tensor,
    m: Tensor,
    v: Tensor,
    /// This step's (loss, gradient norm), and the ring that keeps those of step `s` at
    /// `[2 (s % LOSS_CHUNK) ..]`: read a chunk at a time.
    now: Tensor,
    log: Tensor,
    x0: Tensor,
    eps: Tensor,
    sqrt_ab: Tensor,
    sqrt_1m_ab: Tensor,
    /// Steps done so far.
    pub step: u64,
    /// Record the step and replay it where the backend can (the default); false runs every op each step.
    pub record: bool,
    /// The backend's id of this trainer's recording of its step, once made, and the options it was made
    /// with.
    recording: Option<(u64, TrainOptions)>,
}

impl Trainer {
    pub fn new<B: Backend>(
        be: &mut B,
        config: &UNetConfig,
        schedule: Schedule,
        opts: TrainOptions,
    ) -> Result<Self> {
        opts.validate()?;
        let net = UNet::new(be, config, opts.batch)?;
        let np = net.num_params();
        let (ema, m, v) = (be.alloc(np)?, be.alloc(np)?, be.alloc(np)?);
        let chunk = LOSS_CHUNK as usize;
        let (now, log) = (be.alloc(2)?, be.alloc(2 * chunk)?);
        let (x0, eps) = (be.alloc(net.input.len)?, be.alloc(net.input.len)?);
        let (sqrt_ab, sqrt_1m_ab) = (be.alloc(schedule.len())?, be.alloc(schedule.len())?);
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        be.upload(sqrt_ab, &f32s(&schedule.sqrt_alphas_cumprod))?;
        be.upload(sqrt_1m_ab, &f32s(&schedule.sqrt_one_minus_alphas_cumprod))?;
        Ok(Self {
            net,
            opts,
            schedule,
            ema,
            m,
            v,
            now,
            log,
            x0,
            eps,
            sqrt_ab,
            sqrt_1m_ab,
            step: 0,
            record: true,
            recording: None,
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

    /// One step on `images` (`batch` NHWC images in [-1, 1]). Returns the handle of this step's loss, valid
    /// until the next step (read it only when it is logged: on a device that is a synchronisation).
    pub fn step<B: Backend>(&mut self, be: &mut B, images: &[f32]) -> Result<Tensor> {
        be.upload(self.x0, images)?;
        be.clock_set(self.step)?;
        if self.record && !self.recorded(be) && be.capture_begin(Sequence::Training)? {
            let ops = self.ops(be);
            let end = be.capture_end();
            // An op's own error first: a failed capture is usually its consequence.
            ops?;
            end?;
            self.recording = be
                .recording_id(Sequence::Training)
                .map(|id| (id, self.opts.clone()));
        }
        if self.record && self.recorded(be) {
            be.replay(Sequence::Training)?;
        } else {
            self.ops(be)?;
        }
        self.step += 1;
        Ok(self.now.slice(0, 1))
    }

    /// Whether the backend's recording of the training step is this trainer's, made with the current
    /// options (another trainer on the same backend may have replaced it, memory may have moved and the
    /// backend forgotten it, or `opts` changed since: a recording keeps the values it was made with).
    fn recorded<B: Backend>(&self, be: &B) -> bool {
        self.recording.as_ref().is_some_and(|(id, opts)| {
            Some(*id) == be.recording_id(Sequence::Training) && *opts == self.opts
        })
    }

    /// The ops of one step, after the upload: the same at every step, the clock supplying what changes.
    fn ops<B: Backend>(&mut self, be: &mut B) -> Result<()> {
        let seed = self.opts.seed;
        be.draw_timesteps(
            self.net.timesteps,
            self.schedule.len(),
            seed,
            Stream::per_step(Purpose::Timesteps, 1, 0),
        )?;
        let per_image = self.net.input.len / self.opts.batch;
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
            Stream::per_step(Purpose::TrainNoise, 1, 0),
        )?;
        let out = self.net.forward(be, Some(seed))?;
        let (loss, norm) = (self.now.slice(0, 1), self.now.slice(1, 1));
        be.mse_loss(out, self.eps, loss, self.net.output_grad())?;
        self.net.backward(be)?;
        // A non-finite norm (from a non-finite loss or gradient) makes Adam skip the update on the
        // backend itself: nothing waits for the host. The skip is counted when the log is read.
        be.global_norm(self.net.grads, norm)?;
        be.adam_step(
            self.net.params,
            self.net.grads,
            self.m,
            self.v,
            norm,
            self.adam_hyper(),
        )?;
        be.ema_update(self.ema, self.net.params, self.opts.ema_decay)?;
        be.log_at_clock(self.now, self.log)
    }

    /// Adam's hyper-parameters: the paper's betas and epsilon, the learning rate warmed up linearly.
    fn adam_hyper(&self) -> AdamHyper {
        let o = &self.opts;
        AdamHyper {
            lr: o.lr,
            warmup: o.warmup,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: o.max_grad_norm,
        }
    }

    /// The (loss, gradient norm) of steps `from .. self.step` (at most [`LOSS_CHUNK`] of them), read from
    /// the backend.
    pub fn read_log<B: Backend>(&self, be: &mut B, from: u64) -> Result<Vec<(f32, f32)>> {
        if from > self.step || self.step - from > LOSS_CHUNK {
            return Err(Error::Invalid(format!(
                "losses of steps {from}..{} are no longer kept (the ring holds {LOSS_CHUNK})",
                self.step
            )));
        }
        let log = be.download(self.log)?;
        Ok((from..self.step)
            .map(|s| {
                let i = 2 * (s % LOSS_CHUNK) as usize;
                (log[i], log[i + 1])
            })
            .collect())
    }

    /// Everything needed to resume, downloaded from the backend.
    pub fn state<B: Backend>(&self, be: &mut B, data: &str) -> Result<TrainState> {
        Ok(TrainState {
            step: self.step,
            options: self.opts.clone(),
            data: data.to_string(),
            params: be.download(self.net.params)?,
            ema: be.download(self.ema)?,
            adam_m: be.download(self.m)?,
            adam_v: be.download(self.v)?,
        })
    }

    pub fn restore<B: Backend>(&mut self, be: &mut B, s: &TrainState) -> Result<()> {
        for (t, data, name) in [
            (self.net.params, &s.params, "params"),
            (self.ema, &s.ema, "ema"),
            (self.m, &s.adam_m, "adam_m"),
            (self.v, &s.adam_v, "adam_v"),
        ] {
            if data.len() != t.len {
                return Err(Error::shape(
                    format!("training state tensor {name}"),
                    format!("{} elements (this model's parameter count)", t.len),
                    data.len(),
                ));
            }
            be.upload(t, data)?;
        }
        self.step = s.step;
        Ok(())
    }
}

/// The elements a training run reserves at `batch`: the U-Net with its gradients and activations, the
/// EMA and Adam's moments, the batch and noise buffers, the log rings, the schedule tables, and the
/// sampler for the grids (`grid` images), on a backend of `layout`.
pub fn arena_len(
    config: &UNetConfig,
    batch: usize,
    grid: usize,
    timesteps: usize,
    layout: Layout,
) -> Result<usize> {
    let (net, params) = UNet::arena_len(config, batch, true, layout)?;
    let (grid_net, _) = UNet::arena_len(config, grid, false, layout)?;
    let input = batch * config.sample_size * config.sample_size * config.in_channels;
    Ok(net + 3 * params + 2 * input + 2 + 2 * LOSS_CHUNK as usize + 2 * timesteps + grid_net)
}

/// What `ddpm-cuda train` runs.
pub struct Run {
    pub config: UNetConfig,
    /// `--data`: synthetic, CIFAR-10 binaries, or an image folder.
    pub data: String,
    /// The step to stop at.
    pub steps: u64,
    pub out: PathBuf,
    /// A sample grid and a checkpoint every this many steps (and at the end).
    pub every: u64,
    /// Images in each sample grid.
    pub grid: usize,
    /// Stop after this many consecutive steps with a non-finite loss or gradient (each one skipped).
    pub max_bad_steps: u64,
    /// Train a class-conditional model on the data's labels (`--conditional`), with one embedding row
    /// per class and one for the null class. A config that already has classes is conditional anyway.
    pub conditional: bool,
}

/// The config a run trains: `run.config`, given the data's classes where the run is conditional, checked
/// against them where the config has classes already.
fn conditioned(run: &Run, data: &Dataset, opts: &TrainOptions) -> Result<UNetConfig> {
    let mut config = run.config.clone();
    let have = data.classes();
    match &config.classes {
        Some(c) => {
            data.labels_for(c)
                .map_err(|e| Error::Invalid(format!("--data {}: {e}", run.data)))?;
            if c.null().is_none() && opts.cond_drop > 0.0 {
                return Err(Error::Invalid(
                    "--cond-drop needs a null class, and this model's config has none (its num_class_embeds equals _num_real_classes)".into(),
                ));
            }
        }
        None if run.conditional => {
            if have == 0 {
                return Err(Error::Invalid(format!(
                    "--conditional needs labelled data; --data {} has none (CIFAR-10 binaries, an image folder of class subfolders, or synthetic have)",
                    run.data
                )));
            }
            config.classes = Some(Classes::with_null(have, Some(data.class_names.clone())));
            config.validate()?;
        }
        None if opts.cond_drop > 0.0 => {
            return Err(Error::Invalid(
                "--cond-drop is for class-conditional training: add --conditional".into(),
            ));
        }
        None => {}
    }
    Ok(config)
}

/// Trains from scratch, or from `resume`, until `run.steps`: progress bar, `loss.csv`, a sample grid from
/// the EMA weights and a checkpoint every `run.every` steps, `loss.png` at the end. A stop request
/// (SIGINT, SIGTERM) finishes the step, writes a checkpoint and returns. A step whose loss or gradient is
/// not finite is skipped by the optimizer and counted; `run.max_bad_steps` of them in a row stop the run
/// with an error, leaving the last checkpoint as it was.
pub fn train<B: Backend>(
    be: &mut B,
    run: &Run,
    opts: TrainOptions,
    resume: Option<TrainState>,
) -> Result<()> {
    if run.every == 0 || run.grid == 0 || run.max_bad_steps == 0 {
        return Err(Error::Invalid(
            "--every, --grid and --max-bad-steps must be at least 1".into(),
        ));
    }
    let scheduler = SchedulerConfig::default();
    let timesteps = scheduler.num_train_timesteps;
    let layout = Layout::of(be);
    let fits = |be: &mut B, config: &UNetConfig| {
        crate::backend::check_fits(be, "training", opts.batch, |b| {
            arena_len(config, b, run.grid, timesteps, layout)
        })
    };
    // Before the data is read: a run that cannot fit is refused first.
    fits(be, &run.config)?;
    let data = Dataset::open(&run.data, run.config.sample_size, opts.seed)?;
    eprintln!("data: {}", data.description);
    let config = conditioned(run, &data, &opts)?;
    if config != run.config {
        // The class embedding the data's labels add.
        fits(be, &config)?;
    }
    let mut tr = Trainer::new(be, &config, scheduler.schedule(), opts.clone())?;
    // The sampler for the grids, placed now: everything is reserved before the first step.
    let mut grid_net = UNet::new_inference(be, &config, run.grid)?;
    if let Some(c) = &config.classes {
        // The real classes in turn, as `sample --class all` draws them.
        let every = sample::Conditioning {
            class: None,
            real: c.real,
            guidance: None,
        };
        grid_net.set_labels(be, &every.batch_labels(0, run.grid))?;
    }
    let null = config.classes.as_ref().and_then(|c| c.null()).unwrap_or(0);
    if let Some(c) = &config.classes {
        eprintln!(
            "classes: {} ({}), label dropout {}",
            c.real,
            c.names.join(", "),
            opts.cond_drop
        );
    }
    match &resume {
        Some(s) => {
            tr.restore(be, s)?;
            eprintln!("resuming {} at step {}", run.out.display(), s.step);
        }
        None => tr.init(be)?,
    }
    let start = tr.step;
    eprintln!(
        "model: {} parameters, batch {}, steps {start}..{}, lr {}, warmup {}, EMA {}",
        tr.net.num_params(),
        opts.batch,
        run.steps,
        opts.lr,
        opts.warmup,
        opts.ema_decay
    );
    std::fs::create_dir_all(&run.out).map_err(|e| Error::io(&run.out, e))?;
    files::remove_stale_temporaries(&run.out);
    let mut log = Log::new(run, start);
    let rows = sample::ddpm_table(&tr.schedule, scheduler.variance_type);
    let mut bar = Progress::new("train", "img", run.steps.saturating_sub(start));
    while tr.step < run.steps {
        let (images, labels) = data.labelled_batch(
            opts.seed,
            tr.step,
            opts.batch,
            opts.flip,
            opts.cond_drop,
            null,
        );
        // conditioned() checked that a conditional model's data has labels.
        if let Some(labels) = labels.filter(|_| config.classes.is_some()) {
            tr.net.set_labels(be, &labels)?;
        }
        tr.step(be, &images)?;
        let stop = crate::interrupt::requested();
        let checkpoint = stop || tr.step % run.every == 0 || tr.step == run.steps;
        if checkpoint || tr.step - log.logged == LOSS_CHUNK {
            log.absorb(tr.read_log(be, log.logged)?, tr.step)?;
        }
        bar.update(tr.step - start, opts.batch as f64, &log.message());
        if checkpoint {
            log.save(&run.out.join("loss.csv"))?;
            checkpoint::save_model(&run.out, &tr.net, &be.download(tr.ema)?, &scheduler)?;
            checkpoint::save_state(&run.out, &tr.state(be, &run.data)?)?;
        }
        if stop {
            eprintln!(
                "\nstopped at step {} (signal): checkpoint written to {}; continue with \
                 `ddpm-cuda train --resume {} --steps {}`",
                tr.step,
                run.out.display(),
                run.out.display(),
                run.steps
            );
            return Ok(());
        }
        if checkpoint {
            be.copy(tr.ema, grid_net.params)?;
            let path = run.out.join(format!("samples_{:07}.png", tr.step));
            let draw = Draw {
                seed: opts.seed,
                first_image: 0,
                per_image: grid_net.input.len / grid_net.batch,
                clip: scheduler.clip_sample,
                start: sample::Start::Noise,
                guidance: None,
            };
            match sample::images(be, &mut grid_net, &rows, draw, "sample") {
                Ok(images) => match &config.classes {
                    Some(c) => image::save_class_grid(&images, run.grid, c.real, &config, &path)?,
                    None => image::save_grid(&images, run.grid, &config, &path)?,
                },
                // A stop during the grid: the checkpoint is written; the next step's check stops.
                Err(Error::Interrupted(_)) => continue,
                Err(e) => return Err(e),
            }
            eprintln!(
                "step {}: wrote {} and a checkpoint",
                tr.step,
                path.display()
            );
        }
    }
    log.finish(&run.out)
}

/// The run's losses and gradient norms as they are read back, and the count of skipped steps.
struct Log {
    /// (step, loss, gradient norm) of every step so far, earlier runs' included.
    rows: Vec<(u64, f32, f32)>,
    /// The last step whose loss has been read.
    logged: u64,
    smooth: Option<f64>,
    skipped: u64,
    /// Consecutive skipped steps up to `logged`, and the limit.
    bad_run: u64,
    max_bad: u64,
    out: std::path::PathBuf,
}

impl Log {
    fn new(run: &Run, start: u64) -> Self {
        Self {
            rows: read_loss_csv(&run.out.join("loss.csv"), start),
            logged: start,
            smooth: None,
            skipped: 0,
            bad_run: 0,
            max_bad: run.max_bad_steps,
            out: run.out.clone(),
        }
    }

    /// Takes the (loss, norm) of steps `logged + 1 ..= step`; fails after too many bad steps in a row.
    fn absorb(&mut self, entries: Vec<(f32, f32)>, step: u64) -> Result<()> {
        for (i, (loss, norm)) in entries.into_iter().enumerate() {
            let s = self.logged + 1 + i as u64;
            self.rows.push((s, loss, norm));
            if loss.is_finite() && norm.is_finite() {
                self.bad_run = 0;
                let l = f64::from(loss);
                self.smooth = Some(self.smooth.map_or(l, |m| 0.98 * m + 0.02 * l));
            } else {
                self.skipped += 1;
                self.bad_run += 1;
                eprintln!("\nstep {s}: loss {loss}, gradient norm {norm}: step skipped");
            }
            if self.bad_run >= self.max_bad {
                return Err(Error::Invalid(format!(
                    "training stopped at step {s}: {} consecutive steps had a non-finite loss or \
                     gradient (each was skipped; {} skipped in all). The last checkpoint in {} is \
                     intact; a lower --lr or a tighter --max-grad-norm may help",
                    self.bad_run,
                    self.skipped,
                    self.out.display()
                )));
            }
        }
        self.logged = step;
        Ok(())
    }

    fn message(&self) -> String {
        let loss = self
            .smooth
            .map_or(String::new(), |s| format!("loss {s:.4}"));
        match self.skipped {
            0 => loss,
            n => format!("{loss} ({n} skipped)"),
        }
    }

    fn save(&self, path: &Path) -> Result<()> {
        let mut csv = String::from("step,loss,grad_norm\n");
        for (s, l, n) in &self.rows {
            csv.push_str(&format!("{s},{l},{n}\n"));
        }
        files::write_atomic(path, csv.as_bytes())
    }

    fn finish(&self, out: &Path) -> Result<()> {
        let curve: Vec<(u64, f32)> = self.rows.iter().map(|&(s, l, _)| (s, l)).collect();
        image::loss_curve(&curve).save_png(&out.join("loss.png"))?;
        if self.skipped > 0 {
            eprintln!(
                "{} steps were skipped (non-finite loss or gradient)",
                self.skipped
            );
        }
        eprintln!(
            "done: model in {} (diffusers layout), loss curve {}",
            out.display(),
            out.join("loss.png").display()
        );
        Ok(())
    }
}

/// `step,loss,grad_norm` rows of an earlier run up to `keep` (a crash may have left rows past the
/// checkpoint; files of the older `step,loss` form read with a NaN norm).
fn read_loss_csv(path: &Path, keep: u64) -> Vec<(u64, f32, f32)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split(',');
            let step = f.next()?.parse().ok()?;
            let loss = f.next()?.parse().ok()?;
            let norm = f.next().and_then(|n| n.parse().ok()).unwrap_or(f32::NAN);
            Some((step, loss, norm))
        })
        .filter(|&(s, _, _)| s <= keep)
        .collect()
}

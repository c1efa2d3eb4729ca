//! Samplers: the tables of per-step coefficients (built in f64 from the schedule) and the loop that runs
//! them over a backend. One table format serves the 1000-step ancestral sampler, a respaced one and DDIM,
//! so the device runs every sampler with one fused kernel.

use crate::backend::{Backend, ReverseStep, SamplerRow, Sequence, Tensor};
use crate::error::{Error, Result};
use crate::model::UNet;
use crate::progress::Progress;
use crate::rng;
use crate::schedule::Schedule;
use serde::{Deserialize, Serialize};

/// The variance of the reverse step (REFERENCE.md §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Variance {
    /// `beta_t` (the paper's better FID, and the hub model's setting).
    FixedLarge,
    /// `beta_tilde_t`, the true posterior's variance.
    FixedSmall,
}

impl std::str::FromStr for Variance {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fixed_large" => Ok(Self::FixedLarge),
            "fixed_small" => Ok(Self::FixedSmall),
            other => Err(Error::Invalid(format!(
                "unknown variance type {other:?}: expected fixed_large or fixed_small"
            ))),
        }
    }
}

impl Variance {
    pub fn name(self) -> &'static str {
        match self {
            Self::FixedLarge => "fixed_large",
            Self::FixedSmall => "fixed_small",
        }
    }
}

/// Which reverse process a table encodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Sampler {
    /// Ancestral sampling (DDPMScheduler), over every timestep or respaced.
    Ddpm,
    /// DDIM (DDIMScheduler): deterministic at eta 0.
    Ddim,
}

/// The timesteps of an `steps`-step run over a `T`-step schedule with diffusers' "leading" spacing
/// (`t_i = i * (T / steps)`), in increasing order: row `i` of a table takes `x_{t_i}` to `x_{t_{i-1}}`.
pub fn leading_timesteps(big_t: usize, steps: usize) -> Result<Vec<usize>> {
    if steps == 0 || steps > big_t {
        return Err(Error::Invalid(format!(
            "--steps {steps} must be in 1..={big_t} (the model's num_train_timesteps)"
        )));
    }
    let stride = big_t / steps;
    Ok((0..steps).map(|i| i * stride).collect())
}

/// The table of a sampler: `steps` rows (all `T` for the full ancestral sampler).
pub fn table(
    s: &Schedule,
    sampler: Sampler,
    steps: usize,
    variance: Variance,
    eta: f64,
) -> Result<Vec<SamplerRow>> {
    match sampler {
        Sampler::Ddpm => ddpm_respaced_table(s, steps, variance),
        Sampler::Ddim => ddim_table(s, steps, eta),
    }
}

/// The ancestral sampler over every timestep: row `t` takes `x_t` to `x_{t-1}`.
pub fn ddpm_table(s: &Schedule, variance: Variance) -> Vec<SamplerRow> {
    ddpm_respaced_table(s, s.len(), variance).expect("T steps of a T-step schedule")
}

/// Ancestral sampling over `steps` of the `T` timesteps, as diffusers' DDPMScheduler does after
/// `set_timesteps(steps)`: row `i` goes from `t_i` to `t_{i-1}` (to "before 0", `ab_prev = 1`, at row 0)
/// with `beta' = 1 - ab_t / ab_prev`, and no noise at `t = 0`.
pub fn ddpm_respaced_table(
    s: &Schedule,
    steps: usize,
    variance: Variance,
) -> Result<Vec<SamplerRow>> {
    let ts = leading_timesteps(s.len(), steps)?;
    Ok(ts
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let ab = s.alphas_cumprod[t];
            let abp = if i == 0 {
                1.0
            } else {
                s.alphas_cumprod[ts[i - 1]]
            };
            let beta = 1.0 - ab / abp;
            let var = match variance {
                Variance::FixedLarge => beta,
                Variance::FixedSmall => ((1.0 - abp) / (1.0 - ab) * beta).max(1e-20),
            };
            SamplerRow {
                t: t as f32,
                x0_from_xt: (1.0 / ab.sqrt()) as f32,
                x0_from_eps: ((1.0 - ab).sqrt() / ab.sqrt()) as f32,
                c_x0: (abp.sqrt() * beta / (1.0 - ab)) as f32,
                c_xt: ((1.0 - beta).sqrt() * (1.0 - abp) / (1.0 - ab)) as f32,
                c_eps: 0.0,
                sigma: if t > 0 { var.sqrt() as f32 } else { 0.0 },
                unused: 0.0,
            }
        })
        .collect())
}

/// DDIM (diffusers' DDIMScheduler defaults: "leading" spacing, `set_alpha_to_one`): `steps` rows at
/// `t_i = i * (T / steps)`, deterministic when `eta = 0`.
pub fn ddim_table(s: &Schedule, steps: usize, eta: f64) -> Result<Vec<SamplerRow>> {
    if !(eta.is_finite() && eta >= 0.0) {
        return Err(Error::Invalid(format!("--eta {eta} must be 0 or positive")));
    }
    let ts = leading_timesteps(s.len(), steps)?;
    Ok(ts
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let ab = s.alphas_cumprod[t];
            let abp = if i == 0 {
                1.0
            } else {
                s.alphas_cumprod[ts[i - 1]]
            };
            let sigma = eta * ((1.0 - abp) / (1.0 - ab) * (1.0 - ab / abp)).sqrt();
            SamplerRow {
                t: t as f32,
                x0_from_xt: (1.0 / ab.sqrt()) as f32,
                x0_from_eps: ((1.0 - ab).sqrt() / ab.sqrt()) as f32,
                c_x0: abp.sqrt() as f32,
                c_xt: 0.0,
                c_eps: (1.0 - abp - sigma * sigma).max(0.0).sqrt() as f32,
                sigma: sigma as f32,
                unused: 0.0,
            }
        })
        .collect())
}

/// Where `x_T` comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Philox normal draws of the run's seed.
    Noise,
    /// The caller has put `x_T` in place (`--init-noise`).
    Given,
}

/// What a sampling run draws: the seed, and the number of the first image (so a batch of a larger run draws
/// what the same images would draw in any other split).
#[derive(Clone, Copy, Debug)]
pub struct Draw {
    pub seed: u64,
    pub first_image: u64,
    pub per_image: usize,
    pub clip: bool,
    pub start: Start,
    /// Classifier-free guidance's scale: the batch is doubled (see [`ReverseStep`]); `x` and the eps
    /// tensor hold each image twice, and only the first half is drawn or given.
    pub guidance: Option<f32>,
}

/// How a class-conditional model is asked for classes in a sampling run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conditioning {
    /// Every image of this class, or (`None`) the real classes in turn: image `i` has class `i % real`.
    pub class: Option<usize>,
    /// The model's real classes.
    pub real: usize,
    /// Classifier-free guidance: the scale `w` and the null class's label. `None` asks for the class
    /// alone (`w = 1`, no unconditional pass).
    pub guidance: Option<(f32, usize)>,
}

impl Conditioning {
    /// The class of image `i`.
    pub fn label(&self, i: usize) -> usize {
        self.class.unwrap_or(i % self.real.max(1))
    }

    /// The labels of a batch of `count` images from image `first`, for a net of `batch` images: the
    /// classes, then (guided) the null class for the second half.
    pub fn batch_labels(&self, first: usize, batch: usize) -> Vec<usize> {
        match self.guidance {
            None => (0..batch).map(|j| self.label(first + j)).collect(),
            Some((_, null)) => {
                let half = batch / 2;
                let mut l: Vec<usize> = (0..half).map(|j| self.label(first + j)).collect();
                l.resize(batch, null);
                l
            }
        }
    }
}

/// Runs a sampler table over a backend: `x` gets `x_T ~ N(0, I)` (unless `draw.start` says it is in
/// place), then for every row, `denoise(be)` must write the model's eps prediction for `x` at the current
/// row's timestep into `eps` (reading the timestep with `Backend::sampler_timesteps`, never from the
/// host), and the fused update moves `x` one step down. On a backend that records (CUDA), one step is
/// recorded once and replayed for every row, with no host work in between; `progress` is called after
/// every step with (done, total) as it is queued.
pub fn run<B: Backend>(
    be: &mut B,
    rows: &[SamplerRow],
    x: Tensor,
    eps: Tensor,
    draw: Draw,
    denoise: impl FnMut(&mut B) -> Result<()>,
    progress: impl FnMut(usize, usize),
) -> Result<()> {
    drive(be, rows, x, eps, draw, true, denoise, progress)
}

/// [`run`], step by step, never recorded: for a `denoise` that works on the host (the tests that drive a
/// sampler with a closed-form predictor).
pub fn run_stepwise<B: Backend>(
    be: &mut B,
    rows: &[SamplerRow],
    x: Tensor,
    eps: Tensor,
    draw: Draw,
    denoise: impl FnMut(&mut B) -> Result<()>,
    progress: impl FnMut(usize, usize),
) -> Result<()> {
    drive(be, rows, x, eps, draw, false, denoise, progress)
}

fn drive<B: Backend>(
    be: &mut B,
    rows: &[SamplerRow],
    x: Tensor,
    eps: Tensor,
    draw: Draw,
    record: bool,
    mut denoise: impl FnMut(&mut B) -> Result<()>,
    mut progress: impl FnMut(usize, usize),
) -> Result<()> {
    let first = draw.first_image * draw.per_image as u64;
    let rs = ReverseStep {
        first_element: first,
        clip: draw.clip,
        seed: draw.seed,
        stream_base: rng::stream(rng::Purpose::SamplerNoise, 0),
        guidance: draw.guidance,
    };
    let half = rs.images_len(x.len)?;
    if draw.start == Start::Noise {
        be.normal(
            x.slice(0, half),
            first,
            draw.seed,
            rng::stream(rng::Purpose::SamplerStart, 0),
        )?;
    }
    if half < x.len {
        be.copy(x.slice(0, half), x.slice(half, half))?;
    }
    be.sampler_load(rows)?;
    let mut step = |be: &mut B| -> Result<()> {
        denoise(be)?;
        be.sampler_step(x, eps, x, rs)?;
        be.sampler_advance()
    };
    let recorded = record && be.capture_begin(Sequence::Sampling)?;
    if recorded {
        let captured = step(be);
        let end = be.capture_end();
        // The step's own error first: a failed capture is usually its consequence.
        captured?;
        end?;
    }
    for done in 1..=rows.len() {
        if crate::interrupt::requested() {
            be.synchronize()?;
            return Err(Error::Interrupted(format!(
                "sampling stopped after {} of {} steps",
                done - 1,
                rows.len()
            )));
        }
        if recorded {
            be.replay(Sequence::Sampling)?;
        } else {
            step(be)?;
        }
        progress(done, rows.len());
    }
    be.synchronize()?;
    if be.sampler_position()?.is_some() {
        return Err(Error::Invalid(
            "the sampler did not reach the end of its table".into(),
        ));
    }
    Ok(())
}

/// Samples one batch with a U-Net: `net.batch` images (numbers `draw.first_image ..` of the seed; half as
/// many, each twice, when guided), with a progress bar over the steps. Returns them NHWC.
pub fn images<B: Backend>(
    be: &mut B,
    net: &mut UNet,
    rows: &[SamplerRow],
    draw: Draw,
    label: &str,
) -> Result<Vec<f32>> {
    let mut bar = Progress::new(label, "steps", rows.len() as u64);
    let (x, eps, ts) = (net.input, net.output(), net.timesteps);
    run(
        be,
        rows,
        x,
        eps,
        draw,
        |be| {
            be.sampler_timesteps(ts)?;
            net.forward(be, None).map(|_| ())
        },
        |done, _| bar.update(done as u64, 1.0, ""),
    )?;
    let mut out = be.download(x)?;
    if draw.guidance.is_some() {
        out.truncate(x.len / 2);
    }
    Ok(out)
}

/// Samples images `from .. n` in batches of `net.batch` (the last may be partial; half as many when
/// `cond` guides, each image run with its class and with the null class), handing each finished batch to
/// `sink` (the number of its first image, its images NHWC) before the next starts, so memory holds one
/// batch. `init` gives x_T of images (first, count), NHWC, in place of the drawn one. Image `i` is the
/// same whatever the batch size, and whichever run samples it. Returns how many images are complete:
/// `n`, or fewer after a stop request (SIGINT, SIGTERM), the finished batches' end.
#[allow(clippy::too_many_arguments)]
pub fn many<B: Backend>(
    be: &mut B,
    net: &mut UNet,
    rows: &[SamplerRow],
    n: usize,
    from: usize,
    seed: u64,
    clip: bool,
    cond: Option<&Conditioning>,
    mut init: Option<&mut dyn FnMut(usize, usize) -> Result<Vec<f32>>>,
    sink: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
) -> Result<usize> {
    let per_image = net.input.len / net.batch;
    let guidance = cond.and_then(|c| c.guidance).map(|(w, _)| w);
    let per_batch = match guidance {
        Some(_) if net.batch.is_multiple_of(2) => net.batch / 2,
        Some(_) => {
            return Err(Error::Invalid(format!(
                "a guided run needs a net of an even batch (each image twice), not {}",
                net.batch
            )))
        }
        None => net.batch,
    };
    if cond.is_some() != net.labels.is_some() {
        return Err(Error::Invalid(match cond {
            Some(_) => "classes asked of a model without classes".into(),
            None => "a class-conditional model needs its classes (--class)".into(),
        }));
    }
    let batches = n.saturating_sub(from).div_ceil(per_batch);
    for b in 0..batches {
        let first = from + b * per_batch;
        let take = (n - first).min(per_batch);
        if let Some(c) = cond {
            net.set_labels(be, &c.batch_labels(first, net.batch))?;
        }
        let start = match init.as_mut() {
            Some(read) => {
                let mut batch = read(first, take)?;
                if batch.len() != take * per_image {
                    return Err(Error::shape("initial noise", take * per_image, batch.len()));
                }
                batch.resize(net.input.len, 0.0);
                be.upload(net.input, &batch)?;
                Start::Given
            }
            None => Start::Noise,
        };
        let draw = Draw {
            seed,
            first_image: first as u64,
            per_image,
            clip,
            start,
            guidance,
        };
        let label = format!("batch {}/{batches}", b + 1);
        match images(be, net, rows, draw, &label) {
            Ok(imgs) => sink(first, &imgs[..take * per_image])?,
            // A stop request: the finished batches are written.
            Err(Error::Interrupted(_)) => return Ok(first),
            Err(e) => return Err(e),
        }
    }
    Ok(n.max(from))
}

/// [`many`] for images `0 .. n` collected in memory (NHWC, back to back), of the classes `cond` asks
/// for where the model is class-conditional, `init` the x_T of all of them (NHWC) where given: for tests
/// and small runs. After a stop request, the finished batches' images.
#[allow(clippy::too_many_arguments)]
pub fn collect<B: Backend>(
    be: &mut B,
    net: &mut UNet,
    rows: &[SamplerRow],
    n: usize,
    seed: u64,
    clip: bool,
    cond: Option<&Conditioning>,
    init: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let per_image = net.input.len / net.batch;
    if let Some(x) = init {
        if x.len() != n * per_image {
            return Err(Error::shape("initial noise", n * per_image, x.len()));
        }
    }
    let mut read = |first: usize, count: usize| -> Result<Vec<f32>> {
        let x = init.unwrap_or(&[]);
        Ok(x[first * per_image..(first + count) * per_image].to_vec())
    };
    let read: Option<&mut dyn FnMut(usize, usize) -> Result<Vec<f32>>> = match init {
        Some(_) => Some(&mut read),
        None => None,
    };
    let mut all = Vec::new();
    many(
        be,
        net,
        rows,
        n,
        0,
        seed,
        clip,
        cond,
        read,
        &mut |_, imgs| {
            all.extend_from_slice(imgs);
            Ok(())
        },
    )?;
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The DDPM row against REFERENCE.md §1's formulas, written out on the raw alphas_cumprod.
    #[test]
    fn ddpm_rows_follow_the_reference_formulas() {
        let s = Schedule::paper();
        let large = ddpm_table(&s, Variance::FixedLarge);
        let small = ddpm_table(&s, Variance::FixedSmall);
        for t in [0usize, 1, 500, 999] {
            let ab = s.alphas_cumprod[t];
            let abp = if t == 0 { 1.0 } else { s.alphas_cumprod[t - 1] };
            let beta = 1.0 - ab / abp;
            let r = large[t];
            let close = |a: f32, b: f64| (f64::from(a) - b).abs() <= 1e-6 * b.abs().max(1e-3);
            assert!(close(r.x0_from_xt, 1.0 / ab.sqrt()));
            assert!(close(r.x0_from_eps, (1.0 - ab).sqrt() / ab.sqrt()));
            assert!(close(r.c_x0, abp.sqrt() * beta / (1.0 - ab)));
            assert!(close(
                r.c_xt,
                (1.0 - beta).sqrt() * (1.0 - abp) / (1.0 - ab)
            ));
            if t > 0 {
                assert!(close(r.sigma, beta.sqrt()));
                assert!(close(
                    small[t].sigma,
                    ((1.0 - abp) / (1.0 - ab) * beta).sqrt()
                ));
            } else {
                assert_eq!((r.sigma, small[t].sigma), (0.0, 0.0));
            }
        }
    }

    #[test]
    fn ddim_rows_use_leading_spacing() {
        let s = Schedule::paper();
        let rows = ddim_table(&s, 50, 0.0).unwrap();
        assert_eq!(rows.len(), 50);
        assert_eq!((rows[0].t, rows[49].t), (0.0, 980.0));
        assert!(rows.iter().all(|r| r.sigma == 0.0 && r.c_xt == 0.0));
        // Row 0 goes to ab_prev = 1: x_prev = x0_hat.
        assert_eq!((rows[0].c_x0, rows[0].c_eps), (1.0, 0.0));
        assert!(ddim_table(&s, 0, 0.0).is_err());
    }
}

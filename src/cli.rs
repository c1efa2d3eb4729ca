//! The command line (clap): each subcommand parses its flags, picks a backend and calls into the library.

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::checkpoint::{self, SchedulerConfig};
use crate::image;
use crate::model::{UNet, UNetConfig};
use crate::npy;
use crate::rng;
use crate::sample::{self, Variance};
use crate::train::{self, TrainOptions};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ddpm-cuda",
    version,
    about = "Train and sample denoising diffusion probabilistic models (Ho et al. 2020)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Device {
    /// CUDA when a device, the driver and the CUDA op set are available, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (L_simple, Adam, EMA); writes sample grids, checkpoints, loss.csv and loss.png to --out.
    Train(TrainArgs),
    /// Sample with the 1000-step ancestral sampler from a model directory (diffusers layout).
    Sample(SampleArgs),
    /// A strip of the forward process: an image dissolving into noise at chosen timesteps.
    Diffuse {
        /// A PNG or JPEG image (resized and centre-cropped to --size).
        #[arg(long)]
        image: PathBuf,
        /// Timesteps to show, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "0,50,100,250,500,750,999"
        )]
        t: Vec<usize>,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "diffuse.png")]
        out: PathBuf,
    },
    /// The variational bound in bits/dim over a dataset (not implemented yet).
    Eval {
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        data: Option<String>,
    },
    /// Training and sampling throughput on this machine (not implemented yet).
    Bench {
        #[arg(long, default_value = "ddpm-cifar10")]
        preset: String,
    },
    /// Parameter count, FLOPs per forward pass and memory of a model.
    Info {
        /// A preset: ddpm-cifar10 or tiny.
        #[arg(long, default_value = "ddpm-cifar10", conflicts_with = "model")]
        preset: String,
        /// A model directory (diffusers layout).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Batch size for the memory estimate.
        #[arg(long, default_value_t = 128)]
        batch: usize,
    },
    /// Convert between a training directory and a plain diffusers directory (not implemented yet).
    Convert {
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Model preset: tiny (CPU demo) or ddpm-cifar10 (the paper's 35.7M network).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// A diffusers UNet2DModel config.json to train instead of a preset.
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// synthetic (built in), CIFAR-10 .bin file(s) (a file or a folder), or a folder of PNG/JPEG images.
    #[arg(long, default_value = "synthetic")]
    data: String,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Total training steps (with --resume: the step to stop at).
    #[arg(long, default_value_t = 3000)]
    steps: u64,
    /// Learning rate [default: 2e-4 (the paper); 1e-3 for the tiny preset].
    #[arg(long)]
    lr: Option<f32>,
    /// Linear warmup steps [default: min(5000, steps / 10)].
    #[arg(long)]
    warmup: Option<u64>,
    /// EMA decay [default: 0.9999 from 100k steps (the paper), 0.995 below].
    #[arg(long)]
    ema_decay: Option<f32>,
    /// Clip gradients at this global norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    /// No random horizontal flips.
    #[arg(long)]
    no_flip: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (model in diffusers layout, training state, pictures).
    #[arg(long, default_value = "runs/tiny")]
    out: PathBuf,
    /// Sample grid and checkpoint every N steps [default: steps / 2]; always at the end.
    #[arg(long)]
    every: Option<u64>,
    /// Images in each sample grid.
    #[arg(long, default_value_t = 36)]
    grid: usize,
    /// Continue the run saved in this directory with its own options and data (--steps is the new end).
    #[arg(long)]
    resume: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
}

#[derive(clap::Args)]
struct SampleArgs {
    /// A model directory in diffusers layout (config.json + diffusion_pytorch_model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Number of images.
    #[arg(short, long, default_value_t = 16)]
    n: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// [default: the model's scheduler_config.json]
    #[arg(long, value_enum)]
    variance: Option<Variance>,
    /// Do not clamp the x0 prediction to [-1, 1].
    #[arg(long)]
    no_clip: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The grid PNG.
    #[arg(long, default_value = "samples.png")]
    out: PathBuf,
    /// Also write one PNG per image into this folder (created if needed).
    #[arg(long)]
    each: Option<PathBuf>,
    /// Also write the float samples as a float32 .npy of shape (N, C, H, W).
    #[arg(long)]
    out_npy: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Work that runs on whichever backend `--device` picks.
trait Job {
    fn run<B: Backend>(self, be: &mut B) -> Result<()>;
}

/// Picks the backend, says which and why, and runs the job on it. The CUDA op set is not wired in yet
/// (issue #4), so `auto` runs on the CPU and `cuda` is refused with the reason.
fn dispatch(device: Device, job: impl Job) -> Result<()> {
    let probe = crate::backend::cuda::probe();
    let why = match &probe {
        Ok(dev) => format!("found {dev}, but the CUDA op set is not implemented yet"),
        Err(e) => e.to_string(),
    };
    let threads = rayon::current_num_threads();
    match device {
        Device::Cpu => eprintln!("device: cpu (--device cpu), {threads} threads"),
        Device::Auto => eprintln!("device: cpu, {threads} threads (cuda not used: {why})"),
        Device::Cuda => bail!("--device cuda: {why}"),
    }
    job.run(&mut CpuBackend::<f32>::new())
}

fn not_yet(what: &str, issue: u32) -> Result<()> {
    bail!("`ddpm-cuda {what}` is not implemented yet (issue #{issue})")
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info {
            preset,
            model,
            batch,
        } => match model {
            Some(dir) => {
                let m = checkpoint::load_model(&dir)?;
                info(&m.config, &dir.display().to_string(), batch)
            }
            None => info(&UNetConfig::preset(&preset)?, &preset, batch),
        },
        Command::Train(args) => {
            let device = args.device;
            dispatch(device, args)
        }
        Command::Sample(args) => {
            let device = args.device;
            dispatch(device, args)
        }
        Command::Diffuse {
            image,
            t,
            size,
            seed,
            out,
        } => diffuse(&image, &t, size, seed, &out),
        Command::Eval { .. } => not_yet("eval", 5),
        Command::Bench { .. } => not_yet("bench", 4),
        Command::Convert { .. } => not_yet("convert", 5),
    }
}

fn info(cfg: &UNetConfig, name: &str, batch: usize) -> Result<()> {
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let mut be = CpuBackend::<f32>::new();
    let net = UNet::new(&mut be, cfg, 1).with_context(|| format!("building {name}"))?;
    let gflop = 2.0 * net.macs_per_image() as f64 / 1e9;
    let params = net.num_params();
    let acts = net.activation_len();
    let gib = |elems: f64| elems * 4.0 / (1u64 << 30) as f64;
    let (state, act_mem) = (5.0 * params as f64, 2.0 * (acts * batch) as f64);
    println!(
        "model        {name} ({}x{}, channels {:?})",
        cfg.sample_size, cfg.sample_size, cfg.block_out_channels
    );
    println!("parameters   {params} ({:.1} M)", params as f64 / 1e6);
    println!("forward      {gflop:.2} GFLOP per image (matmul and conv, 2 FLOP per multiply-add)");
    println!(
        "training     {:.2} GFLOP per image (forward + backward, ~3x forward)",
        3.0 * gflop
    );
    println!(
        "memory       {:.2} GiB to train at batch {batch} (fp32: weights, gradients, Adam, EMA {:.2} GiB; \
         activations and their gradients {:.2} GiB)",
        gib(state + act_mem),
        gib(state),
        gib(act_mem)
    );
    Ok(())
}

impl Job for TrainArgs {
    fn run<B: Backend>(self, be: &mut B) -> Result<()> {
        let resume = match &self.resume {
            Some(dir) => Some(checkpoint::load_state(dir)?),
            None => None,
        };
        let (config, data, out, opts) = match (&self.resume, resume.as_ref()) {
            (Some(dir), Some(state)) => {
                let m = checkpoint::load_model(dir)?;
                (
                    m.config,
                    state.data.clone(),
                    dir.clone(),
                    state.options.clone(),
                )
            }
            _ => {
                let config = match &self.config {
                    Some(path) => {
                        let text = std::fs::read_to_string(path)
                            .with_context(|| format!("reading {}", path.display()))?;
                        UNetConfig::from_json(&text, path)?
                    }
                    None => UNetConfig::preset(&self.preset)?,
                };
                let tiny = self.config.is_none() && self.preset == "tiny";
                let opts = TrainOptions {
                    batch: self.batch,
                    lr: self.lr.unwrap_or(if tiny { 1e-3 } else { 2e-4 }),
                    warmup: self.warmup.unwrap_or((self.steps / 10).min(5000)),
                    max_grad_norm: self.max_grad_norm,
                    ema_decay: self.ema_decay.unwrap_or(if self.steps >= 100_000 {
                        0.9999
                    } else {
                        0.995
                    }),
                    flip: !self.no_flip,
                    seed: self.seed,
                };
                (config, self.data.clone(), self.out.clone(), opts)
            }
        };
        let run = train::Run {
            config,
            data,
            steps: self.steps,
            out,
            every: self.every.unwrap_or((self.steps / 2).max(1)),
            grid: self.grid,
        };
        train::train(be, &run, opts, resume)?;
        Ok(())
    }
}

impl Job for SampleArgs {
    fn run<B: Backend>(self, be: &mut B) -> Result<()> {
        if self.n == 0 || self.batch == 0 {
            bail!("-n and --batch must be at least 1");
        }
        // Every output location is checked before the long part.
        checkpoint::check_output_path(&self.out, "--out")?;
        if let Some(p) = &self.out_npy {
            checkpoint::check_output_path(p, "--out-npy")?;
        }
        if let Some(d) = &self.each {
            std::fs::create_dir_all(d)
                .with_context(|| format!("--each: creating {}", d.display()))?;
        }
        let m = checkpoint::load_model(&self.model)?;
        let mut net = UNet::new_inference(be, &m.config, self.batch.min(self.n))?;
        be.upload(net.params, &m.flat_weights(&net)?)?;
        let variance = self.variance.unwrap_or(m.scheduler.variance_type);
        let clip = m.scheduler.clip_sample && !self.no_clip;
        let rows = sample::ddpm_table(&m.scheduler.schedule(), variance);
        eprintln!(
            "sampling {} images with {} steps ({}, clip {clip})",
            self.n,
            rows.len(),
            variance.name()
        );
        let all = sample::many(be, &mut net, &rows, self.n, self.seed, clip)?;
        write_samples(
            &all,
            self.n,
            &m.config,
            &self.out,
            self.each.as_deref(),
            self.out_npy.as_deref(),
        )
    }
}

/// The grid, optionally one PNG per image, optionally the floats as (N, C, H, W) float32 .npy.
fn write_samples(
    all: &[f32],
    n: usize,
    config: &UNetConfig,
    out: &Path,
    each: Option<&Path>,
    npy_path: Option<&Path>,
) -> Result<()> {
    let (size, c) = (config.sample_size, config.out_channels);
    let per = size * size * c;
    image::save_grid(all, n, config, out)?;
    eprintln!("wrote {}", out.display());
    if let Some(d) = each {
        for i in 0..n {
            image::grid(&all[i * per..(i + 1) * per], 1, size, c, 1)
                .save_png(&d.join(format!("{i:05}.png")))?;
        }
        eprintln!("wrote {n} images into {}", d.display());
    }
    if let Some(p) = npy_path {
        let nchw = crate::model::nhwc_to_nchw(all, n, c, size, size);
        checkpoint::write_atomic(p, &npy::to_bytes(&nchw, &[n, c, size, size]))?;
        eprintln!(
            "wrote {} (float32, shape ({n}, {c}, {size}, {size}))",
            p.display()
        );
    }
    Ok(())
}

fn diffuse(path: &Path, ts: &[usize], size: usize, seed: u64, out: &Path) -> Result<()> {
    let sched = SchedulerConfig::default().schedule();
    if let Some(bad) = ts.iter().find(|&&t| t >= sched.len()) {
        bail!("--t {bad} is outside 0..{}", sched.len());
    }
    if !(1..=4096).contains(&size) {
        bail!("--size {size} must be in 1..=4096");
    }
    checkpoint::check_output_path(out, "--out")?;
    let x0 = image::load_image(path, size)?;
    // One noise draw for every column, so the strip shows one path of the forward process.
    let mut noise = vec![0.0f32; x0.len()];
    rng::fill_normal(seed, rng::stream(rng::Purpose::Diffuse, 0), 0, &mut noise);
    let mut strip = Vec::with_capacity(ts.len() * x0.len());
    for &t in ts {
        let (a, b) = (
            sched.sqrt_alphas_cumprod[t],
            sched.sqrt_one_minus_alphas_cumprod[t],
        );
        strip.extend(
            x0.iter()
                .zip(&noise)
                .map(|(&x, &e)| (a * f64::from(x) + b * f64::from(e)) as f32),
        );
    }
    image::grid(&strip, ts.len(), size, 3, ts.len()).save_png(out)?;
    eprintln!("wrote {} (t = {ts:?})", out.display());
    Ok(())
}

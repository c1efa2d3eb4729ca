//! The command line (clap): each subcommand parses its flags, picks a backend and calls into the library.

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, Layout, Precision};
use crate::bench;
use crate::checkpoint::{self, SchedulerConfig};
use crate::data::Dataset;
use crate::eval;
use crate::files;
use crate::hub;
use crate::image;
use crate::model::params::StoredDtype;
use crate::model::{UNet, UNetConfig};
use crate::rng;
use crate::sample::{self, Sampler, Variance};
use crate::sample_files::{absolute, fingerprint, InitNoise, Outputs, SampleJob, GRID_MAX};
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
    /// Resolve `--model owner/name[@revision]` from the Hugging Face cache only, as HF_HUB_OFFLINE=1 does.
    #[arg(long, global = true)]
    offline: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Device {
    /// CUDA when a device, the driver and the CUDA op set are available, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PrecisionArg {
    Auto,
    Fp32,
    Bf16,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (L_simple, Adam, EMA); writes sample grids, checkpoints, loss.csv and loss.png to --out.
    Train(TrainArgs),
    /// Sample from a model directory (diffusers layout): ancestral (all 1000 steps, or respaced) or DDIM.
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
    /// The variational bound (the paper's NLL) in bits/dim over a dataset, with its breakdown.
    Eval(EvalArgs),
    /// Training and sampling throughput of a model on this machine, and its dominant kernels, each against
    /// a ceiling (the copy bandwidth and the arithmetic peak of the precision, measured here).
    Bench(BenchArgs),
    /// Parameter count, FLOPs per forward pass and memory of a model.
    Info {
        /// A preset: ddpm-cifar10 or tiny.
        #[arg(long, default_value = "ddpm-cifar10", conflicts_with = "model")]
        preset: String,
        /// A model directory (diffusers layout) or a Hugging Face repository, owner/name[@revision].
        #[arg(long)]
        model: Option<PathBuf>,
        /// Batch size for the memory estimate.
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// cuda: also the driver and its CUDA version, the device, the toolkit that built the kernels,
        /// and which kernels and rungs run there (cpu, the default: the model only).
        #[arg(long, value_enum, default_value = "cpu")]
        device: Device,
    },
    /// Copy a model to a plain diffusers directory (dropping the training state) or to a training directory
    /// (`--training-state`, for `train --resume`), with the weights stored as f32, bf16 or f16.
    Convert {
        /// The model to read: a directory (diffusers, pipeline or training layout) or a Hugging Face
        /// repository, owner/name[@revision].
        #[arg(long)]
        model: PathBuf,
        /// The directory to write.
        #[arg(long)]
        out: PathBuf,
        /// How to store the weights.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: StoredDtype,
        /// Also write a training state: the source's own, or a fresh one (step 0, the weights as both raw
        /// and EMA weights, zero Adam moments) that `train --resume` continues from.
        #[arg(long)]
        training_state: bool,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// The model: a preset (ddpm-cifar10, tiny).
    #[arg(long, default_value = "ddpm-cifar10")]
    preset: String,
    /// Batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128,256")]
    batch: Vec<usize>,
    /// Timed training steps per batch size (after one warm-up step).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Skip the per-kernel table (and, in bf16, the network timed on each rung of the convolution ladder).
    #[arg(long)]
    no_kernels: bool,
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// The arithmetic of the convolutions and linear layers: fp32, or bf16 on tensor cores (sums in fp32);
    /// auto is bf16 on a CUDA device of compute capability 8.0 or newer, else fp32.
    #[arg(long, value_enum, default_value = "auto")]
    precision: PrecisionArg,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// A model directory (diffusers layout) or a Hugging Face repository, owner/name[@revision].
    #[arg(long)]
    model: PathBuf,
    /// synthetic, CIFAR-10 .bin file(s) (e.g. test_batch.bin), or a folder of PNG/JPEG images.
    #[arg(long)]
    data: String,
    /// Evaluate the first N images only [default: all]. Each image costs T forward passes.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// The model's variance [default: the model's scheduler_config.json].
    #[arg(long, value_enum)]
    variance: Option<Variance>,
    /// Do not clamp the x0 prediction to [-1, 1] (the paper clips).
    #[arg(long)]
    no_clip: bool,
    /// Seed of the x_t draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// The arithmetic of the convolutions and linear layers: fp32, or bf16 on tensor cores (sums in fp32);
    /// auto is bf16 on a CUDA device of compute capability 8.0 or newer, else fp32.
    #[arg(long, value_enum, default_value = "auto")]
    precision: PrecisionArg,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Model preset: tiny (CPU demo) or ddpm-cifar10 (the paper's 35.7M network).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// A diffusers UNet2DModel config.json to train instead of a preset.
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// synthetic (built in), CIFAR-10 .bin file(s) (a file or a folder), or a folder of PNG/JPEG images
    /// [default: synthetic].
    #[arg(long)]
    data: Option<String>,
    /// Images per step [default: 32].
    #[arg(long)]
    batch: Option<usize>,
    /// Total training steps (with --resume: the step to stop at).
    #[arg(long, default_value_t = 2000)]
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
    /// Clip gradients at this global norm, 0 disables [default: 1].
    #[arg(long)]
    max_grad_norm: Option<f32>,
    /// No random horizontal flips.
    #[arg(long)]
    no_flip: bool,
    /// Train a class-conditional model on the data's labels (CIFAR-10's, an image folder's class
    /// subfolders, the synthetic set's 12 colour-shape classes), with a null class for guidance.
    #[arg(long)]
    conditional: bool,
    /// Probability that an image's label is replaced by the null class (classifier-free guidance's
    /// unconditional training) [default: 0.1 with --conditional].
    #[arg(long)]
    cond_drop: Option<f32>,
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
    /// Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped).
    #[arg(long, default_value_t = 50)]
    max_bad_steps: u64,
    /// Continue the run saved in this directory (--steps is the new end). It keeps its saved options; --data,
    /// --batch, --lr, --warmup, --ema-decay, --max-grad-norm and --cond-drop given here replace
    /// them.
    #[arg(long)]
    resume: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// The arithmetic of the convolutions and linear layers: fp32, or bf16 on tensor cores (sums in fp32);
    /// auto is bf16 on a CUDA device of compute capability 8.0 or newer, else fp32.
    #[arg(long, value_enum, default_value = "auto")]
    precision: PrecisionArg,
}

#[derive(clap::Args)]
struct SampleArgs {
    /// A model directory in diffusers layout (config.json + diffusion_pytorch_model.safetensors), a
    /// pipeline directory (unet/, scheduler/), or a Hugging Face repository, owner/name[@revision],
    /// downloaded into the Hugging Face cache when missing (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE).
    #[arg(long)]
    model: PathBuf,
    /// Number of images [default: 16, or the N of --init-noise].
    #[arg(short, long)]
    n: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// ddpm: ancestral sampling (DDPMScheduler); ddim: DDIMScheduler.
    #[arg(long, value_enum, default_value = "ddpm")]
    sampler: Sampler,
    /// Sampling steps, spaced as diffusers' "leading" [default: all T for ddpm, 50 for ddim].
    #[arg(long)]
    steps: Option<usize>,
    /// DDIM's eta: 0 is deterministic, 1 has the posterior variance.
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Ancestral sampling's variance [default: the model's scheduler_config.json].
    #[arg(long, value_enum)]
    variance: Option<Variance>,
    /// Do not clamp the x0 prediction to [-1, 1] (on by default when the scheduler config has clip_sample).
    #[arg(long)]
    no_clip: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A class-conditional model's class: a name from its config, a number, or all (the classes in turn,
    /// one grid row each) [default: all].
    #[arg(long)]
    class: Option<String>,
    /// Classifier-free guidance's scale w: eps = eps_null + w (eps_class - eps_null). 1 is the class
    /// alone (no unconditional pass), 0 the unconditional model, above 1 more of the class.
    #[arg(long)]
    guidance: Option<f32>,
    /// x_T from a float32 .npy of shape (N, C, H, W) instead of drawing it.
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// The grid PNG, of the first 64 images at most. An interrupted run leaves OUT.partial.json beside
    /// it; the same command then continues where it stopped.
    #[arg(long, default_value = "samples.png")]
    out: PathBuf,
    /// Also write one PNG per image into this folder (created if needed).
    #[arg(long)]
    each: Option<PathBuf>,
    /// Also write the float samples as a float32 .npy of shape (N, C, H, W), grown on disk batch by batch
    /// (a complete .npy of the images so far after each).
    #[arg(long)]
    out_npy: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// The arithmetic of the convolutions and linear layers: fp32, or bf16 on tensor cores (sums in fp32);
    /// auto is bf16 on a CUDA device of compute capability 8.0 or newer, else fp32.
    #[arg(long, value_enum, default_value = "auto")]
    precision: PrecisionArg,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = crate::interrupt::install() {
        eprintln!("warning: {e}; Ctrl-C will stop without a checkpoint");
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A stop by signal that kept what was complete exits like an interrupted program.
            match e.downcast_ref::<crate::Error>() {
                Some(crate::Error::Interrupted(_)) => ExitCode::from(130),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Work that runs on whichever backend `--device` picks.
trait Job {
    fn run<B: Backend>(self, be: &mut B) -> Result<()>;
}

/// Picks the backend and the precision, says which and why, and runs the job on it. `auto` takes CUDA only
/// once the CUDA backend has passed its GPU tests ([`crate::backend::cuda::VERIFIED`]); until then
/// `--device cuda` runs it on request. The CPU computes in fp32 only.
fn dispatch(device: Device, precision: PrecisionArg, job: impl Job) -> Result<()> {
    let threads = rayon::current_num_threads();
    // The CUDA backend, or why the CPU runs the job.
    let chosen: std::result::Result<CudaBackend, String> = match device {
        Device::Cpu => Err("--device cpu".into()),
        Device::Cuda => Ok(CudaBackend::new().map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?),
        Device::Auto => match CudaBackend::new() {
            Ok(be) if crate::backend::cuda::VERIFIED => Ok(be),
            Ok(be) => Err(format!(
                "found {}, but the CUDA backend has not passed its GPU tests yet; --device cuda uses it anyway",
                be.device_name()
            )),
            Err(e) => Err(format!("cuda not used: {e}")),
        },
    };
    let mut be = match chosen {
        Ok(be) => be,
        Err(why) => {
            if precision == PrecisionArg::Bf16 {
                bail!("--precision bf16 needs the CUDA backend, and the CPU was chosen: {why}");
            }
            eprintln!("device: cpu, {threads} threads, fp32 ({why})");
            return job.run(&mut CpuBackend::<f32>::new());
        }
    };
    let p = match precision {
        PrecisionArg::Fp32 => Precision::Fp32,
        PrecisionArg::Bf16 => Precision::Bf16,
        PrecisionArg::Auto if be.supports_bf16() => Precision::Bf16,
        PrecisionArg::Auto => Precision::Fp32,
    };
    be.set_precision(p)?;
    eprintln!(
        "device: cuda, {}, {} GEMMs (--device {}, --precision {})",
        be.device_name(),
        p.name(),
        format!("{device:?}").to_lowercase(),
        format!("{precision:?}").to_lowercase(),
    );
    job.run(&mut be)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info {
            preset,
            model,
            batch,
            device,
        } => {
            if device != Device::Cpu {
                cuda_info(device == Device::Cuda)?;
            }
            match model {
                Some(dir) => {
                    let m = checkpoint::load_model(&hub::locate(&dir, cli.offline)?)?;
                    info(&m.config, &dir.display().to_string(), batch)
                }
                None => info(&UNetConfig::preset(&preset)?, &preset, batch),
            }
        }
        Command::Train(args) => {
            let (device, precision) = (args.device, args.precision);
            dispatch(device, precision, args)
        }
        Command::Sample(mut args) => {
            args.model = hub::locate(&args.model, cli.offline)?;
            let (device, precision) = (args.device, args.precision);
            dispatch(device, precision, args)
        }
        Command::Diffuse {
            image,
            t,
            size,
            seed,
            out,
        } => diffuse(&image, &t, size, seed, &out),
        Command::Eval(mut args) => {
            args.model = hub::locate(&args.model, cli.offline)?;
            let (device, precision) = (args.device, args.precision);
            dispatch(device, precision, args)
        }
        Command::Bench(args) => {
            let (device, precision) = (args.device, args.precision);
            dispatch(device, precision, args)
        }
        Command::Convert {
            model,
            out,
            dtype,
            training_state,
        } => convert(
            &hub::locate(&model, cli.offline)?,
            &out,
            dtype,
            training_state,
        ),
    }
}

/// `info --device cuda`: the driver, the device, the kernels' toolkit and the paths they take; an error
/// when no CUDA device can be used (`required`), else a line saying why.
fn cuda_info(required: bool) -> Result<()> {
    use crate::backend::cuda::{
        cuda_version, driver_cuda_version, kernel_toolkit, min_driver_cuda,
    };
    let need = cuda_version(min_driver_cuda());
    match driver_cuda_version() {
        Some(v) => println!(
            "driver       supports CUDA {} (the kernels need {need} or newer)",
            cuda_version(v)
        ),
        None => println!("driver       none (libcuda could not be loaded)"),
    }
    println!(
        "toolkit      {}",
        kernel_toolkit().unwrap_or("none: this binary was built without kernels")
    );
    match CudaBackend::new() {
        Ok(be) => {
            println!("device       {}", be.device_name());
            for (label, text) in be.describe_paths() {
                println!("{label:<12} {text}");
            }
            if !crate::backend::cuda::VERIFIED {
                println!(
                    "status       the CUDA backend has not passed its GPU tests yet: --device auto keeps to \
                     the CPU, --device cuda runs it"
                );
            }
            Ok(())
        }
        Err(e) if required => Err(anyhow::anyhow!("--device cuda: {e}")),
        Err(e) => {
            println!("device       none usable: {e}");
            Ok(())
        }
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
    let gib = |elems: f64| elems * 4.0 / (1u64 << 30) as f64;
    let state = 5.0 * params as f64;
    // The CUDA backend also keeps a bf16 copy of the weights for its tensor cores.
    let copy = crate::backend::weight_copy_len(params) as f64;
    // The CUDA backend stores no normalised input of its own (the CPU stores them): in fp32 each group
    // norm is applied as its convolution loads its input; in bf16 precision (its default on sm_80 and
    // newer) every normalised input is written in bf16 into one scratch region the size of the largest,
    // counted with the activations, and the activations are stored in bf16.
    let lens = |fused, bf16_activations| -> Result<(f64, f64)> {
        let layout = crate::backend::Layout {
            fused,
            weight_copies: fused,
            bf16_activations,
            norm_scratch: bf16_activations,
        };
        let (acts, grads) = UNet::activation_lens(cfg, batch, layout)?;
        Ok((acts as f64, grads as f64))
    };
    let (act_mem, grad_mem) = lens(true, true)?;
    let (fp32_act, _) = lens(true, false)?;
    let (cpu_act, cpu_grad) = lens(false, false)?;
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
        "memory       {:.2} GiB to train at batch {batch} on CUDA in bf16 (fp32 weights, gradients, Adam, \
         EMA {:.2} GiB; the weights' bf16 copy {:.2} GiB; activations {:.2} GiB; their gradients {:.2} GiB); \
         {:.2} GiB in fp32, which keeps every activation in fp32; {:.2} GiB on the CPU, which also \
         stores the normalised inputs",
        gib(state + copy + act_mem + grad_mem),
        gib(state),
        gib(copy),
        gib(act_mem),
        gib(grad_mem),
        gib(state + copy + fp32_act + grad_mem),
        gib(state + cpu_act + cpu_grad)
    );
    Ok(())
}

impl Job for TrainArgs {
    fn run<B: Backend>(self, be: &mut B) -> Result<()> {
        let (config, data, out, opts, resume) = match &self.resume {
            Some(dir) => {
                let mut state = checkpoint::load_state(dir)?;
                let m = checkpoint::load_model(dir)?;
                self.override_saved(&mut state);
                let (data, opts) = (state.data.clone(), state.options.clone());
                (m.config, data, dir.clone(), opts, Some(state))
            }
            None => {
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
                    batch: self.batch.unwrap_or(32),
                    lr: self.lr.unwrap_or(if tiny { 1e-3 } else { 2e-4 }),
                    warmup: self.warmup.unwrap_or((self.steps / 10).min(5000)),
                    max_grad_norm: self.max_grad_norm.unwrap_or(1.0),
                    ema_decay: self.ema_decay.unwrap_or(if self.steps >= 100_000 {
                        0.9999
                    } else {
                        0.995
                    }),
                    flip: !self.no_flip,
                    cond_drop: self.cond_drop.unwrap_or(
                        if self.conditional || config.classes.is_some() {
                            0.1
                        } else {
                            0.0
                        },
                    ),
                    seed: self.seed,
                };
                let data = self.data.clone().unwrap_or_else(|| "synthetic".into());
                (config, data, self.out.clone(), opts, None)
            }
        };
        let run = train::Run {
            config,
            data,
            steps: self.steps,
            out,
            every: self.every.unwrap_or((self.steps / 2).max(1)),
            grid: self.grid,
            max_bad_steps: self.max_bad_steps,
            conditional: self.conditional,
        };
        train::train(be, &run, opts, resume)?;
        Ok(())
    }
}

impl TrainArgs {
    /// Flags given with `--resume` replace the saved options (the run is then no longer bit-identical
    /// to an uninterrupted one, which is the point of changing them).
    fn override_saved(&self, state: &mut checkpoint::TrainState) {
        let o = &mut state.options;
        let mut changed = Vec::new();
        if let Some(d) = &self.data {
            state.data = d.clone();
            changed.push(format!("--data {d}"));
        }
        if let Some(v) = self.batch {
            o.batch = v;
            changed.push(format!("--batch {v}"));
        }
        if let Some(v) = self.lr {
            o.lr = v;
            changed.push(format!("--lr {v}"));
        }
        if let Some(v) = self.warmup {
            o.warmup = v;
            changed.push(format!("--warmup {v}"));
        }
        if let Some(v) = self.ema_decay {
            o.ema_decay = v;
            changed.push(format!("--ema-decay {v}"));
        }
        if let Some(v) = self.max_grad_norm {
            o.max_grad_norm = v;
            changed.push(format!("--max-grad-norm {v}"));
        }
        if let Some(v) = self.cond_drop {
            o.cond_drop = v;
            changed.push(format!("--cond-drop {v}"));
        }
        if !changed.is_empty() {
            eprintln!(
                "resume: replacing saved options with {}",
                changed.join(", ")
            );
        }
    }
}

impl Job for SampleArgs {
    fn run<B: Backend>(self, be: &mut B) -> Result<()> {
        let m = checkpoint::load_model(&self.model)?;
        let (size, c) = (m.config.sample_size, m.config.in_channels);
        let mut init = match &self.init_noise {
            Some(p) => Some(InitNoise::open(p, self.n, c, size)?),
            None => None,
        };
        let cond = conditioning(&m.config, self.class.as_deref(), self.guidance)?;
        // Every class in turn: by default as many of each as fill the grid's 64 places.
        let default_n = match cond {
            Some(c) if c.class.is_none() => c.real * (GRID_MAX / c.real).max(1),
            _ => 16,
        };
        let n = init
            .as_ref()
            .map_or(self.n.unwrap_or(default_n), |(_, n)| *n);
        if n == 0 || self.batch == 0 {
            bail!("-n and --batch must be at least 1");
        }
        // Every output location is checked before the long part.
        files::check_output_path(&self.out, "--out")?;
        if let Some(p) = &self.out_npy {
            files::check_output_path(p, "--out-npy")?;
        }
        if let Some(d) = &self.each {
            std::fs::create_dir_all(d)
                .with_context(|| format!("--each: creating {}", d.display()))?;
        }
        let schedule = m.scheduler.schedule();
        let steps = self.steps.unwrap_or(match self.sampler {
            Sampler::Ddpm => schedule.len(),
            Sampler::Ddim => 50.min(schedule.len()),
        });
        let variance = self.variance.unwrap_or(m.scheduler.variance_type);
        let rows = sample::table(&schedule, self.sampler, steps, variance, self.eta)?;
        let clip = m.scheduler.clip_sample && !self.no_clip;
        let how = match self.sampler {
            Sampler::Ddpm => format!("ddpm, {}", variance.name()),
            Sampler::Ddim => format!("ddim, eta {}", self.eta),
        };
        let job = SampleJob {
            model: absolute(&self.model),
            weights: fingerprint(&m.weights),
            n,
            seed: self.seed,
            sampler: format!(
                "{steps} steps ({how}, clip {clip}{})",
                describe(cond.as_ref())
            ),
            init_noise: self.init_noise.as_deref().map(absolute),
            out_npy: self.out_npy.as_deref().map(absolute),
            each: self.each.as_deref().map(absolute),
            image: [m.config.out_channels, size, size],
        };
        let class_rows = cond.filter(|c| c.class.is_none()).map(|c| c.real);
        let mut outputs = Outputs::open(job, &self.out, &m.config, class_rows)?;
        outputs.check_disk(self.out_npy.as_deref())?;
        let from = outputs.done();
        if from == n {
            eprintln!(
                "all {n} images are written already ({} records them)",
                outputs.record_path().display()
            );
            return Ok(outputs.finish()?);
        }
        // A guided batch runs each image twice: with its class and with the null class.
        let twice = if cond.is_some_and(|c| c.guidance.is_some()) {
            2
        } else {
            1
        };
        let batch = self.batch.min(n - from) * twice;
        let layout = Layout::of(be);
        crate::backend::check_fits(be, "sampling", batch, |b| {
            UNet::arena_len(&m.config, b, false, layout).map(|(len, _)| len)
        })?;
        let mut net = UNet::new_inference(be, &m.config, batch)?;
        be.upload(net.params, &m.flat_weights(&net)?)?;
        if from > 0 {
            eprintln!(
                "continuing the interrupted run {} records, from image {from}",
                outputs.record_path().display()
            );
        }
        eprintln!(
            "sampling {n} images, {steps} steps ({how}, clip {clip}{})",
            describe(cond.as_ref())
        );
        let mut read = |first: usize, count: usize| match init.as_mut() {
            Some((noise, _)) => noise.batch(first, count),
            None => Ok(Vec::new()),
        };
        let given = self.init_noise.is_some();
        let init_fn: Option<&mut dyn FnMut(usize, usize) -> crate::Result<Vec<f32>>> =
            if given { Some(&mut read) } else { None };
        let mut sink = |first: usize, images: &[f32]| outputs.add(first, images);
        let done = sample::many(
            be,
            &mut net,
            &rows,
            n,
            from,
            self.seed,
            clip,
            cond.as_ref(),
            init_fn,
            &mut sink,
        )?;
        if done < n {
            let record = outputs.record_path().display().to_string();
            if !outputs.stop()? {
                return Err(crate::Error::Interrupted("no image was complete".into()).into());
            }
            let msg = format!(
                "wrote the {done} of {n} images that were complete (the grid shows those it can); the \
                 same command continues from image {done} ({record})"
            );
            return Err(crate::Error::Interrupted(msg).into());
        }
        let shown = outputs.grid_len();
        outputs.finish()?;
        eprintln!("wrote {} (a grid of the first {shown})", self.out.display());
        if let Some(p) = &self.out_npy {
            eprintln!(
                "wrote {} (float32, shape ({n}, {c}, {size}, {size}))",
                p.display()
            );
        }
        if let Some(d) = &self.each {
            eprintln!("wrote {n} images into {}", d.display());
        }
        Ok(())
    }
}

/// The classes a sampling run asks of its model (`--class`, `--guidance`), checked against its config.
fn conditioning(
    config: &UNetConfig,
    class: Option<&str>,
    guidance: Option<f32>,
) -> Result<Option<sample::Conditioning>> {
    let Some(c) = &config.classes else {
        if class.is_some() || guidance.is_some() {
            bail!("--class and --guidance are for class-conditional models; this model has no classes (its config has no num_class_embeds)");
        }
        return Ok(None);
    };
    let class = match class.unwrap_or("all") {
        "all" => None,
        name => Some(c.label(name)?),
    };
    let w = guidance.unwrap_or(1.0);
    if !w.is_finite() {
        bail!("--guidance {w} must be a finite number");
    }
    let guidance = if w == 1.0 {
        None
    } else {
        match c.null() {
            Some(null) => Some((w, null)),
            None => bail!(
                "--guidance {w} needs the model's unconditional prediction, and this model has no null class (num_class_embeds {} = _num_real_classes): only --guidance 1 works",
                c.embeds
            ),
        }
    };
    Ok(Some(sample::Conditioning {
        class,
        real: c.real,
        guidance,
    }))
}

/// How a run's conditioning prints: `, class cat, guidance 3`.
fn describe(cond: Option<&sample::Conditioning>) -> String {
    match cond {
        None => String::new(),
        Some(c) => {
            let class = c
                .class
                .map_or("every class in turn".to_string(), |k| format!("class {k}"));
            let w = c.guidance.map_or(1.0, |(w, _)| w);
            format!(", {class}, guidance {w}")
        }
    }
}

impl Job for EvalArgs {
    fn run<B: Backend>(self, be: &mut B) -> Result<()> {
        if self.batch == 0 || self.limit == Some(0) {
            bail!("--batch and --limit must be at least 1");
        }
        let m = checkpoint::load_model(&self.model)?;
        let data = Dataset::open(&self.data, m.config.sample_size, self.seed)?;
        let count = self.limit.unwrap_or(data.len).min(data.len);
        let mut net = UNet::new_inference(be, &m.config, self.batch.min(count))?;
        be.upload(net.params, &m.flat_weights(&net)?)?;
        let variance = self.variance.unwrap_or(m.scheduler.variance_type);
        let clip = m.scheduler.clip_sample && !self.no_clip;
        let ev = eval::Evaluator::new(m.scheduler.schedule(), variance, clip, self.seed);
        eprintln!(
            "evaluating {count} of {} ({}), {} timesteps each, variance {}, clip {clip}",
            data.description,
            self.data,
            ev.timesteps(),
            variance.name()
        );
        let all = eval::evaluate(be, &mut net, &ev, &data, Some(count))?;
        let mean = eval::Bound::mean(&all);
        let totals: Vec<f64> = all.iter().map(eval::Bound::total).collect();
        let sd = (totals
            .iter()
            .map(|t| (t - mean.total()).powi(2))
            .sum::<f64>()
            / (totals.len().max(2) - 1) as f64)
            .sqrt();
        println!("images           {count}");
        println!("L_T (prior)      {:.5} bits/dim", mean.prior);
        println!("sum of L_t       {:.5} bits/dim", mean.terms);
        println!("L_0 (decoder)    {:.5} bits/dim", mean.decoder);
        println!(
            "total (NLL bound) {:.5} bits/dim (standard error {:.5})",
            mean.total(),
            sd / (count as f64).sqrt()
        );
        println!("mean L_simple    {:.5}", mean.mse);
        Ok(())
    }
}

impl Job for BenchArgs {
    fn run<B: Backend>(self, be: &mut B) -> Result<()> {
        if self.batch.contains(&0) || self.steps == 0 {
            bail!("--batch and --steps must be at least 1");
        }
        let config = UNetConfig::preset(&self.preset)?;
        let ceilings = bench::Ceilings::measure(be)?;
        println!("device       {}", be.describe());
        let peak = |p: Option<f64>| {
            // A CPU's peak reads better in GFLOP/s.
            p.map_or("unknown".into(), |p| {
                if p < 1.0 {
                    format!("{:.0} GFLOP/s", p * 1e3)
                } else {
                    format!("{p:.1} TFLOP/s")
                }
            })
        };
        println!(
            "ceilings     device copy {:.0} GB/s; fp32 FMA {}; bf16 mma.sync {} (measured where the \
             backend can, else stated; bench's GEMMs run in {}; on sm_90 wgmma goes past mma.sync: the \
             GPU check's MFU is against the peer's bf16 matmul)",
            ceilings.copy_gb_s,
            peak(ceilings.peak_fp32),
            peak(ceilings.peak_bf16),
            be.precision().name()
        );
        for p in [Precision::Fp32, Precision::Bf16] {
            if let Some(stated) = be.stated_peak_tflops(p) {
                println!(
                    "stated       {} peak {stated:.1} TFLOP/s (SMs x FLOPs per SM per clock x clock)",
                    p.name()
                );
            }
        }
        println!(
            "model        {} ({} steps timed per batch)",
            self.preset, self.steps
        );
        // Each line as soon as it is measured: where a kernel fails on a device it never ran on, what
        // came before it is already out.
        println!(
            "{:<60} {:>13} {:>12} {:<9} {:>7}",
            "what", "time", "rate", "unit", "ceiling"
        );
        let mut emit = |l: bench::Line| println!("{l}");
        for &batch in &self.batch {
            bench::model(be, &config, batch, self.steps, &ceilings, &mut emit)?;
        }
        if !self.no_kernels {
            bench::kernels(be, self.batch[0], bench::KERNEL_ITERS, &ceilings, &mut emit)?;
            // The bf16 bench also times the network on each rung of the convolution ladder, at the
            // largest batch (the sampler's), last: a rung that faults the device takes nothing with it.
            if be.precision() == Precision::Bf16 {
                let batch = self.batch.iter().copied().max().unwrap_or(1);
                let rows = bench::SAMPLING_ROWS;
                bench::rungs(be, &config, batch, self.steps, rows, &ceilings, &mut emit)?;
            }
        }
        Ok(())
    }
}

/// Reads a model (any layout), checks its weights against its config, and writes it to `out`.
fn convert(model: &Path, out: &Path, dtype: StoredDtype, training_state: bool) -> Result<()> {
    let m = checkpoint::load_model(model)?;
    let mut be = CpuBackend::<f32>::new();
    let net = UNet::new_inference(&mut be, &m.config, 1)?;
    let flat = m.flat_weights(&net)?;
    checkpoint::save_model_as(out, &net, &flat, &m.scheduler, dtype)?;
    eprintln!(
        "wrote {} ({} weights as {dtype:?})",
        out.display(),
        flat.len()
    );
    if training_state {
        let state = match checkpoint::load_state(model) {
            Ok(s) => s,
            Err(_) if !model.join(checkpoint::STATE).exists() => fresh_state(flat),
            Err(e) => return Err(e.into()),
        };
        checkpoint::save_state(out, &state)?;
        eprintln!(
            "wrote {} at step {}: continue with `ddpm-cuda train --resume {}`",
            out.join(checkpoint::STATE).display(),
            state.step,
            out.display()
        );
    } else if out.join(checkpoint::STATE).exists() {
        eprintln!(
            "note: {} already holds a training state, left as it was",
            out.display()
        );
    }
    Ok(())
}

/// A training state that starts from given weights: step 0, the paper's options (`train --resume` can
/// override them).
fn fresh_state(weights: Vec<f32>) -> checkpoint::TrainState {
    let zeros = vec![0.0; weights.len()];
    checkpoint::TrainState {
        step: 0,
        options: TrainOptions {
            batch: 128,
            lr: 2e-4,
            warmup: 5000,
            max_grad_norm: 1.0,
            ema_decay: 0.9999,
            flip: true,
            cond_drop: 0.0,
            seed: 0,
        },
        data: "synthetic".into(),
        params: weights.clone(),
        ema: weights,
        adam_m: zeros.clone(),
        adam_v: zeros,
    }
}

fn diffuse(path: &Path, ts: &[usize], size: usize, seed: u64, out: &Path) -> Result<()> {
    let sched = SchedulerConfig::default().schedule();
    if let Some(bad) = ts.iter().find(|&&t| t >= sched.len()) {
        bail!("--t {bad} is outside 0..{}", sched.len());
    }
    if !(1..=4096).contains(&size) {
        bail!("--size {size} must be in 1..=4096");
    }
    files::check_output_path(out, "--out")?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Classes;

    fn with(classes: Option<Classes>) -> UNetConfig {
        UNetConfig {
            classes,
            ..UNetConfig::preset("tiny").unwrap()
        }
    }

    /// `--class` and `--guidance` as `sample` reads them, for a model with a null class, one without
    /// (a diffusers config with `num_class_embeds` and no `_num_real_classes`: every row a real class),
    /// and an unconditional one.
    #[test]
    fn class_and_guidance_flags() {
        let names = vec!["cat".to_string(), "dog".to_string()];
        let nulled = with(Some(Classes::with_null(2, Some(names.clone()))));
        let c = conditioning(&nulled, Some("dog"), Some(4.0))
            .unwrap()
            .unwrap();
        assert_eq!((c.class, c.real, c.guidance), (Some(1), 2, Some((4.0, 2))));
        let c = conditioning(&nulled, None, None).unwrap().unwrap();
        assert_eq!(
            (c.class, c.guidance),
            (None, None),
            "all classes, w = 1: no null pass"
        );
        assert!(
            conditioning(&nulled, Some("2"), None).is_err(),
            "the null class is no --class"
        );
        let full = with(Some(Classes {
            embeds: 2,
            real: 2,
            names,
        }));
        assert!(conditioning(&full, Some("cat"), None).unwrap().is_some());
        let e = conditioning(&full, Some("cat"), Some(2.0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no null class"), "{e}");
        let e = conditioning(&with(None), None, Some(2.0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no classes"), "{e}");
        assert_eq!(conditioning(&with(None), None, None).unwrap(), None);
    }
}

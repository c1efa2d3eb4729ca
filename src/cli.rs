//! The command line (clap). Each subcommand parses its flags and calls into the library.

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::checkpoint::{self, SchedulerConfig};
use crate::data::Dataset;
use crate::image;
use crate::model::{UNet, UNetConfig};
use crate::progress::Progress;
use crate::rng;
use crate::sample::{self, Draw, Variance};
use crate::train::{TrainOptions, Trainer};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
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
    Train {
        /// Model preset: tiny (CPU demo) or ddpm-cifar10 (the paper's 35.7M network).
        #[arg(long, default_value = "tiny")]
        preset: String,
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
        /// Continue the run saved in this directory (its options and data; --steps is the new end).
        #[arg(long)]
        resume: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "auto")]
        device: Device,
    },
    /// Sample with the 1000-step ancestral sampler from a model directory (diffusers layout).
    Sample {
        #[arg(long)]
        model: PathBuf,
        #[arg(short, long, default_value_t = 16)]
        n: usize,
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
        /// Also write one PNG per image into this folder.
        #[arg(long)]
        each: Option<PathBuf>,
        /// Also write the float samples as a float32 .npy of shape (N, C, H, W).
        #[arg(long)]
        out_npy: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "auto")]
        device: Device,
    },
    /// A strip of the forward process: an image dissolving into noise at chosen timesteps.
    Diffuse {
        #[arg(long)]
        image: PathBuf,
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
        Command::Train {
            preset,
            data,
            batch,
            steps,
            lr,
            warmup,
            ema_decay,
            max_grad_norm,
            no_flip,
            seed,
            out,
            every,
            grid,
            resume,
            device,
        } => {
            choose_device(device)?;
            let lr = lr.unwrap_or(if preset == "tiny" { 1e-3 } else { 2e-4 });
            let mut be = CpuBackend::<f32>::new();
            let args = TrainArgs {
                preset,
                data,
                steps,
                out,
                every,
                grid,
                resume,
            };
            let opts = TrainOptions {
                batch,
                lr,
                warmup: warmup.unwrap_or((steps / 10).min(5000)),
                max_grad_norm,
                ema_decay: ema_decay.unwrap_or(if steps >= 100_000 { 0.9999 } else { 0.995 }),
                flip: !no_flip,
                seed,
            };
            train(&mut be, args, opts)
        }
        Command::Sample {
            model,
            n,
            batch,
            variance,
            no_clip,
            seed,
            out,
            each,
            out_npy,
            device,
        } => {
            choose_device(device)?;
            let mut be = CpuBackend::<f32>::new();
            sample_cmd(
                &mut be,
                &model,
                n,
                batch,
                variance,
                !no_clip,
                seed,
                &out,
                each.as_deref(),
                out_npy.as_deref(),
            )
        }
        Command::Diffuse {
            image,
            t,
            size,
            seed,
            out,
        } => diffuse(&image, &t, size, seed, &out),
    }
}

/// Says which backend runs and why. The CUDA op set is not wired in yet (issue #4), so `auto` runs on the
/// CPU and `cuda` is refused with the reason.
fn choose_device(device: Device) -> Result<()> {
    let probe = crate::backend::cuda::probe();
    let why = match &probe {
        Ok(dev) => format!("found {dev}, but the CUDA op set is not implemented yet"),
        Err(e) => e.to_string(),
    };
    match device {
        Device::Cpu => eprintln!(
            "device: cpu (--device cpu), {} threads",
            rayon::current_num_threads()
        ),
        Device::Auto => eprintln!(
            "device: cpu, {} threads (cuda not used: {why})",
            rayon::current_num_threads()
        ),
        Device::Cuda => bail!("--device cuda: {why}"),
    }
    Ok(())
}

fn info(cfg: &UNetConfig, name: &str, batch: usize) -> Result<()> {
    let mut be = CpuBackend::<f32>::new();
    let net = UNet::new(&mut be, cfg, 1).with_context(|| format!("building {name}"))?;
    let gflop = 2.0 * net.macs_per_image() as f64 / 1e9;
    let params = net.num_params();
    let acts = net.activation_len();
    let gib = |elems: f64| elems * 4.0 / (1u64 << 30) as f64;
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
        "memory       {:.2} GiB at batch {batch} (weights/grads/Adam/EMA {:.2} GiB, activations and their gradients {:.2} GiB)",
        gib(5.0 * params as f64 + 2.0 * (acts * batch) as f64),
        gib(5.0 * params as f64),
        gib(2.0 * (acts * batch) as f64)
    );
    Ok(())
}

struct TrainArgs {
    preset: String,
    data: String,
    steps: u64,
    out: PathBuf,
    every: Option<u64>,
    grid: usize,
    resume: Option<PathBuf>,
}

fn train<B: Backend>(be: &mut B, args: TrainArgs, mut opts: TrainOptions) -> Result<()> {
    let scheduler = SchedulerConfig::default();
    let (config, data_spec, out, start, state) = match &args.resume {
        Some(dir) => {
            let m = checkpoint::load_model(dir)?;
            let (tensors, meta) = checkpoint::load_state(dir)?;
            opts = serde_json::from_value(meta["options"].clone())
                .context("training_state.json: options")?;
            let step = meta["step"].as_u64().context("training_state.json: step")?;
            let data = meta["data"].as_str().unwrap_or("synthetic").to_string();
            (m.config, data, dir.clone(), step, Some(tensors))
        }
        None => (
            UNetConfig::preset(&args.preset)?,
            args.data.clone(),
            args.out.clone(),
            0,
            None,
        ),
    };
    let data = Dataset::open(&data_spec, config.sample_size, opts.seed)?;
    eprintln!("data: {}", data.description);
    let mut tr = Trainer::new(be, &config, scheduler.schedule(), opts.clone())?;
    match &state {
        Some(t) => {
            let get = |n: &str| {
                t.get(n)
                    .map(|x| x.data.as_slice())
                    .with_context(|| format!("training_state.safetensors: missing {n}"))
            };
            tr.restore(
                be,
                [get("params")?, get("ema")?, get("adam_m")?, get("adam_v")?],
                start,
            )?;
            eprintln!("resuming {} at step {start}", out.display());
        }
        None => tr.init(be)?,
    }
    eprintln!(
        "model: {} parameters, batch {}, {} steps, lr {}, EMA {}",
        tr.net.num_params(),
        opts.batch,
        args.steps,
        opts.lr,
        opts.ema_decay
    );
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let csv_path = out.join("loss.csv");
    let mut losses: Vec<f32> = read_losses(&csv_path, start);
    let every = args.every.unwrap_or((args.steps / 2).max(1));
    let mut sampler_net: Option<UNet> = None;
    let mut bar = Progress::new("train", "img", args.steps.saturating_sub(start));
    let mut smooth: Option<f64> = None;
    while tr.step < args.steps {
        let images = data.batch(opts.seed, tr.step, opts.batch, opts.flip);
        let loss_t = tr.step(be, &images)?;
        let loss = be.download(loss_t)?[0];
        if !loss.is_finite() {
            bail!(
                "the loss became {loss} at step {}; the last checkpoint in {} is intact",
                tr.step,
                out.display()
            );
        }
        losses.push(loss);
        smooth = Some(smooth.map_or(f64::from(loss), |s| 0.98 * s + 0.02 * f64::from(loss)));
        bar.update(
            tr.step - start,
            opts.batch as f64,
            &format!("loss {:.4}", smooth.unwrap_or(0.0)),
        );
        if tr.step % every == 0 || tr.step == args.steps {
            save_run(be, &tr, &out, &data_spec, &scheduler, &losses)?;
            let net = match &mut sampler_net {
                Some(n) => n,
                None => sampler_net.insert(UNet::new(be, &config, args.grid.max(1))?),
            };
            be.copy(tr.ema, net.params)?;
            let grid = sample_images(
                be,
                net,
                &sample::ddpm_table(&tr.schedule, scheduler.variance_type),
                opts.seed,
                true,
                "sample",
            )?;
            let path = out.join(format!("samples_{:07}.png", tr.step));
            save_grid(
                &grid,
                args.grid.max(1),
                config.sample_size,
                config.out_channels,
                &path,
            )?;
            eprintln!("wrote {} and a checkpoint", path.display());
        }
    }
    image::loss_curve(&losses).save_png(&out.join("loss.png"))?;
    eprintln!(
        "done: model in {} (diffusers layout), loss curve {}",
        out.display(),
        out.join("loss.png").display()
    );
    Ok(())
}

fn read_losses(path: &Path, keep: u64) -> Vec<f32> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(1)?.parse().ok())
        .take(keep as usize)
        .collect()
}

fn save_run<B: Backend>(
    be: &mut B,
    tr: &Trainer,
    out: &Path,
    data: &str,
    scheduler: &SchedulerConfig,
    losses: &[f32],
) -> Result<()> {
    let [params, ema, m, v] = tr.state(be)?;
    checkpoint::save_model(out, &tr.net, &ema, scheduler)?;
    let meta = json!({ "step": tr.step, "options": tr.opts, "data": data, "format": 1 });
    checkpoint::save_state(
        out,
        &[
            ("params", &params),
            ("ema", &ema),
            ("adam_m", &m),
            ("adam_v", &v),
        ],
        &meta,
    )?;
    let mut csv = String::from("step,loss\n");
    for (i, l) in losses.iter().enumerate() {
        csv.push_str(&format!("{},{l}\n", i + 1));
    }
    checkpoint::write_atomic(&out.join("loss.csv"), csv.as_bytes())?;
    Ok(())
}

/// Samples `net.batch` images (images `first .. first + batch` of the seed) and returns them NHWC.
fn sample_images<B: Backend>(
    be: &mut B,
    net: &mut UNet,
    rows: &[crate::backend::SamplerRow],
    seed: u64,
    clip: bool,
    label: &str,
) -> Result<Vec<f32>> {
    sample_batch(be, net, rows, seed, 0, clip, label)
}

fn sample_batch<B: Backend>(
    be: &mut B,
    net: &mut UNet,
    rows: &[crate::backend::SamplerRow],
    seed: u64,
    first_image: u64,
    clip: bool,
    label: &str,
) -> Result<Vec<f32>> {
    let per_image = net.input.len / net.batch;
    let draw = Draw {
        seed,
        first_image,
        per_image,
        clip,
    };
    let mut bar = Progress::new(label, "steps", rows.len() as u64);
    let (x, eps, ts) = (net.input, net.output(), net.timesteps);
    sample::run(
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
    Ok(be.download(x)?)
}

fn save_grid(images: &[f32], n: usize, size: usize, channels: usize, path: &Path) -> Result<()> {
    let cols = (n as f64).sqrt().ceil() as usize;
    let g = image::grid(images, n, size, channels, cols);
    let factor = (128 / size).max(1);
    image::upscale(&g, factor).save_png(path)?;
    Ok(())
}

fn sample_cmd<B: Backend>(
    be: &mut B,
    dir: &Path,
    n: usize,
    batch: usize,
    variance: Option<Variance>,
    clip: bool,
    seed: u64,
    out: &Path,
    each: Option<&Path>,
    npy: Option<&Path>,
) -> Result<()> {
    if n == 0 || batch == 0 {
        bail!("-n and --batch must be at least 1");
    }
    let m = checkpoint::load_model(dir)?;
    let batch = batch.min(n);
    let mut net = UNet::new(be, &m.config, batch)?;
    let weights_path = dir.join(checkpoint::WEIGHTS);
    be.upload(net.params, &net.flat_from_state(&m.weights, &weights_path)?)?;
    let variance = variance.unwrap_or(m.scheduler.variance_type);
    let rows = sample::ddpm_table(&m.scheduler.schedule(), variance);
    eprintln!(
        "sampling {n} images with {} steps ({}, clip {clip})",
        rows.len(),
        variance.name()
    );
    let (size, c) = (m.config.sample_size, m.config.out_channels);
    let per = size * size * c;
    let mut all = Vec::with_capacity(n * per);
    let mut first = 0;
    while first < n {
        let label = format!("batch {}/{}", first / batch + 1, n.div_ceil(batch));
        let imgs = sample_batch(be, &mut net, &rows, seed, first as u64, clip, &label)?;
        let take = (n - first).min(batch);
        all.extend_from_slice(&imgs[..take * per]);
        first += take;
    }
    save_grid(&all, n, size, c, out)?;
    eprintln!("wrote {}", out.display());
    if let Some(d) = each {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        for i in 0..n {
            image::grid(&all[i * per..(i + 1) * per], 1, size, c, 1)
                .save_png(&d.join(format!("{i:05}.png")))?;
        }
    }
    if let Some(p) = npy {
        let nchw = crate::model::nhwc_to_nchw(&all, n, c, size, size);
        checkpoint::write_atomic(p, &npy_f32(&nchw, &[n, c, size, size]))?;
        eprintln!(
            "wrote {} (float32, shape ({n}, {c}, {size}, {size}))",
            p.display()
        );
    }
    Ok(())
}

/// A .npy file (format 1.0) of little-endian float32 in C order.
pub fn npy_f32(data: &[f32], shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_s}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    out
}

fn diffuse(path: &Path, ts: &[usize], size: usize, seed: u64, out: &Path) -> Result<()> {
    let sched = SchedulerConfig::default().schedule();
    if let Some(bad) = ts.iter().find(|&&t| t >= sched.len()) {
        bail!("--t {bad} is outside 0..{}", sched.len());
    }
    if size == 0 {
        bail!("--size must be positive");
    }
    let x0 = image::load_image(path, size)?;
    let stream = rng::stream(rng::Purpose::TrainNoise, u64::MAX >> 8);
    let mut strip = Vec::with_capacity(ts.len() * x0.len());
    for &t in ts {
        let (a, b) = (
            sched.sqrt_alphas_cumprod[t],
            sched.sqrt_one_minus_alphas_cumprod[t],
        );
        strip.extend(x0.iter().enumerate().map(|(i, &v)| {
            (a * f64::from(v) + b * f64::from(rng::normal(seed, stream, i as u64))) as f32
        }));
    }
    image::grid(&strip, ts.len(), size, 3, ts.len()).save_png(out)?;
    eprintln!("wrote {} (t = {:?})", out.display(), ts);
    Ok(())
}

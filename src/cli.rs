//! The command line (clap). Each subcommand parses its flags and calls into the library.

use crate::backend::cpu::CpuBackend;
use crate::model::{UNet, UNetConfig};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ddpm-cuda",
    version,
    about = "Train and sample denoising diffusion probabilistic models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parameter count, FLOPs per forward pass and memory of a model.
    Info {
        /// A preset: ddpm-cifar10 (the paper's network) or tiny.
        #[arg(long, default_value = "ddpm-cifar10")]
        preset: String,
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
        Command::Info { preset, batch } => info(&UNetConfig::preset(&preset)?, &preset, batch),
    }
}

fn info(cfg: &UNetConfig, name: &str, batch: usize) -> Result<()> {
    // Lay the model out for one image to count; memory scales from it.
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
    // Parameters, gradients, two Adam moments and the EMA; activations and their gradients per image.
    println!(
        "memory       {:.2} GiB at batch {batch} (weights/grads/Adam/EMA {:.2} GiB, activations {:.2} GiB)",
        gib(5.0 * params as f64 + 2.0 * (acts * batch) as f64),
        gib(5.0 * params as f64),
        gib(2.0 * (acts * batch) as f64)
    );
    Ok(())
}

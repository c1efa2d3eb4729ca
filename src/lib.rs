//! ddpm-cuda: denoising diffusion probabilistic models (Ho et al. 2020) trained and sampled with
//! hand-written CUDA kernels, and a CPU reference backend that runs the same pipeline anywhere.
//!
//! - [`schedule`]: noise schedules and their derived tables (f64).
//! - [`rng`]: the Philox counter-based generator shared with the kernels.
//! - [`backend`]: the `Backend` op set; [`backend::cpu`] is the reference, [`backend::cuda`] the product.
//! - [`model`]: the U-Net (config, parameters in diffusers' names, forward and backward).

// Ops mirror kernel signatures (tensors, shapes, flags), so long argument lists are the norm here.
#![allow(clippy::too_many_arguments)]

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod error;
pub mod eval;
pub mod files;
pub mod hub;
pub mod image;
pub mod interrupt;
pub mod model;
pub mod npy;
pub mod progress;
pub mod rng;
pub mod sample;
pub mod sample_files;
pub mod sass;
pub mod schedule;
pub mod train;

pub use error::{Error, Result};

//! The U-Net: configuration (diffusers' keys), parameters (diffusers' names), forward and backward.

pub mod config;
pub mod params;
pub mod unet;

pub use config::{Classes, UNetConfig};
pub use params::{Kind, NamedTensor, ParamSpec};
pub use unet::UNet;

/// NCHW (PyTorch) to NHWC (ours).
pub fn nchw_to_nhwc(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for i in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                y[(i * h * w + p) * c + ch] = x[(i * c + ch) * h * w + p];
            }
        }
    }
    y
}

/// NHWC (ours) to NCHW (PyTorch).
pub fn nhwc_to_nchw(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for i in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                y[(i * c + ch) * h * w + p] = x[(i * h * w + p) * c + ch];
            }
        }
    }
    y
}

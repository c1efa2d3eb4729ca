//! Training data: the built-in synthetic set (the default), CIFAR-10 binary files, or a folder of PNG/JPEG
//! images. Every image is NHWC RGB in [-1, 1] at the model's size.
//!
//! The order is a function of (seed, step) alone: epoch `e` is a Philox-keyed permutation and random
//! horizontal flips are drawn per (step, image). So `train --resume` continues exactly where it stopped.

use crate::error::{Error, Result};
use crate::rng::{self, Purpose};
use std::path::Path;

pub struct Dataset {
    pub size: usize,
    pub images: Vec<f32>,
    pub len: usize,
    pub description: String,
}

impl Dataset {
    pub fn image(&self, i: usize) -> &[f32] {
        let per = self.size * self.size * 3;
        &self.images[i * per..(i + 1) * per]
    }

    /// `--data synthetic` (or empty), a CIFAR-10 `.bin` file or folder of them, or a folder of images.
    pub fn open(spec: &str, size: usize, seed: u64) -> Result<Self> {
        if spec.is_empty() || spec == "synthetic" {
            return Ok(synthetic(size, 10_000, seed));
        }
        let path = Path::new(spec);
        if !path.exists() {
            return Err(Error::format(path, "no such file or directory (--data takes synthetic, CIFAR-10 .bin files, or a folder of images)"));
        }
        if path.is_file() {
            return cifar(&[path.to_path_buf()], size);
        }
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        entries.sort();
        let bins: Vec<_> = entries
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "bin"))
            .cloned()
            .collect();
        if !bins.is_empty() {
            return cifar(&bins, size);
        }
        let pics: Vec<_> = entries
            .iter()
            .filter(|p| {
                p.extension().is_some_and(|e| {
                    matches!(
                        e.to_string_lossy().to_lowercase().as_str(),
                        "png" | "jpg" | "jpeg"
                    )
                })
            })
            .cloned()
            .collect();
        if pics.is_empty() {
            return Err(Error::format(
                path,
                "no CIFAR-10 .bin files and no .png/.jpg images in this folder",
            ));
        }
        let mut images = Vec::with_capacity(pics.len() * size * size * 3);
        for p in &pics {
            images.extend(crate::image::load_image(p, size)?);
        }
        Ok(Self {
            size,
            len: pics.len(),
            images,
            description: format!("{} images from {}", pics.len(), path.display()),
        })
    }

    /// Images of training step `step`, `batch` of them, flipped at random when `flip` (NHWC, back to back).
    pub fn batch(&self, seed: u64, step: u64, batch: usize, flip: bool) -> Vec<f32> {
        let per = self.size * self.size * 3;
        let mut out = Vec::with_capacity(batch * per);
        let mut cached: Option<(u64, Vec<u32>)> = None;
        for j in 0..batch {
            let global = step * batch as u64 + j as u64;
            let (epoch, pos) = (
                global / self.len as u64,
                (global % self.len as u64) as usize,
            );
            if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
                cached = Some((epoch, permutation(self.len, seed, epoch)));
            }
            let idx = cached.as_ref().expect("set above").1[pos] as usize;
            let img = self.image(idx);
            let mirror = flip
                && rng::uniform(seed, rng::stream(Purpose::Data, (1 << 40) | step), j as u64) < 0.5;
            if mirror {
                for y in 0..self.size {
                    for x in (0..self.size).rev() {
                        out.extend_from_slice(
                            &img[(y * self.size + x) * 3..(y * self.size + x + 1) * 3],
                        );
                    }
                }
            } else {
                out.extend_from_slice(img);
            }
        }
        out
    }
}

/// Fisher-Yates with Philox draws for (seed, epoch).
fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    let stream = rng::stream(Purpose::Data, epoch);
    for i in (1..n).rev() {
        let j = rng::below(seed, stream, i as u64, i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// CIFAR-10 binary format: per image 1 label byte, then 1024 red, 1024 green, 1024 blue bytes (32x32).
fn cifar(files: &[std::path::PathBuf], size: usize) -> Result<Dataset> {
    const RECORD: usize = 1 + 3 * 1024;
    let mut images = Vec::new();
    let mut len = 0;
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| Error::io(f, e))?;
        if bytes.is_empty() || bytes.len() % RECORD != 0 {
            return Err(Error::format(
                f,
                format!(
                    "{} bytes is not a whole number of CIFAR-10 records of {RECORD} bytes",
                    bytes.len()
                ),
            ));
        }
        for rec in bytes.chunks(RECORD) {
            let px = &rec[1..];
            let mut img = vec![0.0f32; 32 * 32 * 3];
            for p in 0..1024 {
                for c in 0..3 {
                    img[p * 3 + c] = f32::from(px[c * 1024 + p]) / 127.5 - 1.0;
                }
            }
            images.extend(if size == 32 {
                img
            } else {
                resize_nearest(&img, 32, size)
            });
            len += 1;
        }
    }
    Ok(Dataset {
        size,
        len,
        images,
        description: format!("CIFAR-10, {len} images from {} file(s)", files.len()),
    })
}

fn resize_nearest(img: &[f32], from: usize, to: usize) -> Vec<f32> {
    let mut out = vec![0.0; to * to * 3];
    for y in 0..to {
        for x in 0..to {
            let (sy, sx) = (y * from / to, x * from / to);
            out[(y * to + x) * 3..(y * to + x + 1) * 3]
                .copy_from_slice(&img[(sy * from + sx) * 3..(sy * from + sx + 1) * 3]);
        }
    }
    out
}

/// The built-in data: one bright disk or square on a two-colour vertical gradient, position, size and
/// colours drawn per image from Philox. A model that has learned it draws clean single shapes on smooth
/// backgrounds; an untrained one draws noise.
pub fn synthetic(size: usize, count: usize, seed: u64) -> Dataset {
    const PALETTE: [[f32; 3]; 6] = [
        [1.0, 0.2, 0.2],
        [0.2, 0.9, 0.3],
        [0.25, 0.45, 1.0],
        [1.0, 0.85, 0.1],
        [0.9, 0.3, 0.95],
        [0.1, 0.9, 0.9],
    ];
    const BACK: [[f32; 3]; 4] = [
        [0.05, 0.05, 0.15],
        [0.15, 0.05, 0.05],
        [0.05, 0.12, 0.05],
        [0.12, 0.12, 0.12],
    ];
    let per = size * size * 3;
    let mut images = vec![0.0f32; count * per];
    let s = size as f32;
    for (i, img) in images.chunks_mut(per).enumerate() {
        let stream = rng::stream(Purpose::Data, (2 << 40) | i as u64);
        let u = |k: u64| rng::uniform(seed, stream, k);
        let top = BACK[(u(0) * 4.0) as usize % 4];
        let bottom = BACK[(u(1) * 4.0) as usize % 4];
        let colour = PALETTE[(u(2) * 6.0) as usize % 6];
        let square = u(3) < 0.5;
        let r = s * (0.15 + 0.15 * u(4));
        let (cx, cy) = (r + (s - 2.0 * r) * u(5), r + (s - 2.0 * r) * u(6));
        for y in 0..size {
            let f = y as f32 / (s - 1.0);
            for x in 0..size {
                let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                let inside = if square {
                    dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85
                } else {
                    dx * dx + dy * dy <= r * r
                };
                for c in 0..3 {
                    let v = if inside {
                        colour[c]
                    } else {
                        top[c] * (1.0 - f) + bottom[c] * f
                    };
                    img[(y * size + x) * 3 + c] = 2.0 * v - 1.0;
                }
            }
        }
    }
    Dataset {
        size,
        len: count,
        images,
        description: format!("synthetic shapes, {count} images (seed {seed})"),
    }
}

//! Training data: the built-in synthetic set (the default), CIFAR-10 binary files, or a folder of PNG/JPEG
//! images. Every image is NHWC RGB in [-1, 1] at the model's size. Labels, for class-conditional
//! training, come from CIFAR-10's label bytes (named by `batches.meta.txt` beside the files), from an
//! image folder's subfolders (one per class, ImageFolder's convention), or from the synthetic set's shape
//! and colour.
//!
//! The order is a function of (seed, step) alone: epoch `e` is a Philox-keyed permutation and random
//! horizontal flips are drawn per (step, image). So `train --resume` continues exactly where it stopped.

use crate::error::{Error, Result};
use crate::rng::{self, Purpose};
use std::path::{Path, PathBuf};

pub struct Dataset {
    pub size: usize,
    pub images: Vec<f32>,
    pub len: usize,
    pub description: String,
    /// One label per image where the data has classes.
    pub labels: Option<Vec<u32>>,
    /// The classes' names, by label.
    pub class_names: Vec<String>,
}

/// The synthetic set's classes: label `2 * colour + shape`.
const SYNTHETIC_COLOURS: [&str; 6] = ["red", "green", "blue", "yellow", "magenta", "cyan"];
const SYNTHETIC_SHAPES: [&str; 2] = ["disk", "square"];

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
        let mut entries = files_in(path)?;
        let subfolders: Vec<_> = entries.iter().filter(|p| p.is_dir()).cloned().collect();
        entries.retain(|p| p.is_file());
        let bins: Vec<_> = entries
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "bin"))
            .cloned()
            .collect();
        if !bins.is_empty() {
            return cifar(&bins, size);
        }
        let pics = pictures(&entries);
        if pics.is_empty() {
            return image_folder(path, &subfolders, size);
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
            labels: None,
            class_names: Vec::new(),
        })
    }

    /// The labels, checked against a class-conditional model's classes: an error when the data has
    /// none or another number of classes.
    pub fn labels_for(&self, classes: &crate::model::Classes) -> Result<&[u32]> {
        match &self.labels {
            None => Err(Error::Invalid(format!(
                "the model is class-conditional ({} classes) but the data ({}) has no labels",
                classes.real, self.description
            ))),
            Some(_) if self.classes() != classes.real => Err(Error::Invalid(format!(
                "the model has {} classes but the data ({}) has {}",
                classes.real,
                self.description,
                self.classes()
            ))),
            Some(l) => Ok(l),
        }
    }

    /// How many classes the labels have (0 without labels).
    pub fn classes(&self) -> usize {
        match &self.labels {
            Some(_) => self.class_names.len(),
            None => 0,
        }
    }

    /// The labels of training step `step`'s images (the images [`Dataset::batch`] gives), each replaced
    /// by `null` with probability `drop` (Philox: `uniform(seed, stream(CondDrop, 0), global index)`).
    pub fn batch_labels(
        &self,
        seed: u64,
        step: u64,
        batch: usize,
        drop: f32,
        null: usize,
    ) -> Option<Vec<usize>> {
        self.labels_of(&self.order(seed, step, batch), seed, step, drop, null)
    }

    /// [`Dataset::batch`] and [`Dataset::batch_labels`] of one step, its order drawn once.
    pub fn labelled_batch(
        &self,
        seed: u64,
        step: u64,
        batch: usize,
        flip: bool,
        drop: f32,
        null: usize,
    ) -> (Vec<f32>, Option<Vec<usize>>) {
        let order = self.order(seed, step, batch);
        let labels = self.labels_of(&order, seed, step, drop, null);
        (self.images_of(&order, seed, step, flip), labels)
    }

    /// The labels of the images `order` of step `step`, with label dropout.
    fn labels_of(
        &self,
        order: &[usize],
        seed: u64,
        step: u64,
        drop: f32,
        null: usize,
    ) -> Option<Vec<usize>> {
        let labels = self.labels.as_ref()?;
        let stream = rng::stream(Purpose::CondDrop, 0);
        let first = step * order.len() as u64;
        Some(
            order
                .iter()
                .enumerate()
                .map(|(j, &idx)| {
                    if drop > 0.0 && rng::uniform(seed, stream, first + j as u64) < drop {
                        null
                    } else {
                        labels[idx] as usize
                    }
                })
                .collect(),
        )
    }

    /// The images of training step `step`: epoch-wise Philox permutations of the set.
    fn order(&self, seed: u64, step: u64, batch: usize) -> Vec<usize> {
        let mut cached: Option<(u64, Vec<u32>)> = None;
        (0..batch)
            .map(|j| {
                let global = step * batch as u64 + j as u64;
                let (epoch, pos) = (
                    global / self.len as u64,
                    (global % self.len as u64) as usize,
                );
                if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    cached = Some((epoch, permutation(self.len, seed, epoch)));
                }
                cached.as_ref().expect("set above").1[pos] as usize
            })
            .collect()
    }

    /// Images of training step `step`, `batch` of them, flipped at random when `flip` (NHWC, back to back).
    pub fn batch(&self, seed: u64, step: u64, batch: usize, flip: bool) -> Vec<f32> {
        self.images_of(&self.order(seed, step, batch), seed, step, flip)
    }

    /// The images `order` of step `step`, each flipped at random when `flip`.
    fn images_of(&self, order: &[usize], seed: u64, step: u64, flip: bool) -> Vec<f32> {
        let per = self.size * self.size * 3;
        let mut out = Vec::with_capacity(order.len() * per);
        for (j, &idx) in order.iter().enumerate() {
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

/// The entries of a folder, sorted.
fn files_in(path: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<_> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    Ok(entries)
}

/// The PNG and JPEG files among `entries`.
fn pictures(entries: &[PathBuf]) -> Vec<PathBuf> {
    entries
        .iter()
        .filter(|p| {
            p.is_file()
                && p.extension().is_some_and(|e| {
                    matches!(
                        e.to_string_lossy().to_lowercase().as_str(),
                        "png" | "jpg" | "jpeg"
                    )
                })
        })
        .cloned()
        .collect()
}

/// A folder of one subfolder of images per class (ImageFolder's convention): labels by subfolder name,
/// in sorted order. Subfolders without images are skipped.
fn image_folder(path: &Path, subfolders: &[PathBuf], size: usize) -> Result<Dataset> {
    let (mut images, mut labels, mut names) = (Vec::new(), Vec::new(), Vec::new());
    for dir in subfolders {
        let pics = pictures(&files_in(dir)?);
        if pics.is_empty() {
            continue;
        }
        for p in &pics {
            images.extend(crate::image::load_image(p, size)?);
            labels.push(names.len() as u32);
        }
        names.push(
            dir.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        );
    }
    if labels.is_empty() {
        return Err(Error::format(
            path,
            "no CIFAR-10 .bin files, no .png/.jpg images and no subfolders of images (one per class) in this folder",
        ));
    }
    Ok(Dataset {
        size,
        len: labels.len(),
        description: format!(
            "{} images in {} classes from {}",
            labels.len(),
            names.len(),
            path.display()
        ),
        images,
        labels: Some(labels),
        class_names: names,
    })
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
    let mut labels = Vec::new();
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
            labels.push(u32::from(rec[0]));
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
    let classes = labels.iter().max().map_or(0, |&m| m as usize + 1).max(10);
    // batches.meta.txt (one name a line) beside the files, as the CIFAR-10 archive has it.
    let meta = files[0].with_file_name("batches.meta.txt");
    let named: Vec<String> = std::fs::read_to_string(&meta)
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let class_names = if named.len() >= classes {
        named[..classes].to_vec()
    } else {
        (0..classes).map(|i| i.to_string()).collect()
    };
    Ok(Dataset {
        size,
        len,
        images,
        description: format!("CIFAR-10, {len} images from {} file(s)", files.len()),
        labels: Some(labels),
        class_names,
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

/// The shapes' colours, by the synthetic classes' colour index.
const PALETTE: [[f32; 3]; 6] = [
    [1.0, 0.2, 0.2],
    [0.2, 0.9, 0.3],
    [0.25, 0.45, 1.0],
    [1.0, 0.85, 0.1],
    [0.9, 0.3, 0.95],
    [0.1, 0.9, 0.9],
];

/// The built-in data: one bright disk or square on a two-colour vertical gradient, position, size and
/// colours drawn per image from Philox. A model that has learned it draws clean single shapes on smooth
/// backgrounds; an untrained one draws noise. Its 12 classes are the shape's colour and kind.
pub fn synthetic(size: usize, count: usize, seed: u64) -> Dataset {
    const BACK: [[f32; 3]; 4] = [
        [0.05, 0.05, 0.15],
        [0.15, 0.05, 0.05],
        [0.05, 0.12, 0.05],
        [0.12, 0.12, 0.12],
    ];
    let per = size * size * 3;
    let mut images = vec![0.0f32; count * per];
    let mut labels = vec![0u32; count];
    let s = size as f32;
    for ((i, img), label) in images.chunks_mut(per).enumerate().zip(&mut labels) {
        let stream = rng::stream(Purpose::Data, (2 << 40) | i as u64);
        let u = |k: u64| rng::uniform(seed, stream, k);
        let top = BACK[(u(0) * 4.0) as usize % 4];
        let bottom = BACK[(u(1) * 4.0) as usize % 4];
        let hue = (u(2) * 6.0) as usize % 6;
        let colour = PALETTE[hue];
        let square = u(3) < 0.5;
        *label = (2 * hue + usize::from(square)) as u32;
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
        labels: Some(labels),
        class_names: synthetic_class_names(),
    }
}

/// The synthetic set's 12 classes, `colour-shape` (label `2 * colour + shape`): `red-disk`,
/// `red-square`, `green-disk`, ...
pub fn synthetic_class_names() -> Vec<String> {
    SYNTHETIC_COLOURS
        .iter()
        .flat_map(|c| SYNTHETIC_SHAPES.iter().map(move |s| format!("{c}-{s}")))
        .collect()
}

/// The colour of a synthetic-style image's shape (NHWC, values in [-1, 1]), as an index into the
/// synthetic palette (label `l` has colour `l / 2`), judged without any model: the mean of the bright
/// pixels (some channel above 0.6 in [0, 1]; every background colour stays under 0.15 and every shape
/// colour reaches 0.9) taken to the nearest palette colour. `None` when no pixel is bright: no shape.
pub fn synthetic_colour(image: &[f32]) -> Option<usize> {
    let (mut sum, mut count) = ([0.0f32; 3], 0usize);
    for px in image.chunks_exact(3) {
        let rgb = [0, 1, 2].map(|c| (px[c] + 1.0) / 2.0);
        if rgb.iter().any(|&v| v > 0.6) {
            (0..3).for_each(|c| sum[c] += rgb[c]);
            count += 1;
        }
    }
    if count == 0 {
        return None;
    }
    let mean = sum.map(|v| v / count as f32);
    let distance = |p: &[f32; 3]| (0..3).map(|c| (p[c] - mean[c]).powi(2)).sum::<f32>();
    (0..PALETTE.len()).min_by(|&a, &b| distance(&PALETTE[a]).total_cmp(&distance(&PALETTE[b])))
}

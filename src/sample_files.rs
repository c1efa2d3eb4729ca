//! What `ddpm-cuda sample` writes, batch by batch, so that sampling at FID scale (50,000 images) holds only
//! a batch in memory, and an interrupted run continues where it stopped.
//!
//! - `--out-npy FILE` grows on disk: after every batch it is a complete float32 `.npy` of the images so
//!   far ([`npy::Growing`]).
//! - `--each DIR` gets one PNG per image as its batch completes.
//! - The grid PNG (`--out`) shows the first [`GRID_MAX`] images at most; it is written as soon as they
//!   are complete (and, when a run stops before that, with the images it has).
//! - Beside the grid, `OUT.partial.json` records the run (every option that decides an image, and how
//!   many images are written) after every batch, and `OUT.partial.npy` the grid's images until the grid
//!   is written. Run the same command again and it continues from the recorded image; a command whose
//!   options differ is refused, naming them, and touches nothing. Both files go when the run completes.
//!
//! Image i depends only on the seed and i (its x_T and every draw of the sampler are keyed by the image's
//! number), so a run continued with another `--batch` writes the same images.

use crate::error::{Error, Result};
use crate::files;
use crate::image;
use crate::model::{nchw_to_nhwc, nhwc_to_nchw, UNetConfig};
use crate::npy;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The most images the grid PNG shows: the first 64, as an 8 x 8 grid (the npy and `--each` hold all).
pub const GRID_MAX: usize = 64;

/// Everything that decides which images a run writes, and where. Two runs with equal jobs write the same
/// files, whatever their batch size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleJob {
    /// The model directory, as an absolute path.
    pub model: String,
    /// A fingerprint of its weights ([`fingerprint`]): a model trained further in place is another model.
    pub weights: String,
    pub n: usize,
    pub seed: u64,
    /// The sampler, its steps, eta, variance and clipping, as the run prints them.
    pub sampler: String,
    pub init_noise: Option<String>,
    pub out_npy: Option<String>,
    pub each: Option<String>,
    /// (channels, height, width) of an image.
    pub image: [usize; 3],
}

impl SampleJob {
    /// The fields where `self` and `other` differ, as `name: this / other`.
    fn differences(&self, other: &SampleJob) -> Vec<String> {
        let mut d = Vec::new();
        let mut cmp = |name: &str, a: String, b: String| {
            if a != b {
                d.push(format!("{name} {a} there, {b} here"));
            }
        };
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        cmp("--model", self.model.clone(), other.model.clone());
        cmp("the weights", self.weights.clone(), other.weights.clone());
        cmp("-n", self.n.to_string(), other.n.to_string());
        cmp("--seed", self.seed.to_string(), other.seed.to_string());
        cmp("the sampler", self.sampler.clone(), other.sampler.clone());
        cmp(
            "--init-noise",
            opt(&self.init_noise),
            opt(&other.init_noise),
        );
        cmp("--out-npy", opt(&self.out_npy), opt(&other.out_npy));
        cmp("--each", opt(&self.each), opt(&other.each));
        cmp(
            "the image shape",
            format!("{:?}", self.image),
            format!("{:?}", other.image),
        );
        d
    }
}

/// The record of a run beside its grid.
#[derive(Serialize, Deserialize)]
struct Record {
    job: SampleJob,
    /// Images `0 .. done` are written to every output.
    done: usize,
}

/// FNV-1a (64 bits) over the tensors' names, shapes and values in name order: equal for equal weights,
/// and in practice different for any other (a checksum, not a security measure).
pub fn fingerprint(
    weights: &std::collections::HashMap<String, crate::model::NamedTensor>,
) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    for name in names {
        let t = &weights[name];
        eat(name.as_bytes());
        for &d in &t.shape {
            eat(&(d as u64).to_le_bytes());
        }
        for v in &t.data {
            eat(&v.to_bits().to_le_bytes());
        }
    }
    format!("fnv1a64:{h:016x}")
}

/// `path` as an absolute path, for the record (a relative one is taken from the working directory).
pub fn absolute(path: &Path) -> String {
    std::fs::canonicalize(path)
        .or_else(|_| std::env::current_dir().map(|d| d.join(path)))
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// A path with `suffix` appended to its file name.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The outputs of one sampling run.
pub struct Outputs {
    job: SampleJob,
    grid_path: PathBuf,
    record_path: PathBuf,
    grid_npy_path: PathBuf,
    config: UNetConfig,
    npy: Option<npy::Growing>,
    /// The grid's images so far (NHWC), and their file, until the grid is written.
    grid: Vec<f32>,
    grid_npy: Option<npy::Growing>,
    grid_written: bool,
    /// One grid row per class, image `i` in row `i % k`.
    class_rows: Option<usize>,
    done: usize,
}

impl Outputs {
    /// The outputs of `job`, its grid at `grid_path`: continuing the run recorded beside the grid when
    /// it is the same job (what it wrote is checked), starting fresh when none is recorded; an error,
    /// naming the record and the options that differ, when another job is. With `class_rows: Some(k)`
    /// the grid has one row per class: image `i` has class `i % k`.
    pub fn open(
        job: SampleJob,
        grid_path: &Path,
        config: &UNetConfig,
        class_rows: Option<usize>,
    ) -> Result<Self> {
        let record_path = beside(grid_path, ".partial.json");
        let grid_npy_path = beside(grid_path, ".partial.npy");
        let mut out = Self {
            grid_path: grid_path.to_path_buf(),
            record_path,
            grid_npy_path,
            config: config.clone(),
            npy: None,
            grid: Vec::new(),
            grid_npy: None,
            grid_written: false,
            class_rows,
            done: 0,
            job,
        };
        if !out.record_path.exists() {
            return Ok(out);
        }
        let text = std::fs::read_to_string(&out.record_path)
            .map_err(|e| Error::io(&out.record_path, e))?;
        let record: Record = serde_json::from_str(&text).map_err(|e| {
            Error::format(
                &out.record_path,
                format!(
                    "not a record of an interrupted `sample` run ({e}); delete it to start over"
                ),
            )
        })?;
        let differ = record.job.differences(&out.job);
        if !differ.is_empty() {
            return Err(Error::Invalid(format!(
                "{} records an interrupted run with other options ({}): run it again as it was to \
                 continue it, or delete {} (and {}) to start over",
                out.record_path.display(),
                differ.join("; "),
                out.record_path.display(),
                out.grid_npy_path.display()
            )));
        }
        let done = record.done.min(out.job.n);
        let item = out.item();
        let cannot = |e: Error| {
            Error::Invalid(format!(
                "continuing the run recorded in {}: {e}; delete the record to start over",
                out.record_path.display()
            ))
        };
        if let Some(p) = &out.job.out_npy {
            out.npy = Some(npy::Growing::open(Path::new(p), &item, done).map_err(cannot)?);
        }
        let in_grid = done.min(out.grid_len());
        if in_grid < out.grid_len() {
            let g = npy::Growing::open(&out.grid_npy_path, &item, in_grid).map_err(cannot)?;
            let (_, data) = npy::read(&out.grid_npy_path).map_err(cannot)?;
            let [c, h, w] = out.job.image;
            out.grid = nchw_to_nhwc(&data[..in_grid * out.per()], in_grid, c, h, w);
            out.grid_npy = Some(g);
        } else {
            out.grid_written = true;
        }
        out.done = done;
        Ok(out)
    }

    /// Values of one image.
    fn per(&self) -> usize {
        self.job.image.iter().product()
    }

    /// The shape of one image in the npy files: (C, H, W).
    fn item(&self) -> Vec<usize> {
        self.job.image.to_vec()
    }

    /// Images the grid shows: the first [`GRID_MAX`], or by class as many whole columns (one image of
    /// each class) as fit in that.
    pub fn grid_len(&self) -> usize {
        let most = match self.class_rows {
            Some(k) if (1..=GRID_MAX).contains(&k) => GRID_MAX / k * k,
            _ => GRID_MAX,
        };
        self.job.n.min(most)
    }

    /// Images already written (a continued run starts after them).
    pub fn done(&self) -> usize {
        self.done
    }

    /// Refuses a run whose `.npy` (at `shown`, as the user named it) cannot fit on its disk, before
    /// anything is sampled.
    pub fn check_disk(&self, shown: Option<&Path>) -> Result<()> {
        let (Some(p), Some(shown)) = (&self.job.out_npy, shown) else {
            return Ok(());
        };
        let path = Path::new(p);
        let p = shown.display();
        let left = (self.job.n - self.done) as u64;
        let need = left.saturating_mul(4 * self.per() as u64);
        if let Some(free) = files::free_bytes(path) {
            if need > free {
                let gb = |b: u64| b as f64 / 1e9;
                return Err(Error::Invalid(format!(
                    "--out-npy {p}: {left} more images of {:?} need {:.2} GB, and its file system has {:.2} \
                     GB free; sample fewer (-n) or write elsewhere",
                    self.job.image,
                    gb(need),
                    gb(free)
                )));
            }
        }
        Ok(())
    }

    /// Writes images `first ..` (NHWC, whole images; `first` must be [`Self::done`]) to every output, then
    /// the record that says they are written.
    pub fn add(&mut self, first: usize, nhwc: &[f32]) -> Result<()> {
        let per = self.per();
        if first != self.done || !nhwc.len().is_multiple_of(per) {
            return Err(Error::Invalid(format!(
                "sample outputs: images from {first} ({} values) after {} written",
                nhwc.len(),
                self.done
            )));
        }
        let count = nhwc.len() / per;
        let [c, h, w] = self.job.image;
        let nchw = nhwc_to_nchw(nhwc, count, c, h, w);
        if let Some(p) = &self.job.out_npy {
            match &mut self.npy {
                Some(g) => g.append(&nchw)?,
                None => self.npy = Some(npy::Growing::create(Path::new(p), &self.item(), &nchw)?),
            }
        }
        if let Some(d) = &self.job.each {
            for i in 0..count {
                image::grid(&nhwc[i * per..(i + 1) * per], 1, h, c, 1)
                    .save_png(&Path::new(d).join(format!("{:05}.png", first + i)))?;
            }
        }
        let want = self.grid_len();
        if !self.grid_written {
            let take = (want - first.min(want)).min(count);
            if take > 0 {
                let part = &nhwc[..take * per];
                self.grid.extend_from_slice(part);
                let part_nchw = &nchw[..take * per];
                match &mut self.grid_npy {
                    Some(g) => g.append(part_nchw)?,
                    None => {
                        self.grid_npy = Some(npy::Growing::create(
                            &self.grid_npy_path,
                            &self.item(),
                            part_nchw,
                        )?)
                    }
                }
            }
        }
        self.done += count;
        if !self.grid_written && self.grid.len() == want * per {
            self.save_grid(want)?;
            self.grid_written = true;
            self.grid = Vec::new();
        }
        let record = Record {
            job: self.job.clone(),
            done: self.done,
        };
        let text = serde_json::to_string_pretty(&record)
            .map_err(|e| Error::Invalid(format!("writing the sampling record: {e}")))?;
        files::write_atomic(&self.record_path, text.as_bytes())?;
        if self.grid_written {
            self.grid_npy = None;
            remove_if_there(&self.grid_npy_path)?;
        }
        Ok(())
    }

    /// The grid of the first `k` images: one row per class where the images cycle through the classes.
    fn save_grid(&self, k: usize) -> Result<()> {
        match self.class_rows {
            Some(classes) => {
                image::save_class_grid(&self.grid, k, classes, &self.config, &self.grid_path)
            }
            None => image::save_grid(&self.grid, k, &self.config, &self.grid_path),
        }
    }

    /// Ends a run that wrote every image: the record goes.
    pub fn finish(self) -> Result<()> {
        if self.done != self.job.n {
            return Err(Error::Invalid(format!(
                "sample outputs: {} of {} images written",
                self.done, self.job.n
            )));
        }
        remove_if_there(&self.grid_npy_path)?;
        remove_if_there(&self.record_path)
    }

    /// Ends a run that stopped early: a grid of the images it has where the full grid is not written
    /// yet; the record stays, so the same command continues. Whether any image is written.
    pub fn stop(self) -> Result<bool> {
        if !self.grid_written && self.done > 0 {
            let k = self.grid.len() / self.per();
            self.save_grid(k)?;
        }
        Ok(self.done > 0)
    }

    /// Where the record is.
    pub fn record_path(&self) -> &Path {
        &self.record_path
    }
}

fn remove_if_there(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

/// `--init-noise`: x_T for each image from a float32 (N, C, H, W) `.npy`, read a batch at a time.
pub struct InitNoise {
    reader: npy::Reader,
    path: PathBuf,
}

impl InitNoise {
    /// Opens the array and checks it: its shape (N, C, H, W) for images of (c, size, size), N equal to
    /// `n` where given, and every value finite (the first that is not is named). Returns it and N.
    pub fn open(path: &Path, n: Option<usize>, c: usize, size: usize) -> Result<(Self, usize)> {
        let mut reader = npy::Reader::open(path)?;
        let shape = reader.shape.clone();
        let fits = shape.len() == 4 && shape[1..] == [c, size, size] && shape[0] > 0;
        if !fits || n.is_some_and(|n| n != shape[0]) {
            return Err(Error::Invalid(format!(
                "--init-noise {}: shape {shape:?} does not fit: expected (N, {c}, {size}, {size}){}",
                path.display(),
                n.map_or(String::new(), |n| format!(" with N = -n = {n}"))
            )));
        }
        if let Some((i, v)) = reader.first_non_finite(1 << 20)? {
            let (plane, hw) = (size * size, c * size * size);
            return Err(Error::Invalid(format!(
                "--init-noise {}: value {i} (image {}, channel {}, row {}, column {}) is {v}; x_T must be \
                 finite",
                path.display(),
                i / hw,
                i % hw / plane,
                i % plane / size,
                i % size
            )));
        }
        let count = shape[0];
        let path = path.to_path_buf();
        Ok((Self { reader, path }, count))
    }

    /// x_T of images `first .. first + count`, NHWC.
    pub fn batch(&mut self, first: usize, count: usize) -> Result<Vec<f32>> {
        let s = &self.reader.shape;
        let (c, h, w) = (s[1], s[2], s[3]);
        let per = c * h * w;
        let nchw = self.reader.read(first * per, count * per)?;
        Ok(crate::model::nchw_to_nhwc(&nchw, count, c, h, w))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

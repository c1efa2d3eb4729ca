//! Model directories in diffusers layout, and the training state beside them. Every file is written to a
//! temporary name, synced and renamed, so a crash never leaves a half-written file; the training state is
//! one file (tensors and metadata together), so `--resume` always sees a consistent step.
//!
//! ```text
//! DIR/config.json                           UNet2DModel config
//! DIR/diffusion_pytorch_model.safetensors   EMA weights, PyTorch names and layouts
//! DIR/scheduler_config.json                 DDPMScheduler config
//! DIR/training_state.safetensors            raw weights, EMA, Adam moments (flat, our layout), and in its
//!                                           metadata the step, the options and the data spec
//! ```
//!
//! Files are written through [`crate::files::write_atomic`].

use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::model::params::{
    parse_safetensors, write_safetensors_as, write_safetensors_bytes, StoredDtype,
};
use crate::model::{NamedTensor, UNet, UNetConfig};
use crate::sample::Variance;
use crate::schedule::BetaSchedule;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
pub const SCHEDULER: &str = "scheduler_config.json";
pub const STATE: &str = "training_state.safetensors";
/// The version of the training-state layout; a file of another version is refused, not misread.
pub const STATE_FORMAT: u64 = 2;

/// Training options (saved with the training state, so a resumed run uses the same).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub batch: usize,
    pub lr: f32,
    pub warmup: u64,
    pub max_grad_norm: f32,
    pub ema_decay: f32,
    pub flip: bool,
    /// A class-conditional model's label dropout: each image's label becomes the null class with this
    /// probability (`uniform(seed, stream(CondDrop, 0), global image index) < p`), so the model also
    /// learns the unconditional prediction classifier-free guidance needs.
    #[serde(default)]
    pub cond_drop: f32,
    pub seed: u64,
}

impl TrainOptions {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.batch == 0 {
            return bad("--batch must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr {} must be a positive number", self.lr));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return bad(format!("--ema-decay {} must be in [0, 1)", self.ema_decay));
        }
        if !(0.0..1.0).contains(&self.cond_drop) {
            return bad(format!("--cond-drop {} must be in [0, 1)", self.cond_drop));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(format!(
                "--max-grad-norm {} must be 0 (off) or positive",
                self.max_grad_norm
            ));
        }
        Ok(())
    }
}

/// The DDPMScheduler settings saved with a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub variance_type: Variance,
    pub clip_sample: bool,
    pub prediction_type: String,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            variance_type: Variance::FixedLarge,
            clip_sample: true,
            prediction_type: "epsilon".into(),
        }
    }
}

/// The most diffusion steps a scheduler config may ask for (the tables are built on the host).
const MAX_TIMESTEPS: u64 = 100_000;

/// Keys of DDPMScheduler / DDIMScheduler configs that this engine accepts only at their default (or
/// neutral) value, and that are otherwise ignored.
fn scheduler_fixed_keys() -> Vec<(&'static str, Value)> {
    vec![
        ("trained_betas", Value::Null),
        ("thresholding", json!(false)),
        ("clip_sample_range", json!(1.0)),
        ("rescale_betas_zero_snr", json!(false)),
        ("steps_offset", json!(0)),
        ("timestep_spacing", json!("leading")),
        ("set_alpha_to_one", json!(true)),
    ]
}

/// Keys that only matter when a feature above is on.
const SCHEDULER_IGNORED: &[&str] = &["dynamic_thresholding_ratio", "sample_max_value"];

impl SchedulerConfig {
    pub fn schedule(&self) -> crate::schedule::Schedule {
        crate::schedule::Schedule::new(
            self.beta_schedule,
            self.num_train_timesteps,
            self.beta_start,
            self.beta_end,
        )
    }

    /// Parses a diffusers scheduler config. Every key is checked: a wrong type, an unsupported value or an
    /// unknown key is an error that names it.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let Value::Object(mut map) = v else {
            return Err(Error::format(path, "expected a JSON object"));
        };
        map.retain(|k, _| !k.starts_with('_'));
        let bad = |key: &str, v: &Value, want: &str| {
            Error::format(path, format!("{key} = {v}: expected {want}"))
        };
        let mut cfg = Self::default();
        if let Some(v) = map.remove("variance_type") {
            cfg.variance_type = v
                .as_str()
                .ok_or_else(|| bad("variance_type", &v, "a string"))?
                .parse()
                .map_err(|e: Error| Error::format(path, e.to_string()))?;
        }
        for (key, want) in scheduler_fixed_keys() {
            if let Some(v) = map.remove(key) {
                let same = match (&v, &want) {
                    (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
                    _ => v == want,
                };
                if !same {
                    return Err(Error::format(
                        path,
                        format!("{key} = {v} is not supported (this engine implements {want})"),
                    ));
                }
            }
        }
        for key in SCHEDULER_IGNORED {
            map.remove(*key);
        }
        let mut take = |key: &str| map.remove(key);
        if let Some(v) = take("num_train_timesteps") {
            let n = v
                .as_u64()
                .filter(|n| (2..=MAX_TIMESTEPS).contains(n))
                .ok_or_else(|| bad("num_train_timesteps", &v, "an integer in 2..=100000"))?;
            cfg.num_train_timesteps = n as usize;
        }
        for (key, slot) in [
            ("beta_start", &mut cfg.beta_start),
            ("beta_end", &mut cfg.beta_end),
        ] {
            if let Some(v) = take(key) {
                *slot = v
                    .as_f64()
                    .filter(|b| *b > 0.0 && *b < 1.0)
                    .ok_or_else(|| bad(key, &v, "a number in (0, 1)"))?;
            }
        }
        if let Some(v) = take("beta_schedule") {
            cfg.beta_schedule = v
                .as_str()
                .ok_or_else(|| bad("beta_schedule", &v, "a string"))?
                .parse()
                .map_err(|e: String| Error::format(path, e))?;
        }
        if let Some(v) = take("clip_sample") {
            cfg.clip_sample = v
                .as_bool()
                .ok_or_else(|| bad("clip_sample", &v, "true or false"))?;
        }
        if let Some(v) = take("prediction_type") {
            if v != json!("epsilon") {
                return Err(Error::format(
                    path,
                    format!("prediction_type = {v} is not supported (only \"epsilon\")"),
                ));
            }
        }
        if let Some(key) = map.keys().next() {
            return Err(Error::format(
                path,
                format!("unknown scheduler config key {key:?}"),
            ));
        }
        Ok(cfg)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "_class_name": "DDPMScheduler",
            "_diffusers_version": "0.30.0",
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "variance_type": self.variance_type.name(),
            "clip_sample": self.clip_sample,
            "prediction_type": self.prediction_type,
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// A model read from a directory: config, scheduler and weights (PyTorch layout, by name). Accepts the
/// pipeline layout too (`unet/` and `scheduler/` subfolders).
pub struct ModelDir {
    pub dir: PathBuf,
    /// The file the weights came from (for errors about them).
    pub weights_path: PathBuf,
    pub config: UNetConfig,
    pub scheduler: SchedulerConfig,
    pub weights: HashMap<String, NamedTensor>,
}

impl ModelDir {
    /// The weights as a flat vector laid out like `net.params`, checked tensor by tensor.
    pub fn flat_weights(&self, net: &UNet) -> Result<Vec<f32>> {
        net.flat_from_state(&self.weights, &self.weights_path)
    }
}

pub fn load_model(dir: &Path) -> Result<ModelDir> {
    if dir.is_file() {
        let msg = if dir
            .extension()
            .is_some_and(|e| e == "bin" || e == "pt" || e == "pth")
        {
            "a PyTorch pickle, which this engine does not read (it runs no Python): --model takes a \
             directory with config.json and diffusion_pytorch_model.safetensors; diffusers can convert \
             one with UNet2DModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        } else {
            "--model takes a directory (config.json and diffusion_pytorch_model.safetensors), not a file"
        };
        return Err(Error::format(dir, msg));
    }
    if !dir.is_dir() {
        return Err(Error::format(dir, "no such model directory"));
    }
    let unet_dir = if dir.join(CONFIG).is_file() {
        dir.to_path_buf()
    } else {
        dir.join("unet")
    };
    let cfg_path = unet_dir.join(CONFIG);
    if !cfg_path.is_file() {
        return Err(Error::format(
            dir,
            format!("not a model directory: no {CONFIG} (or unet/{CONFIG})"),
        ));
    }
    let config = UNetConfig::from_json(&String::from_utf8_lossy(&read(&cfg_path)?), &cfg_path)?;
    let scheduler = [
        unet_dir.join(SCHEDULER),
        dir.join("scheduler").join(SCHEDULER),
        dir.join(SCHEDULER),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .map(|p| SchedulerConfig::from_json(&String::from_utf8_lossy(&read(&p)?), &p))
    .transpose()?
    .unwrap_or_default();
    let weights_path = unet_dir.join(WEIGHTS);
    if !weights_path.is_file() {
        let pickle = unet_dir.join("diffusion_pytorch_model.bin");
        let hint = if pickle.is_file() {
            format!(
                " ({} is a PyTorch pickle, which this engine does not read: convert it to safetensors with \
                 diffusers, e.g. UNet2DModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True))",
                pickle.display()
            )
        } else {
            String::new()
        };
        return Err(Error::format(
            &weights_path,
            format!("the model's weights are missing{hint}"),
        ));
    }
    let weights = parse_safetensors(&read(&weights_path)?, &weights_path)?;
    Ok(ModelDir {
        dir: dir.to_path_buf(),
        weights_path,
        config,
        scheduler,
        weights,
    })
}

/// Writes config.json, the weights (a flat vector laid out like `net.params`) and scheduler_config.json,
/// creating the directory if needed.
pub fn save_model(dir: &Path, net: &UNet, flat: &[f32], scheduler: &SchedulerConfig) -> Result<()> {
    save_model_as(dir, net, flat, scheduler, StoredDtype::F32)
}

/// [`save_model`] with the weights stored as `dtype`.
pub fn save_model_as(
    dir: &Path,
    net: &UNet,
    flat: &[f32],
    scheduler: &SchedulerConfig,
    dtype: StoredDtype,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors = net.state_from_flat(flat);
    write_atomic(
        &dir.join(WEIGHTS),
        &write_safetensors_as(&tensors, dtype, None)?,
    )?;
    let cfg = serde_json::to_string_pretty(&net.config.to_json()).expect("json");
    write_atomic(&dir.join(CONFIG), cfg.as_bytes())?;
    let sch = serde_json::to_string_pretty(&scheduler.to_json()).expect("json");
    write_atomic(&dir.join(SCHEDULER), sch.as_bytes())
}

/// Everything `train --resume` needs, saved as one file.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    /// Steps done.
    pub step: u64,
    pub options: TrainOptions,
    /// The `--data` the run trains on.
    pub data: String,
    /// Flat, in our layout: raw weights, their EMA, Adam's first and second moments.
    pub params: Vec<f32>,
    pub ema: Vec<f32>,
    pub adam_m: Vec<f32>,
    pub adam_v: Vec<f32>,
}

/// The metadata stored in the training state's safetensors header.
#[derive(Serialize, Deserialize)]
struct StateMeta {
    format: u64,
    step: u64,
    options: TrainOptions,
    data: String,
}

const STATE_VECTORS: [&str; 4] = ["params", "ema", "adam_m", "adam_v"];

pub fn save_state(dir: &Path, s: &TrainState) -> Result<()> {
    let meta = StateMeta {
        format: STATE_FORMAT,
        step: s.step,
        options: s.options.clone(),
        data: s.data.clone(),
    };
    let meta = HashMap::from([(
        "training_state".to_string(),
        serde_json::to_string(&meta).expect("json"),
    )]);
    let tensors: Vec<(String, NamedTensor)> = STATE_VECTORS
        .iter()
        .zip([&s.params, &s.ema, &s.adam_m, &s.adam_v])
        .map(|(name, v)| {
            let t = NamedTensor {
                shape: vec![v.len()],
                data: v.to_vec(),
            };
            (name.to_string(), t)
        })
        .collect();
    write_atomic(
        &dir.join(STATE),
        &write_safetensors_bytes(&tensors, Some(meta))?,
    )
}

/// Reads and checks a training state: its format, its metadata, and four vectors of one length.
pub fn load_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE);
    let bytes = read(&path)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::format(&path, format!("not a safetensors file: {e}")))?;
    let text = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("training_state"))
        .ok_or_else(|| Error::format(&path, "no training_state metadata in the header"))?;
    let meta: StateMeta = serde_json::from_str(text)
        .map_err(|e| Error::format(&path, format!("training_state metadata: {e}")))?;
    if meta.format != STATE_FORMAT {
        return Err(Error::format(
            &path,
            format!(
                "training state format {} (this build reads format {STATE_FORMAT})",
                meta.format
            ),
        ));
    }
    let mut tensors = parse_safetensors(&bytes, &path)?;
    let mut take = |name: &str| {
        tensors
            .remove(name)
            .map(|t| t.data)
            .ok_or_else(|| Error::format(&path, format!("missing tensor {name}")))
    };
    let s = TrainState {
        step: meta.step,
        options: meta.options,
        data: meta.data,
        params: take("params")?,
        ema: take("ema")?,
        adam_m: take("adam_m")?,
        adam_v: take("adam_v")?,
    };
    let n = s.params.len();
    for (name, v) in STATE_VECTORS[1..]
        .iter()
        .zip([&s.ema, &s.adam_m, &s.adam_v])
    {
        if v.len() != n {
            return Err(Error::format(
                &path,
                format!("tensor {name} has {} elements, params {n}", v.len()),
            ));
        }
    }
    Ok(s)
}

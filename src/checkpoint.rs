//! Model directories in diffusers layout, and the training state beside them. Every file is written to a
//! temporary name and renamed, so a crash never leaves a half-written checkpoint.
//!
//! ```text
//! DIR/config.json                           UNet2DModel config
//! DIR/diffusion_pytorch_model.safetensors   EMA weights, PyTorch names and layouts
//! DIR/scheduler_config.json                 DDPMScheduler config
//! DIR/training_state.safetensors            raw weights and Adam moments (flat, our layout)
//! DIR/training_state.json                   step, seed, options, data spec
//! ```

use crate::error::{Error, Result};
use crate::model::params::{parse_safetensors, write_safetensors_bytes};
use crate::model::{NamedTensor, UNet, UNetConfig};
use crate::sample::Variance;
use crate::schedule::BetaSchedule;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
pub const SCHEDULER: &str = "scheduler_config.json";
pub const STATE: &str = "training_state.safetensors";
pub const STATE_JSON: &str = "training_state.json";

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
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

impl SchedulerConfig {
    pub fn schedule(&self) -> crate::schedule::Schedule {
        crate::schedule::Schedule::new(
            self.beta_schedule,
            self.num_train_timesteps,
            self.beta_start,
            self.beta_end,
        )
    }

    fn from_json(text: &str, path: &Path) -> Result<Self> {
        let mut v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let map = v
            .as_object_mut()
            .ok_or_else(|| Error::format(path, "expected a JSON object"))?;
        let mut cfg = Self::default();
        let get_f = |m: &serde_json::Map<String, serde_json::Value>, k: &str| {
            m.get(k).and_then(|x| x.as_f64())
        };
        if let Some(n) = map.get("num_train_timesteps").and_then(|x| x.as_u64()) {
            cfg.num_train_timesteps = n as usize;
        }
        if let Some(b) = get_f(map, "beta_start") {
            cfg.beta_start = b;
        }
        if let Some(b) = get_f(map, "beta_end") {
            cfg.beta_end = b;
        }
        if let Some(s) = map.get("beta_schedule").and_then(|x| x.as_str()) {
            cfg.beta_schedule = s.parse().map_err(|e: String| Error::format(path, e))?;
        }
        if let Some(s) = map.get("variance_type").and_then(|x| x.as_str()) {
            cfg.variance_type = s
                .parse()
                .map_err(|e: Error| Error::format(path, e.to_string()))?;
        }
        if let Some(b) = map.get("clip_sample").and_then(|x| x.as_bool()) {
            cfg.clip_sample = b;
        }
        if let Some(p) = map.get("prediction_type").and_then(|x| x.as_str()) {
            if p != "epsilon" {
                return Err(Error::format(
                    path,
                    format!("prediction_type {p:?} is not supported (only epsilon)"),
                ));
            }
        }
        if cfg.num_train_timesteps < 2 {
            return Err(Error::format(
                path,
                "num_train_timesteps must be at least 2",
            ));
        }
        Ok(cfg)
    }

    fn to_json(&self) -> serde_json::Value {
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
    pub config: UNetConfig,
    pub scheduler: SchedulerConfig,
    pub weights: HashMap<String, NamedTensor>,
}

pub fn load_model(dir: &Path) -> Result<ModelDir> {
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
    let wpath = unet_dir.join(WEIGHTS);
    let weights = parse_safetensors(&read(&wpath)?, &wpath)?;
    Ok(ModelDir {
        dir: dir.to_path_buf(),
        config,
        scheduler,
        weights,
    })
}

/// Writes config.json, the weights (a flat vector laid out like `net.params`) and scheduler_config.json.
pub fn save_model(dir: &Path, net: &UNet, flat: &[f32], scheduler: &SchedulerConfig) -> Result<()> {
    let tensors = net.state_from_flat(flat);
    write_atomic(&dir.join(WEIGHTS), &write_safetensors_bytes(&tensors)?)?;
    let cfg = serde_json::to_string_pretty(&net.config.to_json()).expect("json");
    write_atomic(&dir.join(CONFIG), cfg.as_bytes())?;
    let sch = serde_json::to_string_pretty(&scheduler.to_json()).expect("json");
    write_atomic(&dir.join(SCHEDULER), sch.as_bytes())
}

/// Flat f32 vectors saved by name (raw weights, Adam moments).
pub fn save_state(dir: &Path, vectors: &[(&str, &[f32])], meta: &serde_json::Value) -> Result<()> {
    let tensors: Vec<(String, NamedTensor)> = vectors
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                NamedTensor {
                    shape: vec![v.len()],
                    data: v.to_vec(),
                },
            )
        })
        .collect();
    write_atomic(&dir.join(STATE), &write_safetensors_bytes(&tensors)?)?;
    write_atomic(
        &dir.join(STATE_JSON),
        serde_json::to_string_pretty(meta).expect("json").as_bytes(),
    )
}

pub fn load_state(dir: &Path) -> Result<(HashMap<String, NamedTensor>, serde_json::Value)> {
    let p = dir.join(STATE);
    let tensors = parse_safetensors(&read(&p)?, &p)?;
    let j = dir.join(STATE_JSON);
    let meta = serde_json::from_slice(&read(&j)?)
        .map_err(|e| Error::format(&j, format!("not valid JSON: {e}")))?;
    Ok((tensors, meta))
}

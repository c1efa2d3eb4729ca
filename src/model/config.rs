//! The U-Net configuration: the keys of diffusers' `UNet2DModel` `config.json` for this family of models.
//!
//! Reading a config checks every key: those this engine implements are parsed, those it implements only at
//! one value (`act_fn: "silu"`, `flip_sin_to_cos: false`, ...) must have that value, keys starting with `_`
//! are metadata, and anything else is an error that names the key.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    pub sample_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    /// `DownBlock2D` or `AttnDownBlock2D` per level.
    pub down_block_types: Vec<String>,
    /// `UpBlock2D` or `AttnUpBlock2D` per level (from the bottom level up).
    pub up_block_types: Vec<String>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub dropout: f64,
    /// Class conditioning (diffusers' `num_class_embeds`): `None` for the paper's unconditional model.
    #[serde(skip)]
    pub classes: Option<Classes>,
}

/// A class-conditional model's labels: diffusers' `num_class_embeds` rows of a learned embedding added to
/// the time embedding. Models this engine trains have one row more than they have classes, the last one
/// the *null class* the unconditional prediction of classifier-free guidance uses; the saved config says
/// so with two metadata keys diffusers ignores, `_num_real_classes` and `_class_names`. A model from
/// elsewhere without them has every row a real class and no null class.
#[derive(Clone, Debug, PartialEq)]
pub struct Classes {
    /// `num_class_embeds`: rows of the embedding table.
    pub embeds: usize,
    /// How many of them are real classes (`embeds` or `embeds - 1`).
    pub real: usize,
    /// One name per real class (`"0"`, `"1"`, ... where the data named none).
    pub names: Vec<String>,
}

impl Classes {
    /// `real` classes named `names` (numbers where `None`), plus the null class.
    pub fn with_null(real: usize, names: Option<Vec<String>>) -> Self {
        Self {
            embeds: real + 1,
            real,
            names: names.unwrap_or_else(|| (0..real).map(|i| i.to_string()).collect()),
        }
    }

    /// The null class's label, where the model has one.
    pub fn null(&self) -> Option<usize> {
        (self.embeds > self.real).then_some(self.real)
    }

    /// The label a `--class` value names: a class name, or a number below `real`.
    pub fn label(&self, spec: &str) -> Result<usize> {
        if let Some(i) = self.names.iter().position(|n| n == spec) {
            return Ok(i);
        }
        match spec.parse::<usize>() {
            Ok(i) if i < self.real => Ok(i),
            _ => Err(Error::Invalid(format!(
                "--class {spec:?} is neither a class of this model ({}) nor a number below {}",
                self.names.join(", "),
                self.real
            ))),
        }
    }

    fn validate(&self) -> Result<()> {
        let err = |m: String| Err(Error::Config(m));
        if self.embeds == 0 || self.embeds > 100_000 {
            return err(format!(
                "num_class_embeds {} must be in 1..=100000",
                self.embeds
            ));
        }
        if self.real == 0 || !(self.real == self.embeds || self.real + 1 == self.embeds) {
            return err(format!(
                "_num_real_classes {} must be num_class_embeds ({}) or one less (the null class last)",
                self.real, self.embeds
            ));
        }
        if self.names.len() != self.real {
            return err(format!(
                "_class_names has {} names for {} real classes",
                self.names.len(),
                self.real
            ));
        }
        Ok(())
    }
}

/// Presets: `ddpm-cifar10` is the paper's CIFAR-10 network; `tiny` is small enough for tests and a
/// CPU demo.
pub const PRESETS: &[&str] = &["ddpm-cifar10", "tiny"];

/// Keys diffusers writes that this engine supports only at the value given.
fn fixed_keys() -> Vec<(&'static str, Value)> {
    vec![
        ("act_fn", json!("silu")),
        ("time_embedding_type", json!("positional")),
        ("flip_sin_to_cos", json!(false)),
        ("freq_shift", json!(1)),
        ("downsample_padding", json!(0)),
        ("center_input_sample", json!(false)),
        ("mid_block_scale_factor", json!(1)),
        ("resnet_time_scale_shift", json!("default")),
        ("add_attention", json!(true)),
        ("class_embed_type", Value::Null),
        ("downsample_type", json!("conv")),
        ("upsample_type", json!("conv")),
        ("mid_block_type", json!("UNetMidBlock2D")),
        ("attn_norm_num_groups", Value::Null),
        ("time_embedding_dim", Value::Null),
        ("num_train_timesteps", Value::Null),
    ]
}

impl UNetConfig {
    pub fn preset(name: &str) -> Result<Self> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        match name {
            "ddpm-cifar10" => Ok(Self {
                sample_size: 32,
                in_channels: 3,
                out_channels: 3,
                block_out_channels: vec![128, 256, 256, 256],
                down_block_types: s(&[
                    "DownBlock2D",
                    "AttnDownBlock2D",
                    "DownBlock2D",
                    "DownBlock2D",
                ]),
                up_block_types: s(&["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]),
                layers_per_block: 2,
                norm_num_groups: 32,
                norm_eps: 1e-6,
                dropout: 0.1,
                classes: None,
            }),
            "tiny" => Ok(Self {
                sample_size: 16,
                in_channels: 3,
                out_channels: 3,
                block_out_channels: vec![32, 64],
                down_block_types: s(&["DownBlock2D", "AttnDownBlock2D"]),
                up_block_types: s(&["AttnUpBlock2D", "UpBlock2D"]),
                layers_per_block: 1,
                norm_num_groups: 8,
                norm_eps: 1e-6,
                dropout: 0.0,
                classes: None,
            }),
            other => Err(Error::Config(format!(
                "unknown preset {other:?}: expected one of {}",
                PRESETS.join(", ")
            ))),
        }
    }

    /// Whether level `i` of the down path has attention.
    pub fn down_attention(&self, i: usize) -> bool {
        self.down_block_types[i] == "AttnDownBlock2D"
    }

    /// Whether level `i` of the up path (counted from the bottom) has attention.
    pub fn up_attention(&self, i: usize) -> bool {
        self.up_block_types[i] == "AttnUpBlock2D"
    }

    /// Width of the time embedding: 4 x the first level's channels.
    pub fn time_embed_dim(&self) -> usize {
        4 * self.block_out_channels[0]
    }

    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(Error::Config(m));
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            return err(format!(
                "down_block_types ({}) and up_block_types ({}) must have one entry per block_out_channels entry ({levels})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if t != "DownBlock2D" && t != "AttnDownBlock2D" {
                return err(format!("down block type {t:?} is not supported: expected DownBlock2D or AttnDownBlock2D"));
            }
        }
        for t in &self.up_block_types {
            if t != "UpBlock2D" && t != "AttnUpBlock2D" {
                return err(format!(
                    "up block type {t:?} is not supported: expected UpBlock2D or AttnUpBlock2D"
                ));
            }
        }
        if self.layers_per_block == 0 {
            return err("layers_per_block must be at least 1".into());
        }
        if self.in_channels == 0 || self.out_channels == 0 {
            return err("in_channels and out_channels must be positive".into());
        }
        let g = self.norm_num_groups;
        if g == 0 {
            return err("norm_num_groups must be positive".into());
        }
        for &c in &self.block_out_channels {
            if c == 0 || c % g != 0 {
                return err(format!(
                    "block_out_channels entry {c} is not a multiple of norm_num_groups {g}"
                ));
            }
        }
        if self.block_out_channels[0] < 4 {
            return err(
                "the first level needs at least 4 channels (the timestep embedding's width)".into(),
            );
        }
        let down = 1usize << (levels - 1);
        if self.sample_size < 2 * down || !self.sample_size.is_multiple_of(down) {
            return err(format!(
                "sample_size {} must be a multiple of {down} and at least {} for {levels} levels",
                self.sample_size,
                2 * down
            ));
        }
        // Bounds that keep every size computed from the config far from overflow; real models are
        // orders of magnitude inside them.
        if levels > 8 || self.layers_per_block > 16 || self.sample_size > 4096 {
            return err(format!(
                "{levels} levels, layers_per_block {} and sample_size {} must be at most 8, 16 and 4096",
                self.layers_per_block, self.sample_size
            ));
        }
        if self.in_channels > 64 || self.out_channels > 64 {
            return err("in_channels and out_channels must be at most 64".into());
        }
        if let Some(&c) = self.block_out_channels.iter().find(|&&c| c > 8192) {
            return err(format!("block_out_channels entry {c} is over 8192"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return err(format!("dropout {} is outside [0, 1)", self.dropout));
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            return err(format!("norm_eps {} must be positive", self.norm_eps));
        }
        match &self.classes {
            Some(c) => c.validate(),
            None => Ok(()),
        }
    }

    /// Parses a diffusers `config.json`. `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(origin, format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(Error::format(origin, "expected a JSON object"));
        };
        Self::from_map(map, origin)
    }

    fn from_map(mut map: Map<String, Value>, origin: &Path) -> Result<Self> {
        if let Some(class) = map.get("_class_name") {
            if class != "UNet2DModel" {
                return Err(Error::format(
                    origin,
                    format!("_class_name is {class}, expected \"UNet2DModel\""),
                ));
            }
        }
        let classes = Self::classes_from(&mut map, origin)?;
        map.retain(|k, _| !k.starts_with('_'));
        for (key, want) in fixed_keys() {
            if let Some(v) = map.remove(key) {
                let same = match (&v, &want) {
                    (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
                    _ => v == want,
                };
                if !(same || want.is_null() && key == "num_train_timesteps") {
                    return Err(Error::format(
                        origin,
                        format!("{key} = {v} is not supported (this engine implements {want})"),
                    ));
                }
            }
        }
        // One attention head of width C: `attention_head_dim` null (or equal to every level's width).
        let head_dim = map.remove("attention_head_dim").unwrap_or(Value::Null);
        // Defaults as in diffusers' UNet2DModel signature, for the keys a config may leave out.
        let defaults = [
            ("in_channels", json!(3)),
            ("out_channels", json!(3)),
            ("layers_per_block", json!(2)),
            ("norm_num_groups", json!(32)),
            ("norm_eps", json!(1e-5)),
            ("dropout", json!(0.0)),
            ("block_out_channels", json!([224, 448, 672, 896])),
            (
                "down_block_types",
                json!([
                    "DownBlock2D",
                    "AttnDownBlock2D",
                    "AttnDownBlock2D",
                    "AttnDownBlock2D"
                ]),
            ),
            (
                "up_block_types",
                json!([
                    "AttnUpBlock2D",
                    "AttnUpBlock2D",
                    "AttnUpBlock2D",
                    "UpBlock2D"
                ]),
            ),
        ];
        for (k, v) in defaults {
            map.entry(k.to_string()).or_insert(v);
        }
        let known = [
            "sample_size",
            "in_channels",
            "out_channels",
            "block_out_channels",
            "down_block_types",
            "up_block_types",
            "layers_per_block",
            "norm_num_groups",
            "norm_eps",
            "dropout",
        ];
        if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(Error::format(
                origin,
                format!("unknown config key {unknown:?}"),
            ));
        }
        // sample_size may be an [h, w] pair in diffusers; only square samples are supported here.
        if let Some(Value::Array(hw)) = map.get("sample_size").cloned() {
            if hw.len() == 2 && hw[0] == hw[1] {
                map.insert("sample_size".into(), hw[0].clone());
            } else {
                return Err(Error::format(
                    origin,
                    format!("sample_size {hw:?}: only square samples are supported"),
                ));
            }
        }
        let mut cfg: Self = serde_json::from_value(Value::Object(map))
            .map_err(|e| Error::format(origin, e.to_string()))?;
        cfg.classes = classes;
        match head_dim {
            Value::Null => {}
            Value::Number(n) if cfg.block_out_channels.iter().all(|&c| n.as_u64() == Some(c as u64)) => {}
            other => {
                return Err(Error::format(
                    origin,
                    format!(
                        "attention_head_dim = {other}: only single-head attention (null, one head of width C) is supported"
                    ),
                ))
            }
        }
        cfg.validate()
            .map_err(|e| Error::format(origin, e.to_string()))?;
        Ok(cfg)
    }

    /// `num_class_embeds` and this engine's two metadata keys (see [`Classes`]), taken out of `map`.
    fn classes_from(map: &mut Map<String, Value>, origin: &Path) -> Result<Option<Classes>> {
        let bad = |key: &str, v: &Value, want: &str| {
            Error::format(origin, format!("{key} = {v}: expected {want}"))
        };
        let count = |key: &str, v: Option<Value>| -> Result<Option<usize>> {
            match v {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) => Ok(Some(n as usize)),
                    None => Err(bad(key, &v, "null or a positive integer")),
                },
            }
        };
        let embeds = count("num_class_embeds", map.remove("num_class_embeds"))?;
        let real = count("_num_real_classes", map.remove("_num_real_classes"))?;
        let names = match map.remove("_class_names") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| bad("_class_names", v, "a list of strings"))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(v) => return Err(bad("_class_names", &v, "a list of strings")),
        };
        let Some(embeds) = embeds else {
            if real.is_some() || names.is_some() {
                return Err(Error::format(
                    origin,
                    "_num_real_classes or _class_names without num_class_embeds",
                ));
            }
            return Ok(None);
        };
        let real = real.unwrap_or(embeds);
        let names = names.unwrap_or_else(|| (0..real).map(|i| i.to_string()).collect());
        let c = Classes {
            embeds,
            real,
            names,
        };
        c.validate()
            .map_err(|e| Error::format(origin, e.to_string()))?;
        Ok(Some(c))
    }

    /// The `config.json` diffusers writes for this model.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        let map = v.as_object_mut().expect("an object");
        map.insert("_class_name".into(), json!("UNet2DModel"));
        map.insert("_diffusers_version".into(), json!("0.30.0"));
        map.insert("attention_head_dim".into(), Value::Null);
        for (k, val) in fixed_keys() {
            if k != "num_train_timesteps" {
                map.insert(k.into(), val);
            }
        }
        match &self.classes {
            Some(c) => {
                map.insert("num_class_embeds".into(), json!(c.embeds));
                map.insert("_num_real_classes".into(), json!(c.real));
                map.insert("_class_names".into(), json!(c.names));
            }
            None => {
                map.insert("num_class_embeds".into(), Value::Null);
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_round_trip_through_json() {
        for name in PRESETS {
            let c = UNetConfig::preset(name).unwrap();
            c.validate().unwrap();
            let text = serde_json::to_string(&c.to_json()).unwrap();
            assert_eq!(UNetConfig::from_json(&text, Path::new("x")).unwrap(), c);
        }
    }

    #[test]
    fn the_hub_config_parses_to_the_paper_network() {
        // google/ddpm-cifar10-32 config.json, as published.
        let hub = r#"{"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
          "attention_head_dim": null, "block_out_channels": [128, 256, 256, 256], "center_input_sample": false,
          "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
          "downsample_padding": 0, "flip_sin_to_cos": false, "freq_shift": 1, "in_channels": 3,
          "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
          "out_channels": 3, "resnet_time_scale_shift": "default", "sample_size": 32,
          "time_embedding_type": "positional",
          "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}"#;
        let c = UNetConfig::from_json(hub, Path::new("config.json")).unwrap();
        let mut paper = UNetConfig::preset("ddpm-cifar10").unwrap();
        paper.dropout = 0.0; // the hub config leaves dropout out (inference)
        assert_eq!(c, paper);
    }

    #[test]
    fn unsupported_and_unknown_keys_are_named() {
        let base = UNetConfig::preset("tiny").unwrap().to_json();
        for (key, value, needle) in [
            ("act_fn", json!("gelu"), "act_fn"),
            ("flip_sin_to_cos", json!(true), "flip_sin_to_cos"),
            ("attention_head_dim", json!(8), "attention_head_dim"),
            ("colour", json!(1), "unknown config key \"colour\""),
            ("norm_num_groups", json!(5), "norm_num_groups"),
        ] {
            let mut v = base.clone();
            v[key] = value;
            let e = UNetConfig::from_json(&v.to_string(), Path::new("m/config.json"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle) && e.contains("m/config.json"), "{e}");
        }
    }

    #[test]
    fn class_conditioning_round_trips_and_inconsistent_counts_are_refused() {
        let mut c = UNetConfig::preset("tiny").unwrap();
        c.classes = Some(Classes::with_null(
            3,
            Some(vec!["a".into(), "b".into(), "c".into()]),
        ));
        let v = c.to_json();
        assert_eq!(v["num_class_embeds"], json!(4));
        assert_eq!(v["_num_real_classes"], json!(3));
        assert_eq!(
            UNetConfig::from_json(&v.to_string(), Path::new("x")).unwrap(),
            c
        );
        let classes = c.classes.as_ref().unwrap();
        assert_eq!(
            (
                classes.null(),
                classes.label("b").unwrap(),
                classes.label("2").unwrap()
            ),
            (Some(3), 1, 2)
        );
        assert!(classes
            .label("3")
            .unwrap_err()
            .to_string()
            .contains("a, b, c"));
        // A diffusers model without this engine's keys: every row a class, no null class.
        let mut plain = v.clone();
        plain.as_object_mut().unwrap().remove("_num_real_classes");
        plain.as_object_mut().unwrap().remove("_class_names");
        let p = UNetConfig::from_json(&plain.to_string(), Path::new("x")).unwrap();
        let pc = p.classes.unwrap();
        assert_eq!((pc.embeds, pc.real, pc.null()), (4, 4, None));
        for (key, value, needle) in [
            ("_num_real_classes", json!(2), "_num_real_classes"),
            ("num_class_embeds", json!(-1), "num_class_embeds"),
            ("_class_names", json!(["a"]), "_class_names"),
            ("class_embed_type", json!("timestep"), "class_embed_type"),
        ] {
            let mut bad = v.clone();
            bad[key] = value;
            let e = UNetConfig::from_json(&bad.to_string(), Path::new("m/config.json"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle) && e.contains("m/config.json"), "{e}");
        }
    }
}

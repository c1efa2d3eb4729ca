//! Parameters: diffusers' names and PyTorch shapes, their place in the flat buffer, the conversions between
//! PyTorch layouts and ours, and the paper's initialisation.

use crate::error::{Error, Result};
use crate::rng;
use std::collections::HashMap;

/// What a parameter is, which decides its layout and its initialisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// Conv weight: PyTorch `[o, c, kh, kw]`, ours `[o, kh, kw, c]`.
    Conv { o: usize, c: usize, k: usize },
    /// Linear weight `[out, in]` (same in both).
    Linear { out: usize, inp: usize },
    /// A class embedding table `[classes, dim]` (same in both; PyTorch's `nn.Embedding`).
    Embedding { classes: usize, dim: usize },
    /// A bias (zeros).
    Bias,
    /// Group-norm scale (ones).
    Gamma,
    /// Group-norm shift (zeros).
    Beta,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// diffusers' name, e.g. `down_blocks.0.resnets.1.conv2.weight`.
    pub name: String,
    pub kind: Kind,
    /// Offset in the flat buffer, in elements.
    pub offset: usize,
    pub len: usize,
    /// The paper's `init_scale` for weights (1, or 0 for the layers that start as identity paths).
    pub init_scale: f64,
}

impl ParamSpec {
    /// The PyTorch shape.
    pub fn shape(&self) -> Vec<usize> {
        match self.kind {
            Kind::Conv { o, c, k } => vec![o, c, k, k],
            Kind::Linear { out, inp } => vec![out, inp],
            Kind::Embedding { classes, dim } => vec![classes, dim],
            _ => vec![self.len],
        }
    }

    /// PyTorch layout to ours.
    pub fn from_pytorch(&self, data: &[f32]) -> Vec<f32> {
        match self.kind {
            Kind::Conv { o, c, k } => {
                let mut out = vec![0.0; data.len()];
                for oo in 0..o {
                    for cc in 0..c {
                        for r in 0..k * k {
                            out[(oo * k * k + r) * c + cc] = data[(oo * c + cc) * k * k + r];
                        }
                    }
                }
                out
            }
            _ => data.to_vec(),
        }
    }

    /// Our layout to PyTorch's.
    pub fn to_pytorch(&self, data: &[f32]) -> Vec<f32> {
        match self.kind {
            Kind::Conv { o, c, k } => {
                let mut out = vec![0.0; data.len()];
                for oo in 0..o {
                    for cc in 0..c {
                        for r in 0..k * k {
                            out[(oo * c + cc) * k * k + r] = data[(oo * k * k + r) * c + cc];
                        }
                    }
                }
                out
            }
            _ => data.to_vec(),
        }
    }

    /// Initial values as the paper's code draws them: weights from TensorFlow's
    /// `variance_scaling(scale, "fan_avg", "uniform")` (scale 1e-10 where the code asks for 0), biases and
    /// norm shifts 0, norm scales 1; a class embedding N(0, 1), as PyTorch's. Draws come from Philox (seed, `Init` stream of this parameter's index).
    pub fn init(&self, seed: u64, index: usize) -> Vec<f32> {
        let (fan_in, fan_out) = match self.kind {
            Kind::Conv { o, c, k } => (c * k * k, o * k * k),
            Kind::Linear { out, inp } => (inp, out),
            Kind::Bias | Kind::Beta => return vec![0.0; self.len],
            Kind::Gamma => return vec![1.0; self.len],
            // PyTorch's `nn.Embedding` default, N(0, 1), as diffusers leaves it.
            Kind::Embedding { .. } => {
                let stream = rng::stream(rng::Purpose::Init, index as u64);
                return (0..self.len)
                    .map(|e| rng::normal(seed, stream, e as u64))
                    .collect();
            }
        };
        let scale = if self.init_scale == 0.0 {
            1e-10
        } else {
            self.init_scale
        };
        let limit = (3.0 * scale / ((fan_in + fan_out) as f64 / 2.0)).sqrt();
        let stream = rng::stream(rng::Purpose::Init, index as u64);
        // Drawn in PyTorch's layout so the weights do not depend on our internal order.
        let pt: Vec<f32> = (0..self.len)
            .map(|e| ((2.0 * f64::from(rng::uniform(seed, stream, e as u64)) - 1.0) * limit) as f32)
            .collect();
        self.from_pytorch(&pt)
    }
}

/// Older diffusers checkpoints (the hub's `google/ddpm-cifar10-32` among them) name the attention
/// projections `query`, `key`, `value`, `proj_attn`.
pub fn legacy_name(name: &str) -> Option<String> {
    for (new, old) in [
        (".to_q.", ".query."),
        (".to_k.", ".key."),
        (".to_v.", ".value."),
        (".to_out.0.", ".proj_attn."),
    ] {
        if name.contains(new) {
            return Some(name.replace(new, old));
        }
    }
    None
}

/// A named tensor in PyTorch layout, as read from or written to safetensors.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Reads every tensor of a safetensors file as f32 (f32, f16 and bf16 accepted).
pub fn read_safetensors(path: &std::path::Path) -> Result<HashMap<String, NamedTensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_safetensors(&bytes, path)
}

pub fn parse_safetensors(
    bytes: &[u8],
    path: &std::path::Path,
) -> Result<HashMap<String, NamedTensor>> {
    use safetensors::Dtype;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|b| {
                    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect(),
            other => {
                return Err(Error::format(
                    path,
                    format!(
                    "tensor {name}: dtype {other:?} is not supported (expected F32, F16 or BF16)"
                ),
                ))
            }
        };
        out.insert(
            name,
            NamedTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// How weights are stored in a safetensors file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoredDtype {
    F32,
    Bf16,
    F16,
}

impl StoredDtype {
    fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::Bf16 => v
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
            Self::F16 => v
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }
    fn dtype(self) -> safetensors::Dtype {
        match self {
            Self::F32 => safetensors::Dtype::F32,
            Self::Bf16 => safetensors::Dtype::BF16,
            Self::F16 => safetensors::Dtype::F16,
        }
    }
}

/// Serialises f32 tensors to safetensors bytes, with optional header metadata.
pub fn write_safetensors_bytes(
    tensors: &[(String, NamedTensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    write_safetensors_as(tensors, StoredDtype::F32, metadata)
}

/// Serialises tensors stored as `dtype` (rounded to nearest from f32).
pub fn write_safetensors_as(
    tensors: &[(String, NamedTensor)],
    dtype: StoredDtype,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), dtype.encode(&t.data), t.shape.clone()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, b, s)| {
            safetensors::tensor::TensorView::new(dtype.dtype(), s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Invalid(format!("tensor {n}: {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize(views, metadata)
        .map_err(|e| Error::Invalid(format!("serialising safetensors: {e}")))
}

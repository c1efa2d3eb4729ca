//! Properties of the U-Net that do not need a reference implementation.

use ddpm_cuda::backend::cpu::CpuBackend;
use ddpm_cuda::backend::{Backend, Layout};
use ddpm_cuda::model::{UNet, UNetConfig};
use std::collections::HashSet;

/// REFERENCE.md §2: the paper's CIFAR-10 network has 35,746,307 parameters in 328 tensors, and a forward
/// pass costs 12.44 GFLOP per image (PyTorch's counter on the diffusers model: matmul and conv, 2 FLOP per
/// multiply-add).
#[test]
fn paper_network_has_the_published_size() {
    let cfg = UNetConfig::preset("ddpm-cifar10").unwrap();
    let mut be = CpuBackend::<f32>::new();
    let net = UNet::new(&mut be, &cfg, 1).unwrap();
    assert_eq!(net.num_params(), 35_746_307);
    assert_eq!(net.specs().len(), 328);
    let names: HashSet<&str> = net.specs().iter().map(|s| s.name.as_str()).collect();
    for name in [
        "conv_in.weight",
        "time_embedding.linear_2.bias",
        "down_blocks.1.resnets.0.conv_shortcut.weight",
        "down_blocks.1.attentions.1.to_out.0.weight",
        "down_blocks.2.downsamplers.0.conv.bias",
        "mid_block.attentions.0.to_q.weight",
        "up_blocks.3.resnets.2.conv_shortcut.weight",
        "up_blocks.2.attentions.2.group_norm.weight",
        "up_blocks.2.upsamplers.0.conv.weight",
        "conv_norm_out.bias",
        "conv_out.weight",
    ] {
        assert!(names.contains(name), "{name}");
    }
    let gflop = 2.0 * net.macs_per_image() as f64 / 1e9;
    assert!((gflop - 12.44).abs() < 0.01, "{gflop} GFLOP");
}

/// The config.json of the hub's 256x256 models (google/ddpm-ema-church-256, -bedroom-256, -cat-256,
/// -celebahq-256 share it), typed in from the published file: six levels (channel multipliers 1, 1, 2, 2,
/// 4, 4 of 128), attention at 16x16, two ResNet blocks a level. Its model card gives 113.7M parameters.
const DDPM_256: &str = r#"{"_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": null,
  "block_out_channels": [128, 128, 256, 256, 512, 512], "center_input_sample": false,
  "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 0, "flip_sin_to_cos": false, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
  "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3,
  "resnet_time_scale_shift": "default", "sample_size": 256, "time_embedding_type": "positional",
  "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]}"#;

/// The 256x256 family's config loads and builds a network of the published size (113.7M, to the model
/// card's rounding), with the attention at 16x16 as the paper has it.
#[test]
fn the_256_family_builds_at_its_published_size() {
    let cfg = UNetConfig::from_json(DDPM_256, std::path::Path::new("config.json")).unwrap();
    let mut be = CpuBackend::<f32>::new();
    let net = UNet::new_inference(&mut be, &cfg, 1).unwrap();
    let m = (net.num_params() as f64 / 1e5).round() / 10.0;
    assert_eq!(m, 113.7, "{} parameters", net.num_params());
    let names: Vec<&str> = net.specs().iter().map(|s| s.name.as_str()).collect();
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("down_blocks.4.attentions.1.")),
        "attention at level 4 (16x16)"
    );
    assert!(!names
        .iter()
        .any(|n| n.starts_with("down_blocks.3.attentions.")));
}

/// The paper's initialisation: variance-scaling uniform weights with limit sqrt(3 / fan_avg), the layers
/// that start as identity paths (conv2, attention output, conv_out) at scale 1e-10, biases 0, norm scales 1.
#[test]
fn initialisation_follows_the_paper() {
    let cfg = UNetConfig::preset("tiny").unwrap();
    let mut be = CpuBackend::<f32>::new();
    let net = UNet::new(&mut be, &cfg, 1).unwrap();
    net.init(&mut be, 1).unwrap();
    let p = be.download(net.params).unwrap();
    let get = |name: &str| {
        let s = net.specs().iter().find(|s| s.name == name).unwrap();
        p[s.offset..s.offset + s.len].to_vec()
    };
    let w = get("down_blocks.0.resnets.0.conv1.weight");
    let limit = (3.0f32 / ((32.0 * 9.0 + 32.0 * 9.0) / 2.0)).sqrt();
    let max = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(max <= limit && max > 0.95 * limit, "{max} vs {limit}");
    // Uniform on [-l, l] has variance l^2 / 3.
    let var = w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
    assert!(
        (var / (limit * limit / 3.0) - 1.0).abs() < 0.1,
        "variance ratio {}",
        var / (limit * limit / 3.0)
    );
    assert!(get("conv_out.weight").iter().all(|v| v.abs() < 1e-4));
    assert!(get("down_blocks.1.attentions.0.to_out.0.weight")
        .iter()
        .all(|v| v.abs() < 1e-4));
    assert!(get("conv_in.bias").iter().all(|&v| v == 0.0));
    assert!(get("conv_norm_out.weight").iter().all(|&v| v == 1.0));
    // Different seeds, different weights; same seed, same weights.
    net.init(&mut be, 2).unwrap();
    assert_ne!(be.download(net.params).unwrap(), p);
    net.init(&mut be, 1).unwrap();
    assert_eq!(be.download(net.params).unwrap(), p);
}

/// Weights survive the trip to PyTorch layouts and back, and a state dict with the wrong shape, a missing
/// tensor or an extra one is refused with its name; the legacy attention names load.
#[test]
fn state_dict_round_trip_and_errors() {
    let cfg = UNetConfig::preset("tiny").unwrap();
    let mut be = CpuBackend::<f32>::new();
    let net = UNet::new(&mut be, &cfg, 1).unwrap();
    net.init(&mut be, 3).unwrap();
    let flat = be.download(net.params).unwrap();
    let state: std::collections::HashMap<_, _> = net.state_from_flat(&flat).into_iter().collect();
    let origin = std::path::Path::new("w.safetensors");
    assert_eq!(net.flat_from_state(&state, origin).unwrap(), flat);
    let legacy: std::collections::HashMap<_, _> = state
        .iter()
        .map(|(k, v)| {
            (
                ddpm_cuda::model::params::legacy_name(k).unwrap_or(k.clone()),
                v.clone(),
            )
        })
        .collect();
    assert!(legacy.contains_key("mid_block.attentions.0.query.weight"));
    assert_eq!(net.flat_from_state(&legacy, origin).unwrap(), flat);
    let mut bad = state.clone();
    bad.get_mut("conv_in.weight").unwrap().shape = vec![32, 3, 1, 9];
    let e = net.flat_from_state(&bad, origin).unwrap_err().to_string();
    assert!(
        e.contains("conv_in.weight") && e.contains("[32, 3, 3, 3]"),
        "{e}"
    );
    let mut missing = state.clone();
    missing.remove("conv_out.bias");
    assert!(net
        .flat_from_state(&missing, origin)
        .unwrap_err()
        .to_string()
        .contains("missing tensor conv_out.bias"));
    let mut extra = state.clone();
    extra.insert("stray".into(), state["conv_out.bias"].clone());
    assert!(net
        .flat_from_state(&extra, origin)
        .unwrap_err()
        .to_string()
        .contains("stray"));
}

/// On a backend that applies every group norm as the convolution after it loads its input
/// (`Backend::fuses_normalisation`: CUDA), the U-Net gives the normalised inputs no memory, nor the
/// dropped-out inputs of the ResNet blocks' second convolutions: the activations shrink by exactly
/// their sizes, counted here from the normalisations' parameters (each `c` channels at its level's side)
/// and the config, and their gradients stay (the convolutions' input gradients write them). One that
/// also stores activations in bf16 (`Backend::stores_bf16_activations`) saves half of each of those,
/// counted from the parameters of the layers that write or read them.
#[test]
fn a_fusing_backend_stores_no_normalised_input() {
    let batch = 2;
    for preset in ["tiny", "ddpm-cifar10"] {
        let cfg = UNetConfig::preset(preset).unwrap();
        let mut be = CpuBackend::<f32>::new();
        let net = UNet::new(&mut be, &cfg, 1).unwrap();
        let levels = cfg.block_out_channels.len();
        // The side of the feature maps a parameter's block works on.
        let side = |name: &str| {
            let level = |prefix: &str| {
                name.strip_prefix(prefix)
                    .and_then(|rest| rest.split('.').next())
                    .map(|i| i.parse::<usize>().unwrap())
            };
            let down = if let Some(i) = level("down_blocks.") {
                i
            } else if let Some(i) = level("up_blocks.") {
                levels - 1 - i
            } else if name.starts_with("mid_block.") {
                levels - 1
            } else {
                0
            };
            cfg.sample_size >> down
        };
        let (mut normalised, mut bf16_saved, mut largest) = (0, 0, 0);
        for s in net.specs() {
            // In bf16, each half a word per element and 31 words of alignment padding: every block's
            // output (its last convolution's or projection's) and shortcut, a ResNet block's hidden
            // activation, an attention block's q, k, v and output, the input convolution's output, the resamplers'
            // outputs (at half and twice their level's side) and the upsampled maps, and the up path's
            // concatenations (the input of each up block's first normalisation).
            let name = s.name.as_str();
            let side = side(name);
            let ends = |ends: &[&str]| ends.iter().any(|e| name.ends_with(e));
            let tensors: &[(usize, usize)] = match () {
                _ if ends(&[".conv1.bias", ".conv2.bias", ".conv_shortcut.bias"])
                    || name == "conv_in.bias" =>
                {
                    &[(side, s.len)]
                }
                // The attention output and the block's output.
                _ if ends(&[".to_out.0.bias"]) => &[(side, s.len), (side, s.len)],
                _ if ends(&[".to_q.bias"]) => &[(side, 3 * s.len)],
                _ if ends(&["downsamplers.0.conv.bias"]) => &[(side / 2, s.len)],
                _ if ends(&["upsamplers.0.conv.bias"]) => &[(2 * side, s.len), (2 * side, s.len)],
                _ if name.starts_with("up_blocks.") && ends(&[".norm1.weight"]) => &[(side, s.len)],
                _ => &[],
            };
            for &(side, width) in tensors {
                let len = batch * side.pow(2) * width;
                bf16_saved += len - (len.div_ceil(2) + 31);
            }
            let is_norm = [".norm1.weight", ".norm2.weight", ".group_norm.weight"]
                .iter()
                .any(|end| s.name.ends_with(end))
                || s.name == "conv_norm_out.weight";
            if !is_norm {
                continue;
            }
            let copies = if s.name.ends_with(".norm2.weight") && cfg.dropout > 0.0 {
                2 // the normalised input and the dropout's output
            } else {
                1
            };
            normalised += copies * batch * side.pow(2) * s.len;
            largest = largest.max(batch * side.pow(2) * s.len);
        }
        let layout = |fused, bf16_activations| Layout {
            fused,
            bf16_activations,
            ..Layout::default()
        };
        let lens = |l| UNet::activation_lens(&cfg, batch, l).unwrap();
        let (stored, stored_grads) = lens(layout(false, false));
        let (fused, fused_grads) = lens(layout(true, false));
        assert_eq!(stored - fused, normalised, "{preset}");
        assert_eq!(stored_grads, fused_grads, "{preset}");
        // In bf16 those activations take half the memory; their gradients stay fp32.
        let (bf16, bf16_grads) = lens(layout(true, true));
        assert!(bf16_saved > 0, "{preset}");
        assert_eq!(fused - bf16, bf16_saved, "{preset}");
        assert_eq!(bf16_grads, fused_grads, "{preset}");
        // A backend that normalises into one bf16 scratch region (CUDA in bf16) counts it with the
        // activations: the largest normalised input, two elements a word, 31 words of alignment.
        let scratch = Layout {
            norm_scratch: true,
            ..layout(true, true)
        };
        let (with_scratch, scratch_grads) = lens(scratch);
        assert_eq!(with_scratch - bf16, largest.div_ceil(2) + 31, "{preset}");
        assert_eq!(scratch_grads, fused_grads, "{preset}");
        // The CPU stores them: its net is the unfused layout.
        assert_eq!(net.activation_len() * batch, stored, "{preset}");
    }
}

//! The CPU U-Net against diffusers' UNet2DModel: output, loss and every parameter gradient of a small
//! model of the paper's family, and of the same with a class embedding and class labels (fixtures written
//! by scripts/make_fixtures.py, float64 reference).

use ddpm_cuda::backend::cpu::real::Real;
use ddpm_cuda::backend::cpu::CpuBackend;
use ddpm_cuda::backend::Backend;
use ddpm_cuda::model::params::read_safetensors;
use ddpm_cuda::model::{nchw_to_nhwc, nhwc_to_nchw, NamedTensor, UNet, UNetConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> (PathBuf, HashMap<String, NamedTensor>, UNetConfig) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{name}.safetensors"));
    let all = read_safetensors(&path).unwrap();
    // The config diffusers saved with the model, parsed by our own reader (it checks every key).
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let config_json = meta.metadata().as_ref().unwrap()["config"].clone();
    let config = UNetConfig::from_json(&config_json, &path).unwrap();
    (path, all, config)
}

/// max |a - b| / max |b|: the error relative to the tensor's scale (an elementwise relative error would
/// be dominated by entries that happen to be near zero).
fn scaled_error(a: &[f32], b: &[f32], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(floor, |m, v| m.max(f64::from(v.abs())));
    let err = a.iter().zip(b).fold(0.0f64, |m, (x, y)| {
        m.max((f64::from(*x) - f64::from(*y)).abs())
    });
    err / scale.max(1e-30)
}

fn labels(t: &NamedTensor) -> Vec<usize> {
    t.data.iter().map(|&l| l as usize).collect()
}

fn run<T: Real>(name: &str, tol_output: f64, tol_grad: f64, floor: f64) {
    let (path, all, config) = fixture(name);
    assert_eq!(config.block_out_channels, vec![8, 12, 16]);
    let state: HashMap<String, NamedTensor> = all
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("param.").map(|n| (n.to_string(), v.clone())))
        .collect();
    let mut be = CpuBackend::<T>::new();
    let n = all["input"].shape[0];
    let mut net = UNet::new(&mut be, &config, n).unwrap();
    assert_eq!(net.specs().len(), state.len(), "one tensor per parameter");
    let flat = net.flat_from_state(&state, &path).unwrap();
    be.upload(net.params, &flat).unwrap();
    let s = config.sample_size;
    be.upload(net.input, &nchw_to_nhwc(&all["input"].data, n, 3, s, s))
        .unwrap();
    be.upload(net.timesteps, &all["timesteps"].data).unwrap();
    let classes = all.get("labels").map(labels);
    assert_eq!(classes.is_some(), config.classes.is_some());
    if let Some(other) = all.get("other_labels") {
        // The rows the gradient pass does not use, through a forward pass of their own.
        net.set_labels(&mut be, &labels(other)).unwrap();
        let out = net.forward(&mut be, None).unwrap();
        let got = nhwc_to_nchw(&be.download(out).unwrap(), n, 3, s, s);
        let e = scaled_error(&got, &all["other_output"].data, 0.0);
        assert!(e < tol_output, "output error {e:e} with the other labels");
    }
    if let Some(l) = &classes {
        net.set_labels(&mut be, l).unwrap();
    }
    let out = net.forward(&mut be, None).unwrap();
    let got = nhwc_to_nchw(&be.download(out).unwrap(), n, 3, s, s);
    let e = scaled_error(&got, &all["output"].data, 0.0);
    assert!(
        e < tol_output,
        "output error {e:e} (tolerance {tol_output:e})"
    );

    let target = be.alloc(out.len).unwrap();
    let loss = be.alloc(1).unwrap();
    be.upload(target, &nchw_to_nhwc(&all["target"].data, n, 3, s, s))
        .unwrap();
    be.mse_loss(out, target, loss, net.output_grad()).unwrap();
    let l = f64::from(be.download(loss).unwrap()[0]);
    let l_ref = f64::from(all["loss"].data[0]);
    assert!(
        (l - l_ref).abs() / l_ref < tol_output,
        "loss {l} vs {l_ref}"
    );
    net.backward(&mut be).unwrap();
    let grads = be.download(net.grads).unwrap();
    // Some gradients are exactly zero in exact arithmetic (the key bias: softmax ignores a constant added
    // to a row of scores) and come out as rounding noise, so each tensor's scale is floored at `floor` times
    // the largest gradient in the model.
    let largest = all
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .flat_map(|(_, v)| v.data.iter())
        .fold(0.0f64, |m, v| m.max(f64::from(v.abs())));
    let mut worst = (0.0, String::new());
    for (name, g) in net.state_from_flat(&grads) {
        let reference = &all[&format!("grad.{name}")];
        assert_eq!(g.shape, reference.shape, "{name}");
        let e = scaled_error(&g.data, &reference.data, floor * largest);
        if e > worst.0 {
            worst = (e, name);
        }
    }
    eprintln!(
        "output error {e:e}, worst gradient error {:e} ({})",
        worst.0, worst.1
    );
    assert!(
        worst.0 < tol_grad,
        "worst gradient error {:e} in {} (tolerance {tol_grad:e})",
        worst.0,
        worst.1
    );
}

// f32: ~1e-7 per operation, compounded over ~30 layers and sums of up to ~1000 terms: 1e-5 of the tensor's
// scale for the output, 5e-5 for gradients (they pass through the network twice). The zero key-bias
// gradient is f32 noise of ~1e-8 of the largest gradient, so the floor is 1e-3 of it.
#[test]
fn f32_unet_matches_diffusers() {
    run::<f32>("unet_small", 1e-5, 5e-5, 1e-3);
}

// The class-conditional model: the same network with one more input to the time embedding, so the same
// tolerances. Its batch has two images of one class, whose embedding gradients add.
#[test]
fn f32_conditional_unet_matches_diffusers() {
    run::<f32>("unet_cond", 1e-5, 5e-5, 1e-3);
}

#[test]
fn f64_conditional_unet_matches_diffusers() {
    run::<f64>("unet_cond", 5e-7, 5e-7, 1e-4);
}

// f64: the reference is stored in f32, so agreement is limited by that rounding (6e-8 relative).
#[test]
fn f64_unet_matches_diffusers() {
    run::<f64>("unet_small", 5e-7, 5e-7, 1e-4);
}

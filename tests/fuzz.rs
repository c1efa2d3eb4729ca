//! Hostile files, for every reader: thousands of mutations of valid files (bit flips, bytes set to 0,
//! 0xff or digits, truncations, duplicated and deleted spans, inserted bytes), each fed to the reader,
//! which must return a value or an error and never panic. A reader that allocated from a size in a
//! header without checking it against the file would abort the whole test process. Mutations are drawn
//! from Philox with fixed seeds, so a failure is reproducible from the case number it prints; the count
//! bounds the time (a few seconds in all). Then the headers that claim absurd sizes, one by one.

mod common;

use ddpm_cuda::backend::Layout;
use ddpm_cuda::checkpoint::{self, SchedulerConfig};
use ddpm_cuda::data::Dataset;
use ddpm_cuda::model::params::{parse_safetensors, write_safetensors_bytes};
use ddpm_cuda::model::{UNet, UNetConfig};
use ddpm_cuda::npy;
use ddpm_cuda::rng;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

const CASES: u64 = 5000;

/// Applies 1..=6 random mutations to `bytes` (case `case` of stream `stream`).
fn mutate(bytes: &[u8], stream: u64, case: u64) -> Vec<u8> {
    let mut draw = {
        let mut k = 0u64;
        move |n: u64| {
            k += 1;
            rng::below(case, stream, k, n.max(1))
        }
    };
    let mut v = bytes.to_vec();
    for _ in 0..1 + draw(6) {
        let len = v.len() as u64;
        let at = draw(len + 1) as usize;
        match draw(7) {
            0 if at < v.len() => v[at] ^= 1 << draw(8),
            1 if at < v.len() => v[at] = [0, 0xff, b'9', b'[', b'"', 0x80][draw(6) as usize],
            2 => v.truncate(at),
            3 => {
                let end = (at + draw(64) as usize).min(v.len());
                v.drain(at..end);
            }
            4 => {
                let end = (at + draw(64) as usize).min(v.len());
                let span = v[at..end].to_vec();
                v.splice(at..at, span);
            }
            5 => {
                let extra: Vec<u8> = (0..draw(16)).map(|_| draw(256) as u8).collect();
                v.splice(at..at, extra);
            }
            _ => {
                if let Some(b) = v.get_mut(at) {
                    *b = b.wrapping_add(1);
                }
            }
        }
    }
    v
}

/// Runs `read` on `CASES` mutations of `valid`; fails with the case number on a panic.
fn fuzz(what: &str, stream: u64, valid: &[u8], read: impl Fn(&[u8])) {
    read(valid);
    let mut accepted = 0;
    for case in 0..CASES {
        let input = mutate(valid, stream, case);
        if catch_unwind(AssertUnwindSafe(|| read(&input))).is_err() {
            panic!(
                "{what}: case {case} panicked (input of {} bytes)",
                input.len()
            );
        }
        accepted += 1;
    }
    eprintln!("{what}: {accepted} mutated inputs, no panic");
}

fn micro() -> UNetConfig {
    common::two_level(8, [8, 16], 1, 4, 0.0)
}

#[test]
fn safetensors_weights_never_panic() {
    let mut be = ddpm_cuda::backend::cpu::CpuBackend::<f32>::new();
    let net = UNet::new_inference(&mut be, &micro(), 1).unwrap();
    let flat: Vec<f32> = (0..net.num_params()).map(|i| i as f32 * 1e-3).collect();
    let valid = write_safetensors_bytes(&net.state_from_flat(&flat), None).unwrap();
    let path = Path::new("weights.safetensors");
    fuzz("safetensors weights", 1, &valid, |b| {
        if let Ok(state) = parse_safetensors(b, path) {
            let _ = net.flat_from_state(&state, path);
        }
    });
}

#[test]
fn training_states_never_panic() {
    let dir = std::env::temp_dir().join(format!("ddpm-fuzz-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let n = 40;
    let state = checkpoint::TrainState {
        step: 7,
        options: ddpm_cuda::train::TrainOptions {
            batch: 2,
            lr: 1e-3,
            warmup: 1,
            max_grad_norm: 1.0,
            ema_decay: 0.9,
            flip: true,
            cond_drop: 0.0,
            seed: 1,
        },
        data: "synthetic".into(),
        params: vec![0.5; n],
        ema: vec![0.25; n],
        adam_m: vec![0.0; n],
        adam_v: vec![1.0; n],
    };
    checkpoint::save_state(&dir, &state).unwrap();
    let valid = std::fs::read(dir.join(checkpoint::STATE)).unwrap();
    fuzz("training state", 2, &valid, |b| {
        std::fs::write(dir.join(checkpoint::STATE), b).unwrap();
        if let Ok(s) = checkpoint::load_state(&dir) {
            assert_eq!(
                s.params.len(),
                s.adam_v.len(),
                "a loaded state is consistent"
            );
        }
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn configs_never_panic() {
    let unet = serde_json::to_string_pretty(&micro().to_json()).unwrap();
    fuzz("config.json", 3, unet.as_bytes(), |b| {
        if let Ok(c) = UNetConfig::from_json(&String::from_utf8_lossy(b), Path::new("config.json"))
        {
            // Whatever parses must place without overflow or an absurd allocation.
            let _ = UNet::arena_len(&c, 1, true, Layout::default());
        }
    });
    let sched = serde_json::to_string_pretty(&SchedulerConfig::default().to_json()).unwrap();
    fuzz("scheduler_config.json", 4, sched.as_bytes(), |b| {
        let p = Path::new("scheduler_config.json");
        if let Ok(s) = SchedulerConfig::from_json(&String::from_utf8_lossy(b), p) {
            assert_eq!(s.schedule().len(), s.num_train_timesteps);
        }
    });
}

#[test]
fn npy_files_never_panic() {
    let data: Vec<f32> = (0..2 * 3 * 4 * 4).map(|i| i as f32).collect();
    let valid = npy::to_bytes(&data, &[2, 3, 4, 4]);
    fuzz(".npy", 5, &valid, |b| {
        if let Ok((shape, v)) = npy::parse(b, Path::new("x.npy")) {
            assert_eq!(shape.iter().product::<usize>(), v.len());
        }
    });
}

#[test]
fn cifar_files_and_image_folders_never_panic() {
    let dir = std::env::temp_dir().join(format!("ddpm-fuzz-data-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let cifar: Vec<u8> = (0..2 * 3073).map(|i| (i * 7 % 256) as u8).collect();
    let bin = dir.join("data_batch_1.bin");
    fuzz("CIFAR-10 binary", 6, &cifar, |b| {
        std::fs::write(&bin, b).unwrap();
        if let Ok(d) = Dataset::open(bin.to_str().unwrap(), 8, 0) {
            assert_eq!(d.images.len(), d.len * 8 * 8 * 3);
        }
    });
    let mut png = Vec::new();
    let img = image::RgbImage::from_fn(12, 9, |x, y| image::Rgb([x as u8 * 20, y as u8 * 25, 7]));
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let path = dir.join("images/a.png");
    let folder = dir.join("images");
    fuzz("image folder (PNG)", 7, &png, |b| {
        std::fs::write(&path, b).unwrap();
        if let Ok(d) = Dataset::open(folder.to_str().unwrap(), 8, 0) {
            assert_eq!(d.len, 1);
        }
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Headers that claim sizes far beyond the file: refused before anything that size is allocated.
#[test]
fn absurd_sizes_in_headers_are_refused() {
    let p = Path::new("x");
    // A safetensors header claiming 2^60 floats over 16 bytes of data.
    let header = r#"{"w":{"dtype":"F32","shape":[1152921504606846976],"data_offsets":[0,16]}}"#;
    let mut st = (header.len() as u64).to_le_bytes().to_vec();
    st.extend(header.as_bytes());
    st.extend([0u8; 16]);
    assert!(parse_safetensors(&st, p).is_err());
    // ... or a header length of 2^60.
    let mut st = (1u64 << 60).to_le_bytes().to_vec();
    st.extend(b"{}");
    assert!(parse_safetensors(&st, p).is_err());
    // An .npy of shape (2^60, 4) over 32 bytes of data.
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1152921504606846976, 4), }\n";
    let mut bad = b"\x93NUMPY\x01\x00".to_vec();
    bad.extend((header.len() as u16).to_le_bytes());
    bad.extend(header.as_bytes());
    bad.extend([0u8; 32]);
    let e = npy::parse(&bad, p).unwrap_err().to_string();
    assert!(e.contains("needs") || e.contains("overflows"), "{e}");
    // A config of enormous images, and one with a channel count past any memory.
    let mut c = micro().to_json();
    c["sample_size"] = serde_json::json!(1u64 << 40);
    let e = UNetConfig::from_json(&c.to_string(), p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sample_size"), "{e}");
    let mut c = micro().to_json();
    c["block_out_channels"] = serde_json::json!([8, 1u64 << 33]);
    assert!(UNetConfig::from_json(&c.to_string(), p).is_err());
    // A batch whose arena could not exist.
    assert!(UNet::arena_len(&micro(), 1 << 50, true, Layout::default()).is_err());
    // num_train_timesteps of 10^12 (the tables would be built on the host).
    let s = r#"{"num_train_timesteps": 1000000000000}"#;
    assert!(SchedulerConfig::from_json(s, p).is_err());
}

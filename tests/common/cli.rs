//! Running the real binary from tests: a scratch directory, the micro model, and runs that must succeed
//! or fail cleanly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// An 8x8 model of the paper's family (two levels, attention at the lower one): fast enough to sample
/// 1000 steps in a test.
pub const MICRO: &str = r#"{"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 3, "out_channels": 3,
  "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
  "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 4,
  "norm_eps": 1e-6, "dropout": 0.1, "attention_head_dim": null}"#;

pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ddpm-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn ddpm(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddpm-cuda"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the binary runs")
}

pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = ddpm(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ddpm-cuda {args:?} failed:\n{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned() + &stderr
}

/// Runs a command that must fail cleanly; returns its stderr.
pub fn fails(dir: &Path, args: &[&str]) -> String {
    let out = ddpm(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "ddpm-cuda {args:?} should fail with exit code 1:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    stderr
}

pub fn png_size(path: &Path) -> (u32, u32) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (img.width(), img.height())
}

/// Trains the micro model for `steps` in `dir/out`.
pub fn train(dir: &Path, out: &str, steps: u64, extra: &[&str]) {
    std::fs::write(dir.join("micro.json"), MICRO).unwrap();
    let steps = steps.to_string();
    let mut args = vec![
        "train",
        "--config",
        "micro.json",
        "--batch",
        "4",
        "--grid",
        "4",
        "--out",
        out,
        "--steps",
    ];
    args.push(&steps);
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--device", "cpu"]);
    ok(dir, &args);
}

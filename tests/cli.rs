//! The real binary, as a user runs it: train a few steps, resume, sample, diffuse, info; every output is
//! decoded and its shape checked. Bad input must give a clear error, exit code 1 (a panic exits 101), and
//! leave existing files untouched.

mod common;

use common::cli::{fails, ok, png_size, scratch, train, MICRO};
use ddpm_cuda::checkpoint::{self, load_model, load_state};
use ddpm_cuda::model::params::{read_safetensors, write_safetensors_bytes};
use ddpm_cuda::model::{UNet, UNetConfig};
use std::path::Path;

#[test]
fn train_sample_diffuse_and_info_write_valid_outputs() {
    let dir = scratch("outputs");
    train(&dir, "run", 6, &["--every", "3"]);
    let run = dir.join("run");

    // The model directory loads, its weights fit the config tensor by tensor, the state is at step 6.
    let model = load_model(&run).unwrap();
    let config = UNetConfig::from_json(MICRO, Path::new("micro.json")).unwrap();
    assert_eq!(model.config, config);
    let mut be = ddpm_cuda::backend::cpu::CpuBackend::<f32>::new();
    let net = UNet::new_inference(&mut be, &config, 1).unwrap();
    let ema = model.flat_weights(&net).unwrap();
    let state = load_state(&run).unwrap();
    assert_eq!((state.step, state.ema.clone()), (6, ema));
    let csv = std::fs::read_to_string(run.join("loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7, "a header and six losses:\n{csv}");
    // 4 samples of 8x8 in a 2x2 grid with 2-pixel gaps, scaled up 16x.
    for png in ["samples_0000003.png", "samples_0000006.png"] {
        assert_eq!(png_size(&run.join(png)), (16 * 22, 16 * 22));
    }
    assert_eq!(png_size(&run.join("loss.png")), (640, 360));

    ok(
        &dir,
        &[
            "sample",
            "--model",
            "run",
            "-n",
            "3",
            "--batch",
            "2",
            "--out",
            "s.png",
            "--each",
            "each",
            "--out-npy",
            "s.npy",
            "--device",
            "cpu",
        ],
    );
    assert_eq!(png_size(&dir.join("s.png")), (16 * 22, 16 * 22));
    for i in 0..3 {
        assert_eq!(png_size(&dir.join(format!("each/{i:05}.png"))), (12, 12));
    }
    let (shape, data) = ddpm_cuda::npy::read(&dir.join("s.npy")).unwrap();
    assert_eq!(shape, vec![3, 3, 8, 8]);
    // Clipping of x0 keeps the final samples (x0 predictions at t = 0) in [-1, 1].
    assert!(data.iter().all(|v| (-1.0..=1.0).contains(v)), "{data:?}");

    ok(
        &dir,
        &[
            "diffuse", "--image", "s.png", "--size", "16", "--out", "d.png",
        ],
    );
    assert_eq!(png_size(&dir.join("d.png")), (7 * 18 + 2, 18 + 2));

    let info = ok(&dir, &["info", "--model", "run", "--batch", "4"]);
    let count = format!("parameters   {} ", net.num_params());
    assert!(info.contains(&count), "{info}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `train --resume` after 4 steps, continued to 7, ends exactly where 7 steps straight end, for a plain and a
/// class-conditional run.
#[test]
fn resume_through_the_cli_is_bit_identical() {
    let dir = scratch("resume");
    // Unconditional, and class-conditional (the labels and their dropout are drawn by step too).
    for (name, extra) in [
        ("", &[][..]),
        ("cond-", &["--conditional", "--cond-drop", "0.3"][..]),
    ] {
        let (straight, split) = (format!("{name}straight"), format!("{name}split"));
        train(
            &dir,
            &straight,
            7,
            &[&["--every", "100"][..], extra].concat(),
        );
        train(&dir, &split, 4, &[&["--every", "100"][..], extra].concat());
        ok(
            &dir,
            &[
                "train", "--resume", &split, "--steps", "7", "--grid", "4", "--device", "cpu",
            ],
        );
        let (a, b) = (
            load_state(&dir.join(&straight)).unwrap(),
            load_state(&dir.join(&split)).unwrap(),
        );
        assert_eq!(a.step, 7);
        assert!(
            a == b,
            "{name}: resumed state differs from the uninterrupted run"
        );
        let csv = |d: &str| std::fs::read_to_string(dir.join(d).join("loss.csv")).unwrap();
        assert_eq!(csv(&straight), csv(&split));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// DDIM with eta 0 from a given x_T is deterministic; the legacy attention names load to the same
/// model; convert writes bf16 and training directories that load and resume; eval reports a bound.
#[test]
fn interop_ddim_convert_and_eval() {
    let dir = scratch("interop");
    train(&dir, "run", 2, &[]);
    let noise: Vec<f32> = (0..2 * 3 * 64)
        .map(|i| ddpm_cuda::rng::normal(5, 0, i))
        .collect();
    std::fs::write(
        dir.join("x_T.npy"),
        ddpm_cuda::npy::to_bytes(&noise, &[2, 3, 8, 8]),
    )
    .unwrap();
    let ddim = |model: &str, out: &str| {
        ok(
            &dir,
            &[
                "sample",
                "--model",
                model,
                "--sampler",
                "ddim",
                "--steps",
                "20",
                "--init-noise",
                "x_T.npy",
                "--out",
                "g.png",
                "--out-npy",
                out,
                "--device",
                "cpu",
            ],
        );
        std::fs::read(dir.join(out)).unwrap()
    };
    let first = ddim("run", "a.npy");
    assert_eq!(
        ddim("run", "b.npy"),
        first,
        "DDIM eta 0 from one x_T is deterministic"
    );
    let (shape, _) = ddpm_cuda::npy::parse(&first, Path::new("a.npy")).unwrap();
    assert_eq!(shape, vec![2, 3, 8, 8], "N comes from --init-noise");

    // The same weights under the 2022 names (query, key, value, proj_attn).
    let legacy = dir.join("legacy");
    std::fs::create_dir_all(&legacy).unwrap();
    for f in [checkpoint::CONFIG, checkpoint::SCHEDULER] {
        std::fs::copy(dir.join("run").join(f), legacy.join(f)).unwrap();
    }
    let renamed: Vec<_> = read_safetensors(&dir.join("run").join(checkpoint::WEIGHTS))
        .unwrap()
        .into_iter()
        .map(|(n, t)| (ddpm_cuda::model::params::legacy_name(&n).unwrap_or(n), t))
        .collect();
    assert!(renamed.iter().any(|(n, _)| n.contains(".proj_attn.")));
    std::fs::write(
        legacy.join(checkpoint::WEIGHTS),
        write_safetensors_bytes(&renamed, None).unwrap(),
    )
    .unwrap();
    assert_eq!(
        ddim("legacy", "c.npy"),
        first,
        "legacy names give the same model"
    );

    // Respaced ancestral sampling honours --init-noise too, and runs.
    ok(
        &dir,
        &[
            "sample",
            "--model",
            "run",
            "--steps",
            "10",
            "--init-noise",
            "x_T.npy",
            "--out",
            "r.png",
            "--device",
            "cpu",
        ],
    );

    // convert: a plain bf16 directory (weights rounded to bf16), and a training directory from it.
    ok(
        &dir,
        &[
            "convert", "--model", "run", "--out", "plain", "--dtype", "bf16",
        ],
    );
    assert!(!dir.join("plain").join(checkpoint::STATE).exists());
    let ema = load_state(&dir.join("run")).unwrap().ema;
    let config = UNetConfig::from_json(MICRO, Path::new("micro.json")).unwrap();
    let mut be = ddpm_cuda::backend::cpu::CpuBackend::<f32>::new();
    let net = UNet::new_inference(&mut be, &config, 1).unwrap();
    let bf16 = load_model(&dir.join("plain"))
        .unwrap()
        .flat_weights(&net)
        .unwrap();
    for (a, b) in ema.iter().zip(&bf16) {
        assert_eq!(half::bf16::from_f32(*a).to_f32(), *b);
    }
    // f16 storage, read back from diffusers' pipeline layout (unet/ and scheduler/ folders).
    let args = [
        "convert",
        "--model",
        "run",
        "--out",
        "pipe/unet",
        "--dtype",
        "f16",
    ];
    ok(&dir, &args);
    std::fs::create_dir_all(dir.join("pipe/scheduler")).unwrap();
    std::fs::rename(
        dir.join("pipe/unet").join(checkpoint::SCHEDULER),
        dir.join("pipe/scheduler").join(checkpoint::SCHEDULER),
    )
    .unwrap();
    let pipe = load_model(&dir.join("pipe")).unwrap();
    assert_eq!(pipe.config, config);
    let f16 = pipe.flat_weights(&net).unwrap();
    for (a, b) in ema.iter().zip(&f16) {
        assert_eq!(half::f16::from_f32(*a).to_f32(), *b);
    }
    let args = [
        "sample", "--model", "pipe", "-n", "1", "--steps", "5", "--out", "p.png",
    ];
    ok(&dir, &args);
    let args = [
        "convert",
        "--model",
        "plain",
        "--out",
        "again",
        "--training-state",
    ];
    ok(&dir, &args);
    let state = load_state(&dir.join("again")).unwrap();
    assert_eq!((state.step, &state.params), (0, &bf16));
    ok(
        &dir,
        &[
            "train", "--resume", "again", "--steps", "2", "--batch", "2", "--grid", "1",
            "--device", "cpu",
        ],
    );
    assert_eq!(load_state(&dir.join("again")).unwrap().step, 2);

    // eval: every term reported, finite and positive, and they add up.
    let report = ok(
        &dir,
        &[
            "eval",
            "--model",
            "run",
            "--data",
            "synthetic",
            "--limit",
            "3",
            "--batch",
            "2",
            "--device",
            "cpu",
        ],
    );
    let value = |label: &str| -> f64 {
        let line = report
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("{label} missing from:\n{report}"));
        line[label.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (prior, terms, decoder, total) = (
        value("L_T (prior)"),
        value("sum of L_t"),
        value("L_0 (decoder)"),
        value("total (NLL bound)"),
    );
    assert!(
        prior > 0.0 && terms > 0.0 && decoder.is_finite(),
        "{report}"
    );
    assert!((prior + terms + decoder - total).abs() < 1e-4, "{report}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_is_a_clear_error_and_destroys_nothing() {
    let dir = scratch("bad");
    train(&dir, "good", 1, &[]);
    let sentinel = dir.join("keep.png");
    std::fs::write(&sentinel, b"the user's file").unwrap();
    let good = dir.join("good");
    let weights = read_safetensors(&good.join(checkpoint::WEIGHTS)).unwrap();
    let mut sorted: Vec<_> = weights.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));

    // A broken copy of the good model: `edit` changes one file of it.
    let broken = |name: &str, edit: &dyn Fn(&Path)| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in [
            checkpoint::CONFIG,
            checkpoint::WEIGHTS,
            checkpoint::SCHEDULER,
        ] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        edit(&d);
        name.to_string()
    };
    let weights_file = |d: &Path| d.join(checkpoint::WEIGHTS);
    let cases: Vec<(String, &str)> = vec![
        (
            broken("no-weights", &|d| {
                std::fs::remove_file(weights_file(d)).unwrap()
            }),
            "weights are missing",
        ),
        (
            broken("truncated", &|d| {
                let b = std::fs::read(weights_file(d)).unwrap();
                std::fs::write(weights_file(d), &b[..b.len() / 2]).unwrap();
            }),
            "not a safetensors file",
        ),
        (
            broken("garbage", &|d| {
                std::fs::write(weights_file(d), [0xffu8; 64]).unwrap()
            }),
            "not a safetensors file",
        ),
        (
            broken("gelu", &|d| {
                let c = MICRO.replace("\"sample_size\"", "\"act_fn\": \"gelu\", \"sample_size\"");
                std::fs::write(d.join(checkpoint::CONFIG), c).unwrap();
            }),
            "act_fn",
        ),
        (
            broken("unknown-key", &|d| {
                let c = MICRO.replace("\"sample_size\"", "\"colour\": 3, \"sample_size\"");
                std::fs::write(d.join(checkpoint::CONFIG), c).unwrap();
            }),
            "unknown config key \"colour\"",
        ),
        (
            broken("bad-scheduler", &|d| {
                std::fs::write(d.join(checkpoint::SCHEDULER), r#"{"beta_end": "big"}"#).unwrap();
            }),
            "beta_end",
        ),
        (
            broken("missing-tensor", &|d| {
                let kept: Vec<_> = sorted
                    .iter()
                    .filter(|(n, _)| n != "conv_in.weight")
                    .cloned()
                    .collect();
                std::fs::write(
                    weights_file(d),
                    write_safetensors_bytes(&kept, None).unwrap(),
                )
                .unwrap();
            }),
            "missing tensor conv_in.weight",
        ),
        (
            broken("wrong-shape", &|d| {
                let mut t = sorted.clone();
                let conv = t.iter_mut().find(|(n, _)| n == "conv_out.bias").unwrap();
                conv.1.shape = vec![1, 3];
                std::fs::write(weights_file(d), write_safetensors_bytes(&t, None).unwrap())
                    .unwrap();
            }),
            "conv_out.bias: expected shape [3]",
        ),
    ];
    for (model, needle) in &cases {
        let e = fails(
            &dir,
            &[
                "sample", "--model", model, "--out", "keep.png", "--device", "cpu",
            ],
        );
        assert!(
            e.contains(needle) && e.contains(model.as_str()),
            "{model}: {e}"
        );
    }

    std::fs::write(dir.join("short.bin"), vec![0u8; 3073 + 100]).unwrap();
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    std::fs::write(dir.join("empty/readme.txt"), "no images here").unwrap();
    std::fs::create_dir_all(dir.join("fake")).unwrap();
    std::fs::write(dir.join("fake/a.png"), "not a png").unwrap();
    std::fs::write(dir.join("micro.json"), MICRO).unwrap();
    let train_on = |data: &str| {
        let args = [
            "train",
            "--config",
            "micro.json",
            "--data",
            data,
            "--steps",
            "1",
            "--out",
            "good",
            "--device",
            "cpu",
        ];
        fails(&dir, &args)
    };
    let before = std::fs::read(good.join(checkpoint::STATE)).unwrap();
    for (data, needle) in [
        ("short.bin", "3073"),
        ("empty", "no CIFAR-10 .bin files, no .png/.jpg images"),
        ("fake", "a.png: not a readable PNG/JPEG image"),
        ("nowhere", "no such file or directory"),
    ] {
        let e = train_on(data);
        assert!(e.contains(needle), "--data {data}: {e}");
    }
    assert_eq!(std::fs::read(good.join(checkpoint::STATE)).unwrap(), before);

    let npy = ddpm_cuda::npy::to_bytes(&[0.0; 48], &[1, 3, 4, 4]);
    std::fs::write(dir.join("wrong.npy"), npy).unwrap();
    let f64_npy = ddpm_cuda::npy::to_bytes(&[0.0; 12], &[6, 1]);
    let at = f64_npy.windows(3).position(|w| w == b"<f4").unwrap();
    std::fs::write(
        dir.join("f64.npy"),
        [&f64_npy[..at], b"<f8", &f64_npy[at + 3..]].concat(),
    )
    .unwrap();
    broken("pickle", &|d| {
        std::fs::rename(weights_file(d), d.join("diffusion_pytorch_model.bin")).unwrap()
    });
    broken("short-header", &|d| {
        let b = std::fs::read(weights_file(d)).unwrap();
        std::fs::write(weights_file(d), &b[..20]).unwrap();
    });
    // The weights of another config (one more level) under this config.
    let other = MICRO
        .replace("[8, 16]", "[8, 16, 16]")
        .replace(
            r#"["DownBlock2D", "AttnDownBlock2D"]"#,
            r#"["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]"#,
        )
        .replace(
            r#"["AttnUpBlock2D", "UpBlock2D"]"#,
            r#"["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]"#,
        );
    std::fs::write(dir.join("other.json"), other).unwrap();
    let args = [
        "train",
        "--config",
        "other.json",
        "--steps",
        "1",
        "--batch",
        "1",
        "--grid",
        "1",
        "--out",
        "bigger",
        "--device",
        "cpu",
    ];
    ok(&dir, &args);
    broken("other-config", &|d| {
        std::fs::copy(
            dir.join("bigger").join(checkpoint::WEIGHTS),
            weights_file(d),
        )
        .unwrap();
    });
    for (args, needle) in [
        (
            vec!["sample", "--model", "good", "-n", "0"],
            "-n and --batch",
        ),
        (
            vec!["sample", "--model", "good", "--out", "no/such/dir/s.png"],
            "no/such/dir does not exist",
        ),
        (
            vec!["sample", "--model", "good", "--out-npy", "nodir/s.npy"],
            "nodir does not exist",
        ),
        (vec!["sample", "--model", "nothing-here"], "nothing-here"),
        (
            vec!["train", "--resume", "empty", "--steps", "2"],
            "training_state.safetensors",
        ),
        (vec!["train", "--preset", "huge"], "unknown preset \"huge\""),
        (
            vec!["diffuse", "--image", "fake/a.png"],
            "not a readable PNG/JPEG image",
        ),
        (
            vec!["diffuse", "--image", "keep.png", "--t", "1000"],
            "--t 1000",
        ),
        (
            vec!["bench", "--preset", "tiny", "--batch", "0"],
            "--batch and --steps must be at least 1",
        ),
        (
            vec!["train", "--preset", "tiny", "--precision", "bf16"],
            "--precision bf16 needs the CUDA backend",
        ),
        (
            vec!["sample", "--model", "good", "--precision", "bf16"],
            "--precision bf16 needs the CUDA backend",
        ),
        (
            vec!["sample", "--model", "good", "--init-noise", "short.bin"],
            "not a .npy file",
        ),
        (
            vec!["sample", "--model", "good", "--init-noise", "wrong.npy"],
            "does not fit: expected (N, 3, 8, 8)",
        ),
        (
            vec!["sample", "--model", "good", "--init-noise", "f64.npy"],
            "expected float32",
        ),
        (
            vec![
                "sample",
                "--model",
                "good",
                "--sampler",
                "ddim",
                "--steps",
                "2000",
            ],
            "--steps 2000 must be in 1..=1000",
        ),
        (vec!["sample", "--model", "pickle"], "PyTorch pickle"),
        (
            vec!["sample", "--model", "pickle/diffusion_pytorch_model.bin"],
            "a PyTorch pickle",
        ),
        (
            vec!["sample", "--model", "other-config"],
            "these weights are for another config",
        ),
        (
            vec!["sample", "--model", "short-header"],
            "not a safetensors file",
        ),
    ] {
        let mut a = args.clone();
        a.extend_from_slice(&["--device", "cpu"]);
        if a[0] == "diffuse" {
            a.truncate(a.len() - 2);
        }
        let e = fails(&dir, &a);
        assert!(e.contains(needle), "{args:?}: {e}");
    }
    assert_eq!(std::fs::read(&sentinel).unwrap(), b"the user's file");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sampling at FID scale: a request whose `.npy` cannot fit on its disk is refused before anything runs
/// (and before any memory is taken for it: a billion images of the micro model are 768 GB); x_T with
/// a value that is not finite is refused, naming the first; the grid shows the first 64 images while the
/// `.npy` and `--each` hold them all.
#[test]
fn sampling_at_scale_is_checked_before_it_starts_and_streams() {
    let dir = scratch("scale");
    train(&dir, "run", 1, &[]);
    let e = fails(
        &dir,
        &[
            "sample",
            "--model",
            "run",
            "-n",
            "1000000000",
            "--out-npy",
            "big.npy",
            "--device",
            "cpu",
        ],
    );
    assert!(
        e.contains("--out-npy big.npy") && e.contains("GB free"),
        "{e}"
    );
    assert!(!dir.join("big.npy").exists() && !dir.join("samples.png").exists());

    let mut x = vec![0.5f32; 2 * 3 * 8 * 8];
    // Image 1, channel 2, row 3, column 4 (NCHW), and a later one.
    x[3 * 64 + 2 * 64 + 3 * 8 + 4] = f32::NAN;
    x[3 * 64 + 2 * 64 + 3 * 8 + 6] = f32::INFINITY;
    std::fs::write(
        dir.join("nan.npy"),
        ddpm_cuda::npy::to_bytes(&x, &[2, 3, 8, 8]),
    )
    .unwrap();
    let e = fails(
        &dir,
        &[
            "sample",
            "--model",
            "run",
            "--init-noise",
            "nan.npy",
            "--device",
            "cpu",
        ],
    );
    assert!(
        e.contains("nan.npy")
            && e.contains("image 1, channel 2, row 3, column 4")
            && e.contains("NaN"),
        "{e}"
    );

    ok(
        &dir,
        &[
            "sample",
            "--model",
            "run",
            "-n",
            "70",
            "--batch",
            "35",
            "--sampler",
            "ddim",
            "--steps",
            "2",
            "--out",
            "g.png",
            "--out-npy",
            "g.npy",
            "--each",
            "g",
            "--device",
            "cpu",
        ],
    );
    // 8 x 8 cells of 8 pixels with 2-pixel gaps, scaled up 16x.
    assert_eq!(png_size(&dir.join("g.png")), (16 * 82, 16 * 82));
    let (shape, _) = ddpm_cuda::npy::read(&dir.join("g.npy")).unwrap();
    assert_eq!(shape, vec![70, 3, 8, 8]);
    assert!(dir.join("g/00069.png").is_file());
    assert!(!dir.join("g.png.partial.json").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A class-conditional run end to end: `train --conditional` saves the classes (a null one besides),
/// `sample --class` takes a name, a number or `all` (a row per class) with or without guidance, `eval`
/// takes the model with the data's labels, and every misuse of the flags is a clear error.
#[test]
fn class_conditional_train_sample_and_eval() {
    let dir = scratch("conditional");
    train(&dir, "cond", 3, &["--conditional"]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cond/config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["num_class_embeds"], 13,
        "12 classes and the null class"
    );
    assert_eq!(config["_num_real_classes"], 12);
    assert_eq!(config["_class_names"][3], "green-square");
    // The training grid of 4 has a row per class: 4 rows of one 8x8 sample, scaled 16x.
    assert_eq!(
        png_size(&dir.join("cond/samples_0000003.png")),
        (16 * 12, 16 * 42)
    );
    let sample = |extra: &[&'static str]| {
        let mut args = vec![
            "sample",
            "--model",
            "cond",
            "--sampler",
            "ddim",
            "--steps",
            "3",
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        args
    };
    // Every class in turn, guided: 24 images in 12 rows of 2.
    let out = ok(
        &dir,
        &sample(&["--guidance", "3", "-n", "24", "--out", "all.png"]),
    );
    assert!(out.contains("guidance 3"), "{out}");
    assert_eq!(png_size(&dir.join("all.png")), (16 * 22, 16 * 122));
    // One class by name and by number: the same images, other than the null class's.
    let npy = |name: &str| ddpm_cuda::npy::read(&dir.join(name)).unwrap().1;
    ok(
        &dir,
        &sample(&["--class", "blue-disk", "-n", "3", "--out-npy", "a.npy"]),
    );
    ok(
        &dir,
        &sample(&["--class", "4", "-n", "3", "--out-npy", "b.npy"]),
    );
    ok(
        &dir,
        &sample(&[
            "--class",
            "4",
            "-n",
            "3",
            "--guidance",
            "0",
            "--out-npy",
            "c.npy",
        ]),
    );
    assert_eq!(npy("a.npy"), npy("b.npy"));
    assert_ne!(npy("a.npy"), npy("c.npy"));
    let e = fails(&dir, &sample(&["--class", "purple-disk", "-n", "1"]));
    assert!(e.contains("purple-disk") && e.contains("red-disk"), "{e}");
    let e = fails(&dir, &sample(&["--class", "12", "-n", "1"]));
    assert!(e.contains("below 12"), "{e}");
    let e = fails(&dir, &sample(&["--guidance", "inf", "-n", "1"]));
    assert!(e.contains("--guidance"), "{e}");
    let out = ok(
        &dir,
        &[
            "eval",
            "--model",
            "cond",
            "--data",
            "synthetic",
            "--limit",
            "2",
            "--device",
            "cpu",
        ],
    );
    assert!(out.contains("bits/dim"), "{out}");

    // An unconditional model refuses the flags; so does training without labels or --conditional.
    train(&dir, "plain", 1, &[]);
    for flags in [["--class", "3"], ["--guidance", "2"]] {
        let args = ["sample", "--model", "plain", "-n", "1", "--device", "cpu"];
        let e = fails(&dir, &[&args[..], &flags[..]].concat());
        assert!(e.contains("no classes"), "{e}");
    }
    let micro = [
        "train",
        "--config",
        "micro.json",
        "--steps",
        "1",
        "--device",
        "cpu",
    ];
    let e = fails(
        &dir,
        &[&micro[..], &["--cond-drop", "0.1", "--out", "x"]].concat(),
    );
    assert!(e.contains("--conditional"), "{e}");
    std::fs::create_dir_all(dir.join("pics")).unwrap();
    ddpm_cuda::image::Canvas::new(8, 8, [9, 9, 9])
        .save_png(&dir.join("pics/a.png"))
        .unwrap();
    let e = fails(
        &dir,
        &[
            &micro[..],
            &["--conditional", "--data", "pics", "--out", "y"],
        ]
        .concat(),
    );
    assert!(e.contains("labelled") && e.contains("pics"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

//! Faults, tried on the real binary: signals, SIGKILL at random moments, non-finite training, full and
//! read-only disks, and requests that do not fit in memory. docs/RELIABILITY.md lists them with results.

mod common;

use common::cli::{fails, ok, scratch, train, MICRO};
use ddpm_cuda::checkpoint::{self, load_model, load_state};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn spawn(dir: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ddpm-cuda"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts")
}

/// Forwards the child's stderr lines to a channel (and keeps them all).
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (up to `limit`) for a line containing `needle`; returns every line seen.
fn wait_for(rx: &mpsc::Receiver<String>, needle: &str, limit: Duration) -> Vec<String> {
    let end = Instant::now() + limit;
    let mut seen = Vec::new();
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(needle);
                seen.push(line);
                if hit {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!(
        "no line with {needle:?} within {limit:?}:\n{}",
        seen.join("\n")
    );
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

fn micro_train_args<'a>(out: &'a str, steps: &'a str, every: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--config",
        "micro.json",
        "--batch",
        "2",
        "--grid",
        "1",
        "--every",
        every,
        "--out",
        out,
        "--steps",
        steps,
        "--device",
        "cpu",
    ]
}

/// SIGTERM during training: the step finishes, a checkpoint is written, the exit is clean, and
/// `--resume` carries on from it.
#[test]
fn sigterm_during_training_writes_a_checkpoint_and_exits_0() {
    let dir = scratch("sigterm");
    std::fs::write(dir.join("micro.json"), MICRO).unwrap();
    let mut child = spawn(&dir, &micro_train_args("run", "1000000", "1000000"));
    let rx = lines(&mut child);
    wait_for(&rx, "model:", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1500));
    signal(&child, "-TERM");
    let status = child.wait().unwrap();
    let rest: Vec<String> = rx.iter().collect();
    assert_eq!(status.code(), Some(0), "{}", rest.join("\n"));
    assert!(
        rest.iter()
            .any(|l| l.contains("stopped at step") && l.contains("--resume")),
        "{rest:?}"
    );
    let state = load_state(&dir.join("run")).unwrap();
    assert!(state.step > 0, "the stop came after some steps");
    load_model(&dir.join("run")).unwrap();
    let target = (state.step + 3).to_string();
    ok(
        &dir,
        &[
            "train", "--resume", "run", "--steps", &target, "--grid", "1", "--device", "cpu",
        ],
    );
    assert_eq!(load_state(&dir.join("run")).unwrap().step, state.step + 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGINT during sampling: the batches that finished are written (grid and .npy), exit code 130.
#[test]
fn sigint_during_sampling_keeps_the_complete_images() {
    let dir = scratch("sigint");
    train(&dir, "run", 1, &[]);
    let args = [
        "sample",
        "--model",
        "run",
        "-n",
        "64",
        "--batch",
        "2",
        "--out",
        "s.png",
        "--out-npy",
        "s.npy",
        "--device",
        "cpu",
    ];
    let mut child = spawn(&dir, &args);
    let rx = lines(&mut child);
    // The progress line of batch 2 means batch 1 is complete.
    wait_for(&rx, "batch 2/32", Duration::from_secs(120));
    signal(&child, "-INT");
    let status = child.wait().unwrap();
    let rest: Vec<String> = rx.iter().collect();
    assert_eq!(status.code(), Some(130), "{}", rest.join("\n"));
    let (shape, _) = ddpm_cuda::npy::read(&dir.join("s.npy")).unwrap();
    let k = shape[0];
    assert!((2..64).contains(&k) && k % 2 == 0, "{k} complete images");
    assert_eq!(&shape[1..], &[3, 8, 8]);
    assert!(
        rest.iter()
            .any(|l| l.contains(&format!("wrote the {k} of 64 images"))),
        "{rest:?}"
    );
    image::open(dir.join("s.png")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A sampling run stopped by SIGINT continues, when the same command is run again, from the first image it
/// had not written, and ends with exactly the images of a run never stopped (every output byte for byte,
/// though each run used another batch size); the record of the stopped run refuses a command with
/// other options, naming them, and leaves every file as it was; when the run completes its record goes.
#[test]
fn an_interrupted_sampling_run_continues_to_the_same_images() {
    fn run(args: &[String]) -> Vec<&str> {
        args.iter().map(String::as_str).collect()
    }
    let dir = scratch("continue");
    train(&dir, "run", 1, &[]);
    let sample = |out: &str, batch: &'static str, seed: &'static str| -> Vec<String> {
        [
            "sample", "--model", "run", "-n", "12", "--batch", batch, "--seed", seed, "--device",
            "cpu",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--out".into(),
            format!("{out}.png"),
            "--out-npy".into(),
            format!("{out}.npy"),
            "--each".into(),
            out.to_string(),
        ])
        .collect()
    };
    ok(&dir, &run(&sample("ref", "4", "3")));

    let mut child = spawn(&dir, &run(&sample("s", "2", "3")));
    let rx = lines(&mut child);
    wait_for(&rx, "batch 3/6", Duration::from_secs(120));
    signal(&child, "-INT");
    let status = child.wait().unwrap();
    let rest: Vec<String> = rx.iter().collect();
    assert_eq!(status.code(), Some(130), "{}", rest.join("\n"));
    assert!(
        rest.iter()
            .any(|l| l.contains("the same command continues")),
        "{rest:?}"
    );
    let record = dir.join("s.png.partial.json");
    assert!(record.is_file(), "the stopped run is recorded");
    let (shape, _) = ddpm_cuda::npy::read(&dir.join("s.npy")).unwrap();
    let k = shape[0];
    assert!((4..12).contains(&k) && k % 2 == 0, "{k} complete images");
    let snapshot = |names: &[&str]| -> Vec<Vec<u8>> {
        names
            .iter()
            .map(|n| std::fs::read(dir.join(n)).unwrap())
            .collect()
    };
    let files = ["s.npy", "s.png", "s.png.partial.json", "s.png.partial.npy"];
    let before = snapshot(&files);

    let e = fails(&dir, &run(&sample("s", "2", "4")));
    assert!(
        e.contains("s.png.partial.json") && e.contains("--seed 3 there, 4 here"),
        "{e}"
    );
    assert!(
        snapshot(&files) == before,
        "a refused command touches nothing"
    );

    let log = ok(&dir, &run(&sample("s", "5", "3")));
    assert!(log.contains(&format!("from image {k}")), "{log}");
    let same = |a: &str, b: &str| {
        std::fs::read(dir.join(a)).unwrap() == std::fs::read(dir.join(b)).unwrap()
    };
    assert!(
        same("s.npy", "ref.npy"),
        "the continued run's .npy is the uninterrupted run's"
    );
    assert!(same("s.png", "ref.png"), "and so is its grid");
    for i in 0..12 {
        let name = format!("{i:05}.png");
        assert!(
            same(&format!("s/{name}"), &format!("ref/{name}")),
            "image {i}"
        );
    }
    assert!(!record.exists() && !dir.join("s.png.partial.npy").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGKILL at random moments of a run that checkpoints every step (so often in the middle of a write):
/// every time, what is on disk loads, and `--resume` continues. Bounded by count and time.
#[test]
fn sigkill_at_random_moments_never_loses_the_last_checkpoint() {
    let dir = scratch("sigkill");
    std::fs::write(dir.join("micro.json"), MICRO).unwrap();
    let run = dir.join("run");
    let (start, mut last, mut kills) = (Instant::now(), 0u64, 0);
    while kills < 8 && start.elapsed() < Duration::from_secs(60) {
        let mut args = micro_train_args("run", "1000000", "1");
        if run.join(checkpoint::STATE).exists() {
            args = vec![
                "train", "--resume", "run", "--steps", "1000000", "--every", "1", "--grid", "1",
                "--device", "cpu",
            ];
        }
        let mut child = spawn(&dir, &args);
        let delay = 150 + ddpm_cuda::rng::below(9, 9, kills, 900);
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        if !run.join(checkpoint::STATE).exists() {
            continue;
        }
        let state = load_state(&run).unwrap_or_else(|e| panic!("after kill {kills}: {e}"));
        load_model(&run).unwrap_or_else(|e| panic!("after kill {kills}: {e}"));
        assert!(
            state.step >= last,
            "the checkpoint went back from {last} to {}",
            state.step
        );
        last = state.step;
    }
    assert!(last > 0, "no checkpoint was ever written in {kills} runs");
    let target = (last + 2).to_string();
    ok(
        &dir,
        &[
            "train", "--resume", "run", "--steps", &target, "--device", "cpu",
        ],
    );
    assert_eq!(load_state(&run).unwrap().step, last + 2);
    let stale = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .count();
    assert_eq!(
        stale, 0,
        "temporary files of killed runs are cleaned up on resume"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A learning rate that blows the weights up: every step after the first has a non-finite loss, is
/// skipped, and after --max-bad-steps of them the run stops with a clear error; the checkpoint on disk
/// is the one before, and loads.
#[test]
fn non_finite_steps_are_skipped_counted_and_stop_the_run() {
    let dir = scratch("nan");
    std::fs::write(dir.join("micro.json"), MICRO).unwrap();
    let mut args = micro_train_args("run", "40", "1");
    args.extend_from_slice(&["--lr", "1e30", "--warmup", "1", "--max-bad-steps", "4"]);
    let e = fails(&dir, &args);
    assert!(
        e.contains("4 consecutive steps had a non-finite loss"),
        "{e}"
    );
    assert!(e.contains("step skipped"), "{e}");
    let state = load_state(&dir.join("run")).unwrap();
    assert!(state.step < 40, "stopped early, at {}", state.step);
    assert!(
        state.params.iter().all(|v| v.is_finite()),
        "skipped steps leave the weights finite"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Whether this machine lets an unprivileged process make its own mount namespace (where the disk tests
/// mount a tiny tmpfs and a read-only bind without touching the host).
fn namespaces() -> bool {
    Command::new("unshare")
        .args(["-rm", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `script` with `sh` in a private mount namespace, in `dir`; returns (exit code, stderr).
fn in_namespace(dir: &Path, script: &str) -> (Option<i32>, String) {
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", script])
        .env("DDPM", env!("CARGO_BIN_EXE_ddpm-cuda"))
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn full_and_read_only_disks_fail_cleanly_and_keep_the_checkpoint() {
    if !namespaces() {
        eprintln!("SKIPPED: no user and mount namespaces here (unshare -rm failed)");
        return;
    }
    let dir = scratch("disk");
    std::fs::write(dir.join("micro.json"), MICRO).unwrap();
    // The size of one checkpoint, measured from a run on the ordinary disk.
    train(&dir, "sized", 1, &[]);
    let used: u64 = std::fs::read_dir(dir.join("sized"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let state = std::fs::metadata(dir.join("sized").join(checkpoint::STATE))
        .unwrap()
        .len();
    // Room for one checkpoint but not for the second copy of the training state that the next atomic
    // write needs beside the first.
    let size_kb = (used + state / 2) / 1024 + 8;
    std::fs::create_dir_all(dir.join("small")).unwrap();
    let script = format!(
        "mount -t tmpfs -o size={size_kb}k tmpfs small && \"$DDPM\" train --config micro.json --batch 2 \
         --grid 1 --every 1 --steps 3 --out small/run --device cpu; code=$?; \
         \"$DDPM\" info --model small/run >&2 || exit 99; exit $code"
    );
    let (code, err) = in_namespace(&dir, &script);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("small/run"), "the error names the path: {err}");
    assert!(
        err.contains("parameters"),
        "the step-1 checkpoint still loads: {err}"
    );

    // Read-only: a finished run, then --resume with the directory mounted read-only.
    train(&dir, "ro", 2, &[]);
    let before = std::fs::read(dir.join("ro").join(checkpoint::STATE)).unwrap();
    let script =
        "mount --bind ro ro && mount -o remount,bind,ro ro && \"$DDPM\" train --resume ro \
                  --steps 3 --grid 1 --device cpu";
    let (code, err) = in_namespace(&dir, script);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("Read-only file system") && err.contains("ro/"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(dir.join("ro").join(checkpoint::STATE)).unwrap(),
        before
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A batch that does not fit is refused before anything is allocated, with the memory needed, the
/// memory available and the largest batch that fits; a config beyond any memory is refused too.
#[test]
fn requests_that_do_not_fit_are_refused_up_front() {
    let dir = scratch("memory");
    let e = fails(
        &dir,
        &[
            "train",
            "--preset",
            "ddpm-cifar10",
            "--batch",
            "1000",
            "--steps",
            "1",
            "--device",
            "cpu",
        ],
    );
    assert!(
        e.contains("not enough memory: training at batch 1000 needs"),
        "{e}"
    );
    assert!(
        e.contains("available on cpu") && e.contains("the largest batch that fits is"),
        "{e}"
    );
    let largest: usize = e
        .rsplit("the largest batch that fits is ")
        .next()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("{e}"));
    assert!(largest < 1000, "{e}");
    let huge = MICRO
        .replace("\"sample_size\": 8", "\"sample_size\": 4096")
        .replace("[8, 16]", "[8192, 8192]");
    std::fs::write(dir.join("huge.json"), huge).unwrap();
    let e = fails(
        &dir,
        &[
            "train",
            "--config",
            "huge.json",
            "--batch",
            "64",
            "--steps",
            "1",
            "--device",
            "cpu",
        ],
    );
    assert!(e.contains("not enough memory"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

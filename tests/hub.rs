//! Models by name (`--model owner/name[@revision]`, src/hub.rs) against a loopback HTTP server that serves
//! `/{owner}/{name}/resolve/{revision}/{path}` from a directory of repositories, as the hub (or any static
//! file server) does: downloads into the Hugging Face cache layout; a second run from the cache with the
//! server gone, and offline; a download cut off halfway, and one killed halfway (SIGKILL); 404 and 401;
//! pickle-only weights; the pipeline layout; the hub's listing API with its commit; and large files
//! answered by a redirect to storage.

mod common;

use common::cli::{scratch, train};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How the server answers.
#[derive(Default)]
struct Mode {
    /// Answer `/api/models/{owner}/{name}/revision/{rev}` with this commit and the repository's files
    /// (a static server answers it 404).
    api_commit: Option<String>,
    /// Send only this many bytes of the body of any file larger than it, then close the connection.
    cut_after: Option<u64>,
    /// Send bodies 4 KiB at a time, 50 ms apart (a download slow enough to be killed in the middle).
    slow: bool,
}

struct Server {
    port: u16,
    mode: Arc<Mutex<Mode>>,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serves the repositories under `root` (`root/owner/name/...`; a `.token` file in a repository makes
    /// it answer 401 to requests without `Authorization: Bearer <token>`).
    fn start(root: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mode, stop, requests) = (
            Arc::new(Mutex::new(Mode::default())),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (m, s, r, root) = (
            mode.clone(),
            stop.clone(),
            requests.clone(),
            root.to_path_buf(),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        r.fetch_add(1, Ordering::SeqCst);
                        let _ = answer(conn, &root, &m, port);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        Self {
            port,
            mode,
            stop,
            requests,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// FNV-1a of the bytes, as a hex ETag.
fn etag(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Every file of a repository, relative, `/`-separated.
fn files_of(dir: &Path, base: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_of(&p, base, out);
        } else if !p.ends_with(".token") {
            out.push(
                p.strip_prefix(base)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/"),
            );
        }
    }
}

/// Writes a response: status, headers, the body (of which `send` bytes go out).
type Respond<'a> = dyn FnMut(&str, &[(String, String)], &[u8], usize) -> std::io::Result<()> + 'a;

/// Files above this size are answered as the hub answers LFS files: a redirect to the storage (`/cdn/...`
/// here, which needs no token), with the file's ETag and size in `X-Linked-Etag` and `X-Linked-Size`.
const LFS: usize = 64 << 10;

fn answer(mut conn: TcpStream, root: &Path, mode: &Mutex<Mode>, port: u16) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut auth = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = Some(v.trim().to_string());
            }
        }
    }
    let slow = mode.lock().unwrap().slow;
    let mut respond = |status: &str, headers: &[(String, String)], body: &[u8], send: usize| {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        conn.write_all(head.as_bytes())?;
        if method != "HEAD" {
            for chunk in body[..send.min(body.len())].chunks(if slow { 4096 } else { 1 << 20 }) {
                conn.write_all(chunk)?;
                if slow {
                    conn.flush()?;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
        conn.flush()
    };
    let not_found = |r: &mut Respond| {
        r(
            "404 Not Found",
            &[("Content-Length".into(), "9".into())],
            b"not found",
            9,
        )
    };
    let segs: Vec<&str> = target.trim_start_matches('/').split('/').collect();
    // The listing API.
    if segs.len() >= 6 && segs[0] == "api" && segs[1] == "models" && segs[4] == "revision" {
        let repo = root.join(segs[2]).join(segs[3]);
        let commit = mode.lock().unwrap().api_commit.clone();
        return match commit {
            Some(sha) if repo.is_dir() => {
                let mut files = Vec::new();
                files_of(&repo, &repo, &mut files);
                let siblings: Vec<String> = files
                    .iter()
                    .map(|f| format!("{{\"rfilename\": \"{f}\"}}"))
                    .collect();
                let body = format!(
                    "{{\"sha\": \"{sha}\", \"siblings\": [{}]}}",
                    siblings.join(", ")
                );
                let len = body.len();
                respond(
                    "200 OK",
                    &[("Content-Length".into(), len.to_string())],
                    body.as_bytes(),
                    len,
                )
            }
            _ => not_found(&mut respond),
        };
    }
    // The storage a large file redirects to: the file, with an ETag of the storage's own.
    if segs.len() >= 4 && segs[0] == "cdn" {
        let Ok(body) = std::fs::read(root.join(segs[1..].join("/"))) else {
            return not_found(&mut respond);
        };
        let send = match mode.lock().unwrap().cut_after {
            Some(n) if (body.len() as u64) > n => n as usize,
            _ => body.len(),
        };
        let headers = [
            ("Content-Length".to_string(), body.len().to_string()),
            ("ETag".to_string(), "\"storage-etag-1\"".to_string()),
        ];
        return respond("200 OK", &headers, &body, send);
    }
    if segs.len() < 5 || segs[2] != "resolve" {
        return not_found(&mut respond);
    }
    let repo = root.join(segs[0]).join(segs[1]);
    if let Ok(token) = std::fs::read_to_string(repo.join(".token")) {
        if auth.as_deref() != Some(&format!("Bearer {}", token.trim())) {
            return respond(
                "401 Unauthorized",
                &[("Content-Length".into(), "0".into())],
                b"",
                0,
            );
        }
    }
    let file = repo.join(segs[4..].join("/"));
    let Ok(body) = std::fs::read(&file) else {
        return not_found(&mut respond);
    };
    let (cut, commit) = {
        let m = mode.lock().unwrap();
        (m.cut_after, m.api_commit.clone())
    };
    if body.len() > LFS {
        let mut headers = vec![
            (
                "Location".to_string(),
                format!(
                    "http://127.0.0.1:{port}/cdn/{}/{}/{}",
                    segs[0],
                    segs[1],
                    segs[4..].join("/")
                ),
            ),
            ("X-Linked-Etag".to_string(), format!("\"{}\"", etag(&body))),
            ("X-Linked-Size".to_string(), body.len().to_string()),
            ("Content-Length".to_string(), "0".to_string()),
        ];
        if let Some(sha) = commit {
            headers.push(("X-Repo-Commit".into(), sha));
        }
        return respond("302 Found", &headers, b"", 0);
    }
    let send = match cut {
        Some(n) if (body.len() as u64) > n => n as usize,
        _ => body.len(),
    };
    let mut headers = vec![
        ("Content-Length".to_string(), body.len().to_string()),
        ("ETag".to_string(), format!("\"{}\"", etag(&body))),
    ];
    if let Some(sha) = commit {
        headers.push(("X-Repo-Commit".into(), sha));
    }
    respond("200 OK", &headers, &body, send)
}

/// The binary with the hub's environment: this endpoint (none: a port nothing listens on) and cache.
fn ddpm(dir: &Path, endpoint: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ddpm-cuda"));
    c.args(args)
        .current_dir(dir)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_CACHE", dir.join("cache"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HUGGING_FACE_HUB_TOKEN");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("the binary runs")
}

fn ok(dir: &Path, endpoint: &str, env: &[(&str, &str)], args: &[&str]) -> String {
    let out = ddpm(dir, endpoint, env, args);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ddpm-cuda {args:?} failed:\n{text}");
    text
}

fn fails(dir: &Path, endpoint: &str, env: &[(&str, &str)], args: &[&str]) -> String {
    let out = ddpm(dir, endpoint, env, args);
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "ddpm-cuda {args:?} should fail:\n{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    text
}

/// A repository at `root/owner/name` holding `files` of the model directory `model` (each `(from, to)`).
fn repo(root: &Path, id: &str, model: &Path, files: &[(&str, &str)]) -> PathBuf {
    let dir = root.join(id);
    for (from, to) in files {
        let dest = dir.join(to);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(model.join(from), dest).unwrap();
    }
    dir
}

const CONFIG: &str = "config.json";
const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
const SCHEDULER: &str = "scheduler_config.json";

/// 2-step DDIM of 2 images into `npy`, from `model`.
fn sample_args<'a>(model: &'a str, npy: &'a str) -> Vec<&'a str> {
    vec![
        "sample",
        "--model",
        model,
        "-n",
        "2",
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--out",
        "g.png",
        "--out-npy",
        npy,
        "--device",
        "cpu",
    ]
}

#[test]
fn models_by_name_come_through_the_cache() {
    let dir = scratch("hub");
    train(&dir, "run", 1, &[]);
    let run = dir.join("run");
    let root = dir.join("served");
    let flat = [(CONFIG, CONFIG), (WEIGHTS, WEIGHTS), (SCHEDULER, SCHEDULER)];
    repo(&root, "test/micro", &run, &flat);
    let pipeline = [
        (CONFIG, "unet/config.json"),
        (WEIGHTS, "unet/diffusion_pytorch_model.safetensors"),
        (SCHEDULER, "scheduler/scheduler_config.json"),
    ];
    let pipe = repo(&root, "test/micro-pipe", &run, &pipeline);
    std::fs::write(
        pipe.join("model_index.json"),
        "{\"_class_name\": \"DDPMPipeline\"}",
    )
    .unwrap();
    let gated = repo(&root, "test/gated", &run, &flat);
    std::fs::write(gated.join(".token"), "hf_secret").unwrap();
    let pickled = repo(
        &root,
        "test/pickled",
        &run,
        &[(CONFIG, CONFIG), (WEIGHTS, "diffusion_pytorch_model.bin")],
    );
    assert!(pickled.join("diffusion_pytorch_model.bin").is_file());

    // The local directory's samples, for comparison.
    ok(
        &dir,
        "http://127.0.0.1:9",
        &[],
        &sample_args("run", "local.npy"),
    );
    let local = std::fs::read(dir.join("local.npy")).unwrap();

    let server = Server::start(&root);
    let ep = server.endpoint();
    // A download cut off halfway fails, naming it, and leaves no file that looks complete.
    let size = std::fs::metadata(run.join(WEIGHTS)).unwrap().len();
    server.mode.lock().unwrap().cut_after = Some(size / 2);
    let e = fails(&dir, &ep, &[], &sample_args("test/micro", "a.npy"));
    assert!(e.contains("test/micro") && e.contains("run again"), "{e}");
    let cache = dir.join("cache/models--test--micro");
    let snap = cache.join("snapshots/main");
    assert!(
        !snap.join(WEIGHTS).exists(),
        "no complete-looking weights after a cut download"
    );
    let blobs: Vec<String> = std::fs::read_dir(cache.join("blobs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        blobs.iter().any(|b| b.ends_with(".incomplete")),
        "{blobs:?}"
    );
    assert!(!dir.join("a.npy").exists());

    // A download killed in the middle (SIGKILL while the weights arrive): nothing that looks complete.
    server.mode.lock().unwrap().cut_after = None;
    server.mode.lock().unwrap().slow = true;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ddpm-cuda"))
        .args(sample_args("test/micro", "a.npy"))
        .current_dir(&dir)
        .env("HF_ENDPOINT", &ep)
        .env("HF_HUB_CACHE", dir.join("cache"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let partial = |cache: &Path| -> u64 {
        std::fs::read_dir(cache.join("blobs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .max()
            .unwrap_or(0)
    };
    let before = partial(&cache);
    let start = std::time::Instant::now();
    while partial(&cache) <= before.max(8192) && start.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let got = partial(&cache);
    assert!(got > 0 && got < size, "killed with {got} of {size} bytes");
    assert!(
        !snap.join(WEIGHTS).exists(),
        "no complete-looking weights after a killed download"
    );
    server.mode.lock().unwrap().slow = false;

    // Served whole: downloaded into the cache layout, and the same samples as the local directory.
    ok(&dir, &ep, &[], &sample_args("test/micro", "a.npy"));
    assert!(
        std::fs::read(dir.join("a.npy")).unwrap() == local,
        "samples by name = samples from the directory"
    );
    for f in [CONFIG, WEIGHTS, SCHEDULER] {
        let p = snap.join(f);
        assert!(p.is_file(), "{}", p.display());
        let target = std::fs::read_link(&p).expect("a snapshot file links to its blob");
        assert!(target.starts_with("../../blobs"), "{}", target.display());
    }
    let weights = std::fs::read(run.join(WEIGHTS)).unwrap();
    assert!(
        weights.len() > LFS,
        "the weights come through the storage redirect"
    );
    assert!(std::fs::read(snap.join(WEIGHTS)).unwrap() == weights);
    // The blob is named by the hub's X-Linked-Etag, as huggingface_hub names it, not by the storage's.
    assert!(cache.join("blobs").join(etag(&weights)).is_file());

    // The pipeline layout, through the same endpoint.
    let info = ok(&dir, &ep, &[], &["info", "--model", "test/micro-pipe"]);
    let local_info = ok(&dir, &ep, &[], &["info", "--model", "run"]);
    let params = |t: &str| {
        t.lines()
            .find(|l| l.starts_with("parameters"))
            .map(String::from)
    };
    assert_eq!(params(&info), params(&local_info), "{info}");

    // 404, 401 (and the token that opens it), pickles only.
    let e = fails(&dir, &ep, &[], &sample_args("test/nothing", "b.npy"));
    assert!(
        e.contains("no repository test/nothing")
            && e.contains("404")
            && e.contains("no such local directory"),
        "{e}"
    );
    let e = fails(&dir, &ep, &[], &sample_args("test/gated", "b.npy"));
    assert!(e.contains("401") && e.contains("HF_TOKEN"), "{e}");
    ok(
        &dir,
        &ep,
        &[("HF_TOKEN", "hf_secret")],
        &sample_args("test/gated", "b.npy"),
    );
    let e = fails(&dir, &ep, &[], &sample_args("test/pickled", "b.npy"));
    assert!(
        e.contains("pickle") && e.contains("safe_serialization=True"),
        "{e}"
    );

    // The hub's listing API: the files it lists, into the snapshot of the commit it names, and the
    // revision's ref pointing at it.
    let sha = "0123456789abcdef0123456789abcdef01234567";
    server.mode.lock().unwrap().api_commit = Some(sha.into());
    ok(&dir, &ep, &[], &["info", "--model", "test/micro-pipe@main"]);
    let pipe_cache = dir.join("cache/models--test--micro-pipe");
    assert_eq!(
        std::fs::read_to_string(pipe_cache.join("refs/main")).unwrap(),
        sha
    );
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ] {
        assert!(
            pipe_cache.join("snapshots").join(sha).join(f).is_file(),
            "{f}"
        );
    }
    let served = server.requests.load(Ordering::SeqCst);
    assert!(served > 0);

    // The server gone: from the cache, saying so; and offline, by flag and by environment.
    drop(server);
    let log = ok(&dir, &ep, &[], &sample_args("test/micro", "c.npy"));
    assert!(
        log.contains("did not answer") && log.contains("cached snapshot"),
        "{log}"
    );
    assert!(std::fs::read(dir.join("c.npy")).unwrap() == local);
    let mut args = sample_args("test/micro", "d.npy");
    args.push("--offline");
    ok(&dir, &ep, &[], &args);
    ok(
        &dir,
        &ep,
        &[("HF_HUB_OFFLINE", "1")],
        &sample_args("test/micro-pipe", "e.npy"),
    );
    let e = fails(
        &dir,
        &ep,
        &[("HF_HUB_OFFLINE", "1")],
        &sample_args("test/never", "f.npy"),
    );
    assert!(
        e.contains("not in the Hugging Face cache") && e.contains("offline"),
        "{e}"
    );
    // A local directory always wins over a name.
    assert!(ok(
        &dir,
        &ep,
        &[("HF_HUB_OFFLINE", "1")],
        &["info", "--model", "run"]
    )
    .contains("parameters"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An endpoint nothing listens on, with nothing cached: an error naming the endpoint.
#[test]
fn an_endpoint_that_does_not_answer_is_named() {
    let dir = scratch("hub-down");
    let e = fails(
        &dir,
        "http://127.0.0.1:9",
        &[],
        &sample_args("test/micro", "a.npy"),
    );
    assert!(
        e.contains("http://127.0.0.1:9") && e.contains("did not answer"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

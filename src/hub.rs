//! Models by name: `--model owner/name[@revision]` resolved through the Hugging Face cache that Python
//! tools share, downloading what is missing from the hub.
//!
//! - **The cache.** `HF_HUB_CACHE`, else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//!   `~/.cache/huggingface/hub`; a repository is `models--owner--name/` with `refs/REVISION` (the commit
//!   a branch or tag points to), `blobs/ETAG` (each file's bytes, named by its ETag) and
//!   `snapshots/COMMIT/PATH`, a relative symbolic link to the blob (a copy where links cannot be made),
//!   which is what `huggingface_hub` writes and reads.
//! - **Downloads.** From `HF_ENDPOINT` (default `https://huggingface.co`): the repository's file list from
//!   the hub's API (`/api/models/owner/name/revision/REV`) where the endpoint answers it, else the known
//!   names are tried one by one, so a plain static file server serving `/owner/name/resolve/REV/PATH`
//!   works as an endpoint. `HF_TOKEN` is sent as a bearer token (gated and private repositories). Each
//!   file is streamed into `blobs/ETAG.incomplete` with a progress bar, its length checked, then renamed:
//!   an interrupted download never leaves a file that looks complete, and the next run starts it again.
//! - **Offline.** `HF_HUB_OFFLINE=1` or `--offline`: the cache only. Online, a hub that does not answer
//!   falls back to the cached snapshot of the revision, saying so.
//! - **Layouts.** Flat (`config.json`, `diffusion_pytorch_model.safetensors`, `scheduler_config.json` at
//!   the top, as the `google/ddpm-*` repositories are) or pipeline (`unet/`, `scheduler/`,
//!   `model_index.json`). Only safetensors are read: a repository with only `.bin` weights is an error
//!   that says how to convert them.

use crate::error::{Error, Result};
use crate::progress::Progress;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A repository on the hub and the revision asked for (a branch, tag or commit; `main` by default).
#[derive(Clone, Debug, PartialEq)]
pub struct RepoId {
    pub owner: String,
    pub name: String,
    pub revision: String,
}

impl RepoId {
    /// `owner/name` or `owner/name@revision`, with the characters the hub allows in names; `None` for
    /// anything else (a path with more components, `..`, an absolute path).
    pub fn parse(s: &str) -> Option<Self> {
        let (repo, revision) = s.split_once('@').unwrap_or((s, "main"));
        let (owner, name) = repo.split_once('/')?;
        let ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with(['.', '-'])
                && !p.contains("..")
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let rev_ok = !revision.is_empty()
            && !revision.contains("..")
            && revision
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        (ok(owner) && ok(name) && rev_ok).then(|| Self {
            owner: owner.into(),
            name: name.into(),
            revision: revision.into(),
        })
    }

    /// `owner/name`.
    pub fn repo(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }

    /// The repository's folder in the cache.
    fn folder(&self) -> String {
        format!("models--{}--{}", self.owner, self.name)
    }
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo(), self.revision)
    }
}

/// Where and how to reach the hub, from the environment.
pub struct Hub {
    pub endpoint: String,
    pub cache: PathBuf,
    token: Option<String>,
    pub offline: bool,
}

/// What the model loader needs of a repository, flat and pipeline.
const FLAT: [&str; 3] = [
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "scheduler_config.json",
];
const PIPELINE: [&str; 4] = [
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
];

impl Hub {
    /// The hub the environment describes; `offline` (the `--offline` flag) adds to `HF_HUB_OFFLINE`.
    pub fn from_env(offline: bool) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = || {
            var("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
        };
        let cache = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .unwrap_or_else(|| {
                var("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| home().join(".cache"))
                    .join("huggingface")
                    .join("hub")
            });
        let env_offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| ["1", "true", "yes", "on"].contains(&v.to_lowercase().as_str()));
        Self {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .into(),
            cache,
            token: var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")),
            offline: offline || env_offline,
        }
    }

    /// The local directory of `repo`'s snapshot, downloading what is missing (unless offline).
    pub fn snapshot(&self, repo: &RepoId) -> Result<PathBuf> {
        let root = self.cache.join(repo.folder());
        if self.offline {
            return self.cached(repo).ok_or_else(|| {
                Error::Invalid(format!(
                    "--model {repo}: not in the Hugging Face cache ({}) and offline (HF_HUB_OFFLINE or \
                     --offline); run once online to download it",
                    root.display()
                ))
            });
        }
        let agent = self.agent();
        let listing = match self.list(&agent, repo) {
            Ok(l) => l,
            Err(Fetch::Unreachable(e)) => {
                return match self.cached(repo) {
                    Some(dir) => {
                        eprintln!(
                            "hub: {} did not answer ({e}); using the cached snapshot {}",
                            self.endpoint,
                            dir.display()
                        );
                        Ok(dir)
                    }
                    None => Err(Error::Invalid(format!(
                        "--model {repo}: {} did not answer ({e}), and the repository is not in the cache \
                         ({}); check the network or HF_ENDPOINT",
                        self.endpoint,
                        root.display()
                    ))),
                };
            }
            Err(Fetch::Refused(e)) => return Err(e),
        };
        let (files, mut commit) = match listing {
            Some((files, commit)) => (self.choose(repo, &files)?, Some(commit)),
            None => (Vec::new(), None),
        };
        // Without a listing, the known names in turn: the flat layout's config, else the pipeline's.
        let files = if files.is_empty() {
            self.probe(&agent, repo, &mut commit)?
        } else {
            files
        };
        let commit = commit.unwrap_or_else(|| repo.revision.clone());
        let snap = root.join("snapshots").join(&commit);
        for f in &files {
            let dest = snap.join(f);
            if dest.is_file() {
                continue;
            }
            self.download(&agent, repo, f, &root, &dest)?;
        }
        if commit != repo.revision {
            let refs = root.join("refs");
            let ref_path = refs.join(&repo.revision);
            if let Some(parent) = ref_path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            crate::files::write_atomic(&ref_path, commit.as_bytes())?;
        }
        Ok(snap)
    }

    /// The cached snapshot of `repo`'s revision: through `refs/REVISION`, or a snapshot named by it.
    fn cached(&self, repo: &RepoId) -> Option<PathBuf> {
        let root = self.cache.join(repo.folder());
        let commit = std::fs::read_to_string(root.join("refs").join(&repo.revision))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| repo.revision.clone());
        let snap = root.join("snapshots").join(commit);
        let complete = |names: &[&str]| names[..2].iter().all(|f| snap.join(f).is_file());
        (complete(&FLAT) || complete(&PIPELINE[1..])).then_some(snap)
    }

    /// An agent that returns redirects instead of following them: the hub answers a large (LFS) file
    /// with a redirect to its storage whose headers carry what the cache needs (`X-Linked-Etag`, the
    /// file's sha256, names its blob as huggingface_hub names it; `X-Linked-Size`; `X-Repo-Commit`),
    /// which the storage's own answer does not.
    fn agent(&self) -> ureq::Agent {
        Self::agent_following(0)
    }

    fn agent_following(redirects: u32) -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_recv_body(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .max_redirects(redirects)
            .build()
            .into()
    }

    fn get(&self, agent: &ureq::Agent, url: &str) -> std::result::Result<Response, Fetch> {
        self.request(agent.get(url))
    }

    /// Sends `req` with the token, if any.
    fn request(
        &self,
        mut req: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    ) -> std::result::Result<Response, Fetch> {
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        req.call()
            .map_err(|e| Fetch::Unreachable(e.to_string()))
            .map(Response)
    }

    /// The repository's files and commit from the hub's API, `None` where the endpoint does not answer
    /// it (a static file server).
    fn list(
        &self,
        agent: &ureq::Agent,
        repo: &RepoId,
    ) -> std::result::Result<Option<(Vec<String>, String)>, Fetch> {
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.endpoint,
            repo.repo(),
            repo.revision
        );
        let mut r = self.get(agent, &url)?;
        match r.status() {
            200 => {}
            401 | 403 => return Err(Fetch::Refused(self.refused(repo, r.status(), &url))),
            _ => return Ok(None),
        }
        let Ok(text) = r.0.body_mut().read_to_string() else {
            return Ok(None);
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Ok(None);
        };
        let files: Vec<String> = v["siblings"]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter_map(|f| f["rfilename"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let Some(sha) = v["sha"].as_str() else {
            return Ok(None);
        };
        if files.is_empty() {
            return Ok(None);
        }
        Ok(Some((files, sha.to_string())))
    }

    /// The files to fetch from a listing: the flat layout's where it has a config at the top, else the
    /// pipeline's; an error where the weights are only pickles, or missing.
    fn choose(&self, repo: &RepoId, files: &[String]) -> Result<Vec<String>> {
        let has = |f: &str| files.iter().any(|x| x == f);
        let (wanted, prefix): (&[&str], &str) = if has("config.json") {
            (&FLAT, "")
        } else if has("unet/config.json") {
            (&PIPELINE, "unet/")
        } else {
            return Err(Error::Invalid(format!(
                "--model {repo}: the repository has no config.json (or unet/config.json): not a \
                 diffusers UNet2DModel or pipeline"
            )));
        };
        let weights = format!("{prefix}diffusion_pytorch_model.safetensors");
        if !has(&weights) {
            return Err(
                self.no_safetensors(repo, has(&format!("{prefix}diffusion_pytorch_model.bin")))
            );
        }
        Ok(wanted
            .iter()
            .filter(|f| has(f))
            .map(|f| f.to_string())
            .collect())
    }

    /// The files to fetch where there is no listing: each known name tried with a HEAD request; the
    /// commit from the first answer's `X-Repo-Commit` where the server sends one.
    fn probe(
        &self,
        agent: &ureq::Agent,
        repo: &RepoId,
        commit: &mut Option<String>,
    ) -> Result<Vec<String>> {
        let mut exists = |path: &str| -> Result<bool> {
            let url = self.resolve_url(repo, path);
            let r = self
                .request(agent.head(&url))
                .map_err(|e| e.into_error(repo, &self.endpoint))?;
            if commit.is_none() {
                *commit = r.header("x-repo-commit");
            }
            match r.status() {
                // A large file answers with a redirect to its storage.
                200..=399 => Ok(true),
                404 => Ok(false),
                401 | 403 => Err(self.refused(repo, r.status(), &url)),
                s => Err(Error::Invalid(format!(
                    "--model {repo}: {url} answered HTTP {s}"
                ))),
            }
        };
        let (wanted, prefix): (&[&str], &str) = if exists("config.json")? {
            (&FLAT[..], "")
        } else if exists("unet/config.json")? {
            (&PIPELINE[1..], "unet/")
        } else {
            return Err(Error::Invalid(format!(
                "--model {repo}: {} has no repository {} at revision {} (no config.json or \
                 unet/config.json: HTTP 404)",
                self.endpoint,
                repo.repo(),
                repo.revision
            )));
        };
        let weights = format!("{prefix}diffusion_pytorch_model.safetensors");
        if !exists(&weights)? {
            let pickle = exists(&format!("{prefix}diffusion_pytorch_model.bin"))?;
            return Err(self.no_safetensors(repo, pickle));
        }
        let mut files = vec![wanted[0].to_string(), weights];
        if exists(wanted[2])? {
            files.push(wanted[2].to_string());
        }
        Ok(files)
    }

    fn resolve_url(&self, repo: &RepoId, path: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            repo.repo(),
            repo.revision,
            path
        )
    }

    fn refused(&self, repo: &RepoId, status: u16, url: &str) -> Error {
        let how = if self.token.is_some() {
            "HF_TOKEN is set: check that it grants access to this repository (and that its terms are \
             accepted on the hub)"
        } else {
            "a gated or private repository needs an access token in HF_TOKEN"
        };
        Error::Invalid(format!(
            "--model {repo}: the hub refused access (HTTP {status} for {url}); {how}"
        ))
    }

    fn no_safetensors(&self, repo: &RepoId, pickle: bool) -> Error {
        Error::Invalid(if pickle {
            format!(
                "--model {repo}: the repository has only PyTorch pickle weights \
                 (diffusion_pytorch_model.bin), which this engine does not read; convert them with \
                 diffusers: UNet2DModel.from_pretrained(\"{}\").save_pretrained(DIR, \
                 safe_serialization=True), then pass --model DIR",
                repo.repo()
            )
        } else {
            format!("--model {repo}: the repository has no diffusion_pytorch_model.safetensors")
        })
    }

    /// Streams `path` of `repo` into the cache: `blobs/ETAG.incomplete`, its length checked, renamed to
    /// `blobs/ETAG`, linked from `dest` in the snapshot.
    fn download(
        &self,
        agent: &ureq::Agent,
        repo: &RepoId,
        path: &str,
        root: &Path,
        dest: &Path,
    ) -> Result<()> {
        let url = self.resolve_url(repo, path);
        let mut r = self
            .get(agent, &url)
            .map_err(|e| e.into_error(repo, &self.endpoint))?;
        let (linked_etag, linked_size) = (r.header("x-linked-etag"), r.header("x-linked-size"));
        if (300..400).contains(&r.status()) {
            // To the storage (its URL is signed: no token), or within the hub (a renamed repository).
            let Some(loc) = r.header("location") else {
                return Err(Error::Invalid(format!(
                    "--model {repo}: {url} redirected without a location"
                )));
            };
            let within = loc.starts_with('/') || loc.starts_with(&self.endpoint);
            let next = if loc.starts_with('/') {
                format!("{}{loc}", self.endpoint)
            } else {
                loc
            };
            let follow = Self::agent_following(8);
            let sent = if within {
                self.get(&follow, &next)
            } else {
                follow
                    .get(&next)
                    .call()
                    .map_err(|e| Fetch::Unreachable(e.to_string()))
                    .map(Response)
            };
            r = sent.map_err(|e| e.into_error(repo, &self.endpoint))?;
        }
        match r.status() {
            200 => {}
            401 | 403 => return Err(self.refused(repo, r.status(), &url)),
            404 => {
                return Err(Error::Invalid(format!(
                    "--model {repo}: {path} is listed but {url} answered HTTP 404"
                )))
            }
            s => {
                return Err(Error::Invalid(format!(
                    "--model {repo}: {url} answered HTTP {s}"
                )))
            }
        }
        let etag = linked_etag
            .or_else(|| r.header("etag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
            .filter(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        let length: Option<u64> = linked_size
            .or_else(|| r.header("content-length"))
            .and_then(|s| s.parse().ok());
        let blobs = root.join("blobs");
        for d in [&blobs, &dest.parent().unwrap_or(root).to_path_buf()] {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        let (blob, partial) = match &etag {
            Some(e) => (blobs.join(e), blobs.join(format!("{e}.incomplete"))),
            None => {
                let name = dest.file_name().unwrap_or_default().to_string_lossy();
                (
                    dest.to_path_buf(),
                    dest.with_file_name(format!("{name}.incomplete")),
                )
            }
        };
        if !blob.is_file() {
            let mut out = std::fs::File::create(&partial).map_err(|e| Error::io(&partial, e))?;
            let total = length.unwrap_or(0);
            let mut bar = Progress::new(
                &format!("{} {path}", repo.repo()),
                "MB",
                total.div_ceil(1000).max(1),
            );
            let mut body = r.0.into_body().into_reader();
            let mut buf = vec![0u8; 1 << 16];
            let mut got: u64 = 0;
            loop {
                let k = body.read(&mut buf).map_err(|e| {
                    Error::Invalid(format!(
                        "--model {repo}: downloading {url} stopped after {got} bytes ({e}); run again \
                         to start it over"
                    ))
                })?;
                if k == 0 {
                    break;
                }
                out.write_all(&buf[..k])
                    .map_err(|e| Error::io(&partial, e))?;
                got += k as u64;
                bar.update(got / 1000, 1e-3, "");
            }
            if length.is_some_and(|n| n != got) {
                return Err(Error::Invalid(format!(
                    "--model {repo}: {url} ended after {got} of {} bytes; run again to start it over",
                    length.unwrap_or(0)
                )));
            }
            out.sync_all().map_err(|e| Error::io(&partial, e))?;
            drop(out);
            std::fs::rename(&partial, &blob).map_err(|e| Error::io(&blob, e))?;
        }
        if blob != dest {
            link(&blob, dest)?;
        }
        Ok(())
    }
}

/// `dest` as a relative symbolic link to `blob` (a copy where links cannot be made), replacing what is
/// there.
fn link(blob: &Path, dest: &Path) -> Result<()> {
    let _ = std::fs::remove_file(dest);
    #[cfg(unix)]
    {
        // From snapshots/COMMIT/a/b/file up to the repository folder, then into blobs/.
        let root = blob
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."));
        let depth = dest
            .strip_prefix(root)
            .map(|p| p.components().count().saturating_sub(1))
            .unwrap_or(0);
        let mut rel = PathBuf::new();
        for _ in 0..depth {
            rel.push("..");
        }
        rel.push("blobs");
        rel.push(blob.file_name().unwrap_or_default());
        if std::os::unix::fs::symlink(&rel, dest).is_ok() {
            return Ok(());
        }
    }
    std::fs::copy(blob, dest)
        .map(|_| ())
        .map_err(|e| Error::io(dest, e))
}

/// A response, with its headers read as text.
struct Response(ureq::http::Response<ureq::Body>);

impl Response {
    fn status(&self) -> u16 {
        self.0.status().as_u16()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.0
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }
}

/// Why a request gave nothing to use: the endpoint did not answer, or it refused.
enum Fetch {
    Unreachable(String),
    Refused(Error),
}

impl Fetch {
    fn into_error(self, repo: &RepoId, endpoint: &str) -> Error {
        match self {
            Fetch::Unreachable(e) => Error::Invalid(format!(
                "--model {repo}: {endpoint} did not answer ({e}); check the network or HF_ENDPOINT"
            )),
            Fetch::Refused(e) => e,
        }
    }
}

/// The model directory `--model` names: a local directory where one is there, else a repository on the
/// hub (`owner/name[@revision]`), resolved through the cache.
pub fn locate(model: &Path, offline: bool) -> Result<PathBuf> {
    if model.exists() {
        return Ok(model.to_path_buf());
    }
    let Some(repo) = model.to_str().and_then(RepoId::parse) else {
        return Ok(model.to_path_buf()); // the loader says it is no model directory
    };
    let hub = Hub::from_env(offline);
    hub.snapshot(&repo).map_err(|e| {
        Error::Invalid(format!(
            "{e} (--model {}: no such local directory either)",
            model.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::RepoId;

    #[test]
    fn repository_names_parse_and_paths_do_not() {
        let r = RepoId::parse("google/ddpm-cifar10-32").unwrap();
        assert_eq!(
            (r.repo(), r.revision.as_str()),
            ("google/ddpm-cifar10-32".into(), "main")
        );
        let r = RepoId::parse("google/ddpm-ema-church-256@v1.0").unwrap();
        assert_eq!(r.revision, "v1.0");
        assert_eq!(r.folder(), "models--google--ddpm-ema-church-256");
        for bad in [
            "runs",
            "/abs/path",
            "a/b/c",
            "../x",
            "a/..",
            "./x",
            "a/b@",
            "a b/c",
            "",
        ] {
            assert!(RepoId::parse(bad).is_none(), "{bad}");
        }
    }
}

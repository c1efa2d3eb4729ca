//! The library's error type. Bad input is an error that names the file, tensor or flag and what was
//! expected; it is never a panic.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },
    #[error("tensor {what} (offset {off}, length {len}) lies outside the {arena} arena of {capacity} elements")]
    OutOfBounds {
        what: &'static str,
        off: usize,
        len: usize,
        arena: &'static str,
        capacity: usize,
    },
    #[error("{0}: an output overlaps another argument of the same op")]
    Overlap(&'static str),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("{0}")]
    Invalid(String),
    /// Not enough memory for what was asked, before anything was allocated.
    #[error("not enough memory: {0}")]
    Memory(String),
    /// A stop was asked for (SIGINT or SIGTERM) and the work stopped at a safe point.
    #[error("interrupted: {0}")]
    Interrupted(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn shape(what: impl Into<String>, expected: impl ToString, got: impl ToString) -> Self {
        Self::Shape {
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }
}

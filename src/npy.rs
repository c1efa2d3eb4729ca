//! NumPy `.npy` files of little-endian float32 in C order: written for `sample --out-npy`, read for
//! `--init-noise`. The reader checks the header strictly (magic, version, dtype, order, shape) and the
//! payload's length against the shape before it allocates anything.

use crate::error::{Error, Result};
use std::path::Path;

const MAGIC: &[u8] = b"\x93NUMPY";

/// A `.npy` (format 1.0) file of little-endian float32 in C order.
pub fn to_bytes(data: &[f32], shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_s}, }}");
    // The header (with its newline) pads the preamble to a multiple of 64 bytes.
    while (MAGIC.len() + 4 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = MAGIC.to_vec();
    out.extend([1u8, 0]);
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    out
}

/// Parses a float32 `.npy` file: returns the shape and the data. `path` names the file in errors.
pub fn parse(bytes: &[u8], path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let err = |m: String| Error::format(path, m);
    if bytes.len() < MAGIC.len() + 4 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(err("not a .npy file (no \\x93NUMPY magic)".into()));
    }
    let (major, at) = (bytes[6], 8);
    let (header_len, at) = match major {
        1 => (
            u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize,
            at + 2,
        ),
        2 | 3 => {
            if bytes.len() < at + 4 {
                return Err(err("truncated .npy header".into()));
            }
            let n = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
            (n as usize, at + 4)
        }
        v => return Err(err(format!(".npy format version {v} is not supported"))),
    };
    let end = at
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| err("truncated .npy header".into()))?;
    let header = std::str::from_utf8(&bytes[at..end])
        .map_err(|_| err("the .npy header is not text".into()))?;
    let descr =
        dict_value(header, "descr").ok_or_else(|| err("no 'descr' in the header".into()))?;
    if descr != "'<f4'" && descr != "'float32'" {
        return Err(err(format!("dtype {descr}: expected float32 ('<f4')")));
    }
    let fortran = dict_value(header, "fortran_order")
        .ok_or_else(|| err("no 'fortran_order' in the header".into()))?;
    if fortran != "False" {
        return Err(err("Fortran-ordered arrays are not supported".into()));
    }
    let shape_s =
        dict_value(header, "shape").ok_or_else(|| err("no 'shape' in the header".into()))?;
    let shape = parse_shape(shape_s).ok_or_else(|| err(format!("bad shape {shape_s}")))?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| err(format!("shape {shape:?} overflows")))?;
    let payload = &bytes[end..];
    if count.checked_mul(4) != Some(payload.len()) {
        return Err(err(format!(
            "shape {shape:?} needs {count} float32 values, the file holds {} bytes of data",
            payload.len()
        )));
    }
    let data = payload
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((shape, data))
}

pub fn read(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes, path)
}

/// The text of `'key': value` in a Python dict literal (values here are a quoted string, a bool, or a
/// parenthesised tuple).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    let len = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else if let Some(q) = rest.strip_prefix('\'') {
        q.find('\'')? + 2
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(rest[..len].trim())
}

/// `(2, 3, 4)`, `(5,)` or `()`.
fn parse_shape(s: &str) -> Option<Vec<usize>> {
    let inner = s.strip_prefix('(')?.strip_suffix(')')?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_alignment() {
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        let bytes = to_bytes(&data, &[2, 3, 2, 2]);
        // The data starts on a 64-byte boundary, as NumPy writes it.
        assert_eq!((bytes.len() - 24 * 4) % 64, 0);
        let (shape, back) = parse(&bytes, Path::new("x.npy")).unwrap();
        assert_eq!((shape, back), (vec![2, 3, 2, 2], data));
    }

    // A header NumPy 1.26 wrote for np.zeros((1, 3, 2, 2), np.float32), typed out by hand.
    #[test]
    fn reads_numpys_own_header() {
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3, 2, 2), }";
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        let padded = format!("{header:<117}\n");
        bytes.extend((padded.len() as u16).to_le_bytes());
        bytes.extend(padded.as_bytes());
        bytes.extend([0u8; 48]);
        let (shape, data) = parse(&bytes, Path::new("x.npy")).unwrap();
        assert_eq!((shape, data.len()), (vec![1, 3, 2, 2], 12));
    }

    /// Replaces `from` by `to` in the bytes (the header is ASCII after the magic).
    fn swap(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
        let at = bytes
            .windows(from.len())
            .position(|w| w == from.as_bytes())
            .expect("pattern in header");
        [&bytes[..at], to.as_bytes(), &bytes[at + from.len()..]].concat()
    }

    #[test]
    fn bad_files_are_errors() {
        let good = to_bytes(&[1.0; 6], &[2, 3]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"PK\x03\x04".to_vec(), "magic"),
            (good[..good.len() - 4].to_vec(), "holds"),
            (good[..20].to_vec(), "truncated"),
            (swap(&good, "<f4", "<f8"), "float32"),
            (swap(&good, "False", "True "), "Fortran"),
            (
                swap(&good, "(2, 3)", "(1152921504606846976, 16)"),
                "overflows",
            ),
            (swap(&good, "(2, 3)", "(2, x)"), "bad shape"),
        ];
        for (bytes, needle) in cases {
            let e = parse(&bytes, Path::new("noise.npy"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle) && e.contains("noise.npy"), "{e}");
        }
    }
}

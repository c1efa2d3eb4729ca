//! NumPy `.npy` files of little-endian float32 in C order: written for `sample --out-npy`, read for
//! `--init-noise`. The reader checks the header strictly (magic, version, dtype, order, shape) and the
//! payload's length against the shape before it allocates anything.

use crate::error::{Error, Result};
use std::path::Path;

const MAGIC: &[u8] = b"\x93NUMPY";

/// A `.npy` (format 1.0) file of little-endian float32 in C order.
pub fn to_bytes(data: &[f32], shape: &[usize]) -> Vec<u8> {
    let mut out = preamble(shape, 0);
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    out
}

/// The magic, version and header of an array of `shape`: padded with spaces (the header ends in a
/// newline) to a multiple of 64 bytes, and to at least `at_least` bytes.
fn preamble(shape: &[usize], at_least: usize) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_s}, }}");
    let len = (MAGIC.len() + 4 + header.len() + 1)
        .max(at_least)
        .div_ceil(64)
        * 64;
    while MAGIC.len() + 4 + header.len() + 1 < len {
        header.push(' ');
    }
    header.push('\n');
    let mut out = MAGIC.to_vec();
    out.extend([1u8, 0]);
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out
}

/// Parses a float32 `.npy` file: returns the shape and the data. `path` names the file in errors.
pub fn parse(bytes: &[u8], path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let (shape, end) = parse_header(bytes, path)?;
    let count = elements(&shape, path)?;
    let payload = &bytes[end..];
    if count.checked_mul(4) != Some(payload.len()) {
        return Err(Error::format(
            path,
            format!(
                "shape {shape:?} needs {count} float32 values, the file holds {} bytes of data",
                payload.len()
            ),
        ));
    }
    let data = payload
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((shape, data))
}

/// The elements of an array of `shape`, or an error naming `path` when they overflow.
fn elements(shape: &[usize], path: &Path) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|c| c.checked_mul(4).is_some())
        .ok_or_else(|| Error::format(path, format!("shape {shape:?} overflows")))
}

/// The header of a float32 `.npy` file at the start of `bytes` (which may hold only part of the data):
/// the shape, and where the data starts.
pub fn parse_header(bytes: &[u8], path: &Path) -> Result<(Vec<usize>, usize)> {
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
    elements(&shape, path)?;
    Ok((shape, end))
}

/// The longest header this crate reads from a file's start (format 1.0's limit, and more than any
/// format 2.0 header NumPy writes for an array of a few dimensions).
const HEADER_MAX: u64 = 65_536 + 10;

/// A float32 `.npy` file read a part at a time (`sample --init-noise`, which may be larger than memory):
/// its header checked, its length checked against the shape.
pub struct Reader {
    file: std::fs::File,
    path: std::path::PathBuf,
    pub shape: Vec<usize>,
    offset: u64,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let (shape, offset) = read_header(&file, path)?;
        let count = elements(&shape, path)? as u64;
        if len - offset != 4 * count {
            return Err(Error::format(
                path,
                format!(
                    "shape {shape:?} needs {count} float32 values, the file holds {} bytes of data",
                    len - offset
                ),
            ));
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            shape,
            offset,
        })
    }

    /// Elements `first .. first + count` of the array in C order.
    pub fn read(&mut self, first: usize, count: usize) -> Result<Vec<f32>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut bytes = vec![0u8; 4 * count];
        self.file
            .seek(SeekFrom::Start(self.offset + 4 * first as u64))
            .and_then(|_| self.file.read_exact(&mut bytes))
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// The index (C order) and value of the first element that is not finite, read in chunks of
    /// `chunk` elements.
    pub fn first_non_finite(&mut self, chunk: usize) -> Result<Option<(usize, f32)>> {
        let total: usize = self.shape.iter().product();
        let mut at = 0;
        while at < total {
            let take = chunk.max(1).min(total - at);
            let part = self.read(at, take)?;
            if let Some(i) = part.iter().position(|v| !v.is_finite()) {
                return Ok(Some((at + i, part[i])));
            }
            at += take;
        }
        Ok(None)
    }
}

/// A float32 `.npy` file of items of shape `item` that grows on disk one batch at a time (`sample
/// --out-npy`): after every [`Growing::append`] it is a complete `.npy` of the items so far, its header
/// rewritten in place (padded at creation to hold any count) after the data is synced, so a reader, or a
/// run continued after an interruption, never sees an item that was not wholly written.
pub struct Growing {
    file: std::fs::File,
    path: std::path::PathBuf,
    item: Vec<usize>,
    count: usize,
    offset: u64,
}

impl Growing {
    /// The header of `count` items, padded to the length any count's takes.
    fn header(item: &[usize], count: usize) -> Vec<u8> {
        let shape = |n| [&[n][..], item].concat();
        preamble(&shape(count), preamble(&shape(usize::MAX), 0).len())
    }

    /// A new file at `path` holding `first` (whole items), written under a temporary name and renamed,
    /// so a file already at `path` is replaced only by one that holds items.
    pub fn create(path: &Path, item: &[usize], first: &[f32]) -> Result<Self> {
        let per: usize = item.iter().product();
        if per == 0 || !first.len().is_multiple_of(per) {
            return Err(Error::shape("npy items", per, first.len()));
        }
        let count = first.len() / per;
        let mut bytes = Self::header(item, count);
        let offset = bytes.len() as u64;
        bytes.extend(first.iter().flat_map(|v| v.to_le_bytes()));
        crate::files::write_atomic(path, &bytes)?;
        Self::open(path, item, count).map(|g| Self { offset, ..g })
    }

    /// Opens a file this type wrote, keeping its first `keep` items (its header must say at least as
    /// many, for items of shape `item`): the data after them is cut off and the header rewritten.
    pub fn open(path: &Path, item: &[usize], keep: usize) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let (shape, offset) = read_header(&file, path)?;
        if shape.len() != item.len() + 1 || shape[1..] != *item || shape[0] < keep {
            return Err(Error::format(
                path,
                format!(
                    "holds an array of shape {shape:?}; continuing needs at least {keep} items of shape \
                     {item:?}"
                ),
            ));
        }
        let per: usize = item.iter().product();
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let need = offset + 4 * (keep * per) as u64;
        if len < need {
            return Err(Error::format(
                path,
                format!(
                    "holds {len} bytes; continuing needs the {keep} items it had, {need} bytes"
                ),
            ));
        }
        let mut g = Self {
            file,
            path: path.to_path_buf(),
            item: item.to_vec(),
            count: keep,
            offset,
        };
        if Self::header(item, 0).len() as u64 != offset {
            return Err(Error::format(
                path,
                "was not written by `sample` (its header is not the padded one it writes)",
            ));
        }
        g.truncate_and_commit()?;
        Ok(g)
    }

    /// Items in the file.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Appends whole items and makes them part of the file.
    pub fn append(&mut self, items: &[f32]) -> Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        let per: usize = self.item.iter().product();
        if !items.len().is_multiple_of(per) {
            return Err(Error::shape("npy items", per, items.len()));
        }
        let at = self.offset + 4 * (self.count * per) as u64;
        let bytes: Vec<u8> = items.iter().flat_map(|v| v.to_le_bytes()).collect();
        let path = self.path.clone();
        self.file
            .seek(SeekFrom::Start(at))
            .and_then(|_| self.file.write_all(&bytes))
            .and_then(|_| self.file.sync_data())
            .map_err(|e| Error::io(&path, e))?;
        self.count += items.len() / per;
        self.truncate_and_commit()
    }

    /// Cuts the file after `count` items and writes the header that says so, synced.
    fn truncate_and_commit(&mut self) -> Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        let per: usize = self.item.iter().product();
        let end = self.offset + 4 * (self.count * per) as u64;
        let header = Self::header(&self.item, self.count);
        let path = self.path.clone();
        self.file
            .set_len(end)
            .and_then(|_| self.file.seek(SeekFrom::Start(0)))
            .and_then(|_| self.file.write_all(&header))
            .and_then(|_| self.file.sync_data())
            .map_err(|e| Error::io(&path, e))
    }
}

/// The shape and data offset of the `.npy` open as `file` (at its start), from its header alone (the data
/// may be longer or shorter than the shape says).
fn read_header(file: &std::fs::File, path: &Path) -> Result<(Vec<usize>, u64)> {
    use std::io::Read;
    let mut head = Vec::new();
    file.take(HEADER_MAX)
        .read_to_end(&mut head)
        .map_err(|e| Error::io(path, e))?;
    let (shape, end) = parse_header(&head, path)?;
    Ok((shape, end as u64))
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

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ddpm-npy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A growing file is a complete `.npy` of its items after every append; reopened with fewer items
    /// kept, it is cut back to them; bytes of an append whose header was never rewritten (a run killed
    /// between the two) are dropped on reopening; a file of other items, or one shorter than the items to
    /// keep, is refused.
    #[test]
    fn a_growing_file_is_whole_after_every_append() {
        let dir = scratch("grow");
        let p = dir.join("g.npy");
        let item = [2, 3];
        let v = |from: usize, n: usize| -> Vec<f32> {
            (from * 6..(from + n) * 6).map(|i| i as f32).collect()
        };
        let mut g = Growing::create(&p, &item, &v(0, 2)).unwrap();
        assert_eq!(read(&p).unwrap(), (vec![2, 2, 3], v(0, 2)));
        g.append(&v(2, 3)).unwrap();
        assert_eq!(
            (g.count(), read(&p).unwrap()),
            (5, (vec![5, 2, 3], v(0, 5)))
        );
        // The header's length does not depend on the count: rewriting it in place never moves the data.
        assert_eq!(
            Growing::header(&item, 0).len(),
            Growing::header(&item, usize::MAX).len()
        );
        assert_eq!(Growing::header(&item, 7).len() % 64, 0);
        drop(g);
        // Bytes past the header's count, as a killed append leaves them.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &[1u8; 10]))
            .unwrap();
        assert!(read(&p).is_err(), "the torn bytes make it no valid .npy");
        let mut g = Growing::open(&p, &item, 5).unwrap();
        assert_eq!(read(&p).unwrap(), (vec![5, 2, 3], v(0, 5)));
        g.append(&v(5, 1)).unwrap();
        assert_eq!(read(&p).unwrap(), (vec![6, 2, 3], v(0, 6)));
        drop(g);
        Growing::open(&p, &item, 3).unwrap();
        assert_eq!(read(&p).unwrap(), (vec![3, 2, 3], v(0, 3)));
        let e = Growing::open(&p, &[3, 2], 1).err().unwrap().to_string();
        assert!(e.contains("g.npy") && e.contains("[3, 2]"), "{e}");
        let e = Growing::open(&p, &item, 4).err().unwrap().to_string();
        assert!(e.contains("at least 4"), "{e}");
        // A file whose header is longer than the one written here would be overwritten by a shorter
        // rewrite: it is refused, not continued.
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3), }";
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        let padded = format!("{dict:<181}\n");
        bytes.extend((padded.len() as u16).to_le_bytes());
        bytes.extend(padded.as_bytes());
        bytes.extend(v(0, 1).iter().flat_map(|x| x.to_le_bytes()));
        assert_eq!(parse(&bytes, &p).unwrap(), (vec![1, 2, 3], v(0, 1)));
        std::fs::write(&p, &bytes).unwrap();
        let e = Growing::open(&p, &item, 1).err().unwrap().to_string();
        assert!(e.contains("not the padded one"), "{e}");
        assert_eq!(
            std::fs::read(&p).unwrap(),
            bytes,
            "the refused file is untouched"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The reader returns any range of the array, and finds the first value that is not finite.
    #[test]
    fn the_reader_reads_ranges_and_finds_non_finite_values() {
        let dir = scratch("reader");
        let p = dir.join("r.npy");
        let mut data: Vec<f32> = (0..24).map(|i| i as f32).collect();
        std::fs::write(&p, to_bytes(&data, &[2, 3, 4])).unwrap();
        let mut r = Reader::open(&p).unwrap();
        assert_eq!(r.shape, vec![2, 3, 4]);
        assert_eq!(r.read(5, 3).unwrap(), vec![5.0, 6.0, 7.0]);
        assert_eq!(r.first_non_finite(5).unwrap(), None);
        data[17] = f32::INFINITY;
        data[20] = f32::NAN;
        std::fs::write(&p, to_bytes(&data, &[2, 3, 4])).unwrap();
        let mut r = Reader::open(&p).unwrap();
        assert_eq!(r.first_non_finite(5).unwrap(), Some((17, f32::INFINITY)));
        let mut bytes = to_bytes(&data, &[2, 3, 4]);
        bytes.pop();
        std::fs::write(&p, bytes).unwrap();
        let e = Reader::open(&p).err().unwrap().to_string();
        assert!(e.contains("r.npy") && e.contains("holds"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
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

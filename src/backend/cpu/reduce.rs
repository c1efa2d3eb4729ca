//! Deterministic parallel reductions: work is cut into a fixed number of groups (independent of the number
//! of threads), each group sums its items in order, and the groups are added in order. So a result is
//! bit-for-bit the same on any machine, which `train --resume` relies on.

use super::real::Real;
use rayon::prelude::*;

/// Groups a reduction is cut into.
pub const GROUPS: usize = 16;

/// Sums over `total` items taken `chunk` at a time: `body(first, count, acc)` adds the contribution of
/// items `first .. first + count` into `acc` (of length `len`, zeroed per group).
pub fn grouped_sum<T: Real>(
    total: usize,
    chunk: usize,
    len: usize,
    body: impl Fn(usize, usize, &mut [T]) + Sync,
) -> Vec<T> {
    let chunks = total.div_ceil(chunk.max(1));
    let groups = chunks.clamp(1, GROUPS);
    let per_group = chunks.div_ceil(groups);
    let partials: Vec<Vec<T>> = (0..groups)
        .into_par_iter()
        .map(|g| {
            let mut acc = vec![T::ZERO; len];
            for c in g * per_group..((g + 1) * per_group).min(chunks) {
                let first = c * chunk;
                body(first, chunk.min(total - first), &mut acc);
            }
            acc
        })
        .collect();
    let mut out = vec![T::ZERO; len];
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

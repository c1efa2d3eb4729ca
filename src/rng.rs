//! Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), bit for bit the
//! generator of `kernels/common.cuh`, so a CPU run and a GPU run of one seed draw the same noise.
//!
//! A draw is addressed by `(seed, stream, element)`: the key is the seed, the counter is
//! `(element / 4, stream)`, and element `e` takes lane `e % 4` of its block. Nothing depends on how work is
//! split across threads, launches or batches.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// What a stream of random numbers is for: the top byte of the stream id, so purposes never collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    /// The eps of the forward process in training; index = training step.
    TrainNoise = 1,
    /// The z of each reverse step; index = sampler step.
    SamplerNoise = 2,
    /// Dropout masks; index = step * 256 + layer.
    Dropout = 3,
    /// Training timesteps; index = training step.
    Timesteps = 4,
    /// Weight initialisation; index = parameter number.
    Init = 5,
    /// The x_T a sampler starts from; index = 0.
    SamplerStart = 6,
    /// Data order and augmentation; index = epoch (order) or step (flips).
    Data = 7,
    /// The noise of a forward-diffusion strip (`ddpm-cuda diffuse`); index = 0.
    Diffuse = 8,
    /// The x_t draws of the variational bound (`ddpm-cuda eval`); index = timestep.
    Eval = 9,
    /// Label dropout of class-conditional training (`--cond-drop`); index 0, element = global image
    /// index (step * batch + image).
    CondDrop = 10,
}

/// A stream id: `purpose` in the top byte, `index` in the low 56 bits.
pub fn stream(purpose: Purpose, index: u64) -> u64 {
    ((purpose as u64) << 56) | (index & ((1u64 << 56) - 1))
}

/// A stream id that may move with the backend's training clock: `base + per_step * clock` (see
/// `Backend::clock_set`). A fixed stream has `per_step = 0`. The random ops of a training step take their
/// streams in this form, so that one recorded step replays with fresh draws as the clock advances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream {
    pub base: u64,
    pub per_step: u64,
}

impl Stream {
    /// The same stream at every step.
    pub const fn fixed(id: u64) -> Self {
        Self {
            base: id,
            per_step: 0,
        }
    }

    /// `stream(purpose, per_step * clock + offset)`, for every clock below `2^56 / per_step`.
    pub fn per_step(purpose: Purpose, per_step: u64, offset: u64) -> Self {
        Self {
            base: stream(purpose, offset),
            per_step,
        }
    }

    /// `offset` more than this stream (the layers of one step).
    pub fn offset(self, by: u64) -> Self {
        Self {
            base: self.base.wrapping_add(by),
            ..self
        }
    }

    /// The stream id at training clock `clock`.
    pub fn at(self, clock: u64) -> u64 {
        self.base.wrapping_add(self.per_step.wrapping_mul(clock))
    }
}

#[inline(always)]
fn round(c: [u32; 4], k: [u32; 2]) -> [u32; 4] {
    let p0 = u64::from(M0) * u64::from(c[0]);
    let p1 = u64::from(M1) * u64::from(c[2]);
    let (lo0, hi0) = (p0 as u32, (p0 >> 32) as u32);
    let (lo1, hi1) = (p1 as u32, (p1 >> 32) as u32);
    [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
}

/// Ten rounds of Philox4x32 on `counter` with `key`.
pub fn philox4x32_10(mut counter: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for r in 0..10 {
        if r > 0 {
            key[0] = key[0].wrapping_add(W0);
            key[1] = key[1].wrapping_add(W1);
        }
        counter = round(counter, key);
    }
    counter
}

/// The four words of block `block` in `stream` for run `seed`.
#[inline]
pub fn block(seed: u64, stream: u64, block: u64) -> [u32; 4] {
    philox4x32_10(
        [
            block as u32,
            (block >> 32) as u32,
            stream as u32,
            (stream >> 32) as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// 23 random bits to a float in (0, 1): `(k + 0.5) * 2^-23`, exact in f32, never 0 or 1.
#[inline]
pub fn uniform_from_bits(bits: u32) -> f32 {
    ((bits >> 9) as f32 + 0.5) * 1.192_092_9e-7
}

/// Box-Muller in f64, rounded once (the kernel does the same, with `sincospi`).
#[inline]
fn box_muller(a: u32, b: u32) -> [f32; 2] {
    let u1 = f64::from(uniform_from_bits(a));
    let u2 = f64::from(uniform_from_bits(b));
    let radius = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
    [(radius * c) as f32, (radius * s) as f32]
}

/// The four standard-normal draws of block `block` (elements `4 * block .. 4 * block + 3`).
#[inline]
pub fn normal4(seed: u64, stream: u64, blk: u64) -> [f32; 4] {
    let r = block(seed, stream, blk);
    let a = box_muller(r[0], r[1]);
    let b = box_muller(r[2], r[3]);
    [a[0], a[1], b[0], b[1]]
}

/// Standard-normal draw for `element` of `(seed, stream)`.
pub fn normal(seed: u64, stream: u64, element: u64) -> f32 {
    normal4(seed, stream, element >> 2)[(element & 3) as usize]
}

/// Uniform (0, 1) draw for `element` of `(seed, stream)`.
pub fn uniform(seed: u64, stream: u64, element: u64) -> f32 {
    uniform_from_bits(block(seed, stream, element >> 2)[(element & 3) as usize])
}

/// Fills `out` with the normal draws of elements `first .. first + out.len()`.
pub fn fill_normal(seed: u64, stream: u64, first: u64, out: &mut [f32]) {
    for (i, v) in out.iter_mut().enumerate() {
        *v = normal(seed, stream, first + i as u64);
    }
}

/// A uniform integer in `0..n` for `element` of `(seed, stream)` (64 random bits, so the bias is < n / 2^64).
pub fn below(seed: u64, stream: u64, element: u64, n: u64) -> u64 {
    let r = block(seed, stream, element);
    let x = u64::from(r[0]) | (u64::from(r[1]) << 32);
    ((u128::from(x) * u128::from(n)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors of Philox4x32-10 published with Random123 (kat_vectors).
    #[test]
    fn a_per_step_stream_is_the_stream_of_its_step() {
        let s = Stream::per_step(Purpose::Dropout, 1 << 10, 0).offset(7);
        for step in [0, 1, 2, 799_999, (1 << 46) - 1] {
            assert_eq!(s.at(step), stream(Purpose::Dropout, (step << 10) + 7));
        }
        assert_eq!(Stream::fixed(42).at(12345), 42);
    }

    #[test]
    fn philox_matches_random123_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn counter_layout_is_block_then_stream() {
        let seed = 0x0123_4567_89ab_cdef_u64;
        let (stream, blk) = (0xdead_beef_0000_0007_u64, 0x1_0000_0002_u64);
        let expect = philox4x32_10([2, 1, 7, 0xdeadbeef], [0x89abcdef, 0x01234567]);
        assert_eq!(block(seed, stream, blk), expect);
    }

    #[test]
    fn uniform_is_strictly_inside_unit_interval() {
        assert_eq!(uniform_from_bits(0), 0.5 / 8_388_608.0);
        assert_eq!(uniform_from_bits(u32::MAX), 1.0 - 0.5 / 8_388_608.0);
    }

    // 2^16 draws: mean within 5 standard errors (5/256 ≈ 0.02) of 0, variance within 0.03 of 1
    // (standard error of the sample variance is sqrt(2/n) ≈ 0.0055).
    #[test]
    fn normal_draws_have_unit_moments() {
        let n = 1 << 16;
        let xs: Vec<f64> = (0..n)
            .map(|e| f64::from(normal(42, stream(Purpose::TrainNoise, 3), e)))
            .collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
        let kurt = xs.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n as f64 / (var * var);
        assert!((kurt - 3.0).abs() < 0.15, "kurtosis {kurt}");
    }

    #[test]
    fn streams_and_seeds_differ() {
        let a = normal4(1, stream(Purpose::TrainNoise, 0), 0);
        assert_ne!(a, normal4(2, stream(Purpose::TrainNoise, 0), 0));
        assert_ne!(a, normal4(1, stream(Purpose::SamplerNoise, 0), 0));
        assert_ne!(a, normal4(1, stream(Purpose::TrainNoise, 1), 0));
        assert_eq!(stream(Purpose::Dropout, 5) >> 56, 3);
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut counts = [0u32; 10];
        for e in 0..10_000 {
            counts[below(7, 9, e, 10) as usize] += 1;
        }
        // Each bin expects 1000 with sd ≈ 30: 150 is five standard deviations.
        assert!(
            counts.iter().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
    }
}

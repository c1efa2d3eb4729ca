//! Pictures: sample grids, forward-diffusion strips and loss curves as PNG, images in and out of [-1, 1].

use crate::error::{Error, Result};
use std::path::Path;

/// An RGB picture, 8 bits per channel.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize, background: [u8; 3]) -> Self {
        Self {
            width,
            height,
            rgb: background
                .iter()
                .copied()
                .cycle()
                .take(width * height * 3)
                .collect(),
        }
    }

    pub fn put(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < self.width && y < self.height {
            let i = (y * self.width + x) * 3;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Pastes an NHWC image with values in [-1, 1] (clamped) at (x0, y0).
    pub fn paste(&mut self, x0: usize, y0: usize, img: &[f32], size: usize, channels: usize) {
        for y in 0..size {
            for x in 0..size {
                let p = &img[(y * size + x) * channels..(y * size + x + 1) * channels];
                let c = |i: usize| to_u8(p[i.min(channels - 1)]);
                self.put(x0 + x, y0 + y, [c(0), c(1), c(2)]);
            }
        }
    }

    /// Writes the picture atomically (temporary file, then rename).
    pub fn save_png(&self, path: &Path) -> Result<()> {
        let img =
            image::RgbImage::from_raw(self.width as u32, self.height as u32, self.rgb.clone())
                .ok_or_else(|| Error::Invalid("canvas size".into()))?;
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::format(path, format!("encoding PNG: {e}")))?;
        crate::files::write_atomic(path, &bytes)
    }
}

/// [-1, 1] to 0..=255.
pub fn to_u8(v: f32) -> u8 {
    (((v.clamp(-1.0, 1.0) + 1.0) * 127.5) + 0.5) as u8
}

/// A grid of NHWC images in rows of `cols`, with a 2-pixel gap.
pub fn grid(images: &[f32], n: usize, size: usize, channels: usize, cols: usize) -> Canvas {
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    let gap = 2;
    let mut c = Canvas::new(
        cols * (size + gap) + gap,
        rows * (size + gap) + gap,
        [255, 255, 255],
    );
    let per = size * size * channels;
    for i in 0..n {
        c.paste(
            gap + (i % cols) * (size + gap),
            gap + (i / cols) * (size + gap),
            &images[i * per..(i + 1) * per],
            size,
            channels,
        );
    }
    c
}

/// A square grid of NHWC images at the model's size, scaled up so small samples are visible, as a PNG.
pub fn save_grid(
    images: &[f32],
    n: usize,
    config: &crate::model::UNetConfig,
    path: &Path,
) -> Result<()> {
    let (size, channels) = (config.sample_size, config.out_channels);
    let cols = (n as f64).sqrt().ceil() as usize;
    let g = grid(images, n, size, channels, cols);
    upscale(&g, (128 / size).max(1)).save_png(path)
}

/// A grid of a class-conditional model's images with one row per class: image `i` has class
/// `i % classes` (sampling every class in turn), so it goes to row
/// `i % classes`, column `i / classes`. Scaled up as [`save_grid`].
pub fn save_class_grid(
    images: &[f32],
    n: usize,
    classes: usize,
    config: &crate::model::UNetConfig,
    path: &Path,
) -> Result<()> {
    let (size, channels) = (config.sample_size, config.out_channels);
    let per = size * size * channels;
    let rows = classes.clamp(1, n.max(1));
    let cols = n.div_ceil(rows);
    let gap = 2;
    let mut c = Canvas::new(
        cols * (size + gap) + gap,
        rows * (size + gap) + gap,
        [255, 255, 255],
    );
    for i in 0..n {
        c.paste(
            gap + (i / rows) * (size + gap),
            gap + (i % rows) * (size + gap),
            &images[i * per..(i + 1) * per],
            size,
            channels,
        );
    }
    upscale(&c, (128 / size).max(1)).save_png(path)
}

/// Scales a canvas up by an integer factor (nearest), so 16x16 samples are visible.
pub fn upscale(c: &Canvas, factor: usize) -> Canvas {
    let mut out = Canvas::new(c.width * factor, c.height * factor, [0, 0, 0]);
    for y in 0..out.height {
        for x in 0..out.width {
            let i = ((y / factor) * c.width + x / factor) * 3;
            out.put(x, y, [c.rgb[i], c.rgb[i + 1], c.rgb[i + 2]]);
        }
    }
    out
}

/// Loads a PNG or JPEG, resizes its shorter side to `size` and crops the centre: `[size, size, 3]` NHWC in
/// [-1, 1].
pub fn load_image(path: &Path, size: usize) -> Result<Vec<f32>> {
    let img = image::open(path)
        .map_err(|e| Error::format(path, format!("not a readable PNG/JPEG image: {e}")))?
        .to_rgb8();
    let (w, h) = (img.width() as f64, img.height() as f64);
    let scale = size as f64 / w.min(h);
    let (nw, nh) = (
        ((w * scale).round() as u32).max(size as u32),
        ((h * scale).round() as u32).max(size as u32),
    );
    let resized = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
    let (x0, y0) = ((nw - size as u32) / 2, (nh - size as u32) / 2);
    let mut out = Vec::with_capacity(size * size * 3);
    for y in 0..size as u32 {
        for x in 0..size as u32 {
            let p = resized.get_pixel(x0 + x, y0 + y);
            out.extend(p.0.iter().map(|&v| f32::from(v) / 127.5 - 1.0));
        }
    }
    Ok(out)
}

/// 3x5 glyphs for the few characters the plots print, one row per entry, bit 2 the left column.
fn glyph(ch: char) -> [u8; 5] {
    match ch {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'E' => [7, 4, 6, 4, 7],
        'G' => [3, 4, 5, 5, 3],
        'L' => [4, 4, 4, 4, 7],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        _ => [0; 5],
    }
}

impl Canvas {
    /// Writes `text` with its top-left corner at (x, y), each glyph pixel `scale` pixels wide.
    pub fn text(&mut self, x: usize, y: usize, text: &str, scale: usize, colour: [u8; 3]) {
        for (i, ch) in text.chars().enumerate() {
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                let px = x + (4 * i + col) * scale + dx;
                                self.put(px, y + row * scale + dy, colour);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The width `text` takes at `scale`.
    pub fn text_width(text: &str, scale: usize) -> usize {
        (4 * text.chars().count()).saturating_sub(1) * scale
    }
}

/// A loss curve: `(step, loss)` points on a log scale, raw values in light grey and a moving average in
/// blue, the axes labelled with the first and last step and the lowest and highest loss.
pub fn loss_curve(points: &[(u64, f32)]) -> Canvas {
    let (w, h) = (640usize, 360usize);
    let (left, right, top, bottom) = (70usize, 20usize, 30usize, 40usize);
    let mut c = Canvas::new(w, h, [255, 255, 255]);
    let black = [0, 0, 0];
    for x in left..w - right {
        c.put(x, h - bottom, black);
    }
    for y in top..h - bottom {
        c.put(left, y, black);
    }
    c.text(left, 8, "LOSS (LOG)", 2, black);
    let pts: Vec<(u64, f64)> = points
        .iter()
        .map(|&(s, v)| (s, f64::from(v).max(1e-8).ln()))
        .filter(|(_, v)| v.is_finite())
        .collect();
    if pts.len() < 2 {
        return c;
    }
    let (lo, hi) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &(_, v)| (a.min(v), b.max(v)));
    let span = (hi - lo).max(1e-6);
    let (x_span, y_span) = (w - left - right - 2, h - top - bottom - 2);
    let px = |i: usize| left + 1 + i * x_span / (pts.len() - 1);
    let py = |v: f64| h - bottom - 1 - (((v - lo) / span) * y_span as f64) as usize;
    let label = |v: f64| format!("{:.3}", v.exp());
    c.text(4, top, &label(hi), 2, black);
    c.text(4, h - bottom - 10, &label(lo), 2, black);
    let (first, last) = (pts[0].0.to_string(), pts[pts.len() - 1].0.to_string());
    c.text(left, h - bottom + 8, &first, 2, black);
    c.text(
        w - right - Canvas::text_width(&last, 2),
        h - bottom + 8,
        &last,
        2,
        black,
    );
    c.text(
        w / 2 - Canvas::text_width("STEP", 2) / 2,
        h - bottom + 8,
        "STEP",
        2,
        black,
    );
    let vals: Vec<f64> = pts.iter().map(|&(_, v)| v).collect();
    let window = (vals.len() / 50).max(1);
    let mut smooth = Vec::with_capacity(vals.len());
    let mut acc = 0.0;
    for i in 0..vals.len() {
        acc += vals[i];
        if i >= window {
            acc -= vals[i - window];
        }
        smooth.push(acc / (i + 1).min(window) as f64);
    }
    for (series, colour) in [(&vals, [200, 200, 200]), (&smooth, [30, 90, 200])] {
        for i in 1..series.len() {
            let (x0, y0, x1, y1) = (
                px(i - 1) as f64,
                py(series[i - 1]) as f64,
                px(i) as f64,
                py(series[i]) as f64,
            );
            let steps = (x1 - x0).abs().max((y1 - y0).abs()).max(1.0) as usize;
            for s in 0..=steps {
                let f = s as f64 / steps as f64;
                c.put(
                    (x0 + f * (x1 - x0)) as usize,
                    (y0 + f * (y1 - y0)) as usize,
                    colour,
                );
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    // "1" at scale 2: its 3x5 pattern, each bit a 2x2 square, and nothing else painted.
    #[test]
    fn text_draws_the_glyph_bits() {
        let mut c = Canvas::new(10, 12, [255, 255, 255]);
        c.text(1, 1, "1", 2, [0, 0, 0]);
        let dark = |x: usize, y: usize| c.rgb[(y * 10 + x) * 3] == 0;
        let want = [[0, 1, 0], [1, 1, 0], [0, 1, 0], [0, 1, 0], [1, 1, 1]];
        for y in 0..12 {
            for x in 0..10 {
                let inside = (1..7).contains(&x) && (1..11).contains(&y);
                let bit = inside && want[(y - 1) / 2][(x - 1) / 2] == 1;
                assert_eq!(dark(x, y), bit, "pixel ({x}, {y})");
            }
        }
    }

    #[test]
    fn loss_curve_labels_its_range() {
        let pts: Vec<(u64, f32)> = (1..=100).map(|s| (s, 1.0 / s as f32)).collect();
        let c = loss_curve(&pts);
        assert_eq!((c.width, c.height), (640, 360));
        // The highest loss (1.000) is written at the top left, the last step at the bottom right.
        let dark_in = |x0: usize, y0: usize, w: usize, h: usize| {
            (y0..y0 + h).any(|y| (x0..x0 + w).any(|x| c.rgb[(y * 640 + x) * 3] == 0))
        };
        assert!(dark_in(4, 30, 40, 10));
        assert!(dark_in(
            640 - 20 - Canvas::text_width("100", 2),
            328,
            20,
            10
        ));
    }
}

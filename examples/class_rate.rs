//! How often a model trained on the synthetic classes drew the colour it was asked for, judged from the
//! pixels alone (`ddpm_cuda::data::synthetic_colour`), never by the model.
//!
//! ```sh
//! ddpm-cuda sample --model runs/cond --class all --guidance 3 -n 120 --out-npy s.npy
//! cargo run --release --example class_rate -- s.npy            # --class all: image i has class i % 12
//! cargo run --release --example class_rate -- s.npy blue-disk  # every image of one class
//! ```

use ddpm_cuda::data::{synthetic_class_names, synthetic_colour};
use ddpm_cuda::model::Classes;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(path), class) = (args.first(), args.get(1)) else {
        return Err("usage: class_rate SAMPLES.npy [CLASS] (samples of the synthetic classes, as `ddpm-cuda sample --out-npy` writes them)".into());
    };
    let names = synthetic_class_names();
    let classes = Classes::with_null(names.len(), Some(names.clone()));
    let asked = class.map(|c| classes.label(c)).transpose()?;
    let (shape, data) = ddpm_cuda::npy::read(std::path::Path::new(path))?;
    let [n, 3, h, w] = shape[..] else {
        return Err(format!("{path}: shape {shape:?}, expected (N, 3, H, W)").into());
    };
    let (mut right, mut shapeless) = (0, 0);
    for i in 0..n {
        // NCHW to the NHWC the check reads.
        let image = &data[i * 3 * h * w..(i + 1) * 3 * h * w];
        let nhwc: Vec<f32> = (0..h * w)
            .flat_map(|p| (0..3).map(move |c| image[c * h * w + p]))
            .collect();
        let want = asked.unwrap_or(i % names.len()) / 2;
        match synthetic_colour(&nhwc) {
            Some(c) if c == want => right += 1,
            Some(_) => {}
            None => shapeless += 1,
        }
    }
    println!(
        "{right} of {n} images ({:.0}%) have the colour asked for; {shapeless} show no shape",
        100.0 * right as f64 / n as f64
    );
    Ok(())
}

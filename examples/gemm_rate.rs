//! The CPU GEMM's rate against the machine's measured FMA peak, per kernel the CPU has, on the shapes the
//! paper's network gives it (one thread per GEMM, all threads at once, as the backend runs them).
//!
//!     cargo run --release --example gemm_rate
use ddpm_cuda::backend::cpu::sgemm::{fma_peak_gflops, sgemm_on, Isa, Operand};
use rayon::prelude::*;
use std::time::Instant;

fn main() {
    let threads = rayon::current_num_threads();
    // (m, k, n, what): a chunk of pixels of a 3x3 conv at c = o = 256 and 128; a weight gradient; a square.
    let shapes = [
        (108, 2304, 256, "conv fwd 3x3 256->256, 108 pixels"),
        (216, 1152, 128, "conv fwd 3x3 128->128, 216 pixels"),
        (256, 108, 2304, "weight grad 256 x 2304, 108 pixels deep"),
        (512, 512, 512, "square 512"),
    ];
    for isa in Isa::available() {
        let peak = fma_peak_gflops(isa);
        println!(
            "{} on {threads} threads: FMA peak {peak:.0} GFLOP/s",
            isa.name()
        );
        for &(m, k, n, what) in &shapes {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
            let reps = (2e9 / (2.0 * (m * k * n) as f64)).ceil() as usize;
            let run = || {
                let mut c = vec![0.0f32; m * n];
                let op_a = Operand::new(a.as_ptr(), k as isize, 1);
                let op_b = Operand::new(b.as_ptr(), n as isize, 1);
                for _ in 0..reps {
                    // SAFETY: a, b, c are m x k, k x n, m x n row-major.
                    unsafe {
                        sgemm_on(
                            isa,
                            m,
                            k,
                            n,
                            1.0,
                            op_a,
                            op_b,
                            0.0,
                            c.as_mut_ptr(),
                            n as isize,
                            1,
                        )
                    };
                }
                c[0]
            };
            run();
            let t = Instant::now();
            let _: Vec<f32> = (0..threads).into_par_iter().map(|_| run()).collect();
            let gflops = (threads * reps) as f64 * 2.0 * (m * k * n) as f64
                / t.elapsed().as_secs_f64()
                / 1e9;
            println!(
                "  {what:<42} {gflops:6.0} GFLOP/s  {:5.1}% of peak",
                100.0 * gflops / peak
            );
        }
    }
}

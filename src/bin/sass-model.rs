//! `sass-model`: the static performance model of the embedded kernels (`ddpm_cuda::sass`), without a
//! GPU. Run through `scripts/sass-model`, which installs cuobjdump and nvdisasm from PyPI.
//!
//!   sass-model [--cuobjdump PATH] [--batch 128,256] [--check]
//!
//! For H100 (sm_90a) and A100 (sm_80) machine code: plans the launches of the bench's bf16 training
//! step and sampling forward of the paper's network on a device where nothing runs (the launchers pick
//! what they would pick there), on the default path and on each rung of the convolution ladder; reads
//! every launched kernel's SASS; prints one table row per kernel (resources, occupancy, the main loop's
//! instruction mix, its bounds and ceiling) and the network lines. With `--check`, exits 1 when a hot
//! kernel's main loop has an integer division or a per-element global load, or when a known answer (the
//! `peak.cu` loops) comes out wrong.

use ddpm_cuda::backend::cuda::{CudaBackend, Planned, FATBIN};
use ddpm_cuda::backend::{Backend, Launch, Precision, Rung};
use ddpm_cuda::model::UNetConfig;
use ddpm_cuda::sass::{self, Function, KernelModel, Machine, Resources};
use std::collections::HashMap;
use std::process::{Command, ExitCode};

struct Args {
    cuobjdump: String,
    batches: Vec<usize>,
    check: bool,
    /// Print this kernel's main-loop path (sm_90a and sm_80) and stop.
    path: Option<String>,
    /// Also list every launch of the plans whose label contains this (the first batch).
    launches: Option<String>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        cuobjdump: std::env::var("CUOBJDUMP").unwrap_or_else(|_| "cuobjdump".into()),
        batches: vec![128, 256],
        check: false,
        path: None,
        launches: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--cuobjdump" => a.cuobjdump = it.next().ok_or("--cuobjdump needs a path")?,
            "--batch" => {
                let v = it.next().ok_or("--batch needs sizes")?;
                a.batches = v
                    .split(',')
                    .map(|b| {
                        b.trim()
                            .parse()
                            .map_err(|_| format!("--batch: `{b}` is not a size"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--check" => a.check = true,
            "--path" => a.path = Some(it.next().ok_or("--path needs a kernel")?),
            "--launches" => a.launches = Some(it.next().ok_or("--launches needs a plan's name")?),
            "-h" | "--help" => {
                return Err(
                    "usage: sass-model [--cuobjdump PATH] [--batch 128,256] [--check]".into(),
                )
            }
            other => {
                return Err(format!(
                    "sass-model: unknown argument `{other}` (see --help)"
                ))
            }
        }
    }
    Ok(a)
}

/// Every kernel's SASS and resources, by name.
type Disassembly = (HashMap<String, Function>, HashMap<String, Resources>);

/// The SASS and resources of every kernel in the embedded fatbin for one architecture.
fn disassemble(
    cuobjdump: &str,
    fatbin: &std::path::Path,
    arch: &str,
) -> Result<Disassembly, String> {
    let run = |what: &str| -> Result<String, String> {
        let out = Command::new(cuobjdump)
            .args([what, "-arch", arch])
            .arg(fatbin)
            .output()
            .map_err(|e| format!("running {cuobjdump}: {e} (scripts/sass-model installs it)"))?;
        if !out.status.success() {
            return Err(format!(
                "{cuobjdump} {what} -arch {arch} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let functions = sass::parse(&run("-sass")?)
        .into_iter()
        .map(|f| (f.name.clone(), f))
        .collect();
    let resources = sass::parse_resources(&run("-res-usage")?);
    Ok((functions, resources))
}

/// The launches of one plan: a training step and a sampling forward at each batch.
struct Plan {
    label: String,
    default: bool,
    train: Vec<Vec<Launch>>,
    sample: Vec<Vec<Launch>>,
}

fn plan(gpu: Planned, rung: Option<Rung>, batches: &[usize]) -> Result<Option<Plan>, String> {
    let config = UNetConfig::preset("ddpm-cifar10").map_err(|e| e.to_string())?;
    let mut train = Vec::new();
    let mut sample = Vec::new();
    for &batch in batches {
        let mut be = CudaBackend::planned(gpu);
        be.set_precision(Precision::Bf16)
            .map_err(|e| e.to_string())?;
        if !be.set_rung(rung).map_err(|e| e.to_string())? {
            return Ok(None);
        }
        let (t, s) = ddpm_cuda::bench::profile_launches(&mut be, &config, batch)
            .map_err(|e| format!("planning batch {batch}: {e}"))?;
        train.push(t);
        sample.push(s);
    }
    Ok(Some(Plan {
        label: rung.map_or("default".into(), |r| r.name().to_string()),
        default: rung.is_none(),
        train,
        sample,
    }))
}

/// The kernels' models, by kernel and tile, made on first use.
struct Models<'a> {
    m: &'a Machine,
    functions: &'a HashMap<String, Function>,
    resources: &'a HashMap<String, Resources>,
    made: HashMap<(String, Option<[u32; 3]>), KernelModel>,
}

impl Models<'_> {
    fn of(&mut self, l: &Launch) -> Result<&KernelModel, String> {
        let key = (l.kernel.to_string(), l.tile);
        if !self.made.contains_key(&key) {
            let f = self.functions.get(l.kernel).ok_or_else(|| {
                format!(
                    "{}: no {} SASS for kernel {}",
                    self.m.name, self.m.arch, l.kernel
                )
            })?;
            let res = self.resources.get(l.kernel).copied().unwrap_or_default();
            let k = KernelModel::new(self.m, f, res, l.threads, l.shared, l.tile, l.staged);
            self.made.insert(key.clone(), k);
        }
        Ok(&self.made[&key])
    }
}

/// Modelled seconds of each launch of `launches`, and the FLOPs.
fn times(models: &mut Models, launches: &[Launch]) -> Result<Vec<(f64, f64)>, String> {
    launches
        .iter()
        .map(|l| {
            let m = *models.m;
            let k = models.of(l)?;
            let t = sass::time_launch(&m, k, l.blocks, l.issued_macs, l.bytes);
            Ok((t, l.flops))
        })
        .collect()
}

/// A network line: its FLOPs over the dense peak times its launches' modelled time.
fn network_share(m: &Machine, t: &[(f64, f64)]) -> f64 {
    let (secs, flops): (f64, f64) = t.iter().fold((0.0, 0.0), |(a, b), &(s, f)| (a + s, b + f));
    let peak = 2.0 * m.dense_macs * f64::from(m.sms) * m.clock_ghz * 1e9;
    flops / (peak * secs.max(1e-30))
}

fn kib(bytes: u32) -> String {
    format!("{:.1}", f64::from(bytes) / 1024.0)
}

/// One machine's table and lines; returns the problems `--check` fails on.
fn report(
    m: &Machine,
    args: &Args,
    fatbin: &std::path::Path,
    gpu: Planned,
) -> Result<Vec<String>, String> {
    let (functions, resources) = disassemble(&args.cuobjdump, fatbin, m.arch)?;
    let mut models = Models {
        m,
        functions: &functions,
        resources: &resources,
        made: HashMap::new(),
    };
    let mut plans = Vec::new();
    for rung in std::iter::once(None).chain(Rung::ALL.into_iter().map(Some)) {
        if let Some(p) = plan(gpu, rung, &args.batches)? {
            plans.push(p);
        }
    }
    let mut problems = Vec::new();

    // The kernels of the default plan, by their share of its first batch's modelled training and
    // sampling time.
    let base = &plans[0];
    let mut share: HashMap<&'static str, (f64, f64, f64, f64)> = HashMap::new();
    for (launches, is_train) in [(&base.train[0], true), (&base.sample[0], false)] {
        let t = times(&mut models, launches)?;
        let total: f64 = t.iter().map(|x| x.0).sum();
        let flops: f64 = t.iter().map(|x| x.1).sum();
        for (l, (secs, f)) in launches.iter().zip(&t) {
            let e = share.entry(l.kernel).or_default();
            if is_train {
                e.0 += secs / total;
                e.2 += f / flops.max(1.0);
            } else {
                e.1 += secs / total;
                e.3 += f / flops.max(1.0);
            }
        }
    }
    // Every kernel of every plan, the default's first.
    let mut order: Vec<(&'static str, Launch)> = Vec::new();
    for p in &plans {
        for l in p.train.iter().chain(&p.sample).flatten() {
            if !order.iter().any(|(k, _)| *k == l.kernel) {
                order.push((l.kernel, *l));
            }
        }
    }
    order.sort_by(|a, b| {
        let sa = share.get(a.0).map_or(0.0, |s| s.0 + s.1);
        let sb = share.get(b.0).map_or(0.0, |s| s.0 + s.1);
        sb.total_cmp(&sa)
    });

    println!(
        "\n## {} ({}, {} SMs at {} GHz; dense bf16 {:.0} TFLOP/s, copy {:.1} TB/s)\n",
        m.name,
        m.arch,
        m.sms,
        m.clock_ghz,
        2.0 * m.dense_macs * f64::from(m.sms) * m.clock_ghz * 1e-3,
        m.copy_bytes_per_s * 1e-12
    );
    println!("Matrix kernels: per iteration of the main loop of one block (cheapest path), in SM clocks; ceiling = share of the dense bf16 peak.\n");
    println!("| kernel | regs | smem KiB | blocks/SM | warps/SM | instr (path, body x) | MMA / MACs | smem R / W B | global B | TMA | cp.async | div | MUFU / XU | tensor | issue | smem | XU | ceiling | bound | train / sample time |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut bandwidth = Vec::new();
    for (name, l) in &order {
        let k = models.of(l)?.clone();
        let (st, ss, ft, fs) = share.get(name).copied().unwrap_or_default();
        let mx = &k.loops.main;
        if !k.is_matrix() {
            bandwidth.push((name, k, st, ss));
            continue;
        }
        let w = k.warps;
        println!(
            "| {name} | {} | {} | {} | {} | {:.0} ({:.1}x) | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} / {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | **{:.0}%** | {} | {:.1}% / {:.1}% |",
            k.res.registers,
            kib(k.res.shared + l.shared),
            k.blocks_per_sm,
            k.blocks_per_sm as f64 * f64::from(k.threads.div_ceil(32)),
            mx.instructions,
            k.loops.body,
            mx.mma * w,
            mx.macs * w,
            mx.smem_read * w,
            mx.smem_write * w,
            mx.global_load * w + mx.global_store * w,
            mx.tma,
            mx.cp_async * w,
            mx.divisions,
            mx.mufu * w,
            mx.xu * w,
            k.tensor,
            k.issue,
            k.smem,
            k.xu,
            100.0 * k.ceiling(),
            k.bound(),
            100.0 * st,
            100.0 * ss,
        );
        let hot = ft.max(fs) >= 0.01;
        if hot && k.per_element_work() {
            problems.push(format!(
                "{} {name}: {:.0}% of the training FLOPs, {:.0}% of the sampling FLOPs, and its main loop has {} integer division(s) and {} per-element global load(s)",
                m.arch, 100.0 * ft, 100.0 * fs, mx.divisions, mx.narrow_loads
            ));
        }
        if let Some([tm, tn, tk]) = l.tile {
            let want = f64::from(tm) * f64::from(tn) * f64::from(tk);
            let got = mx.macs * w;
            if (got - want).abs() > 1e-6 * want && got > 0.0 {
                println!("|  | (the main loop's {got:.0} multiply-adds per iteration are not the tile's {want:.0}: the iteration count uses the loop's) |");
            }
        }
    }
    println!("\nBandwidth kernels: per iteration of the main loop; ceiling = share of the copy bandwidth the loop's issue allows.\n");
    println!("| kernel | regs | blocks/SM | instr | global B / warp | div | MUFU / XU | issue | XU | ceiling | train / sample time |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, k, st, ss) in &bandwidth {
        let mx = &k.loops.main;
        println!(
            "| {name} | {} | {} | {:.0}{} | {:.0} | {:.0} | {:.0} / {:.0} | {:.0} | {:.0} | {:.0}% | {:.1}% / {:.1}% |",
            k.res.registers,
            k.blocks_per_sm,
            mx.instructions,
            if k.loops.straight { " (no loop)" } else { "" },
            mx.global_load + mx.global_store,
            mx.divisions,
            mx.mufu,
            mx.xu,
            k.issue,
            k.xu,
            100.0 * k.bandwidth_ceiling(m),
            100.0 * st,
            100.0 * ss,
        );
    }

    println!("\nNetwork lines (the paper's network, bf16; FLOPs over the dense peak times the modelled launches' time):\n");
    for p in &plans {
        let mut cells = Vec::new();
        for (i, &batch) in args.batches.iter().enumerate() {
            let tr = network_share(m, &times(&mut models, &p.train[i])?);
            let sa = network_share(m, &times(&mut models, &p.sample[i])?);
            cells.push(format!(
                "batch {batch}: training {:.0}%, sampling {:.0}%",
                100.0 * tr,
                100.0 * sa
            ));
        }
        let mark = if p.default { " (default)" } else { "" };
        println!("- {}{mark}: {}", p.label, cells.join("; "));
        if p.default {
            let tr = network_share(m, &times(&mut models, &p.train[0])?);
            let sa = network_share(m, &times(&mut models, &p.sample[0])?);
            println!("\nnetwork ceiling ({}): training {:.0}%, sampling {:.0}%  (batch {}; upper bounds from instruction counts, not measurements)\n", m.arch, 100.0 * tr, 100.0 * sa, args.batches[0]);
        }
    }
    println!("\nWhere each plan's modelled time goes (batch {}; the 8 longest kernels, their launches, share of the step's time, and achieved share of the dense peak):\n", args.batches[0]);
    for p in &plans {
        for (what, launches) in [("training", &p.train[0]), ("sampling", &p.sample[0])] {
            let t = times(&mut models, launches)?;
            let total: f64 = t.iter().map(|x| x.0).sum();
            let mut by: Vec<(&'static str, usize, f64, f64)> = Vec::new();
            for (l, &(secs, flops)) in launches.iter().zip(&t) {
                match by.iter_mut().find(|k| k.0 == l.kernel) {
                    Some(k) => (k.1, k.2, k.3) = (k.1 + 1, k.2 + secs, k.3 + flops),
                    None => by.push((l.kernel, 1, secs, flops)),
                }
            }
            by.sort_by(|a, b| b.2.total_cmp(&a.2));
            let peak = 2.0 * m.dense_macs * f64::from(m.sms) * m.clock_ghz * 1e9;
            let rows: Vec<String> = by
                .iter()
                .take(8)
                .map(|(k, n, secs, flops)| {
                    format!(
                        "{k} x{n} {:.0}% ({:.0}%)",
                        100.0 * secs / total,
                        100.0 * flops / (peak * secs.max(1e-30))
                    )
                })
                .collect();
            println!("- {} {what}: {}", p.label, rows.join(", "));
        }
    }
    if let Some(want) = &args.launches {
        for p in plans.iter().filter(|p| p.label.contains(want.as_str())) {
            for (what, launches) in [("training", &p.train[0]), ("sampling", &p.sample[0])] {
                println!("\n{} {what}, every launch (blocks, GFLOP, modelled us, at the copy bandwidth us):", p.label);
                for (l, (secs, flops)) in launches.iter().zip(times(&mut models, launches)?) {
                    println!(
                        "  {} {} {:.2} {:.1} {:.1}",
                        l.kernel,
                        l.blocks,
                        flops * 1e-9,
                        secs * 1e6,
                        l.bytes / m.copy_bytes_per_s * 1e6
                    );
                }
            }
        }
    }
    problems.extend(known_answers(m, &functions, &resources));
    Ok(problems)
}

/// The peak loops of `kernels/peak.cu`, whose answers are known: 4 WMMA m16n16k16 (8 HMMA.16816) per
/// iteration with nothing else to wait for is tensor-bound at mma.sync's rate (the dense peak on sm_80,
/// half of it on sm_90), and 8 independent FMA chains are FMA-bound.
fn known_answers(
    m: &Machine,
    functions: &HashMap<String, Function>,
    resources: &HashMap<String, Resources>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let model = |name: &str| {
        functions.get(name).map(|f| {
            KernelModel::new(
                m,
                f,
                resources.get(name).copied().unwrap_or_default(),
                256,
                0,
                None,
                0.0,
            )
        })
    };
    let want = m.hmma_macs / m.dense_macs;
    match model("peak_mma_bf16") {
        Some(k) if (k.ceiling() - want).abs() <= 0.05 * want && k.bound() == "tensor" => {
            println!("known answer: peak_mma_bf16 is tensor-bound at {:.0}% of the dense peak (mma.sync's rate: {:.0}%)", 100.0 * k.ceiling(), 100.0 * want)
        }
        Some(k) => problems.push(format!(
            "{}: peak_mma_bf16 modelled at {:.0}% ({}-bound), not mma.sync's {:.0}%",
            m.arch,
            100.0 * k.ceiling(),
            k.bound(),
            100.0 * want
        )),
        None => problems.push(format!("{}: no SASS for peak_mma_bf16", m.arch)),
    }
    // The FMA loop: 32 FFMA and the loop's own 3 instructions; on sm_90, where a scheduler issues one
    // FFMA a clock to its 32 lanes, the issue of those 3 takes 3 / 35 of the FMA peak.
    match model("peak_fma_f32") {
        Some(k) if k.fma / k.iteration() >= 0.85 => println!(
            "known answer: peak_fma_f32 reaches {:.0}% of the FMA peak ({}-bound; {:.0} FFMA of {:.0} instructions a loop)",
            100.0 * k.fma / k.iteration(),
            k.bound(),
            k.loops.main.ffma,
            k.loops.main.instructions
        ),
        Some(k) => problems.push(format!(
            "{}: peak_fma_f32 modelled at {:.0}% of the FMA peak ({}-bound)",
            m.arch,
            100.0 * k.fma / k.iteration(),
            k.bound()
        )),
        None => problems.push(format!("{}: no SASS for peak_fma_f32", m.arch)),
    }
    // A deliberately slow loader: version 3's convolution that normalises its input as it loads it (the
    // statistics, gamma and beta read per element, a sigmoid per element) beside the same kernel over a
    // plain input. The model must see the per-element loads and put it well below the plain one.
    match (model("conv2d_forward_normed_bf16_io_bf16in"), model("conv2d_forward_bf16_io_bf16in")) {
        (Some(slow), Some(plain))
            if slow.loops.main.narrow_loads > 0.0 && slow.ceiling() < 0.6 * plain.ceiling() =>
        {
            println!(
                "known answer: the normalising loader is flagged ({:.0} per-element loads, {:.0} MUFU an iteration) and modelled at {:.0}% against the plain loader's {:.0}%",
                slow.loops.main.narrow_loads,
                slow.loops.main.mufu,
                100.0 * slow.ceiling(),
                100.0 * plain.ceiling()
            )
        }
        (Some(slow), Some(plain)) => problems.push(format!(
            "{}: the normalising loader modelled at {:.0}% with {} per-element loads, the plain one at {:.0}%",
            m.arch,
            100.0 * slow.ceiling(),
            slow.loops.main.narrow_loads,
            100.0 * plain.ceiling()
        )),
        _ => problems.push(format!("{}: no SASS for version 3's forwards", m.arch)),
    }
    problems
}

fn main() -> ExitCode {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let Some(fatbin) = FATBIN else {
        eprintln!(
            "sass-model: this binary was built without kernels (nvcc was not found at build time)"
        );
        return ExitCode::from(2);
    };
    let path =
        std::env::temp_dir().join(format!("ddpm-cuda-kernels-{}.fatbin", std::process::id()));
    if let Err(e) = std::fs::write(&path, fatbin) {
        eprintln!("sass-model: writing {}: {e}", path.display());
        return ExitCode::from(2);
    }
    if let Some(kernel) = &args.path {
        for m in [Machine::H100, Machine::A100] {
            match disassemble(&args.cuobjdump, &path, m.arch) {
                Ok((functions, _)) => match functions.get(kernel) {
                    Some(f) => {
                        for line in sass::loop_summary(f) {
                            println!("{} {kernel} {line}", m.arch);
                        }
                        println!("{} {kernel}, main loop's typical iteration:", m.arch);
                        for line in sass::main_path(f) {
                            println!("  {line}");
                        }
                    }
                    None => println!("{}: no kernel {kernel}", m.arch),
                },
                Err(e) => eprintln!("sass-model: {e}"),
            }
        }
        let _ = std::fs::remove_file(&path);
        return ExitCode::SUCCESS;
    }
    println!("# Static SASS model of the kernels\n");
    println!("Upper bounds from instruction counts, not measurements (`src/sass.rs` says what is counted and what is not).");
    println!(
        "\nMachine code by {} (for {}).",
        ddpm_cuda::backend::cuda::kernel_toolkit().unwrap_or("?"),
        ddpm_cuda::backend::cuda::kernel_archs().unwrap_or("?")
    );
    let mut problems = Vec::new();
    for (m, gpu) in [
        (Machine::H100, Planned::H100),
        (Machine::A100, Planned::A100),
    ] {
        match report(&m, &args, &path, gpu) {
            Ok(p) => problems.extend(p),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                eprintln!("sass-model: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    if !problems.is_empty() {
        println!("\nProblems:");
        for p in &problems {
            println!("- {p}");
        }
        if args.check {
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

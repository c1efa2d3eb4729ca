//! Compiles every `kernels/*.cu` into one fatbin and embeds it in the crate.
//!
//! nvcc is looked up through `NVCC`, then `CUDA_HOME`/`CUDA_PATH`, then `PATH`. Without it the crate still
//! builds (CPU backend only) and says so once; `DDPM_REQUIRE_NVCC=1` turns a missing nvcc into an error.
//! `DDPM_CUDA_ARCHS` overrides the targets: a comma-separated list where `sm_XX[a]` asks for machine code
//! and `compute_XX[a]` for PTX (default `sm_90a,sm_80,compute_90`).
//!
//! Any nvcc warning is an error, and so is a register spill: ptxas reports every kernel's registers,
//! shared memory and spills, the report is kept at `$OUT_DIR/ptxas-report.txt`, and a kernel that spills
//! fails the build.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "sm_90a,sm_80,compute_90";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ddpm_kernels)");
    println!("cargo:rerun-if-changed=kernels");
    if env::var_os("CARGO_FEATURE_EMU").is_some() {
        build_emulator();
    }
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "DDPM_REQUIRE_NVCC",
        "DDPM_CUDA_ARCHS",
        "DDPM_PTXAS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let required = env::var("DDPM_REQUIRE_NVCC").is_ok_and(|v| !v.is_empty() && v != "0");
    let Some(nvcc) = find_nvcc() else {
        if required {
            fail("DDPM_REQUIRE_NVCC is set but nvcc was not found (looked at NVCC, CUDA_HOME, CUDA_PATH, PATH); \
                  run scripts/install-nvcc.sh and set NVCC to the path it prints");
        }
        println!(
            "cargo:warning=nvcc not found: building without CUDA kernels (CPU backend only). \
             To build them: NVCC=$(scripts/install-nvcc.sh | tail -n 1) cargo build --release"
        );
        return;
    };

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("kernels");
    let unit = write_translation_unit(&kernel_dir, &out_dir);
    let archs = env::var("DDPM_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let fatbin = out_dir.join("kernels.fatbin");

    let flags = |c: &mut Command| {
        c.args(["-O3", "-std=c++17", "-lineinfo"])
            .args(["--Werror", "all-warnings"])
            .arg("-I")
            .arg(&kernel_dir);
    };
    let ptxas12 = find_ptxas12(&nvcc);
    let (report, toolkit, min_cuda) = match &ptxas12 {
        // Machine code by a CUDA 12 ptxas: nvcc (13) writes PTX per architecture, ptxas 12.9 assembles
        // it, and CUDA 13's fatbinary packs the images uncompressed.
        Some(ptxas) => {
            let report = split_build(&nvcc, ptxas, &archs, &unit, &out_dir, &fatbin, &flags);
            (
                report,
                format!(
                    "ptxas {PTXAS12_RELEASE} (machine code), nvcc {} (front end)",
                    release(&nvcc)
                ),
                12020,
            )
        }
        None => {
            let mut cmd = Command::new(&nvcc);
            cmd.arg("--fatbin");
            flags(&mut cmd);
            cmd.args(["-Xptxas", "-v,-warn-spills,-warn-lmem-usage"])
                .args(gencode_flags(&archs))
                .arg("-o")
                .arg(&fatbin)
                .arg(&unit);
            let report = run(&mut cmd, &nvcc);
            let r = release(&nvcc);
            let major: u32 = r
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .unwrap_or(13);
            (report, format!("nvcc {r}"), major.max(12) * 1000)
        }
    };
    fs::write(out_dir.join("ptxas-report.txt"), &report)
        .unwrap_or_else(|e| fail(&format!("writing ptxas report: {e}")));
    if let Some(spill) = report.lines().find(|l| spills(l)) {
        fail(&format!(
            "a kernel spills registers (see {}):\n{spill}",
            out_dir.join("ptxas-report.txt").display()
        ));
    }
    // Every kernel's name, so the backend can load them all before it records a graph (a kernel first
    // loaded inside a stream capture fails on drivers before 12.3, with lazy module loading).
    let mut names = Vec::new();
    for entry in fs::read_dir(&kernel_dir)
        .unwrap_or_else(|e| fail(&format!("reading {}: {e}", kernel_dir.display())))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
    {
        let text = fs::read_to_string(&entry)
            .unwrap_or_else(|e| fail(&format!("reading {}: {e}", entry.display())));
        names.extend(kernel_names(&text));
    }
    names.sort();
    names.dedup();
    println!("cargo:rustc-cfg=ddpm_kernels");
    println!("cargo:rustc-env=DDPM_KERNEL_NAMES={}", names.join(","));
    println!("cargo:rustc-env=DDPM_KERNELS_FATBIN={}", fatbin.display());
    println!("cargo:rustc-env=DDPM_KERNELS_ARCHS={archs}");
    println!("cargo:rustc-env=DDPM_KERNELS_TOOLKIT={toolkit}");
    println!("cargo:rustc-env=DDPM_KERNELS_MIN_CUDA={min_cuda}");
}

/// The release of the pinned CUDA 12 ptxas, and the PTX ISA it reads.
const PTXAS12_RELEASE: &str = "12.9";
const PTX_ISA_12: &str = "8.8";

/// The CUDA 12 ptxas: `DDPM_PTXAS`, else the one scripts/install-nvcc.sh installs beside nvcc
/// (`site-packages/nvidia/cuda_nvcc/bin/ptxas`, from the `nvidia-cuda-nvcc-cu12` wheel, which carries
/// ptxas but no nvcc). `DDPM_PTXAS=none` builds with nvcc alone (CUDA 13 machine code, driver R580+).
fn find_ptxas12(nvcc: &Path) -> Option<PathBuf> {
    match env::var("DDPM_PTXAS") {
        Ok(v) if v == "none" => return None,
        Ok(v) => {
            let p = PathBuf::from(v);
            if !p.is_file() {
                fail(&format!("DDPM_PTXAS={} is not a file", p.display()));
            }
            return Some(p);
        }
        Err(_) => {}
    }
    // nvcc is .../site-packages/nvidia/cu13/bin/nvcc; the CUDA 12 wheel is .../nvidia/cuda_nvcc.
    let nvidia = nvcc.parent()?.parent()?.parent()?;
    let p = nvidia.join("cuda_nvcc").join("bin").join("ptxas");
    p.is_file().then_some(p)
}

/// `release X.Y` from a tool's `--version`.
fn release(tool: &Path) -> String {
    let out = Command::new(tool).arg("--version").output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.split("release ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or("?")
        .to_string()
}

/// Runs a tool; its stderr (the ptxas report), or the build fails with its output.
fn run(cmd: &mut Command, tool: &Path) -> String {
    let output = cmd
        .output()
        .unwrap_or_else(|e| fail(&format!("could not run {}: {e}", tool.display())));
    let report = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        fail(&format!(
            "{} failed ({}):\n{}{}",
            tool.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            report
        ));
    }
    report
}

/// The fatbin from machine code assembled by the CUDA 12 ptxas: for each `sm_XX[a]`, nvcc writes the
/// PTX of `compute_XX[a]`, its `.version` is set to the ISA ptxas 12.9 reads (nvcc 13 writes 9.0; the
/// kernels use nothing newer than 8.x, and ptxas would reject anything it does not know), and ptxas
/// assembles it with the spill checks; each `compute_XX` is kept as PTX of that ISA. fatbinary (CUDA
/// 13's) packs the images uncompressed, in the container format every driver reads. The nvcc runs go
/// in parallel, then the ptxas runs. Returns ptxas's report.
fn split_build(
    nvcc: &Path,
    ptxas: &Path,
    archs: &str,
    unit: &Path,
    out_dir: &Path,
    fatbin: &Path,
    flags: &dyn Fn(&mut Command),
) -> String {
    let release12 = release(ptxas);
    if release12 != PTXAS12_RELEASE {
        fail(&format!(
            "{} is ptxas {release12}; the build pins {PTXAS12_RELEASE} (scripts/install-nvcc.sh installs it)",
            ptxas.display()
        ));
    }
    let list: Vec<&str> = archs
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    let mut jobs = Vec::new();
    for arch in &list {
        let virt = match (arch.strip_prefix("sm_"), arch.strip_prefix("compute_")) {
            (Some(n), _) | (_, Some(n)) => format!("compute_{n}"),
            _ => fail(&format!(
                "DDPM_CUDA_ARCHS: `{arch}` is neither sm_XX nor compute_XX"
            )),
        };
        let ptx = out_dir.join(format!("kernels_{arch}.ptx"));
        let mut c = Command::new(nvcc);
        c.arg("-ptx");
        flags(&mut c);
        c.arg(format!("-arch={virt}")).arg("-o").arg(&ptx).arg(unit);
        let child = c
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| fail(&format!("could not run {}: {e}", nvcc.display())));
        jobs.push((arch.to_string(), ptx, child));
    }
    let mut ptxs = Vec::new();
    for (arch, ptx, child) in jobs {
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| fail(&format!("nvcc: {e}")));
        if !out.status.success() {
            fail(&format!(
                "nvcc -ptx for {arch} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let text = fs::read_to_string(&ptx)
            .unwrap_or_else(|e| fail(&format!("reading {}: {e}", ptx.display())));
        let Some(at) = text.find("\n.version ") else {
            fail(&format!("{}: no .version line", ptx.display()));
        };
        let end = text[at + 1..].find('\n').map_or(text.len(), |e| at + 1 + e);
        let edited = format!("{}\n.version {PTX_ISA_12}{}", &text[..at], &text[end..]);
        fs::write(&ptx, edited)
            .unwrap_or_else(|e| fail(&format!("writing {}: {e}", ptx.display())));
        ptxs.push((arch, ptx));
    }
    let mut report = String::new();
    let mut children = Vec::new();
    let mut images = Vec::new();
    for (arch, ptx) in &ptxs {
        if let Some(num) = arch.strip_prefix("sm_") {
            let cubin = out_dir.join(format!("kernels_{arch}.cubin"));
            let child = Command::new(ptxas)
                .args([
                    "-O3",
                    "-v",
                    "-warn-spills",
                    "-warn-lmem-usage",
                    "-lineinfo",
                    "-Werror",
                ])
                .arg(format!("-arch={arch}"))
                .arg("-o")
                .arg(&cubin)
                .arg(ptx)
                .stderr(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| fail(&format!("could not run {}: {e}", ptxas.display())));
            children.push((arch.clone(), child));
            images.push(format!(
                "--image3=kind=elf,sm={num},file={}",
                cubin.display()
            ));
        } else if let Some(num) = arch.strip_prefix("compute_") {
            images.push(format!("--image3=kind=ptx,sm={num},file={}", ptx.display()));
        }
    }
    for (arch, child) in children {
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| fail(&format!("ptxas: {e}")));
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            fail(&format!(
                "ptxas {PTXAS12_RELEASE} for {arch} failed ({}):\n{text}",
                out.status
            ));
        }
        report.push_str(&text);
    }
    let fatbinary = nvcc.with_file_name("fatbinary");
    let mut c = Command::new(&fatbinary);
    c.arg(format!("--create={}", fatbin.display()))
        .arg("-64")
        .arg("--compress=false")
        .args(&images);
    run(&mut c, &fatbinary);
    report
}

/// `NVCC`, then `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, then the first `nvcc` on `PATH`.
fn find_nvcc() -> Option<PathBuf> {
    if let Ok(path) = env::var("NVCC") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            fail(&format!("NVCC={} is not a file", path.display()));
        }
        return Some(path);
    }
    let from_roots = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(env::var_os)
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"));
    let from_path = env::var_os("PATH")
        .map(|p| {
            env::split_paths(&p)
                .map(|dir| dir.join("nvcc"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    from_roots.chain(from_path).find(|p| p.is_file())
}

/// nvcc takes one input for `--fatbin`: a generated unit that includes every kernel file, sorted by name.
fn write_translation_unit(kernel_dir: &Path, out_dir: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = fs::read_dir(kernel_dir)
        .unwrap_or_else(|e| fail(&format!("reading {}: {e}", kernel_dir.display())))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    files.sort();
    let mut unit =
        String::from("// Generated by build.rs: every kernel file in one translation unit.\n");
    for file in &files {
        unit.push_str(&format!("#include \"{}\"\n", file.display()));
    }
    let path = out_dir.join("all_kernels.cu");
    fs::write(&path, unit).unwrap_or_else(|e| fail(&format!("writing {}: {e}", path.display())));
    path
}

/// `sm_90a` -> SASS for sm_90a; `compute_90` -> PTX for compute_90.
fn gencode_flags(archs: &str) -> Vec<String> {
    archs
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|arch| {
            if let Some(num) = arch.strip_prefix("sm_") {
                format!("-gencode=arch=compute_{num},code=sm_{num}")
            } else if let Some(num) = arch.strip_prefix("compute_") {
                format!("-gencode=arch=compute_{num},code=compute_{num}")
            } else {
                fail(&format!(
                    "DDPM_CUDA_ARCHS: `{arch}` is neither sm_XX nor compute_XX"
                ))
            }
        })
        .collect()
}

/// ptxas -v prints `N bytes stack frame, S bytes spill stores, L bytes spill loads` per kernel.
fn spills(line: &str) -> bool {
    let count_before = |key: &str| {
        line.find(key)
            .and_then(|i| line[..i].split_whitespace().last()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    count_before("bytes spill stores") > 0 || count_before("bytes spill loads") > 0
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

/// Feature "emu": the same kernel sources compiled by the host's C++ compiler against emu/cuda_emu.h, with
/// a table of launchers by name, into a static library the CUDA backend's emulated device calls. Only for
/// tests on machines without a GPU; needs a C++20 compiler (`CXX`, else `c++`).
fn build_emulator() {
    println!("cargo:rerun-if-changed=emu");
    println!("cargo:rerun-if-env-changed=CXX");
    let root =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernels = root.join("kernels");
    let mut files: Vec<PathBuf> = fs::read_dir(&kernels)
        .unwrap_or_else(|e| fail(&format!("reading {}: {e}", kernels.display())))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    let mut unit = String::from(
        "// Generated by build.rs (feature emu): every kernel file, for the CPU emulator.\n\
         #include \"cuda_emu.h\"\n#include \"runtime.h\"\n#include <cstring>\n",
    );
    let mut names = Vec::new();
    let mut all_text = String::new();
    for f in &files {
        let text = fs::read_to_string(f)
            .unwrap_or_else(|e| fail(&format!("reading {}: {e}", f.display())));
        names.extend(kernel_names(&text));
        all_text.push_str(&text);
        // Dynamic shared memory is the running block's buffer.
        unit.push_str(&text.replace(
            "extern __shared__ float smem[];",
            "float* smem = emu::dynamic_shared();",
        ));
        unit.push('\n');
    }
    // Kernels defined in headers (gemm.cuh's reductions) come in through the .cu files' includes.
    for header in fs::read_dir(&kernels)
        .unwrap_or_else(|e| fail(&format!("reading {}: {e}", kernels.display())))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cuh"))
    {
        let text = fs::read_to_string(&header)
            .unwrap_or_else(|e| fail(&format!("reading {}: {e}", header.display())));
        names.extend(kernel_names(&text));
        all_text.push_str(&text);
    }
    unit.push_str("#include \"thread_exit.h\"\n");
    unit.push_str(
        "namespace {\nstruct Entry { const char* name; emu::Launcher launch; bool sequential; };\n\
         const Entry table[] = {\n",
    );
    for n in &names {
        // A kernel whose body never synchronises can run its threads one after another in one OS thread.
        let sequential = all_text.contains(&format!("void {n}(")) && !synchronises(&all_text, n);
        unit.push_str(&format!(
            "    {{\"{n}\", EMU_LAUNCHER({n}), {sequential}}},\n"
        ));
    }
    unit.push_str(
        "};\n}  // namespace\n\
         extern \"C\" int ddpm_emu_launch(const char* name, const unsigned* grid, const unsigned* block,\n\
                                          unsigned shared_bytes, void** args) {\n\
             for (const Entry& e : table)\n\
                 if (std::strcmp(e.name, name) == 0)\n\
                     return emu::launch(e.launch, e.sequential, grid, block, shared_bytes, args);\n\
             return 1;\n\
         }\n",
    );
    let generated = out.join("emu_kernels.cpp");
    fs::write(&generated, unit)
        .unwrap_or_else(|e| fail(&format!("writing {}: {e}", generated.display())));
    let cxx = env::var("CXX").unwrap_or_else(|_| "c++".into());
    let mut objects = Vec::new();
    for (src, obj) in [
        (generated, "emu_kernels.o"),
        (root.join("emu/runtime.cpp"), "emu_runtime.o"),
    ] {
        let obj = out.join(obj);
        let status = Command::new(&cxx)
            .args([
                "-std=c++20",
                "-O2",
                "-fPIC",
                "-fno-strict-aliasing",
                "-Wno-unknown-pragmas",
            ])
            .arg("-I")
            .arg(&kernels)
            .arg("-I")
            .arg(root.join("emu"))
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| fail(&format!("running {cxx}: {e}")));
        if !status.success() {
            fail(&format!("{cxx} failed on {} (feature emu)", src.display()));
        }
        objects.push(obj);
    }
    let lib = out.join("libddpm_emu.a");
    let _ = fs::remove_file(&lib);
    let status = Command::new("ar")
        .arg("crs")
        .arg(&lib)
        .args(&objects)
        .status()
        .unwrap_or_else(|e| fail(&format!("running ar: {e}")));
    if !status.success() {
        fail("ar failed (feature emu)");
    }
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=ddpm_emu");
    println!("cargo:rustc-link-lib=dylib=stdc++");
}

/// Whether kernel `name`'s body (from its name to the brace that closes it) synchronises threads, directly
/// or through the project's helpers that do (block and warp reductions, the warp-collective tensor-core
/// instructions, the GEMM cores and the `*_gemm<..>` bodies that run them).
fn synchronises(text: &str, name: &str) -> bool {
    let Some(start) = text.find(&format!("void {name}(")) else {
        return true;
    };
    let body = &text[start..];
    let Some(open) = body.find('{') else {
        return true;
    };
    let mut depth = 0;
    let mut end = body.len();
    for (i, ch) in body[open..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    end = open + i;
                    break;
                }
            }
            _ => {}
        }
    }
    let body = &body[open..end];
    [
        "__syncthreads",
        "__syncwarp",
        "wmma::",
        "__shfl",
        "block_sum",
        "warp_sum",
        "warp_dot",
        "_gemm<",
        "gemm_run",
        "gemm_tile",
        "ldmatrix",
        "mma_",
        "wgmma",
    ]
    .iter()
    .any(|s| body.contains(s))
}

/// The names of the `extern "C" __global__` kernels in a source file.
fn kernel_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("extern \"C\" __global__ void") {
        rest = &rest[i + "extern \"C\" __global__ void".len()..];
        let mut s = rest.trim_start();
        if let Some(after) = s.strip_prefix("__launch_bounds__(") {
            s = after[after.find(')').map_or(0, |j| j + 1)..].trim_start();
        }
        let name: String = s
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            names.push(name);
        }
    }
    names
}

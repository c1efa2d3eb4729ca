//! The static performance model: what the machine code of a kernel allows, read from its SASS
//! (`cuobjdump -sass`) without a GPU. `scripts/sass-model` runs it over the embedded kernels
//! (`src/bin/sass-model.rs`); `docs/SASS_MODEL.md` says how to read its table.
//!
//! For each kernel it finds the *main loop* (of the loops in the code, the one whose typical path
//! through one iteration carries the most tensor-core work; without tensor work, the most memory
//! traffic) and counts what one iteration issues on that path: every instruction, the
//! multiply-adds of its matrix instructions, the bytes it reads from and writes to shared memory, its
//! global loads and stores, TMA copies, integer-division sequences, special-function (MUFU) instructions
//! and conversions. Against a [`Machine`]'s rates those give four times per iteration of one block:
//!
//! - **tensor**: the multiply-adds at the rate of the instruction that does them (`HGMMA` at the dense
//!   peak; `HMMA` at the peak on sm_80, at half of it on sm_90, where mma.sync is not fed as wgmma is);
//! - **issue**: instructions over the SM's four schedulers (one warp instruction each per clock);
//! - **shared memory**: bytes over 128 per clock (wgmma's operand reads from shared memory and the
//!   copies landing there included: a conservative count);
//! - **XU**: MUFU and conversions at 16 lanes per clock.
//!
//! The largest is the iteration's time; the dense-peak tensor time over it is the kernel's *ceiling*, the
//! most of the dense bf16 peak its main loop can reach. These are upper bounds from instruction counts:
//! latencies, stalls, bank conflicts, the prologue and the epilogue, and the memory system beyond its
//! bandwidth are not modelled. A launch's time is then the larger of the busiest SM's iterations at that
//! rate (whole waves of blocks) and its compulsory bytes at the copy bandwidth; a network's line is its
//! FLOPs over the dense peak times the sum of its launches' times.

use std::collections::HashMap;

/// One SASS instruction: its address, whether it is predicated, its opcode with modifiers
/// (`HMMA.16816.F32.BF16`) and its operands.
#[derive(Clone, Debug, PartialEq)]
pub struct Instr {
    pub addr: u32,
    pub predicated: bool,
    pub op: String,
    pub args: String,
}

/// A kernel's machine code.
#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    pub name: String,
    pub code: Vec<Instr>,
}

/// The functions of `cuobjdump -sass` output for one architecture, in order.
pub fn parse(text: &str) -> Vec<Function> {
    let mut out: Vec<Function> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("Function : ") {
            out.push(Function {
                name: rest.trim().to_string(),
                code: Vec::new(),
            });
            continue;
        }
        let Some(f) = out.last_mut() else { continue };
        if let Some(i) = parse_instr(t) {
            f.code.push(i);
        }
    }
    out
}

/// `/*0c30*/  @!P0 BRA 0x1030 ;  /* 0x... */` into an instruction; `None` for any other line.
fn parse_instr(line: &str) -> Option<Instr> {
    let rest = line.strip_prefix("/*")?;
    let close = rest.find("*/")?;
    let addr = u32::from_str_radix(&rest[..close], 16).ok()?;
    let body = rest[close + 2..].trim();
    let body = body.split(';').next()?.trim();
    if body.is_empty() {
        return None;
    }
    let (predicated, body) = match body.strip_prefix('@') {
        Some(p) => {
            let (_, after) = p.split_once(char::is_whitespace)?;
            (true, after.trim_start())
        }
        None => (false, body),
    };
    let (op, args) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
    if !op.starts_with(|c: char| c.is_ascii_uppercase()) {
        return None;
    }
    Some(Instr {
        addr,
        predicated,
        op: op.to_string(),
        args: args.trim().to_string(),
    })
}

/// Registers, shared memory and local memory of each function, from `cuobjdump -res-usage`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub registers: u32,
    pub shared: u32,
    pub local: u32,
    pub stack: u32,
}

/// `cuobjdump -res-usage` output for one architecture: each function's resources by name.
pub fn parse_resources(text: &str) -> HashMap<String, Resources> {
    let mut out = HashMap::new();
    let mut name: Option<String> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("Function ") {
            name = Some(rest.trim_end_matches(':').trim().to_string());
            continue;
        }
        let Some(n) = name.take() else { continue };
        let field = |key: &str| {
            t.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        out.insert(
            n,
            Resources {
                registers: field("REG:"),
                shared: field("SHARED:"),
                local: field("LOCAL:"),
                stack: field("STACK:"),
            },
        );
    }
    out
}

/// The tensor-core instruction families, which run at different rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mma {
    /// Hopper's warpgroup MMA (`HGMMA`, wgmma).
    Hgmma,
    /// The warp-level MMA (`HMMA`, mma.sync and WMMA).
    Hmma,
}

/// What one warp instruction contributes to the model.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    /// Multiply-adds of a matrix instruction (one warp's share of a warpgroup's).
    pub macs: f64,
    pub hgmma: bool,
    /// Bytes read from and written to shared memory by the warp.
    pub smem_read: f64,
    pub smem_write: f64,
    /// Global memory bytes loaded and stored by the warp (32 lanes each).
    pub global_load: f64,
    pub global_store: f64,
    /// A global load narrower than 16 bytes a lane (a per-element load).
    pub narrow_load: bool,
    /// A TMA copy (its bytes are the tile's, which the instruction does not say).
    pub tma: bool,
    /// A cp.async (LDGSTS): its smem bytes are counted in `smem_write`.
    pub cp_async: bool,
    /// On the XU pipe (MUFU, I2F, F2I, F2F): 2 SM cycles per warp instruction.
    pub xu: bool,
    pub mufu: bool,
    /// The start of an integer division's reciprocal sequence (`I2F.*.RP`; a call of a subroutine that
    /// has one, 64-bit division, counts too: [`Mix`]).
    pub division: bool,
    /// An fp32 FMA (`FFMA`), for the SIMT kernels' pipe.
    pub ffma: bool,
    /// `setmaxnreg`: the kernel specialises its warps.
    pub setmaxnreg: bool,
}

/// The width in bytes of one lane's access (`.128` 16, `.64` 8, `.U16` 2, ... 4 when unsaid).
fn lane_bytes(op: &str) -> f64 {
    let mut bytes = 4.0;
    for m in op.split('.').skip(1) {
        bytes = match m {
            "U8" | "S8" => 1.0,
            "U16" | "S16" => 2.0,
            "64" => 8.0,
            "128" => 16.0,
            _ => continue,
        };
    }
    bytes
}

/// The bytes of an `ldmatrix`/`stmatrix` of N 8x8 matrices of 16-bit elements (`.4`: 512).
fn matrices_bytes(op: &str) -> f64 {
    let n: f64 = op
        .rsplit('.')
        .next()
        .and_then(|x| x.parse().ok())
        .unwrap_or(1.0);
    128.0 * n
}

/// The cost of instruction `i` (see [`Cost`]).
pub fn cost(i: &Instr) -> Cost {
    let op = i.op.as_str();
    let base = op.split('.').next().unwrap_or(op);
    let mut c = Cost::default();
    match base {
        "HGMMA" => {
            // HGMMA.64xNx16.F32.BF16: a warpgroup's m64 nN k16, one quarter per warp. Its operands are
            // read from shared memory through descriptors (A may come from registers instead).
            let shape = op.split('.').nth(1).unwrap_or("");
            let dims: Vec<f64> = shape.split('x').filter_map(|d| d.parse().ok()).collect();
            if let [m, n, k] = dims[..] {
                c.macs = m * n * k / 4.0;
                let a_smem = i
                    .args
                    .split(',')
                    .nth(1)
                    .is_some_and(|a| a.trim().starts_with("gdesc"));
                let a = if a_smem { m * k * 2.0 } else { 0.0 };
                c.smem_read = (a + n * k * 2.0) / 4.0;
            }
            c.hgmma = true;
        }
        "HMMA" => {
            // HMMA.16816 (m16 n8 k16) or .1688 (m16 n8 k8) per warp.
            let shape = op.split('.').nth(1).unwrap_or("");
            c.macs = match shape {
                "16816" => 16.0 * 8.0 * 16.0,
                "1688" => 16.0 * 8.0 * 8.0,
                _ => 0.0,
            };
        }
        "LDS" => c.smem_read = 32.0 * lane_bytes(op),
        "STS" => c.smem_write = 32.0 * lane_bytes(op),
        // LDSM.16.M88.N / .MT88.N and STSM: N 8x8 matrices of 16-bit elements, 128 bytes each.
        "LDSM" => c.smem_read = matrices_bytes(op),
        "STSM" => c.smem_write = matrices_bytes(op),
        "LDGSTS" => {
            c.cp_async = true;
            c.smem_write = 32.0 * lane_bytes(op);
            c.global_load = c.smem_write;
        }
        "LDG" => {
            c.global_load = 32.0 * lane_bytes(op);
            c.narrow_load = lane_bytes(op) < 16.0;
        }
        "STG" => c.global_store = 32.0 * lane_bytes(op),
        "UTMALDG" | "UBLKCP" => c.tma = true,
        "MUFU" => {
            c.xu = true;
            c.mufu = true;
        }
        "I2F" | "F2I" | "F2F" => {
            c.xu = true;
            c.division = base == "I2F" && op.split('.').any(|m| m == "RP");
        }

        "FFMA" => c.ffma = true,
        "USETMAXREG" => c.setmaxnreg = true,
        _ => {}
    }
    c
}

fn is_branch(op: &str) -> bool {
    op == "BRA" || op.starts_with("BRA.")
}

/// Whether a branch has a condition of its own besides any guard predicate (`BRA P2, 0x1030`; `.ANY`
/// and `.ALL`, taken by the warp's vote).
fn conditional_branch(i: &Instr) -> bool {
    let cond = i.args.split(',').count() > 1;
    cond || i.op.split('.').any(|m| m == "ANY" || m == "ALL")
}

/// Whether control never falls through instruction `i` (an unconditional branch, an exit, a return).
fn ends_flow(i: &Instr) -> bool {
    if i.predicated {
        return false;
    }
    match is_branch(&i.op) {
        true => !conditional_branch(i),
        false => ["EXIT", "RET", "BRX", "JMX"]
            .iter()
            .any(|k| i.op.starts_with(k)),
    }
}

/// The index of the instruction a branch goes to.
fn target(f: &Function, i: &Instr) -> Option<usize> {
    if !is_branch(&i.op) {
        return None;
    }
    // `BRA 0x1030`, `BRA P2, 0x1030`, `BRA.U !UP0, 0x1030`: the address is the last operand.
    let t = i.args.split(',').next_back()?.trim();
    let addr = u32::from_str_radix(t.strip_prefix("0x")?, 16).ok()?;
    f.code.iter().position(|x| x.addr == addr)
}

/// A natural loop: the instruction its back branches go to, those branches, and its body (every
/// instruction that reaches a back branch without passing the head, the head included), in order. A loop
/// the compiler closes through code placed far away (the retry of an mbarrier wait, out of line) takes
/// only what lies on such a path, not the range between.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loop {
    pub head: usize,
    pub latches: Vec<usize>,
    pub body: Vec<usize>,
}

/// The instructions control can go to from `at`: the next one (unless it ends the flow) and a branch's
/// target.
fn successors(f: &Function, at: usize) -> impl Iterator<Item = usize> + '_ {
    let i = &f.code[at];
    let next = (!ends_flow(i) && at + 1 < f.code.len()).then_some(at + 1);
    next.into_iter().chain(target(f, i))
}

/// Every loop of `f`, by head.
pub fn loops(f: &Function) -> Vec<Loop> {
    let n = f.code.len();
    let mut preds: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut latches: HashMap<usize, Vec<usize>> = HashMap::new();
    for at in 0..n {
        for to in successors(f, at) {
            preds[to].push(at);
            if to <= at && target(f, &f.code[at]) == Some(to) {
                latches.entry(to).or_default().push(at);
            }
        }
    }
    let mut out: Vec<Loop> = latches
        .into_iter()
        .map(|(head, latches)| {
            let mut seen = vec![false; n];
            seen[head] = true;
            let mut stack: Vec<usize> = latches.clone();
            while let Some(at) = stack.pop() {
                if seen[at] {
                    continue;
                }
                seen[at] = true;
                stack.extend(preds[at].iter().copied().filter(|&p| !seen[p]));
            }
            let body = (0..n).filter(|&i| seen[i]).collect();
            Loop {
                head,
                latches,
                body,
            }
        })
        .collect();
    out.sort_by_key(|l| l.head);
    out
}

/// How a path through the code is ranked: its tensor work, then the bytes it moves (global and shared
/// memory), then fewer instructions. The *typical* path is the best so ranked: it takes a branch that
/// skips work only where the work is done anyway (the slow twin of a fast path, which moves the same
/// bytes in more instructions), so it keeps the loads a loop does on all but its last iteration (`if
/// (more) fetch(..)`) and drops the per-launch alternatives (an unaligned fallback, zeros for the
/// padding).
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd)]
struct Rank {
    macs: f64,
    bytes: f64,
    fewer: f64,
}

impl Rank {
    fn of(i: &Instr) -> Self {
        let c = cost(i);
        Rank {
            macs: c.macs,
            bytes: c.global_load + c.global_store + c.smem_read + c.smem_write,
            fewer: -1.0,
        }
    }
    fn add(self, o: Rank) -> Self {
        Rank {
            macs: self.macs + o.macs,
            bytes: self.bytes + o.bytes,
            fewer: self.fewer + o.fewer,
        }
    }
}

/// The typical path (see [`Rank`]) through `nodes` (instruction indices in order, the first where it
/// starts) to an instruction `end` accepts, following forward edges between them only (an inner loop's
/// body counted once, a branch leaving them not followed). The instructions on it, in order; empty where
/// no end is reachable.
fn typical_path(
    f: &Function,
    nodes: &[usize],
    exits: &HashMap<usize, usize>,
    end: impl Fn(usize) -> bool,
) -> Vec<usize> {
    let Some(&start) = nodes.first() else {
        return Vec::new();
    };
    let place: HashMap<usize, usize> = nodes.iter().enumerate().map(|(k, &at)| (at, k)).collect();
    let mut best_to: Vec<Option<Rank>> = vec![None; nodes.len()];
    let mut from = vec![usize::MAX; nodes.len()];
    best_to[0] = Some(Rank::of(&f.code[start]));
    let mut best: Option<(Rank, usize)> = None;
    for (k, &at) in nodes.iter().enumerate() {
        let Some(here) = best_to[k] else { continue };
        if end(at) && best.is_none_or(|(r, _)| here > r) {
            best = Some((here, k));
        }
        // A back branch to an inner loop's head goes on after that loop instead (its body counted once,
        // whichever way an iteration of it went).
        let next = successors(f, at).filter_map(|to| match to > at {
            true => Some(to),
            false => exits.get(&to).copied().filter(|&e| e > at),
        });
        for to in next {
            let Some(&j) = place.get(&to) else { continue };
            let r = here.add(Rank::of(&f.code[to]));
            if best_to[j].is_none_or(|old| r > old) {
                best_to[j] = Some(r);
                from[j] = k;
            }
        }
    }
    let Some((_, mut k)) = best else {
        return Vec::new();
    };
    let mut path = vec![nodes[k]];
    while k != 0 {
        k = from[k];
        path.push(nodes[k]);
    }
    path.reverse();
    path
}

/// The typical path (see [`Rank`]) through one iteration of `l`: from its head to a back branch to it.
pub fn iteration_path(f: &Function, l: &Loop) -> Vec<usize> {
    let mut nodes = vec![l.head];
    nodes.extend(l.body.iter().copied().filter(|&at| at > l.head));
    // The loops inside this one: each head and the instruction after its last back branch.
    let exits: HashMap<usize, usize> = loops(f)
        .into_iter()
        .filter(|inner| inner.head != l.head && l.body.binary_search(&inner.head).is_ok())
        .filter_map(|inner| Some((inner.head, inner.latches.iter().max()? + 1)))
        .collect();
    typical_path(f, &nodes, &exits, |at| l.latches.contains(&at))
}

/// The typical path from the function's entry to an exit, for a kernel without loops.
fn straight_path(f: &Function) -> Vec<usize> {
    let nodes: Vec<usize> = (0..f.code.len()).collect();
    let path = typical_path(f, &nodes, &HashMap::new(), |at| {
        let i = &f.code[at];
        i.op == "EXIT" && !i.predicated
    });
    match path.is_empty() {
        true => nodes,
        false => path,
    }
}

/// What one iteration of a loop issues, per warp.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mix {
    pub instructions: f64,
    pub mma: f64,
    pub macs: f64,
    pub hgmma: bool,
    pub smem_read: f64,
    pub smem_write: f64,
    pub global_load: f64,
    pub global_store: f64,
    pub narrow_loads: f64,
    pub tma: f64,
    pub cp_async: f64,
    pub xu: f64,
    pub mufu: f64,
    pub divisions: f64,
    pub ffma: f64,
}

/// Whether the subroutine a `CALL` at `at` enters (up to its `RET`) divides.
fn calls_division(f: &Function, at: usize) -> bool {
    let i = &f.code[at];
    if !i.op.starts_with("CALL") {
        return false;
    }
    let Some(addr) = i
        .args
        .split_whitespace()
        .next()
        .and_then(|t| u32::from_str_radix(t.strip_prefix("0x")?, 16).ok())
    else {
        return false;
    };
    let Some(start) = f.code.iter().position(|x| x.addr == addr) else {
        return false;
    };
    // A subroutine returns; a call into code that exits the kernel before any return is how the
    // compiler closes some loops (`CALL.REL.NOINC` to the next instruction but one, never taken), not a
    // subroutine.
    let body: Vec<&Instr> = f.code[start..]
        .iter()
        .take_while(|x| !x.op.starts_with("RET"))
        .collect();
    body.iter().all(|x| x.op != "EXIT") && body.iter().any(|x| cost(x).division)
}

impl Mix {
    fn of(f: &Function, path: &[usize]) -> Self {
        let mut m = Mix::default();
        for &at in path {
            let mut c = cost(&f.code[at]);
            c.division |= calls_division(f, at);
            m.instructions += 1.0;
            if c.macs > 0.0 {
                m.mma += 1.0;
                m.macs += c.macs;
                m.hgmma |= c.hgmma;
            }
            m.smem_read += c.smem_read;
            m.smem_write += c.smem_write;
            m.global_load += c.global_load;
            m.global_store += c.global_store;
            m.narrow_loads += f64::from(u8::from(c.narrow_load));
            m.tma += f64::from(u8::from(c.tma));
            m.cp_async += f64::from(u8::from(c.cp_async));
            m.xu += f64::from(u8::from(c.xu));
            m.mufu += f64::from(u8::from(c.mufu));
            m.divisions += f64::from(u8::from(c.division));
            m.ffma += f64::from(u8::from(c.ffma));
        }
        m
    }
    fn global(&self) -> f64 {
        self.global_load + self.global_store
    }
}

/// A kernel's loops as the model reads them: the main loop, and in a kernel that specialises its warps
/// (`setmaxnreg`), the producer's loop beside it.
#[derive(Clone, Debug, PartialEq)]
pub struct Loops {
    pub main: Mix,
    /// The main loop's instructions over the whole loop body's (1 when no branch in it is skipped).
    pub body: f64,
    pub producer: Option<Mix>,
    pub specialised: bool,
    /// No loop at all: `main` is the typical path from entry to exit.
    pub straight: bool,
}

/// Every loop of `f` with its typical iteration's size, tensor work and bytes, as text (for
/// `sass-model --path`).
pub fn loop_summary(f: &Function) -> Vec<String> {
    loop_mixes(f)
        .iter()
        .map(|(l, m)| {
            format!(
                "loop at {:05x}: body {} instructions, iteration {} ({} MMA, {} MACs, global {} B, shared {} B)",
                f.code[l.head].addr,
                l.body.len(),
                m.instructions,
                m.mma,
                m.macs,
                m.global(),
                m.smem_read + m.smem_write
            )
        })
        .collect()
}

/// The instructions of `f`'s main loop's typical iteration, as text (for `sass-model --path`).
pub fn main_path(f: &Function) -> Vec<String> {
    let l = main_loop(f);
    let path = match &l {
        Some(l) => iteration_path(f, l),
        None => straight_path(f),
    };
    path.iter()
        .map(|&at| {
            let i = &f.code[at];
            format!(
                "{:05x} {}{} {}",
                i.addr,
                if i.predicated { "@P " } else { "" },
                i.op,
                i.args
            )
        })
        .collect()
}

/// Each loop of `f` with what its typical iteration issues.
fn loop_mixes(f: &Function) -> Vec<(Loop, Mix)> {
    loops(f)
        .into_iter()
        .map(|l| {
            let m = Mix::of(f, &iteration_path(f, &l));
            (l, m)
        })
        .filter(|(_, m)| m.instructions > 0.0)
        .collect()
}

/// The main loop among `mixes`: the most tensor work, and of loops with as much the fewest instructions (of
/// a loop the compiler made twice, for a fast case and a slow one decided outside it, the fast one);
/// without tensor work, the most FMAs, then the most memory traffic, then the fewest instructions.
fn pick_main(mixes: &[(Loop, Mix)]) -> Option<&(Loop, Mix)> {
    let key = |m: &Mix| match m.macs > 0.0 {
        true => (m.macs, 0.0, 0.0, -m.instructions),
        false => (
            0.0,
            m.ffma,
            m.global() + m.smem_read + m.smem_write,
            -m.instructions,
        ),
    };
    mixes.iter().max_by(|a, b| {
        key(&a.1)
            .partial_cmp(&key(&b.1))
            .unwrap_or(std::cmp::Ordering::Equal)
    })
}

/// The main loop of `f` (see [`pick_main`]), if it has loops.
fn main_loop(f: &Function) -> Option<Loop> {
    pick_main(&loop_mixes(f)).map(|(l, _)| l.clone())
}

/// Finds `f`'s main loop (and producer loop) and counts what one iteration issues.
pub fn read_loops(f: &Function) -> Loops {
    let specialised = f.code.iter().any(|i| cost(i).setmaxnreg);
    let paths = loop_mixes(f);
    let Some((ml, mm)) = pick_main(&paths).cloned() else {
        let p = straight_path(f);
        return Loops {
            main: Mix::of(f, &p),
            body: 1.0,
            producer: None,
            specialised,
            straight: true,
        };
    };
    let body = ml.body.len() as f64 / mm.instructions.max(1.0);
    // The producer's loop: outside the main one, moving operands (TMA, cp.async, loads and stores to
    // shared memory) and doing no tensor work.
    let producer = specialised
        .then(|| {
            paths
                .iter()
                .filter(|(l, m)| {
                    !l.body.iter().any(|at| ml.body.binary_search(at).is_ok())
                        && m.macs == 0.0
                        && (m.tma + m.cp_async > 0.0 || m.smem_write > 0.0)
                })
                .max_by(|a, b| {
                    let (ka, kb) = (
                        a.1.tma + a.1.cp_async + a.1.smem_write,
                        b.1.tma + b.1.cp_async + b.1.smem_write,
                    );
                    ka.partial_cmp(&kb).unwrap_or(std::cmp::Ordering::Equal)
                })
                .map(|(_, m)| m.clone())
        })
        .flatten();
    Loops {
        main: mm,
        body,
        producer,
        specialised,
        straight: false,
    }
}

/// A GPU's rates, per SM and clock.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Machine {
    pub name: &'static str,
    /// The SASS architecture to read (`cuobjdump -arch`).
    pub arch: &'static str,
    pub sms: u32,
    pub clock_ghz: f64,
    /// Dense bf16 multiply-adds per clock (the peak every ceiling is a share of).
    pub dense_macs: f64,
    /// mma.sync's (HMMA) multiply-adds per clock.
    pub hmma_macs: f64,
    /// fp32 FMA lanes per clock.
    pub fma_lanes: f64,
    pub smem_bytes: f64,
    /// The device-to-device copy bandwidth, bytes per second (read + written).
    pub copy_bytes_per_s: f64,
    pub regs: u32,
    pub smem_per_sm: u32,
    pub max_threads: u32,
    pub max_blocks: u32,
}

impl Machine {
    /// H100 SXM: 989 TFLOP/s dense bf16 at 1.83 GHz over 132 SMs (2048 multiply-adds per SM and clock);
    /// 3.0 TB/s copy bandwidth (REFERENCE.md's measured figure; 3.35 TB/s datasheet).
    pub const H100: Machine = Machine {
        name: "H100 SXM",
        arch: "sm_90a",
        sms: 132,
        clock_ghz: 1.83,
        dense_macs: 2048.0,
        hmma_macs: 1024.0,
        fma_lanes: 128.0,
        smem_bytes: 128.0,
        copy_bytes_per_s: 3.0e12,
        regs: 65536,
        smem_per_sm: 228 << 10,
        max_threads: 2048,
        max_blocks: 32,
    };
    /// A100 SXM: 312 TFLOP/s dense bf16 at 1.41 GHz over 108 SMs (1024 per SM and clock); 1.7 TB/s copy
    /// bandwidth (85% of the 80 GB part's 2.04 TB/s datasheet figure, the share H100 measures at).
    pub const A100: Machine = Machine {
        name: "A100 SXM",
        arch: "sm_80",
        sms: 108,
        clock_ghz: 1.41,
        dense_macs: 1024.0,
        hmma_macs: 1024.0,
        fma_lanes: 64.0,
        smem_bytes: 128.0,
        copy_bytes_per_s: 1.7e12,
        regs: 65536,
        smem_per_sm: 164 << 10,
        max_threads: 2048,
        max_blocks: 32,
    };

    /// The copy bandwidth in bytes per SM and clock.
    pub fn copy_bytes_per_clock(&self) -> f64 {
        self.copy_bytes_per_s / (f64::from(self.sms) * self.clock_ghz * 1e9)
    }

    /// Blocks of `threads` with `res` (plus `dynamic` bytes of shared memory) that fit one SM.
    pub fn blocks_per_sm(&self, res: &Resources, threads: u32, dynamic: u32) -> u32 {
        let warps = threads.div_ceil(32).max(1);
        let regs = res.registers.max(1).next_multiple_of(8) * 32 * warps;
        let by_regs = self.regs / regs.next_multiple_of(256).max(1);
        // 1 KiB of each block's shared memory is the system's.
        let smem = res.shared + dynamic + 1024;
        let by_smem = self.smem_per_sm / smem;
        let by_threads = self.max_threads / (32 * warps);
        by_regs.min(by_smem).min(by_threads).min(self.max_blocks)
    }
}

/// The tile a GEMM launch covers per iteration of its main loop (m x n x k), as its launcher says.
pub type Tile = [u32; 3];

/// One kernel's model on one machine, for blocks of `threads`.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelModel {
    pub name: String,
    pub res: Resources,
    pub threads: u32,
    pub blocks_per_sm: u32,
    pub loops: Loops,
    /// Per iteration of one block, in SM clocks.
    pub tensor: f64,
    pub dense: f64,
    pub issue: f64,
    pub smem: f64,
    pub xu: f64,
    /// fp32 FMA pipe time of a kernel without tensor work.
    pub fma: f64,
    /// Warps running the main loop and the producer loop.
    pub warps: f64,
    pub producer_warps: f64,
}

impl KernelModel {
    /// Models `f` with `res` for blocks of `threads`, `dynamic` bytes of dynamic shared memory, and (a
    /// GEMM) the tile whose operands its iteration stages in shared memory (`tile`, for the bytes TMA
    /// copies write there, which the instructions do not say).
    pub fn new(
        m: &Machine,
        f: &Function,
        res: Resources,
        threads: u32,
        dynamic: u32,
        tile: Option<Tile>,
        staged_bytes: f64,
    ) -> Self {
        let loops = read_loops(f);
        let all = f64::from(threads.div_ceil(32));
        // A specialising kernel's first warpgroup produces (one warp of it issues TMA copies, all four
        // gather); the others consume.
        let (warps, producer_warps) = match (&loops.producer, loops.specialised) {
            (Some(p), true) => {
                let gathers = p.cp_async + p.smem_write > 0.0;
                ((all - 4.0).max(1.0), if gathers { 4.0 } else { 1.0 })
            }
            _ => (all, 0.0),
        };
        let main = &loops.main;
        let empty = Mix::default();
        let prod = loops.producer.as_ref().unwrap_or(&empty);
        let rate = if main.hgmma {
            m.dense_macs
        } else {
            m.hmma_macs
        };
        let macs = main.macs * warps;
        let tensor = macs / rate;
        let dense = macs / m.dense_macs;
        let issue = (main.instructions * warps + prod.instructions * producer_warps) / 4.0;
        // Bytes TMA writes: the tile's operands (`staged_bytes` where the launcher says, else bf16 of the
        // tile's sizes) for as many tiles' work as the iteration does (a loop unrolled over stages does
        // several), less what instructions stage.
        let staged = (main.smem_write * warps) + prod.smem_write * producer_warps;
        let tma_bytes = match tile {
            Some([tm, tn, tk]) if main.tma + prod.tma > 0.0 => {
                let tiles = macs / (f64::from(tm) * f64::from(tn) * f64::from(tk));
                let per_tile = match staged_bytes > 0.0 {
                    true => staged_bytes,
                    false => 2.0 * f64::from(tk) * f64::from(tm + tn),
                };
                (tiles * per_tile - staged).max(0.0)
            }
            _ => 0.0,
        };
        let smem = ((main.smem_read + main.smem_write) * warps
            + (prod.smem_read + prod.smem_write) * producer_warps
            + tma_bytes)
            / m.smem_bytes;
        let xu = 2.0 * (main.xu * warps + prod.xu * producer_warps);
        let fma = main.ffma * warps * 32.0 / m.fma_lanes;
        let blocks_per_sm = m.blocks_per_sm(&res, threads, dynamic);
        Self {
            name: f.name.clone(),
            res,
            threads,
            blocks_per_sm,
            loops,
            tensor,
            dense,
            issue,
            smem,
            xu,
            fma,
            warps,
            producer_warps,
        }
    }

    /// Whether the main loop does tensor work.
    pub fn is_matrix(&self) -> bool {
        self.loops.main.macs > 0.0
    }

    /// One iteration's time: the largest of its bounds.
    pub fn iteration(&self) -> f64 {
        self.tensor
            .max(self.issue)
            .max(self.smem)
            .max(self.xu)
            .max(self.fma)
            .max(1e-9)
    }

    /// The bound that sets the iteration's time.
    pub fn bound(&self) -> &'static str {
        let t = self.iteration();
        if self.tensor >= t {
            "tensor"
        } else if self.issue >= t {
            "issue"
        } else if self.smem >= t {
            "smem"
        } else if self.xu >= t {
            "XU"
        } else {
            "FMA"
        }
    }

    /// The share of the dense bf16 peak the main loop can reach (a matrix kernel).
    pub fn ceiling(&self) -> f64 {
        self.dense / self.iteration()
    }

    /// A kernel without tensor work: the share of the copy bandwidth its main loop can issue for (every
    /// bound is the SM's, shared by its blocks, so this does not depend on how many are resident); 1
    /// where its loop moves no global memory (it is then limited by what it waits for, not modelled).
    pub fn bandwidth_ceiling(&self, m: &Machine) -> f64 {
        let bytes = self.loops.main.global() * self.warps;
        if bytes <= 0.0 {
            return 1.0;
        }
        (bytes / self.iteration() / m.copy_bytes_per_clock()).min(1.0)
    }

    /// Whether the main loop has an integer division or a per-element global load: what a hot GEMM
    /// must not (the CI check).
    pub fn per_element_work(&self) -> bool {
        self.is_matrix() && (self.loops.main.divisions > 0.0 || self.loops.main.narrow_loads > 0.0)
    }
}

/// Times one launch: `blocks` blocks, `issued_macs` multiply-adds over them (a matrix kernel: as many
/// iterations of its main loop as that takes), `bytes` compulsory bytes. Seconds.
pub fn time_launch(m: &Machine, k: &KernelModel, blocks: u64, issued_macs: f64, bytes: f64) -> f64 {
    let memory = bytes / m.copy_bytes_per_s;
    let per_iteration = k.loops.main.macs * k.warps;
    let compute = match k.is_matrix() && issued_macs > 0.0 && blocks > 0 {
        true => {
            let iterations = issued_macs / blocks as f64 / per_iteration;
            // The busiest SM runs ceil(blocks / SMs) blocks' iterations at the SM's rate.
            let on_busiest = blocks.div_ceil(u64::from(m.sms)) as f64;
            on_busiest * iterations * k.iteration() / (m.clock_ghz * 1e9)
        }
        false => 0.0,
    };
    // A bandwidth kernel moves its bytes at the share of the copy bandwidth its loop's issue allows.
    let memory = match k.is_matrix() {
        true => memory,
        false => memory / k.bandwidth_ceiling(m).max(1e-3),
    };
    compute.max(memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(code: &str) -> Function {
        parse(&format!("\t\tFunction : k\n{code}")).remove(0)
    }

    /// A loop with a fast path and its slow twin (the same bytes in more instructions, with a division):
    /// the typical iteration takes the fast one, and keeps loads that a branch could skip.
    #[test]
    fn the_typical_iteration_takes_the_fast_twin_and_keeps_the_loads() {
        let k = f("        /*0000*/                   MOV R1, R2 ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/               @P0 BRA 0xa0 ;
        /*0030*/                   I2F.U32.RP R5, R6 ;
        /*0040*/                   MUFU.RCP R5, R5 ;
        /*0050*/                   LDG.E R7, desc[UR4][R2.64] ;
        /*0060*/                   LDG.E R8, desc[UR4][R2.64+0x4] ;
        /*0070*/                   LDG.E R9, desc[UR4][R2.64+0x8] ;
        /*0080*/                   LDG.E R10, desc[UR4][R2.64+0xc] ;
        /*0090*/                   BRA 0xb0 ;
        /*00a0*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*00b0*/                   LDS.128 R8, [R3] ;
        /*00c0*/               @P1 BRA 0x10 ;
        /*00d0*/                   EXIT ;
");
        let ls = loops(&k);
        assert_eq!(ls.len(), 1);
        assert_eq!((ls[0].head, &ls[0].latches), (1, &vec![12]));
        assert_eq!(ls[0].body, (1..=12).collect::<Vec<_>>());
        assert_eq!(iteration_path(&k, &ls[0]), vec![1, 2, 10, 11, 12]);
        let l = read_loops(&k);
        assert_eq!(l.main.macs, 2048.0);
        assert_eq!((l.main.global_load, l.main.smem_read), (512.0, 512.0));
        assert_eq!(
            (l.main.divisions, l.main.narrow_loads, l.main.mufu),
            (0.0, 0.0, 0.0)
        );
        assert!((l.body - 12.0 / 5.0).abs() < 1e-12);

        let k = f(
            "        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0010*/               @P0 BRA 0x30 ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0030*/               @P1 BRA 0x0 ;
        /*0040*/                   EXIT ;
",
        );
        assert_eq!(iteration_path(&k, &loops(&k)[0]), vec![0, 1, 2, 3]);

        // A wait whose retry the compiler put out of line, past the function's end: the main loop's
        // path does not go through the retry, and the retry's own loop holds only the wait and itself.
        let k = f("        /*0000*/                   MOV R1, R2 ;
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R9 ;
        /*0020*/              @!P0 BRA 0x80 ;
        /*0030*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR16], R24 ;
        /*0040*/                   STG.E.128 desc[UR4][R2.64], R8 ;
        /*0050*/               @P1 BRA 0x10 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70 ;
        /*0080*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R9 ;
        /*0090*/              @!P0 BRA 0x80 ;
        /*00a0*/                   BRA 0x10 ;
");
        let ls = loops(&k);
        let heads: Vec<usize> = ls.iter().map(|l| l.head).collect();
        assert_eq!(heads, vec![1, 7, 8]);
        assert_eq!(ls[0].body, vec![1, 2, 3, 4, 5, 8, 9, 10]);
        assert_eq!(iteration_path(&k, &ls[0]), vec![1, 2, 3, 4, 5]);
        assert_eq!(ls[2].body, vec![8, 9]);
        let l = read_loops(&k);
        assert_eq!((l.main.mma, l.main.instructions), (1.0, 5.0));
    }

    /// An iteration whose only path goes through a division and a narrow load counts both, and the model
    /// flags it; a wgmma's operand reads count against shared memory.
    #[test]
    fn divisions_and_narrow_loads_on_the_path_are_flagged() {
        let k = f("        /*0000*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16].tnspB, R24, gsb0 ;
        /*0010*/                   I2F.U32.RP R5, R6 ;
        /*0020*/                   MUFU.RCP R5, R5 ;
        /*0030*/                   LDG.E.U16 R7, desc[UR4][R2.64] ;
        /*0040*/               @P1 BRA 0x0 ;
        /*0050*/                   EXIT ;
");
        let m = KernelModel::new(&Machine::H100, &k, Resources::default(), 128, 0, None, 0.0);
        assert_eq!(m.loops.main.divisions, 1.0);
        assert_eq!(m.loops.main.narrow_loads, 1.0);
        assert!(m.per_element_work());
        // 4 warps x 64 x 128 x 16 / 4 multiply-adds at 2048 a clock; A and B from shared memory.
        assert!((m.tensor - 64.0).abs() < 1e-9);
        assert!((m.smem - 4.0 * (2048.0 + 4096.0) / 4.0 / 128.0).abs() < 1e-9);
        assert_eq!(m.bound(), "tensor");
        assert!((m.ceiling() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn resources_are_read_per_function() {
        let r = parse_resources(
            " Function conv2d_forward_bf16:\n  REG:125 STACK:0 SHARED:40960 LOCAL:0 CONSTANT[0]:448 TEXTURE:0\n Function x:\n  REG:16 STACK:8 SHARED:0 LOCAL:4\n",
        );
        assert_eq!(
            r["conv2d_forward_bf16"],
            Resources {
                registers: 125,
                shared: 40960,
                local: 0,
                stack: 0
            }
        );
        assert_eq!(r["x"].stack, 8);
        // 125 registers (128 allocated) x 256 threads: two blocks of 40 KiB fit an H100's SM.
        assert_eq!(
            Machine::H100.blocks_per_sm(&r["conv2d_forward_bf16"], 256, 0),
            2
        );
    }
}

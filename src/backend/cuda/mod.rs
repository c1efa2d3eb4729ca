//! The CUDA backend: the op set as launches of the hand-written kernels in `kernels/`, on one stream, over
//! one arena of device memory.
//!
//! - **Detection.** [`CudaBackend::new`] checks, in order, that kernels were compiled into this binary,
//!   that libcuda loads, that a device exists; each failure is an error that says what to do, never a
//!   panic. cudarc's per-argument event tracking is turned off before anything is allocated, so work can be
//!   captured into CUDA graphs.
//! - **Memory.** Tensors are offsets into one arena. `alloc` only reserves: the device memory is allocated
//!   (or grown, with the contents copied) when an op first needs it, so a model, a trainer and a sampler
//!   placed one after the other end up in one allocation made before the first step. A scratch workspace
//!   (split-K partial sums, per-image group-norm partials, reduction partials) is allocated with it.
//! - **Launches.** One file per kernel family (`conv.rs`, `norm.rs`, `attention.rs`, `linear.rs`,
//!   `elementwise.rs`, `diffusion.rs`, `optim.rs`), each checking its arguments with the same
//!   [`check_args`] as the CPU backend before it launches, and every launch checked.
//! - **Sampler.** The table and the step counter live on the device; `sampler_step` reads both there, so
//!   one step recorded as a CUDA graph replays for every row.
//! - **Training.** The training clock lives on the device too: the random ops take their streams as
//!   `base + per_step * clock`, Adam computes its learning rate and bias corrections from it, the loss
//!   log is written at `clock % slots`, so one training step recorded as a CUDA graph replays for every
//!   step. Each recorded [`Sequence`] has its own graph.

mod attention;
mod conv;
mod device;
mod diffusion;
mod elementwise;
mod hopper;
mod linear;
mod norm;
mod optim;
mod weights;

pub use self::device::{cuda_version, driver_cuda_version, Planned};
use self::device::{gib, Device, DeviceBuffer, Properties, Work};
use super::{
    check_args_stored, AdamHyper, Arg, ClassEmbedShape, Dtype, Precision, Sequence, Stream, Tensor,
};
use crate::error::{Error, Result};
use cudarc::driver::LaunchConfig;

/// The fatbin build.rs compiled from `kernels/*.cu`, when nvcc was available at build time.
#[cfg(ddpm_kernels)]
pub static FATBIN: Option<&[u8]> = Some(include_bytes!(env!("DDPM_KERNELS_FATBIN")));
#[cfg(not(ddpm_kernels))]
pub static FATBIN: Option<&[u8]> = None;

/// The name of every kernel in [`FATBIN`] (empty without kernels).
pub fn kernel_names() -> Vec<&'static str> {
    #[cfg(ddpm_kernels)]
    {
        env!("DDPM_KERNEL_NAMES").split(',').collect()
    }
    #[cfg(not(ddpm_kernels))]
    {
        Vec::new()
    }
}

/// The architectures the embedded kernels were built for.
pub fn kernel_archs() -> Option<&'static str> {
    #[cfg(ddpm_kernels)]
    {
        Some(env!("DDPM_KERNELS_ARCHS"))
    }
    #[cfg(not(ddpm_kernels))]
    {
        None
    }
}

/// What built the embedded kernels (build.rs): "ptxas 12.9 (machine code), nvcc 13.0 (front end)", or
/// "nvcc 13.0" where the CUDA 12 ptxas was not used.
pub fn kernel_toolkit() -> Option<&'static str> {
    #[cfg(ddpm_kernels)]
    {
        Some(env!("DDPM_KERNELS_TOOLKIT"))
    }
    #[cfg(not(ddpm_kernels))]
    {
        None
    }
}

/// The oldest CUDA version a driver must support to run the embedded kernels (12020 for 12.2): machine
/// code of a CUDA 12 toolkit loads on any driver of CUDA 12 (minor-version compatibility), and the driver
/// API this engine calls is 12.2's (cudarc's `cuda-12020` bindings), so R535 and newer; CUDA 13's
/// machine code needs a CUDA 13 driver (R580).
pub fn min_driver_cuda() -> u32 {
    #[cfg(ddpm_kernels)]
    {
        env!("DDPM_KERNELS_MIN_CUDA").parse().unwrap_or(13000)
    }
    #[cfg(not(ddpm_kernels))]
    {
        12020
    }
}

/// Which of the embedded images a device of compute capability `major.minor` runs, for kernels built for
/// `archs`: its own machine code (sm_90a runs only on 9.0), the machine code of an earlier minor of its
/// major (sm_80's runs on 8.6 and 8.9), else the PTX, compiled by the driver.
pub fn image_for(major: i32, minor: i32, archs: &str) -> String {
    let list: Vec<&str> = archs.split(',').map(str::trim).collect();
    let own = [format!("sm_{major}{minor}a"), format!("sm_{major}{minor}")];
    if let Some(a) = own.iter().find(|a| list.contains(&a.as_str())) {
        return format!("its own machine code ({a})");
    }
    let earlier = list.iter().filter_map(|a| {
        let n: i32 = a.strip_prefix("sm_")?.parse().ok()?;
        (n / 10 == major && n % 10 <= minor).then_some((n, *a))
    });
    if let Some((_, a)) = earlier.max() {
        return format!("the machine code of {a}");
    }
    let ptx = list.iter().filter_map(|a| {
        let n: i32 = a
            .strip_prefix("compute_")?
            .trim_end_matches('a')
            .parse()
            .ok()?;
        (n <= 10 * major + minor && !a.ends_with('a')).then_some((n, *a))
    });
    match ptx.max() {
        Some((_, p)) => format!("the PTX of {p}, compiled by the driver at load"),
        None => "nothing: no image fits this device".into(),
    }
}

/// Whether this backend has passed its GPU tests (`scripts/gpu-check.sh`, logs in `benches/results/`).
/// Until it has, `--device auto` keeps to the CPU and says why; `--device cuda` runs it on request.
pub const VERIFIED: bool = false;

/// Threads per block of the elementwise kernels.
const BLOCK: u32 = 256;
/// Blocks of the fixed-grid reductions (the gradient norm, the loss): fixed, so the order of additions
/// never depends on the size.
const REDUCE_BLOCKS: u32 = 512;
/// The scratch workspace, in floats (64 MiB): split-K partial sums are sized to fit in it.
const WORKSPACE: usize = 16 << 20;

/// Fields are dropped in order: the device buffers go before the device they belong to.
pub struct CudaBackend {
    /// The sequence being recorded, and the id of each recorded sequence (see `recording_id`).
    capturing: Option<Sequence>,
    recorded: [Option<u64>; Sequence::COUNT],
    /// Elements handed out by `alloc`, and the arena that holds them (once materialised).
    reserved: usize,
    arena: Option<DeviceBuffer>,
    /// Scratch for the kernels that need it (see [`WORKSPACE`]), and fp64 reduction partials.
    workspace: Option<DeviceBuffer>,
    partials: Option<DeviceBuffer>,
    /// The sampler table (rows of 8 floats) and the step counter.
    table: Option<DeviceBuffer>,
    table_rows: usize,
    step: Option<DeviceBuffer>,
    /// The training clock (one u64), allocated with the workspace.
    clock: Option<DeviceBuffer>,
    /// Which GEMM core the convolutions and linear layers run on.
    precision: Precision,
    /// The ladder rung the bf16 convolutions run on instead of their own (`Backend::set_rung`).
    rung: Option<super::Rung>,
    /// The bf16 copies of the declared weights, the ranges of them written since they were last rounded
    /// (by copy index), and the weights outside them rounded so far (`weights.rs`).
    copies: Vec<weights::WeightCopy>,
    stale: Vec<(usize, Tensor)>,
    loose_roundings: u64,
    /// Convolutions launched with a tensor map (`conv.rs`): on ladder version 5's kernels, and on version
    /// 6's (in the 64-byte swizzle).
    tma_launches: [u64; 2],
    /// GEMMs launched on ladder version 8 (`hopper.rs`).
    v8_launches: u64,
    /// The region every normalised input is written into in bf16 precision
    /// (`Backend::normalises_into_scratch`), once reserved.
    norm_scratch: Option<Tensor>,
    /// The work of the next launch (see [`crate::backend::Launch`]): the compulsory bytes of the op whose
    /// arguments were checked last, and the FLOPs its launcher counts; taken by the launch.
    work: Work,
    dev: Device,
    props: Properties,
}

impl CudaBackend {
    /// Opens device 0 and loads the embedded kernels.
    pub fn new() -> Result<Self> {
        let Some(fatbin) = FATBIN else {
            return Err(Error::Cuda(
                "this binary was built without CUDA kernels (nvcc was not found at build time). Install nvcc \
                 with scripts/install-nvcc.sh and rebuild: NVCC=$(scripts/install-nvcc.sh | tail -n 1) cargo \
                 build --release"
                    .into(),
            ));
        };
        let archs = kernel_archs().unwrap_or("?");
        let large: Vec<&'static str> = attention::kernels()
            .iter()
            .copied()
            .chain(hopper::KERNELS)
            .collect();
        let (dev, props) = Device::gpu(fatbin, archs, &kernel_names(), &large)?;
        Ok(Self::on(dev, props))
    }

    /// The same backend over the CPU emulator of the kernels (feature `emu`): for tests without a GPU.
    #[cfg(feature = "emu")]
    pub fn emulated() -> Self {
        let (dev, props) = Device::emulator();
        Self::on(dev, props)
    }

    /// The same backend over a device where nothing runs ([`Planned`]): for the static model, which
    /// reads the launches a profile of a training step or a sampling forward makes there.
    pub fn planned(gpu: Planned) -> Self {
        let (dev, props) = Device::planned(gpu);
        Self::on(dev, props)
    }

    fn on(dev: Device, props: Properties) -> Self {
        Self {
            capturing: None,
            recorded: [None; Sequence::COUNT],
            reserved: 0,
            arena: None,
            workspace: None,
            partials: None,
            table: None,
            table_rows: 0,
            step: None,
            clock: None,
            precision: Precision::Fp32,
            rung: None,
            copies: Vec::new(),
            stale: Vec::new(),
            loose_roundings: 0,
            tma_launches: [0; 2],
            v8_launches: 0,
            work: Work::default(),
            norm_scratch: None,
            dev,
            props,
        }
    }

    /// Whether the device has bf16 tensor cores (sm_80 and newer).
    pub fn supports_bf16(&self) -> bool {
        self.props.major >= 8
    }

    /// The kernel of an op in the current precision: its `_f32` or its `_bf16` twin.
    fn pick(&self, f32: &'static str, bf16: &'static str) -> &'static str {
        match self.precision {
            Precision::Fp32 => f32,
            Precision::Bf16 => bf16,
        }
    }

    /// The device, for logs.
    pub fn device_name(&self) -> &str {
        &self.props.name
    }

    /// Free and total device memory, in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.dev.memory()
    }

    /// Launches from now on as a device allowing at most `bytes` of shared memory per block would (never
    /// more than this one allows): every launcher picks the path that fits, as it does on an A100 (163 KiB)
    /// or an sm_86 / sm_89 card (99 KiB). For tests of those choices on the emulator.
    pub fn limit_shared_memory(&mut self, bytes: u32) {
        self.props.max_shared = self.props.max_shared.min(bytes);
    }

    /// What this backend runs here, for `ddpm-cuda info --device cuda`: (label, text) lines on the
    /// machine code loaded, the GEMMs' rung, attention, and the shared memory that decides them.
    pub fn describe_paths(&self) -> Vec<(&'static str, String)> {
        let p = &self.props;
        let archs = kernel_archs().unwrap_or("?");
        let kib = p.max_shared / 1024;
        let mut out = vec![
            (
                "kernels",
                format!(
                    "built by {} for {archs}; this device runs {}",
                    kernel_toolkit().unwrap_or("?"),
                    image_for(p.major, p.minor, archs)
                ),
            ),
            (
                "shared mem",
                format!("{kib} KiB per block (the launchers take the kernels that fit)"),
            ),
        ];
        let gemm = if !self.supports_bf16() {
            "fp32 (ladder v1: no bf16 tensor cores before sm_80)".to_string()
        } else if p.sm90a {
            "bf16 on ladder v3 (mma.sync) by default; v8 (TMA + wgmma, warp-specialised) selectable \
             (Backend::set_rung) and benched, the default once a GPU run shows it correct"
                .to_string()
        } else {
            "bf16 on ladder v3 (mma.sync, cp.async)".to_string()
        };
        out.push(("GEMMs", gemm));
        if self.supports_bf16() {
            out.push(("attention", self.attention_fit()));
        }
        out
    }

    /// How many GEMMs ran on ladder version 8 (`Rung::Pipelined`).
    pub fn v8_launches(&self) -> u64 {
        self.v8_launches
    }

    /// The bf16 region normalised inputs are written into in bf16 precision, once reserved
    /// (`Backend::reserve_norm_scratch`).
    pub fn norm_scratch(&self) -> Option<Tensor> {
        self.norm_scratch
    }

    /// Elements reserved so far (what the arena will hold).
    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// Makes sure the arena holds every reserved element, allocating or growing it (contents kept), and the
    /// workspace exists. Growing invalidates a recorded graph; it cannot happen while recording.
    fn materialise(&mut self) -> Result<()> {
        let need = self.reserved * 4;
        if self.arena.as_ref().is_none_or(|a| a.bytes < need) {
            if self.capturing.is_some() {
                return Err(Error::Invalid(
                    "device memory would have to grow while recording a graph".into(),
                ));
            }
            let bigger = self
                .dev
                .malloc(need, "the activation and parameter arena")?;
            let kept = self.arena.as_ref().map_or(0, |a| a.bytes);
            // SAFETY: both ranges are live allocations of at least `kept` bytes; the new tail is zeroed, as
            // `alloc` promises.
            unsafe {
                if let Some(old) = &self.arena {
                    self.dev.dtod(bigger.ptr, old.ptr, kept)?;
                }
                self.dev.zero(bigger.ptr + kept as u64, need - kept)?;
            }
            self.dev.synchronize()?;
            self.arena = Some(bigger);
            self.forget_recordings();
        }
        if self.workspace.is_none() {
            self.workspace = Some(self.dev.malloc(WORKSPACE * 4, "the kernels' workspace")?);
            self.partials = Some(
                self.dev
                    .malloc(REDUCE_BLOCKS as usize * 8, "reduction partials")?,
            );
            let clock = self.dev.malloc(8, "the training clock")?;
            // SAFETY: 8 bytes just allocated.
            unsafe { self.dev.zero(clock.ptr, 8)? };
            self.clock = Some(clock);
        }
        Ok(())
    }

    /// Refuses host transfers while a sequence is being recorded (they would not be part of it).
    fn not_recording(&self, what: &str) -> Result<()> {
        if self.capturing.is_some() {
            return Err(Error::Invalid(format!(
                "{what} while recording a sequence of device work"
            )));
        }
        Ok(())
    }

    /// Refuses `what` while kernels are being profiled: a recording or a replay would put kernels in the
    /// stream that the profile's launcher never sees, and profiles do not nest.
    fn not_profiling(&self, what: &str) -> Result<()> {
        if self.dev.profiling() {
            return Err(Error::Invalid(format!(
                "{what} while kernels are being profiled (profiles time ops run one by one)"
            )));
        }
        Ok(())
    }

    /// Checks an op's arguments ([`check_args`]), makes the arena ready, brings the weights' bf16 copies
    /// up to date with what earlier ops wrote, and notes what this one will write (`weights.rs`).
    fn args(&mut self, op: &'static str, ins: &[Arg], outs: &[Arg]) -> Result<()> {
        self.args_stored(op, ins, outs, &[])
    }

    /// [`CudaBackend::args`] for an op whose kernels also take bf16 storage for the arguments named in
    /// `bf16_ok` ([`check_args_stored`]).
    fn args_stored(
        &mut self,
        op: &'static str,
        ins: &[Arg],
        outs: &[Arg],
        bf16_ok: &[&str],
    ) -> Result<()> {
        check_args_stored(op, self.reserved, "cuda", ins, outs, bf16_ok)?;
        let bytes = ins.iter().chain(outs).map(|a| bytes_of(a.1)).sum();
        self.work = Work {
            bytes,
            ..Work::default()
        };
        self.materialise()?;
        self.refresh_copies()?;
        self.mark_written(outs);
        Ok(())
    }

    /// The work counted for the next launch so far, which it takes (the op's later launches count
    /// none unless their launchers say).
    fn take_work(&mut self) -> Work {
        std::mem::take(&mut self.work)
    }

    /// Counts a GEMM's work for its launch: `macs` multiply-adds of the op (2 FLOPs each), and what a
    /// grid of `tile` over a `rows` x `cols` output issues, `splits` slices of `chunk` of the reduction
    /// each (a reduction of `chunk` when `splits` is 1).
    fn count_gemm(
        &mut self,
        macs: usize,
        tile: conv::Tile,
        rows: usize,
        cols: usize,
        splits: usize,
        chunk: usize,
    ) {
        let pad = |x: usize, t: usize| x.div_ceil(t) * t;
        let issued = pad(rows, tile.mn) * pad(cols, tile.mn) * splits * pad(chunk, tile.k);
        self.work.flops = 2.0 * macs as f64;
        self.work.issued_macs = issued as f64;
        self.work.tile = Some([tile.mn as u32, tile.mn as u32, tile.k as u32]);
    }

    /// Counts `macs` multiply-adds of the op and `issued` that the launch computes, `tile` of them per
    /// iteration of a block, for a matrix kernel that is not one of the GEMM cores (attention).
    fn count_work(&mut self, macs: usize, issued: usize, tile: [usize; 3]) {
        self.work.flops = 2.0 * macs as f64;
        self.work.issued_macs = issued as f64;
        self.work.tile = Some(tile.map(|x| x as u32));
    }

    /// Counts `bytes` for the next launch (one that moves more than its op's tensors, or one after the
    /// first).
    fn count_bytes(&mut self, bytes: usize) {
        self.work.bytes = bytes as f64;
    }

    /// The device address of a checked tensor.
    fn ptr(&self, t: Tensor) -> u64 {
        self.arena.as_ref().map_or(0, |a| a.ptr) + 4 * t.off as u64
    }

    /// An optional tensor as the pair of pointers the kernels that take it in either storage expect
    /// (`_io` kernels): `[fp32, bf16]`, the one of its storage set, the other null; both null for `None`.
    fn ptr_by_dtype(&self, t: Option<Tensor>) -> [u64; 2] {
        match t {
            None => [0, 0],
            Some(t) if t.is_bf16() => [0, self.ptr(t)],
            Some(t) => [self.ptr(t), 0],
        }
    }

    /// Whether a launch of `op` touches an activation stored in bf16 (`tensors`, checked by the caller to
    /// be allowed in bf16), so runs one of the kernels for those; an error in fp32 precision, which has
    /// none (a network placed in bf16 precision and run in fp32).
    fn stores_bf16(&self, op: &str, tensors: &[Tensor]) -> Result<bool> {
        if !tensors.iter().any(|t| t.is_bf16()) {
            return Ok(false);
        }
        match self.precision {
            Precision::Bf16 => Ok(true),
            Precision::Fp32 => Err(Error::Invalid(format!(
                "{op}: an activation stored in bf16 has no kernel in fp32 precision: place the network \
                 in the precision it runs in"
            ))),
        }
    }

    fn workspace_ptr(&self) -> u64 {
        self.workspace.as_ref().map_or(0, |w| w.ptr)
    }

    fn partials_ptr(&self) -> u64 {
        self.partials.as_ref().map_or(0, |w| w.ptr)
    }

    /// Recorded sequences hold addresses and kernel names: stale once memory moves or the precision
    /// changes.
    fn forget_recordings(&mut self) {
        self.dev.forget_recordings();
        self.recorded = [None; Sequence::COUNT];
    }

    fn clock_ptr(&self) -> u64 {
        self.clock.as_ref().map_or(0, |c| c.ptr)
    }

    /// A grid-stride launch over `n` items: 256 threads a block, at most 32 blocks per SM.
    fn elementwise_cfg(&self, n: usize) -> LaunchConfig {
        let blocks = n
            .div_ceil(BLOCK as usize)
            .clamp(1, 32 * self.props.sms as usize) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn sync(&self) -> Result<()> {
        self.dev.synchronize()
    }
}

/// Launches kernel `$name` of the embedded module with `$cfg` and the arguments in the kernel's order
/// (device addresses as u64, sizes as the kernel's integer types), and checks the launch. A trailing
/// `; list` appends a [`KernelArgs`] built beforehand (arguments that depend on the op's options).
///
/// SAFETY (of the launch inside): every device address passed was checked against the arena by the
/// caller (`args`, i.e. [`check_args`]), the argument list matches the kernel's signature, and the stream
/// orders every access.
macro_rules! launch {
    ($be:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let (name, cfg) = ($name, $cfg);
        let mut list = $crate::backend::cuda::KernelArgs::default();
        $( list.push($arg); )*
        let work = $be.take_work();
        list.launch(&mut $be.dev, name, cfg, work)
    }};
}
pub(crate) use launch;

/// The types a kernel argument may have: the scalars of the kernels' signatures (device addresses are
/// u64). Anything else (a reference, a struct, a usize) fails to compile instead of reaching the kernel
/// as bytes of the wrong size.
pub(crate) trait KernelArg: bytemuck::Pod {}
impl KernelArg for i32 {}
impl KernelArg for u32 {}
impl KernelArg for i64 {}
impl KernelArg for u64 {}
impl KernelArg for f32 {}
impl KernelArg for f64 {}

/// A kernel's arguments, in order: each scalar in an 8-byte slot (aligned for any of them), a tensor map
/// in 16 consecutive slots, with the index of its first slot and its size.
#[derive(Default)]
pub(crate) struct KernelArgs {
    slots: Vec<u64>,
    starts: Vec<usize>,
    sizes: Vec<usize>,
}

impl KernelArgs {
    pub fn push<T: KernelArg>(&mut self, v: T) {
        let mut slot = 0u64;
        let bytes = bytemuck::bytes_of(&v);
        bytemuck::bytes_of_mut(&mut slot)[..bytes.len()].copy_from_slice(bytes);
        self.starts.push(self.slots.len());
        self.slots.push(slot);
        self.sizes.push(bytes.len());
    }

    /// A `const __grid_constant__ TensorMap` parameter (the driver copies its 128 bytes into the
    /// kernel's 64-byte aligned parameter; where the host copy sits does not matter).
    fn push_tensor_map(&mut self, map: &device::TensorMap) {
        self.starts.push(self.slots.len());
        self.slots.extend_from_slice(&map.0);
        self.sizes.push(std::mem::size_of_val(&map.0));
    }

    /// A GEMM's weight operand: its address, or on ladder version 5 the tensor map that describes it.
    fn push_weight(&mut self, pw: u64, map: Option<&device::TensorMap>) {
        match map {
            Some(m) => self.push_tensor_map(m),
            None => self.push(pw),
        }
    }

    /// See [`launch!`] for what makes this sound.
    fn launch(
        mut self,
        dev: &mut Device,
        name: &'static str,
        cfg: LaunchConfig,
        work: Work,
    ) -> Result<()> {
        let base = self.slots.as_mut_ptr();
        let mut params: Vec<*mut std::ffi::c_void> = self
            .starts
            .iter()
            // SAFETY: every start indexes `slots`, which is not touched again before the launch.
            .map(|&i| unsafe { base.add(i) } as *mut std::ffi::c_void)
            .collect();
        // SAFETY: as documented on `launch!`; each pointer is to a live slot holding the value's bytes.
        unsafe { dev.launch(name, cfg, &mut params, &self.sizes, work) }
    }
}

impl super::Backend for CudaBackend {
    fn describe(&self) -> String {
        format!("cuda: {}, {} GEMMs", self.props.name, self.precision.name())
    }

    fn alloc(&mut self, len: usize) -> Result<Tensor> {
        if let Some(avail) = self.memory_available() {
            if len > avail {
                return Err(Error::Memory(format!(
                    "reserving {:.2} GiB on {}: {:.2} GiB free",
                    gib(4 * len),
                    self.props.name,
                    gib(4 * avail)
                )));
            }
        }
        let t = Tensor::new(self.reserved.next_multiple_of(super::ALLOC_ALIGN), len);
        self.reserved = t.end();
        Ok(t)
    }

    /// A bf16 `dst` gets `src` rounded to nearest, ties to even (as the kernels round).
    fn upload(&mut self, dst: Tensor, src: &[f32]) -> Result<()> {
        self.not_recording("an upload")?;
        self.args_stored("upload", &[], &[("dst", dst, src.len())], &["dst"])?;
        if dst.dtype == Dtype::Bf16 {
            let bits = bf16_words(src);
            // SAFETY: dst (its words) was checked to lie inside the arena.
            return unsafe { self.dev.htod(self.ptr(dst), bytemuck::cast_slice(&bits)) };
        }
        // SAFETY: dst was checked to lie inside the arena.
        unsafe { self.dev.htod(self.ptr(dst), bytemuck::cast_slice(src)) }
    }

    /// A bf16 `src` comes back widened to fp32 (exactly).
    fn download(&mut self, src: Tensor) -> Result<Vec<f32>> {
        self.not_recording("a download")?;
        self.args_stored("download", &[("src", src, src.len)], &[], &["src"])?;
        let mut out = vec![0.0f32; src.words()];
        // SAFETY: src lies inside the arena; dtoh waits for the copy.
        unsafe {
            self.dev
                .dtoh(bytemuck::cast_slice_mut(&mut out), self.ptr(src))?
        };
        if src.dtype == Dtype::Bf16 {
            return Ok(widen_bf16(&out, src.len));
        }
        Ok(out)
    }

    fn fill(&mut self, dst: Tensor, value: f32) -> Result<()> {
        self.fill_tensor(dst, value)
    }

    fn copy(&mut self, src: Tensor, dst: Tensor) -> Result<()> {
        self.args("copy", &[("src", src, src.len)], &[("dst", dst, src.len)])?;
        // SAFETY: both ranges were checked to lie inside the arena and not to overlap.
        unsafe { self.dev.dtod(self.ptr(dst), self.ptr(src), 4 * src.len) }
    }

    fn accumulate(&mut self, src: Tensor, dst: Tensor, accumulate: bool) -> Result<()> {
        self.accumulate_tensor(src, dst, accumulate)
    }

    fn add(&mut self, a: Tensor, b: Tensor, y: Tensor) -> Result<()> {
        self.add_tensors(a, b, y)
    }

    fn conv2d_forward(
        &mut self,
        s: super::ConvShape,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        y: Tensor,
    ) -> Result<()> {
        self.conv_forward(s, x, None, w, b, None, None, y)
    }

    fn conv2d_forward_fused(
        &mut self,
        s: super::ConvShape,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        image_bias: Option<Tensor>,
        residual: Option<Tensor>,
        y: Tensor,
    ) -> Result<()> {
        self.conv_forward(s, x, None, w, b, image_bias, residual, y)
    }

    fn fuses_normalisation(&self) -> bool {
        true
    }

    fn keep_weight_copy(&mut self, weights: Tensor) -> Result<()> {
        self.declare_weights(weights)
    }

    fn keeps_weight_copies(&self) -> bool {
        true
    }

    /// In bf16 precision: the normalising convolutions (version 3), the group norms and the attention
    /// kernels have twins that write and read those activations so.
    fn stores_bf16_activations(&self) -> bool {
        self.precision == Precision::Bf16
    }

    /// In bf16 precision.
    fn normalises_into_scratch(&self) -> bool {
        self.precision == Precision::Bf16
    }

    fn reserve_norm_scratch(&mut self, len: usize) -> Result<()> {
        if self.norm_scratch.is_some_and(|t| t.len >= len) || len == 0 {
            return Ok(());
        }
        let words = self.alloc(super::norm_scratch_len(len))?;
        // 128-byte aligned: the arena's base is, and a word is 4 bytes.
        let off = words.off.next_multiple_of(32);
        self.norm_scratch = Some(Tensor::bf16(off, len));
        Ok(())
    }

    /// The statistics; then in bf16 precision the normalised input written once in bf16 into the scratch
    /// region and a plain convolution of it, elsewhere the convolution normalising its operand as it
    /// loads it. Either way `input.normed` is left alone.
    fn group_norm_conv2d_forward(
        &mut self,
        s: super::ConvShape,
        input: super::NormedInput,
        w: Tensor,
        b: Tensor,
        image_bias: Option<Tensor>,
        residual: Option<Tensor>,
        y: Tensor,
    ) -> Result<()> {
        let n = input;
        self.norm_forward(n.s, n.x, n.gamma, n.beta, None, n.mean, n.rstd, n.silu)?;
        if let Some(scratch) = self.norm_scratch_for(&n) {
            Self::is_input_of(&s, &n)?;
            self.norm_apply(&n, scratch)?;
            return self.conv_forward(s, scratch, None, w, b, image_bias, residual, y);
        }
        self.conv_forward(s, n.x, Some(n), w, b, image_bias, residual, y)
    }

    fn conv2d_backward_weight_normed(
        &mut self,
        s: super::ConvShape,
        input: super::NormedInput,
        dy: Tensor,
        dw: Tensor,
        db: Tensor,
    ) -> Result<()> {
        if let Some(scratch) = self.norm_scratch_for(&input) {
            Self::is_input_of(&s, &input)?;
            self.norm_apply(&input, scratch)?;
            return self.conv_backward_weight(s, scratch, None, dy, dw, db);
        }
        self.conv_backward_weight(s, input.x, Some(input), dy, dw, db)
    }

    fn conv2d_backward_data(
        &mut self,
        s: super::ConvShape,
        dy: Tensor,
        w: Tensor,
        dx: Tensor,
        accumulate: bool,
    ) -> Result<()> {
        self.conv_backward_data(s, dy, w, dx, accumulate)
    }

    fn conv2d_backward_weight(
        &mut self,
        s: super::ConvShape,
        x: Tensor,
        dy: Tensor,
        dw: Tensor,
        db: Tensor,
    ) -> Result<()> {
        self.conv_backward_weight(s, x, None, dy, dw, db)
    }

    fn group_norm_forward(
        &mut self,
        s: super::GroupNormShape,
        x: Tensor,
        gamma: Tensor,
        beta: Tensor,
        y: Tensor,
        mean: Tensor,
        rstd: Tensor,
        silu: bool,
    ) -> Result<()> {
        self.norm_forward(s, x, gamma, beta, Some(y), mean, rstd, silu)
    }

    fn group_norm_backward(
        &mut self,
        s: super::GroupNormShape,
        x: Tensor,
        gamma: Tensor,
        beta: Tensor,
        mean: Tensor,
        rstd: Tensor,
        dy: Tensor,
        dx: Tensor,
        dgamma: Tensor,
        dbeta: Tensor,
        silu: bool,
        accumulate: bool,
    ) -> Result<()> {
        self.norm_backward(
            s, x, gamma, beta, mean, rstd, dy, dx, dgamma, dbeta, silu, accumulate,
        )
    }

    fn silu_forward(&mut self, x: Tensor, y: Tensor) -> Result<()> {
        self.silu(x, y)
    }

    fn silu_backward(&mut self, x: Tensor, dy: Tensor, dx: Tensor, accumulate: bool) -> Result<()> {
        self.silu_grad(x, dy, dx, accumulate)
    }

    fn linear_forward(
        &mut self,
        m: usize,
        k: usize,
        n: usize,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        y: Tensor,
    ) -> Result<()> {
        self.linear(m, k, n, x, w, b, None, y)
    }

    fn linear_forward_fused(
        &mut self,
        m: usize,
        k: usize,
        n: usize,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        residual: Tensor,
        y: Tensor,
    ) -> Result<()> {
        self.linear(m, k, n, x, w, b, Some(residual), y)
    }

    fn linear_backward(
        &mut self,
        m: usize,
        k: usize,
        n: usize,
        x: Tensor,
        w: Tensor,
        dy: Tensor,
        dx: Option<Tensor>,
        dw: Tensor,
        db: Tensor,
        accumulate: bool,
    ) -> Result<()> {
        self.linear_grad(m, k, n, x, w, dy, dx, dw, db, accumulate)
    }

    fn attention_forward(
        &mut self,
        s: super::AttentionShape,
        qkv: Tensor,
        out: Tensor,
        lse: Tensor,
    ) -> Result<()> {
        self.attention(s, qkv, out, lse)
    }

    fn attention_backward(
        &mut self,
        s: super::AttentionShape,
        qkv: Tensor,
        out: Tensor,
        lse: Tensor,
        dout: Tensor,
        dqkv: Tensor,
    ) -> Result<()> {
        self.attention_grad(s, qkv, out, lse, dout, dqkv)
    }

    fn upsample2x_forward(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        x: Tensor,
        y: Tensor,
    ) -> Result<()> {
        self.upsample(n, h, w, c, x, y)
    }

    fn upsample2x_backward(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        dy: Tensor,
        dx: Tensor,
        accumulate: bool,
    ) -> Result<()> {
        self.upsample_grad(n, h, w, c, dy, dx, accumulate)
    }

    fn concat_forward(
        &mut self,
        pixels: usize,
        ca: usize,
        cb: usize,
        a: Tensor,
        b: Tensor,
        y: Tensor,
    ) -> Result<()> {
        self.concat(pixels, ca, cb, a, b, y)
    }

    fn concat_backward(
        &mut self,
        pixels: usize,
        ca: usize,
        cb: usize,
        dy: Tensor,
        da: Tensor,
        db: Tensor,
        accumulate_a: bool,
        accumulate_b: bool,
    ) -> Result<()> {
        self.concat_grad(pixels, ca, cb, dy, da, db, accumulate_a, accumulate_b)
    }

    fn add_image_bias(
        &mut self,
        n: usize,
        hw: usize,
        c: usize,
        y: Tensor,
        bias: Tensor,
    ) -> Result<()> {
        self.image_bias(n, hw, c, y, bias)
    }

    fn image_bias_backward(
        &mut self,
        n: usize,
        hw: usize,
        c: usize,
        dy: Tensor,
        dbias: Tensor,
    ) -> Result<()> {
        self.image_bias_grad(n, hw, c, dy, dbias)
    }

    fn class_embedding_add(
        &mut self,
        s: ClassEmbedShape,
        table: Tensor,
        labels: Tensor,
        y: Tensor,
    ) -> Result<()> {
        self.class_embed(s, table, labels, y)
    }

    fn class_embedding_backward(
        &mut self,
        s: ClassEmbedShape,
        labels: Tensor,
        dy: Tensor,
        dtable: Tensor,
    ) -> Result<()> {
        self.class_embed_grad(s, labels, dy, dtable)
    }

    fn timestep_embedding(&mut self, n: usize, dim: usize, t: Tensor, y: Tensor) -> Result<()> {
        self.embedding(n, dim, t, y)
    }

    fn dropout_forward(
        &mut self,
        x: Tensor,
        y: Tensor,
        p: f32,
        seed: u64,
        stream: Stream,
    ) -> Result<()> {
        self.dropout(x, y, p, seed, stream)
    }

    fn dropout_backward(
        &mut self,
        dy: Tensor,
        dx: Tensor,
        p: f32,
        seed: u64,
        stream: Stream,
        accumulate: bool,
    ) -> Result<()> {
        self.dropout_grad(dy, dx, p, seed, stream, accumulate)
    }

    fn mse_loss(
        &mut self,
        pred: Tensor,
        target: Tensor,
        loss: Tensor,
        dpred: Tensor,
    ) -> Result<()> {
        self.mse(pred, target, loss, dpred)
    }

    fn noise_add(
        &mut self,
        x0: Tensor,
        timesteps: Tensor,
        sqrt_ab: Tensor,
        sqrt_1m_ab: Tensor,
        x_t: Tensor,
        eps: Tensor,
        per_image: usize,
        first_element: u64,
        seed: u64,
        stream: Stream,
    ) -> Result<()> {
        self.forward_process(
            x0,
            timesteps,
            sqrt_ab,
            sqrt_1m_ab,
            x_t,
            eps,
            per_image,
            first_element,
            seed,
            stream,
        )
    }

    fn normal(&mut self, x: Tensor, first_element: u64, seed: u64, stream: u64) -> Result<()> {
        self.normal_draws(x, first_element, seed, stream)
    }

    fn draw_timesteps(
        &mut self,
        timesteps: Tensor,
        steps: usize,
        seed: u64,
        stream: Stream,
    ) -> Result<()> {
        self.timestep_draws(timesteps, steps, seed, stream)
    }

    fn clock_set(&mut self, step: u64) -> Result<()> {
        self.not_recording("setting the training clock")?;
        self.materialise()?;
        // SAFETY: the clock is 8 bytes of live device memory (materialise).
        unsafe { self.dev.htod(self.clock_ptr(), &step.to_le_bytes()) }
    }

    fn log_at_clock(&mut self, src: Tensor, ring: Tensor) -> Result<()> {
        self.log_entry(src, ring)
    }

    fn sampler_load(&mut self, rows: &[super::SamplerRow]) -> Result<()> {
        self.load_table(rows)
    }

    fn sampler_position(&mut self) -> Result<Option<usize>> {
        self.table_position()
    }

    fn sampler_timesteps(&mut self, timesteps: Tensor) -> Result<()> {
        self.table_timesteps(timesteps)
    }

    fn sampler_step(
        &mut self,
        x_t: Tensor,
        eps_hat: Tensor,
        x_prev: Tensor,
        step: super::ReverseStep,
    ) -> Result<()> {
        self.reverse_step(x_t, eps_hat, x_prev, step)
    }

    fn sampler_advance(&mut self) -> Result<()> {
        self.table_advance()
    }

    fn global_norm(&mut self, grads: Tensor, out: Tensor) -> Result<()> {
        self.grad_norm(grads, out)
    }

    fn adam_step(
        &mut self,
        params: Tensor,
        grads: Tensor,
        m: Tensor,
        v: Tensor,
        norm: Tensor,
        hp: AdamHyper,
    ) -> Result<()> {
        self.adam(params, grads, m, v, norm, hp)
    }

    fn ema_update(&mut self, ema: Tensor, params: Tensor, decay: f32) -> Result<()> {
        self.ema(ema, params, decay)
    }

    fn capture_begin(&mut self, seq: Sequence) -> Result<bool> {
        // Everything a recorded op touches must exist before recording starts.
        self.not_recording("starting a recording")?;
        self.not_profiling("starting a recording")?;
        self.materialise()?;
        // What was written before is rounded now, not in every replay.
        self.refresh_copies()?;
        self.recorded[seq as usize] = None;
        self.dev.capture_begin(seq)?;
        self.capturing = Some(seq);
        Ok(true)
    }

    fn capture_end(&mut self) -> Result<()> {
        let seq = self
            .capturing
            .take()
            .ok_or_else(|| Error::Invalid("capture_end without capture_begin".into()))?;
        // The roundings the last recorded op's writes need belong to the recording.
        let refreshed = self.refresh_copies();
        self.dev.capture_end(seq)?;
        refreshed?;
        // Ids unique across backends too: a trainer moved to another backend never mistakes a stranger's
        // recording for its own.
        static RECORDINGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = RECORDINGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.recorded[seq as usize] = Some(id);
        Ok(())
    }

    fn recording_id(&self, seq: Sequence) -> Option<u64> {
        self.recorded[seq as usize]
    }

    fn replay(&mut self, seq: Sequence) -> Result<()> {
        self.not_recording("replaying a recording")?;
        self.not_profiling("replaying a recording")?;
        self.refresh_copies()?;
        self.dev.replay(seq)
    }

    fn synchronize(&mut self) -> Result<()> {
        self.refresh_copies()?;
        self.sync()
    }

    fn profile_begin(&mut self) -> Result<bool> {
        self.not_recording("profiling")?;
        self.not_profiling("beginning a profile")?;
        // The roundings owed to earlier writes are not this profile's.
        self.refresh_copies()?;
        self.dev.profile_begin();
        Ok(true)
    }

    fn profile_end(&mut self) -> Result<Vec<super::Launch>> {
        // The roundings this profile's writes need (the weight copies) are its own.
        let refreshed = self.refresh_copies();
        let launches = self.dev.profile_end();
        refreshed?;
        launches
    }

    fn bytes_held(&self) -> (usize, usize) {
        let bytes = |b: &Option<DeviceBuffer>| b.as_ref().map_or(0, |b| b.bytes);
        let scratch = [
            &self.workspace,
            &self.partials,
            &self.table,
            &self.step,
            &self.clock,
        ]
        .into_iter()
        .map(bytes)
        .sum();
        (4 * self.reserved, scratch)
    }

    /// Free device memory, less what is reserved but not yet allocated, the workspace (if not yet
    /// allocated) and 256 MiB of headroom for the driver and graphs, in elements.
    fn memory_available(&self) -> Option<usize> {
        let (free, _) = self.memory().ok()?;
        let materialised = self.arena.as_ref().map_or(0, |a| a.bytes);
        let pending = (4 * self.reserved).saturating_sub(materialised);
        let workspace = if self.workspace.is_some() {
            0
        } else {
            4 * WORKSPACE
        };
        Some(free.saturating_sub(pending + workspace + (256 << 20)) / 4)
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    /// bf16 needs tensor cores with bf16 inputs: compute capability 8.0 or newer.
    fn set_precision(&mut self, p: Precision) -> Result<()> {
        if p == Precision::Bf16 && !self.supports_bf16() {
            return Err(Error::Cuda(format!(
                "--precision bf16 needs compute capability 8.0 or newer; {} is older (use --precision fp32)",
                self.props.name
            )));
        }
        if p != self.precision {
            // Recorded sequences launch the kernels of the precision they were recorded in.
            self.not_recording("changing the precision")?;
            self.forget_recordings();
        }
        self.precision = p;
        Ok(())
    }

    /// WMMA needs bf16 tensor cores (sm_80 and newer); wgmma and TMA a Hopper (sm_90a) and kernels built
    /// for it.
    fn set_rung(&mut self, rung: Option<super::Rung>) -> Result<bool> {
        let runs = match rung {
            None => true,
            Some(r) if r.needs_sm90a() => self.props.sm90a,
            Some(_) => self.supports_bf16(),
        };
        if !runs {
            return Ok(false);
        }
        if rung != self.rung {
            // Recorded sequences launch the kernels of the rung they were recorded on.
            self.not_recording("changing the convolutions' core")?;
            self.forget_recordings();
        }
        self.rung = rung;
        Ok(true)
    }

    /// SMs x FLOPs per SM per clock x the SM clock. fp32: 128 lanes x 2 (a fused multiply-add) on sm_90,
    /// 64 x 2 on sm_80. bf16 with fp32 accumulation, dense: 4096 on sm_90 (H100, H200), 2048 on sm_80
    /// (A100; the 8.x consumer parts have half that).
    fn stated_peak_tflops(&self, p: Precision) -> Option<f64> {
        let props = &self.props;
        let per_clock = match (p, props.major >= 9) {
            (Precision::Fp32, true) => 256.0,
            (Precision::Fp32, false) => 128.0,
            (Precision::Bf16, true) => 4096.0,
            (Precision::Bf16, false) => 2048.0,
        };
        (props.clock_khz > 0 && (p == Precision::Fp32 || self.supports_bf16()))
            .then(|| f64::from(props.sms) * per_clock * f64::from(props.clock_khz) * 1e3 / 1e12)
    }

    /// Times `kernels/peak.cu` over 4 blocks per SM: fp32 FMAs, or bf16 WMMA. The loop count doubles
    /// from 256 until one launch takes [`PEAK_LAUNCH_S`] (the launch and the wait are then a rounding
    /// error of the timing, and the doublings have brought the clocks up; on the emulator it stops
    /// early), then five launches are timed.
    fn measure_peak_tflops(&mut self, p: Precision) -> Result<Option<f64>> {
        if p == Precision::Bf16 && !self.supports_bf16() {
            return Ok(None);
        }
        self.materialise()?;
        let blocks = 4 * self.props.sms;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // FLOPs per loop iteration of a block: 256 threads x 8 FMAs, or 8 warps x 4 m16n16k16 products.
        let (kernel, flop) = match p {
            Precision::Fp32 => ("peak_fma_f32", 2.0 * 8.0 * 256.0),
            Precision::Bf16 => ("peak_mma_bf16", 2.0 * 4.0 * 4096.0 * 8.0),
        };
        let (out, seed) = (self.workspace_ptr(), 0.5f32);
        let timed = |be: &mut Self, iters: i32, runs: u32| -> Result<f64> {
            let start = std::time::Instant::now();
            for _ in 0..runs {
                launch!(be, kernel, cfg, out, seed, iters)?;
            }
            be.sync()?;
            Ok(start.elapsed().as_secs_f64() / f64::from(runs))
        };
        self.sync()?;
        let mut iters = 256i32;
        while timed(self, iters, 1)? < PEAK_LAUNCH_S && iters < 1 << 24 {
            iters *= 2;
        }
        let seconds = timed(self, iters, 5)?;
        Ok(Some(
            flop * f64::from(iters) * f64::from(blocks) / seconds / 1e12,
        ))
    }
}

/// How long one launch of a peak kernel runs at least ([`CudaBackend::measure_peak_tflops`]).
const PEAK_LAUNCH_S: f64 = 10e-3;

/// `src` rounded to bf16 (to nearest, ties to even; NaN stays NaN) and packed two to a word, element `2i`
/// in the low half of word `i`: the layout of a [`Dtype::Bf16`] tensor.
/// The bytes a tensor's elements take.
fn bytes_of(t: Tensor) -> f64 {
    let per = match t.dtype {
        Dtype::F32 => 4.0,
        Dtype::Bf16 => 2.0,
    };
    per * t.len as f64
}

fn bf16_words(src: &[f32]) -> Vec<u32> {
    let round = |f: f32| -> u32 {
        let u = f.to_bits();
        if f.is_nan() {
            return (u >> 16) | 0x40;
        }
        (u + 0x7fff + ((u >> 16) & 1)) >> 16
    };
    src.chunks(2)
        .map(|p| round(p[0]) | p.get(1).map_or(0, |&f| round(f) << 16))
        .collect()
}

/// The first `len` elements of bf16 pairs packed as [`bf16_words`] packs them, widened to fp32.
fn widen_bf16(words: &[f32], len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let w = words[i / 2].to_bits();
            f32::from_bits(if i % 2 == 0 { w << 16 } else { w & 0xffff_0000 })
        })
        .collect()
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Buffers are freed after everything queued has finished with them.
        let _ = self.dev.synchronize();
    }
}

#[cfg(test)]
mod bf16_tests {
    use super::{bf16_words, widen_bf16};

    /// Rounding to nearest with ties to even, checked on values whose bf16 neighbours are known: 1 + 2^-8
    /// lies halfway between 1 and 1 + 2^-7 and goes to 1 (even mantissa), 1 + 3 * 2^-8 halfway between
    /// 1 + 2^-7 and 1 + 2^-6 and goes up; just past the halfway point goes up. Odd lengths leave the last
    /// high half zero; widening gives the rounded values back exactly.
    #[test]
    fn bf16_packing_rounds_to_nearest_even_and_widens_exactly() {
        let h = 2f32.powi(-8);
        let src = [
            1.0 + h,
            1.0 + 3.0 * h,
            1.0 + h * 1.0001,
            -2.5,
            f32::INFINITY,
        ];
        let want = [1.0, 1.0 + 4.0 * h, 1.0 + 2.0 * h, -2.5, f32::INFINITY];
        let words = bf16_words(&src);
        assert_eq!(words.len(), 3);
        assert_eq!(words[2] >> 16, 0, "the unused half of the last word");
        let as_f32: Vec<f32> = words.iter().map(|&w| f32::from_bits(w)).collect();
        assert_eq!(widen_bf16(&as_f32, src.len()), want);
        let nan = widen_bf16(&[f32::from_bits(bf16_words(&[f32::NAN])[0])], 1);
        assert!(nan[0].is_nan());
    }
}

#[cfg(all(test, ddpm_kernels))]
mod tests {
    // Every kernel must be in the eager-load list: the ones the attention launcher names, and one defined
    // in a header (gemm.cuh) rather than a .cu file.
    #[test]
    fn every_kernel_is_listed_for_loading_before_any_capture() {
        let names = super::kernel_names();
        for k in super::attention::kernels().iter().chain(&[
            "gemm_reduce_f32",
            "draw_timesteps_f32",
            "conv2d_forward_normed_bf16",
        ]) {
            assert!(names.contains(k), "{k} is not in {names:?}");
        }
    }
}

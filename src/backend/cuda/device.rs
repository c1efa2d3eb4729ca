//! The machine the kernels run on, below the launchers: an NVIDIA GPU through the driver (cudarc), or,
//! with the cargo feature `emu`, the CPU emulator of `emu/` that runs the same kernel sources thread by
//! thread (for testing kernels and launchers on machines without a GPU). Both offer the same few things:
//! memory, copies, launches by kernel name, recording a sequence of launches and replaying it.

use crate::backend::{Launch, Sequence};
use crate::error::{Error, Result};
use cudarc::driver::sys::{self, CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    result, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaStream, LaunchConfig,
};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

/// Maps a driver error to ours, naming what was being done.
pub(super) fn cuda<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> Error {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

pub(super) fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The CUDA version the installed driver supports (12020 for 12.2), or `None` without a driver.
pub fn driver_cuda_version() -> Option<u32> {
    // SAFETY: only tries to dlopen libcuda and reports whether it loaded.
    if !unsafe { sys::is_culib_present() } {
        return None;
    }
    let mut v: std::ffi::c_int = 0;
    // SAFETY: writes one int; needs neither cuInit nor a context.
    let r = unsafe { sys::cuDriverGetVersion(&mut v) };
    (r == sys::CUresult::CUDA_SUCCESS && v > 0).then_some(v as u32)
}

/// 12020 as "12.2".
pub fn cuda_version(v: u32) -> String {
    format!("{}.{}", v / 1000, v % 1000 / 10)
}

/// What the launchers need to know about the device.
pub(super) struct Properties {
    /// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)".
    pub name: String,
    pub sms: u32,
    /// Largest dynamic shared memory a block may opt in to, in bytes.
    pub max_shared: u32,
    /// Compute capability major version and the SM clock (kHz), for the arithmetic peak (0: unknown).
    pub major: i32,
    pub minor: i32,
    pub clock_khz: i32,
    /// Whether the sm_90a kernels (wgmma) run here: compute capability 9.0 and kernels built for
    /// sm_90a (elsewhere their bodies are empty).
    pub sm90a: bool,
}

/// A tensor map of the tensor-memory accelerator (`kernels/tma.cuh`): 128 bytes the kernel reads from its
/// parameter, opaque on a GPU (the driver writes them), the emulator's own encoding on the emulator.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub(super) struct TensorMap(pub [u64; 16]);

/// How a tensor map lays a box out in shared memory: densely (`None`), or with the 16-byte chunks of each
/// 64-byte box row permuted by the 64-byte swizzle wgmma reads (`kernels/wgmma.cuh`, `smem_desc_sw64`).
/// The values are CUtensorMapSwizzle's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Swizzle {
    None = 0,
    B64 = 2,
    /// Each 128-byte box row's 16-byte chunks permuted by the 128-byte swizzle (ladder version 8).
    B128 = 3,
}

/// The element type of a tensor map: the bf16 weights and activations, or an fp32 gradient (ladder
/// version 8's A operands).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Element {
    Bf16,
    F32,
}

impl Element {
    pub fn bytes(self) -> u64 {
        match self {
            Self::Bf16 => 2,
            Self::F32 => 4,
        }
    }
}

/// The work a launcher counts for one launch (see [`Launch`]): FLOPs of its matrix products and
/// compulsory bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Work {
    pub flops: f64,
    pub bytes: f64,
    /// The multiply-adds the launch's tiles issue, padding and structural zeros included.
    pub issued_macs: f64,
    /// What one block multiplies per iteration of its main loop (see [`Launch::tile`]).
    pub tile: Option<[u32; 3]>,
    /// See [`Launch::staged`].
    pub staged: f64,
}

/// A GPU the static model (`src/bin/sass-model.rs`) plans launches for: the launchers pick the kernels
/// they would pick there, and nothing runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planned {
    /// An H100 SXM (sm_90a machine code): 132 SMs, 227 KiB of shared memory per block.
    H100,
    /// An A100 SXM (sm_80): 108 SMs, 163 KiB.
    A100,
}

/// Device memory, freed on drop.
pub(super) struct DeviceBuffer {
    pub ptr: u64,
    pub bytes: usize,
    free: unsafe fn(u64),
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: allocated by the matching allocator, not freed before; the owner has synchronised.
            unsafe { (self.free)(self.ptr) }
        }
    }
}

/// A GPU through the CUDA driver: one context, one stream, the embedded module.
pub(super) struct Gpu {
    /// One recorded graph per [`Sequence`].
    graphs: [Option<CudaGraph>; Sequence::COUNT],
    functions: HashMap<&'static str, CudaFunction>,
    module: Arc<CudaModule>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    /// While profiling: each launch and the events recorded on the stream before and after it.
    profile: Option<Vec<(Launch, CudaEvent, CudaEvent)>>,
    /// Timing events of earlier profiles, for the next one.
    spare_events: Vec<CudaEvent>,
}

pub(super) enum Device {
    Gpu(Gpu),
    #[cfg(feature = "emu")]
    Emu(emu::Emu),
    Plan(Plan),
}

unsafe fn gpu_free(ptr: u64) {
    let _ = result::free_sync(ptr);
}

unsafe fn plan_free(_: u64) {}

/// A device where nothing runs: memory is addresses handed out and never backed, copies do nothing (a
/// read gives zeros), and a launch is recorded while profiling. For the static model, which needs every
/// launch of a training step and a sampling forward as the launchers make them for a device it does not
/// have.
pub(super) struct Plan {
    next: std::cell::Cell<u64>,
    profile: Option<Vec<Launch>>,
}

fn launch_record(name: &'static str, cfg: &LaunchConfig, ms: f64, work: Work) -> Launch {
    let (g, b) = (cfg.grid_dim, cfg.block_dim);
    Launch {
        kernel: name,
        ms,
        blocks: u64::from(g.0) * u64::from(g.1) * u64::from(g.2),
        threads: b.0 * b.1 * b.2,
        shared: cfg.shared_mem_bytes,
        tile: work.tile,
        staged: work.staged,
        flops: work.flops,
        bytes: work.bytes,
        issued_macs: work.issued_macs,
    }
}

impl Device {
    /// Opens GPU 0, loads `fatbin` and every kernel of `kernels` in it (all of them now: a kernel first
    /// loaded while a graph is being recorded breaks the capture on drivers before 12.3, with lazy module
    /// loading); `dynamic_shared` kernels may use the device's maximum of dynamic shared memory.
    pub fn gpu(
        fatbin: &[u8],
        archs: &str,
        kernels: &[&'static str],
        dynamic_shared: &[&'static str],
    ) -> Result<(Self, Properties)> {
        let Some(driver) = driver_cuda_version() else {
            return Err(Error::Cuda(
                "the CUDA driver library (libcuda) could not be loaded: no NVIDIA driver on this machine"
                    .into(),
            ));
        };
        let need = super::min_driver_cuda();
        if driver < need {
            return Err(Error::Cuda(format!(
                "the NVIDIA driver supports CUDA {}, and these kernels need CUDA {} or newer (a driver \
                 from {}): update the driver",
                cuda_version(driver),
                cuda_version(need),
                if need >= 13000 { "R580" } else { "R535" }
            )));
        }
        let count = CudaContext::device_count().map_err(cuda("counting devices"))?;
        if count == 0 {
            return Err(Error::Cuda("the NVIDIA driver reports no devices".into()));
        }
        let ctx = CudaContext::new(0).map_err(cuda("creating a context on device 0"))?;
        // Before any allocation: cudarc's event tracking would record events around every argument, which
        // breaks stream capture (REFERENCE.md §5). This backend orders everything on one stream itself.
        // SAFETY: nothing has been allocated or launched in this context yet.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(cuda("creating a stream"))?;
        let name = ctx.name().map_err(cuda("reading the device name"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(cuda("reading the compute capability"))?;
        let attr = |a| ctx.attribute(a).map_err(cuda("reading a device attribute"));
        let sms = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let max_shared =
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
        let clock_khz = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec()))
            .map_err(|e| {
                Error::Cuda(format!(
                    "loading the kernels (built for {archs}) on {name} (sm_{major}{minor}): {e}"
                ))
            })?;
        let mut gpu = Gpu {
            graphs: Default::default(),
            functions: HashMap::new(),
            module,
            stream,
            ctx,
            profile: None,
            spare_events: Vec::new(),
        };
        for kernel in kernels {
            gpu.function(kernel)?;
        }
        for kernel in dynamic_shared {
            gpu.function(kernel)?
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    max_shared as i32,
                )
                .map_err(cuda("allowing a kernel the device's shared memory"))?;
        }
        let props = Properties {
            name: format!("{name} (sm_{major}{minor}, {sms} SMs)"),
            sms,
            max_shared,
            major,
            minor,
            clock_khz,
            sm90a: (major, minor) == (9, 0) && archs.split(',').any(|a| a.trim() == "sm_90a"),
        };
        Ok((Self::Gpu(gpu), props))
    }

    /// A planned device (see [`Plan`]) with the properties of `gpu`.
    pub fn planned(gpu: Planned) -> (Self, Properties) {
        let (name, sms, max_shared, major, clock_khz) = match gpu {
            Planned::H100 => (
                "planned H100 SXM (sm_90a, 132 SMs)",
                132,
                227 << 10,
                9,
                1_830_000,
            ),
            Planned::A100 => (
                "planned A100 SXM (sm_80, 108 SMs)",
                108,
                163 << 10,
                8,
                1_410_000,
            ),
        };
        let props = Properties {
            name: name.into(),
            sms,
            max_shared,
            major,
            minor: 0,
            clock_khz,
            sm90a: gpu == Planned::H100,
        };
        (
            Self::Plan(Plan {
                next: std::cell::Cell::new(1 << 40),
                profile: None,
            }),
            props,
        )
    }

    /// The CPU emulator (feature `emu`).
    #[cfg(feature = "emu")]
    pub fn emulator() -> (Self, Properties) {
        let props = Properties {
            name: "CUDA emulator on the CPU (kernels/ built by the host compiler)".into(),
            sms: 4,
            max_shared: 227 << 10,
            major: 9,
            minor: 0,
            clock_khz: 0,
            sm90a: true, // the emulator runs every kernel as written
        };
        (Self::Emu(emu::Emu::default()), props)
    }

    pub fn malloc(&self, bytes: usize, what: &str) -> Result<DeviceBuffer> {
        if bytes == 0 {
            return Ok(DeviceBuffer {
                ptr: 0,
                bytes,
                free: gpu_free,
            });
        }
        match self {
            Self::Gpu(g) => {
                g.ctx
                    .bind_to_thread()
                    .map_err(cuda("binding the context"))?;
                // SAFETY: a plain allocation in the bound context; freed once by DeviceBuffer.
                let ptr = unsafe { result::malloc_sync(bytes) }.map_err(|e| {
                    let free = g.ctx.mem_get_info().map_or(0, |(free, _)| free);
                    Error::Cuda(format!(
                        "allocating {what}: {:.2} GiB needed, {:.2} GiB free on the device ({e})",
                        gib(bytes),
                        gib(free)
                    ))
                })?;
                Ok(DeviceBuffer {
                    ptr,
                    bytes,
                    free: gpu_free,
                })
            }
            #[cfg(feature = "emu")]
            Self::Emu(_) => emu::malloc(bytes, what),
            Self::Plan(p) => {
                let ptr = p.next.get();
                p.next.set(ptr + (bytes as u64).next_multiple_of(1 << 10));
                Ok(DeviceBuffer {
                    ptr,
                    bytes,
                    free: plan_free,
                })
            }
        }
    }

    /// Copies `src` to device address `dst`.
    ///
    /// # Safety
    /// `dst` must be the start of `src.len()` bytes of live device memory.
    pub unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        match self {
            Self::Gpu(g) => result::memcpy_htod_async(dst, src, g.stream.cu_stream())
                .map_err(cuda("copying to the device")),
            #[cfg(feature = "emu")]
            Self::Emu(_) => {
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len());
                Ok(())
            }
            Self::Plan(_) => Ok(()),
        }
    }

    /// Copies device memory at `src` into `dst`, waiting for everything queued before.
    ///
    /// # Safety
    /// `src` must be the start of `dst.len()` bytes of live device memory.
    pub unsafe fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        match self {
            Self::Gpu(g) => {
                result::memcpy_dtoh_async(dst, src, g.stream.cu_stream())
                    .map_err(cuda("copying from the device"))?;
                self.synchronize()
            }
            #[cfg(feature = "emu")]
            Self::Emu(_) => {
                std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len());
                Ok(())
            }
            Self::Plan(_) => {
                dst.fill(0);
                Ok(())
            }
        }
    }

    /// Copies `bytes` from `src` to `dst` on the device (recorded, when recording, as a graph records it).
    ///
    /// # Safety
    /// Both ranges must be live device memory of `bytes`, not overlapping.
    pub unsafe fn dtod(&mut self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        match self {
            Self::Gpu(g) => result::memcpy_dtod_async(dst, src, bytes, g.stream.cu_stream())
                .map_err(cuda("copying on the device")),
            #[cfg(feature = "emu")]
            Self::Emu(e) => {
                e.copy(dst, src, bytes);
                Ok(())
            }
            Self::Plan(_) => Ok(()),
        }
    }

    /// # Safety
    /// `dst` must be live device memory of `bytes`.
    pub unsafe fn zero(&self, dst: u64, bytes: usize) -> Result<()> {
        match self {
            Self::Gpu(g) => result::memset_d8_async(dst, 0, bytes, g.stream.cu_stream())
                .map_err(cuda("zeroing device memory")),
            #[cfg(feature = "emu")]
            Self::Emu(_) => {
                std::ptr::write_bytes(dst as *mut u8, 0, bytes);
                Ok(())
            }
            Self::Plan(_) => Ok(()),
        }
    }

    /// Launches `name` with `params` (pointers to the argument values, `sizes` their sizes), or records
    /// it when recording.
    ///
    /// # Safety
    /// The arguments must match the kernel's signature and every address in them must be valid for
    /// what the kernel does with it.
    pub unsafe fn launch(
        &mut self,
        name: &'static str,
        cfg: LaunchConfig,
        params: &mut [*mut c_void],
        sizes: &[usize],
        work: Work,
    ) -> Result<()> {
        match self {
            Self::Gpu(g) => {
                let f = g.function(name)?;
                let _ = sizes;
                let start = match g.profile.is_some() {
                    true => Some(g.recorded_event()?),
                    false => None,
                };
                result::launch_kernel(
                    f.cu_function(),
                    cfg.grid_dim,
                    cfg.block_dim,
                    cfg.shared_mem_bytes,
                    g.stream.cu_stream(),
                    params,
                )
                .map_err(|e| Error::Cuda(format!("launching {name}: {e}")))?;
                if let Some(start) = start {
                    let end = g.recorded_event()?;
                    if let Some(list) = &mut g.profile {
                        list.push((launch_record(name, &cfg, 0.0, work), start, end));
                    }
                }
                Ok(())
            }
            #[cfg(feature = "emu")]
            Self::Emu(e) => e.launch(name, cfg, params, sizes, work),
            Self::Plan(p) => {
                if let Some(list) = &mut p.profile {
                    list.push(launch_record(name, &cfg, 0.0, work));
                }
                Ok(())
            }
        }
    }

    /// [`Device::tensor_map`] of a bf16 tensor.
    pub fn tensor_map_bf16(
        &self,
        base: u64,
        dims: &[u64],
        strides: &[u64],
        boxes: &[u32],
        swizzle: Swizzle,
    ) -> Result<TensorMap> {
        self.tensor_map(Element::Bf16, base, dims, strides, boxes, swizzle)
    }

    /// The tensor map of a tensor of `element`s at `base`: extents `dims` (innermost first, 1 to 5 of
    /// them), `strides` the byte steps of dimensions 1 and up, copied in boxes of `boxes` elements with
    /// zeros where a box leaves the tensor, laid out in shared memory with `swizzle`. An error where the
    /// driver refuses it (`base` or a stride not a multiple of 16 bytes, a box side over 256, a box row
    /// not a multiple of 16 bytes, or wider than the swizzle).
    pub fn tensor_map(
        &self,
        element: Element,
        base: u64,
        dims: &[u64],
        strides: &[u64],
        boxes: &[u32],
        swizzle: Swizzle,
    ) -> Result<TensorMap> {
        let refused = |why: String| {
            Error::Cuda(format!(
                "encoding the tensor map of a {element:?} tensor of extents {dims:?}, byte strides \
                 {strides:?} at {base:#x}, boxes of {boxes:?}, {swizzle:?}: {why}"
            ))
        };
        let rank = dims.len();
        if !(1..=5).contains(&rank) || strides.len() + 1 != rank || boxes.len() != rank {
            return Err(refused(
                "a rank of 1 to 5 and one stride less than extents".into(),
            ));
        }
        match self {
            Self::Gpu(_) => {
                let steps = [1u32; 5];
                let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
                // SAFETY: every array holds at least `rank` (strides: rank - 1) values, as checked
                // above; the map is aligned as CUtensorMap's type demands; the driver writes all of it
                // or fails.
                unsafe {
                    sys::cuTensorMapEncodeTiled(
                        map.as_mut_ptr(),
                        match element {
                            Element::Bf16 => {
                                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                            }
                            Element::F32 => {
                                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                            }
                        },
                        rank as u32,
                        base as *mut c_void,
                        dims.as_ptr(),
                        strides.as_ptr(),
                        boxes.as_ptr(),
                        steps.as_ptr(),
                        sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                        match swizzle {
                            Swizzle::None => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
                            Swizzle::B64 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
                            Swizzle::B128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                        },
                        sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                        sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
                    )
                    .result()
                    .map_err(|e| refused(e.to_string()))?;
                    Ok(TensorMap(map.assume_init().opaque))
                }
            }
            #[cfg(feature = "emu")]
            Self::Emu(_) => emu::tensor_map(element, base, dims, strides, boxes, swizzle)
                .map_err(|why| refused(why.into())),
            Self::Plan(_) => Ok(TensorMap([0; 16])),
        }
    }

    pub fn synchronize(&self) -> Result<()> {
        match self {
            Self::Gpu(g) => g
                .stream
                .synchronize()
                .map_err(cuda("synchronising the stream")),
            #[cfg(feature = "emu")]
            Self::Emu(_) => Ok(()),
            Self::Plan(_) => Ok(()),
        }
    }

    /// Free and total device memory, in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        match self {
            Self::Gpu(g) => g.ctx.mem_get_info().map_err(cuda("reading device memory")),
            #[cfg(feature = "emu")]
            Self::Emu(_) => Ok((8 << 30, 8 << 30)),
            Self::Plan(_) => Ok((80 << 30, 80 << 30)),
        }
    }

    pub fn capture_begin(&mut self, seq: Sequence) -> Result<()> {
        match self {
            Self::Gpu(g) => {
                g.graphs[seq as usize] = None;
                g.stream
                    .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(cuda("starting a graph capture"))
            }
            #[cfg(feature = "emu")]
            Self::Emu(e) => {
                e.begin(seq);
                Ok(())
            }
            Self::Plan(_) => Err(Error::Invalid(format!(
                "recording {seq:?} on a planned device, where nothing runs"
            ))),
        }
    }

    /// Ends the capture `capture_begin(seq)` started, keeping it as `seq`.
    pub fn capture_end(&mut self, seq: Sequence) -> Result<()> {
        match self {
            Self::Gpu(g) => {
                let graph = g
                    .stream
                    .end_capture(sys::CUgraphInstantiate_flags(0))
                    .map_err(cuda("ending a graph capture"))?;
                if graph.is_none() {
                    return Err(Error::Cuda("the captured graph is empty".into()));
                }
                g.graphs[seq as usize] = graph;
                Ok(())
            }
            #[cfg(feature = "emu")]
            Self::Emu(e) => {
                e.end(seq);
                Ok(())
            }
            Self::Plan(_) => Ok(()),
        }
    }

    pub fn replay(&mut self, seq: Sequence) -> Result<()> {
        match self {
            Self::Gpu(g) => match &g.graphs[seq as usize] {
                Some(graph) => graph.launch().map_err(cuda("replaying a graph")),
                None => Err(Error::Invalid(format!("no recorded graph of {seq:?}"))),
            },
            #[cfg(feature = "emu")]
            Self::Emu(e) => e.replay(seq),
            Self::Plan(_) => Err(Error::Invalid(format!(
                "replaying {seq:?} on a planned device, where nothing was recorded"
            ))),
        }
    }

    /// Starts timing every kernel launched from now to [`Device::profile_end`]. The caller launches
    /// nothing into a recording meanwhile, and starts no profile inside another.
    pub fn profile_begin(&mut self) {
        match self {
            Self::Gpu(g) => g.profile = Some(Vec::new()),
            #[cfg(feature = "emu")]
            Self::Emu(e) => e.profile = Some(Vec::new()),
            Self::Plan(p) => p.profile = Some(Vec::new()),
        }
    }

    /// Whether kernels are being timed.
    pub fn profiling(&self) -> bool {
        match self {
            Self::Gpu(g) => g.profile.is_some(),
            #[cfg(feature = "emu")]
            Self::Emu(e) => e.profile.is_some(),
            Self::Plan(p) => p.profile.is_some(),
        }
    }

    /// Waits for the stream and returns each launch since [`Device::profile_begin`], in order, with its
    /// time in milliseconds (on the emulator, the wall-clock time of running it; on a planned device, 0).
    pub fn profile_end(&mut self) -> Result<Vec<Launch>> {
        match self {
            Self::Gpu(g) => {
                let list = g.profile.take().unwrap_or_default();
                g.stream
                    .synchronize()
                    .map_err(cuda("waiting for the profiled kernels"))?;
                let times = list
                    .iter()
                    .map(|(launch, start, end)| {
                        let ms = start
                            .elapsed_ms(end)
                            .map_err(cuda("reading a kernel's timing events"))?;
                        Ok(Launch {
                            ms: f64::from(ms),
                            ..*launch
                        })
                    })
                    .collect();
                g.spare_events
                    .extend(list.into_iter().flat_map(|(_, a, b)| [a, b]));
                times
            }
            #[cfg(feature = "emu")]
            Self::Emu(e) => Ok(e.profile.take().unwrap_or_default()),
            Self::Plan(p) => Ok(p.profile.take().unwrap_or_default()),
        }
    }

    /// Forgets every recorded sequence (their addresses are stale once memory moves, their kernels once
    /// the precision changes).
    pub fn forget_recordings(&mut self) {
        match self {
            Self::Gpu(g) => g.graphs = Default::default(),
            #[cfg(feature = "emu")]
            Self::Emu(e) => e.forget(),
            Self::Plan(_) => {}
        }
    }
}

impl Gpu {
    /// A timing event (a spare one where there is one), recorded on the stream now.
    fn recorded_event(&mut self) -> Result<CudaEvent> {
        let event = match self.spare_events.pop() {
            Some(e) => e,
            None => self
                .ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(cuda("creating a timing event"))?,
        };
        event
            .record(&self.stream)
            .map_err(cuda("recording a timing event"))?;
        Ok(event)
    }

    /// A kernel of the embedded module, loaded once.
    fn function(&mut self, name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.get(name) {
            return Ok(f.clone());
        }
        let f = self
            .module
            .load_function(name)
            .map_err(|e| Error::Cuda(format!("kernel {name} is missing from the module: {e}")))?;
        self.functions.insert(name, f.clone());
        Ok(f)
    }
}

#[cfg(feature = "emu")]
mod emu {
    //! The C entry points of `emu/` (built by build.rs with the feature) and the recording of launches.

    use super::DeviceBuffer;
    use crate::backend::{Launch, Sequence};
    use crate::error::{Error, Result};
    use cudarc::driver::LaunchConfig;
    use std::ffi::{c_char, c_void, CString};

    extern "C" {
        fn ddpm_emu_launch(
            name: *const c_char,
            grid: *const u32,
            block: *const u32,
            shared_bytes: u32,
            args: *mut *mut c_void,
        ) -> i32;
        fn ddpm_emu_malloc(bytes: usize) -> *mut c_void;
        fn ddpm_emu_tensor_map(
            map: *mut u64,
            base: u64,
            rank: u32,
            dims: *const u64,
            strides: *const u64,
            boxes: *const u32,
            swizzle: u32,
            element: u32,
        ) -> i32;
        fn ddpm_emu_free(ptr: *mut c_void);
    }

    /// The emulator's encoding of a tensor map (`emu/tma_emu.h`); the error says whether the driver would
    /// refuse it or the emulator does not model it. The caller checked the lengths (rank 1 to 5, one
    /// stride fewer).
    pub fn tensor_map(
        element: super::Element,
        base: u64,
        dims: &[u64],
        strides: &[u64],
        boxes: &[u32],
        swizzle: super::Swizzle,
    ) -> std::result::Result<super::TensorMap, &'static str> {
        let mut map = super::TensorMap([0; 16]);
        // SAFETY: the emulator writes the 16 words of `map` and reads `rank` extents and boxes and
        // `rank - 1` strides.
        let r = unsafe {
            ddpm_emu_tensor_map(
                map.0.as_mut_ptr(),
                base,
                dims.len() as u32,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                swizzle as u32,
                element.bytes() as u32,
            )
        };
        match r {
            0 => Ok(map),
            1 => Err("the emulator's checks (those of the driver) fail"),
            _ => Err("the emulator does not model this swizzle or box"),
        }
    }

    unsafe fn free(ptr: u64) {
        ddpm_emu_free(ptr as *mut c_void)
    }

    pub fn malloc(bytes: usize, what: &str) -> Result<DeviceBuffer> {
        // SAFETY: a plain host allocation, freed once by DeviceBuffer through `free`.
        let ptr = unsafe { ddpm_emu_malloc(bytes) } as u64;
        if ptr == 0 {
            return Err(Error::Memory(format!(
                "allocating {what} ({bytes} bytes) for the emulator"
            )));
        }
        Ok(DeviceBuffer { ptr, bytes, free })
    }

    /// What a recording keeps for replay: a launch, its arguments copied by value, or a copy between
    /// device addresses.
    enum Recorded {
        Launch {
            name: CString,
            cfg: LaunchConfig,
            args: Vec<Vec<u8>>,
        },
        Copy {
            dst: u64,
            src: u64,
            bytes: usize,
        },
    }

    #[derive(Default)]
    pub struct Emu {
        recording: Option<Vec<Recorded>>,
        recorded: [Vec<Recorded>; Sequence::COUNT],
        /// While profiling: each launch, with the milliseconds it took to run.
        pub profile: Option<Vec<Launch>>,
    }

    impl Emu {
        pub fn begin(&mut self, seq: Sequence) {
            self.recorded[seq as usize].clear();
            self.recording = Some(Vec::new());
        }
        pub fn end(&mut self, seq: Sequence) {
            if let Some(launches) = self.recording.take() {
                self.recorded[seq as usize] = launches;
            }
        }
        pub fn forget(&mut self) {
            self.recorded = Default::default();
        }

        /// A device-to-device copy: done now, or recorded.
        ///
        /// # Safety
        /// As `Device::dtod`.
        pub unsafe fn copy(&mut self, dst: u64, src: u64, bytes: usize) {
            match &mut self.recording {
                Some(rec) => rec.push(Recorded::Copy { dst, src, bytes }),
                None => std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes),
            }
        }

        pub unsafe fn launch(
            &mut self,
            name: &'static str,
            cfg: LaunchConfig,
            params: &mut [*mut c_void],
            sizes: &[usize],
            work: super::Work,
        ) -> Result<()> {
            let cname = CString::new(name).expect("kernel names have no NUL");
            if let Some(rec) = &mut self.recording {
                let args = params
                    .iter()
                    .zip(sizes)
                    .map(|(&p, &n)| std::slice::from_raw_parts(p as *const u8, n).to_vec())
                    .collect();
                rec.push(Recorded::Launch {
                    name: cname,
                    cfg,
                    args,
                });
                return Ok(());
            }
            let start = std::time::Instant::now();
            run(&cname, cfg, params)?;
            if let Some(list) = &mut self.profile {
                let ms = start.elapsed().as_secs_f64() * 1e3;
                list.push(super::launch_record(name, &cfg, ms, work));
            }
            Ok(())
        }

        pub fn replay(&mut self, seq: Sequence) -> Result<()> {
            for r in &mut self.recorded[seq as usize] {
                match r {
                    Recorded::Launch { name, cfg, args } => {
                        let mut params: Vec<*mut c_void> = args
                            .iter_mut()
                            .map(|a| a.as_mut_ptr() as *mut c_void)
                            .collect();
                        // SAFETY: the recorded arguments are the bytes of the original launch's values.
                        unsafe { run(name, *cfg, &mut params)? };
                    }
                    // SAFETY: recorded from a checked copy; memory moving forgets recordings.
                    Recorded::Copy { dst, src, bytes } => unsafe {
                        std::ptr::copy_nonoverlapping(*src as *const u8, *dst as *mut u8, *bytes)
                    },
                }
            }
            Ok(())
        }
    }

    unsafe fn run(name: &CString, cfg: LaunchConfig, params: &mut [*mut c_void]) -> Result<()> {
        let (g, b) = (cfg.grid_dim, cfg.block_dim);
        let code = ddpm_emu_launch(
            name.as_ptr(),
            [g.0, g.1, g.2].as_ptr(),
            [b.0, b.1, b.2].as_ptr(),
            cfg.shared_mem_bytes,
            params.as_mut_ptr(),
        );
        match code {
            0 => Ok(()),
            1 => Err(Error::Cuda(format!(
                "kernel {name:?} is not in the emulator's table"
            ))),
            _ => Err(Error::Cuda(format!(
                "the emulator cannot run {name:?} with block {b:?}"
            ))),
        }
    }
}

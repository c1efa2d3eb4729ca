//! The CUDA backend: device detection and the embedded kernels. The op set on the device is issue #4's
//! work; until it lands, asking for CUDA explains what is and is not there.

use crate::error::{Error, Result};

/// The fatbin build.rs compiled from `kernels/*.cu`, when nvcc was available at build time.
#[cfg(ddpm_kernels)]
pub static FATBIN: Option<&[u8]> = Some(include_bytes!(env!("DDPM_KERNELS_FATBIN")));
#[cfg(not(ddpm_kernels))]
pub static FATBIN: Option<&[u8]> = None;

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

/// Why CUDA cannot be used here, or `Ok` with a description of the device it would use.
pub fn probe() -> Result<String> {
    let Some(fatbin) = FATBIN else {
        return Err(Error::Cuda(
            "this binary was built without CUDA kernels (nvcc was not found at build time). Install nvcc with \
             scripts/install-nvcc.sh and rebuild: NVCC=$(scripts/install-nvcc.sh | tail -n 1) cargo build --release"
                .into(),
        ));
    };
    // SAFETY: only tries to dlopen libcuda and reports whether it loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Cuda("the CUDA driver library (libcuda) could not be loaded: no NVIDIA driver on this machine".into()));
    }
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| Error::Cuda(format!("counting devices: {e}")))?;
    if count == 0 {
        return Err(Error::Cuda("the NVIDIA driver reports no devices".into()));
    }
    let ctx = cudarc::driver::CudaContext::new(0)
        .map_err(|e| Error::Cuda(format!("creating a context on device 0: {e}")))?;
    let name = ctx
        .name()
        .map_err(|e| Error::Cuda(format!("reading the device name: {e}")))?;
    Ok(format!(
        "{name} ({} kernel bytes for {})",
        fatbin.len(),
        kernel_archs().unwrap_or("?")
    ))
}

//! SIGINT and SIGTERM: the first asks long work to stop at a safe point (training finishes its step and
//! writes a checkpoint; sampling keeps the images that are complete); a second SIGINT or SIGTERM exits at
//! once with status 130. Library loops poll [`requested`]; nothing here runs in the signal handler but an
//! atomic store.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Installs the handlers (once per process; the CLI does it before long work).
pub fn install() -> Result<()> {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered first, so it sees the flag as it was before this signal: a second signal exits.
        signal_hook::flag::register_conditional_shutdown(signal, 130, &REQUESTED)
            .and_then(|_| signal_hook::flag::register(signal, &REQUESTED))
            .map_err(|e| Error::Invalid(format!("installing the signal handlers: {e}")))?;
    }
    Ok(())
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Asks for a stop as a signal would (tests, and callers that stop for their own reasons).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

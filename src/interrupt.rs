//! Ctrl-C (SIGINT, and SIGTERM): the first one asks long jobs to stop at the next safe point
//! (training saves a checkpoint, generation closes the part file it is writing); a second one
//! exits at once, which loses nothing either, since every file is written atomically.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler; called once by the binary (a library user keeps its own handling).
pub fn install() {
    let result = ctrlc::set_handler(|| {
        if REQUESTED.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted again: exiting now");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: stopping at the next safe point (press Ctrl-C again to exit now)");
    });
    if let Err(e) = result {
        eprintln!("warning: cannot install the Ctrl-C handler ({e}); Ctrl-C will stop without a checkpoint");
    }
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// The error a stage returns when it stopped on request.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: {saved}; run the same command again to continue")]
pub struct Interrupted {
    /// What was kept, e.g. "checkpoint saved at step 120 in runs/x/student/checkpoints/step-000120".
    pub saved: String,
}

//! Fault injection for the crash tests: with `KDLLM_FAULT=SITE:N` in the environment, the N-th
//! time this process reaches `point(SITE)` it sends itself SIGKILL. The sites sit between two
//! file-system steps (a part renamed but not yet in the manifest, a checkpoint written but not yet
//! renamed), windows a kill from outside would rarely hit. Without the variable, a no-op.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

static SPEC: OnceLock<Option<(String, usize)>> = OnceLock::new();
static HITS: AtomicUsize = AtomicUsize::new(0);

pub fn point(site: &str) {
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("KDLLM_FAULT").ok()?;
        let (s, n) = v.rsplit_once(':')?;
        Some((s.to_string(), n.parse().ok()?))
    });
    if let Some((s, n)) = spec {
        if s == site && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            // SAFETY: kill(2) on our own pid; nothing is shared with Rust state.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}

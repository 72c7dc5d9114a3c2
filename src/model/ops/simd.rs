//! Which vector extension the hand-written kernels use: detected once at run time, so one
//! binary runs its AVX-512 paths where the CPU has them and its AVX2+FMA paths elsewhere.
//! Tests and benchmarks can cap the level to run a lower path on a higher machine.

use std::cell::Cell;
use std::sync::OnceLock;

/// A kernel path, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Portable code (what the compiler makes of it for the build target).
    Scalar,
    /// AVX2, FMA and F16C (every x86 CPU since Haswell / Zen 1).
    Avx2,
    /// AVX-512 F and BW (Skylake-SP and later Xeons, Zen 4 and later).
    Avx512,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    /// Parses `scalar`, `avx2` or `avx512` (the `KDLLM_SIMD` variable).
    pub fn parse(s: &str) -> Option<Level> {
        [Level::Scalar, Level::Avx2, Level::Avx512].into_iter().find(|l| l.name() == s)
    }
}

thread_local! {
    static CAP: Cell<Option<Level>> = const { Cell::new(None) };
}

/// The best level this CPU supports, capped by `KDLLM_SIMD` when that names a level.
pub fn detected() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cpu = cpu_level();
        match std::env::var("KDLLM_SIMD").ok().as_deref().and_then(Level::parse) {
            Some(cap) => cap.min(cpu),
            None => cpu,
        }
    })
}

fn cpu_level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
            return Level::Avx512;
        }
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        if avx2 && std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("f16c") {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// The level the kernels use on this thread: [`detected`], or lower inside [`with_level`].
pub fn level() -> Level {
    let best = detected();
    CAP.get().map_or(best, |cap| cap.min(best))
}

/// Every level this CPU runs, lowest first (what the tests sweep); says which it cannot.
pub fn available() -> Vec<Level> {
    let all = [Level::Scalar, Level::Avx2, Level::Avx512];
    let paths: Vec<Level> = all.into_iter().filter(|&l| l <= detected()).collect();
    if paths.len() < all.len() {
        eprintln!("this CPU runs only {paths:?}: the other paths are compiled, not run");
    }
    paths
}

/// Runs `f` with the kernels on this thread capped at `cap` (and what runs on rayon's pool
/// inside it: the kernels read the level once, on the calling thread). Returns `f`'s result.
pub fn with_level<R>(cap: Level, f: impl FnOnce() -> R) -> R {
    let before = CAP.replace(Some(cap));
    let out = f();
    CAP.set(before);
    out
}

/// The CPU's name and the vector extensions kdllm's kernels care about, for benchmark reports.
pub fn cpu_description() -> (String, Vec<&'static str>) {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    #[allow(unused_mut)]
    let mut flags = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => { $(if std::arch::is_x86_feature_detected!($f) { flags.push($f); })* };
        }
        probe!("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni", "avx512bf16", "avxvnni");
    }
    (name, flags)
}

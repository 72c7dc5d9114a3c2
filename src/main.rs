use clap::Parser;

// Training allocates and frees many short-lived tensors; mimalloc avoids the page faults
// glibc's allocator takes on them (see docs/performance.md, "Speed levers").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

fn main() {
    // mimalloc's `purge_delay` (option 15 in its v2 and v3 headers) = -1: keep freed memory
    // instead of handing it back to the OS, where every reuse costs page faults and zeroing of
    // fresh huge pages (~15% of a training step, measured with perf).
    // SAFETY: sets one integer option of the allocator this binary is linked with.
    unsafe { mi_option_set(15, -1) };
    // candle asks for its thread count at every matmul and, unless RAYON_NUM_THREADS is set,
    // answers by parsing /proc/cpuinfo each time (measurable in small decode steps): ask once.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
    }
    // candle's element-wise worker spins 25,000 rounds after each op before it parks; beside
    // kdllm's own threads on a small CPU it takes their core (SmolLM2 Q4_1 at batch 128 on 2
    // cores: 406-424 -> 482-530 tok/s with 2,000).
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2000");
    }
    let cli = kdllm::cli::Cli::parse();
    kdllm::interrupt::install();
    if let Err(err) = kdllm::cli::run(cli) {
        // One line: each cause once (library messages often already quote their source).
        let mut message = String::new();
        for cause in err.chain().map(|e| e.to_string()) {
            if !message.contains(&cause) {
                if !message.is_empty() {
                    message.push_str(": ");
                }
                message.push_str(&cause);
            }
        }
        eprintln!("error: {message}");
        // 130, as shells report a process stopped by Ctrl-C; the work so far is saved.
        let interrupted = err.chain().any(|e| e.is::<kdllm::interrupt::Interrupted>());
        std::process::exit(if interrupted { 130 } else { 1 });
    }
}

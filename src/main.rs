use clap::Parser;

// Training allocates and frees many short-lived tensors; mimalloc avoids the page faults
// glibc's allocator takes on them (see README, "Speed levers").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = kdllm::cli::Cli::parse();
    if let Err(err) = kdllm::cli::run(cli) {
        let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
        eprintln!("error: {}", chain.join(": "));
        std::process::exit(1);
    }
}

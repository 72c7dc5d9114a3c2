use clap::Parser;

// Training allocates and frees many short-lived tensors; mimalloc avoids the page faults
// glibc's allocator takes on them (see README, "Speed levers").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = kdllm::cli::Cli::parse();
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
        std::process::exit(1);
    }
}

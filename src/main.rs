use clap::Parser;

fn main() {
    let cli = kdllm::cli::Cli::parse();
    if let Err(err) = kdllm::cli::run(cli) {
        let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
        eprintln!("error: {}", chain.join(": "));
        std::process::exit(1);
    }
}

use clap::Parser;
use passflow::app::{self, Cli};

/// mimalloc rather than the system allocator: the pipelines allocate and free many small
/// values per pass (measured: glibc's malloc took a fifth of a replay's time).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    app::init_tracing();
    match app::dispatch(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

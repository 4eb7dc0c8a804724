use clap::Parser;
use passflow::app::{self, Cli};

/// mimalloc rather than the system allocator: the pipelines allocate and free many small
/// values per pass (measured: glibc's malloc took a fifth of a replay's time).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    app::init_tracing();
    let code = match app::dispatch(cli).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    // Exits here rather than by dropping the runtime, which would wait for a task that a stop
    // left held by a dependency.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::process::exit(code)
}

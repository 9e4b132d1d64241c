//! The `sagawatch` binary: parses the command line and dispatches; errors become one line
//! on stderr and a documented exit code, never a panic.

use clap::Parser;

/// mimalloc: the core thread allocates and frees small objects per event (decoded events,
/// row copies, keys); glibc's malloc took about a tenth of its time, mimalloc a fraction of
/// that (README: benchmarks).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = sagawatch::cli::Cli::parse();
    let code = match sagawatch::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            let broken_pipe = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if broken_pipe {
                0
            } else {
                sagawatch::stderr!("error: {e:#}");
                1
            }
        }
    };
    std::process::exit(code);
}

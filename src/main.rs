use clap::Parser;
use entitle::{cli::Cli, config::Config};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` (its place in the C library's option enum, the
/// same in its v2 and v3; the Rust bindings do not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc's `page_full_retain` (v3, the version built here).
const MI_OPTION_PAGE_FULL_RETAIN: libmimalloc_sys::mi_option_t = 36;

/// mimalloc keeps freed pages for a second before returning them, in case
/// they are wanted again; under a burst of webhooks that delay is what the RSS
/// peak is made of (4 to 8 MB in the benchmark), and returning them at once
/// cost no measurable throughput.
///
/// Each thread also keeps up to two full pages per size class to itself;
/// handing them back at once, where other threads can reclaim them as they
/// free into them, took about 2.5 MB off the webhook peak (65 -> 62.6 MB in
/// the benchmark, same throughput). An operator's own `MIMALLOC_PURGE_DELAY` and
/// `MIMALLOC_PAGE_FULL_RETAIN` win.
fn tune_allocator() {
    for (name, option, value) in [
        ("MIMALLOC_PURGE_DELAY", MI_OPTION_PURGE_DELAY, 0),
        ("MIMALLOC_PAGE_FULL_RETAIN", MI_OPTION_PAGE_FULL_RETAIN, 0),
    ] {
        if std::env::var_os(name).is_none() {
            // SAFETY: sets one allocator option, before any thread but this
            // one exists; any value is valid for either option.
            unsafe { libmimalloc_sys::mi_option_set(option, value) };
        }
    }
}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    tune_allocator();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the async runtime")
        .block_on(run())
}

/// glibc gives threads that allocate at the same time arenas of their own,
/// up to eight per core, and memory freed in one is not reused by another:
/// SQLite's allocations (C code, glibc's malloc) would grow the RSS with the
/// arena count. Two are plenty for a 2-core server. An operator's own
/// `MALLOC_ARENA_MAX` wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; it runs first
        // thing in main, before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

async fn run() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("entitle: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(cli.log_filter(&config.log)));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match entitle::cli::run(cli, config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("entitle: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

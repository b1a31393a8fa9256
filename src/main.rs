//! The `ringway` binary; everything lives in the library (`cli` is the entry point).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ringway::cli::main()
}

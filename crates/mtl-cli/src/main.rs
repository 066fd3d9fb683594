//! The `mtl` binary: the command line of [`mtl_cli`].

// Large tensors are allocated and freed at every op; mimalloc keeps the pages instead of returning them to
// the kernel and faulting them in again (measured: a large share of a training step with glibc malloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mtl::process::setup();
    mtl_cli::main(std::env::args_os())
}

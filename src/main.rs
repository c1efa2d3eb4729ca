//! The `ddpm-cuda` command line: argument parsing and dispatch only.

fn main() -> std::process::ExitCode {
    ddpm_cuda::cli::main()
}

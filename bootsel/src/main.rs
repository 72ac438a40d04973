//! `bootsel`: the initramfs `/init` that chooses slot A or B, and a debugging tool.

mod cli;
mod init;

fn main() -> std::process::ExitCode {
    // As PID 1 there is nobody to return an exit code to: run the boot, never return.
    // (`bootsel init --config FILE` as PID 1 is the same with another config.)
    if std::process::id() == 1 && std::env::args_os().len() <= 1 {
        init::run_as_pid1();
    }
    cli::main()
}

//! `bootsel`: the initramfs `/init` that chooses slot A or B, and a debugging tool.

mod cli;
mod init;

fn main() -> std::process::ExitCode {
    // As PID 1 there is nobody to return an exit code to: run the boot, never return.
    if std::process::id() == 1 {
        init::run_as_pid1();
    }
    cli::main()
}

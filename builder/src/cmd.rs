//! Running the external tools (mke2fs, rsync, mount, …) with errors that say what failed.

use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// Runs `cmd`, capturing its output; a non-zero exit becomes an error naming the command
/// and quoting the end of its stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    run_from(cmd, None)
}

/// As [`run`], for a program from the Debian package `package`: a missing program is named
/// with the package to install.
pub fn run_from(cmd: &mut Command, package: Option<&str>) -> Result<Output> {
    let shown = format!("{cmd:?}");
    tracing::debug!(command = %shown, "running");
    let out = match cmd.stdin(Stdio::null()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && package.is_some() => {
            let program = cmd.get_program().to_string_lossy().into_owned();
            bail!(
                "{program} is not installed (Debian package {})",
                package.unwrap_or_default()
            );
        }
        Err(e) => return Err(e).with_context(|| format!("cannot start {shown} (is it installed?)")),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{shown} failed ({}): {}", out.status, tail.join(" / "));
    }
    Ok(out)
}

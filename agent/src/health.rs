//! `atom-update health-check`: runs every executable in the health directories; all must
//! pass for the boot to count as good.
//!
//! A check in /etc/atom/health.d overrides one of the same name in /usr/lib/atom/health.d
//! (an empty or non-executable file there disables it), like systemd's drop-in rules.
//! Checks run in name order, each with a timeout; a check that hangs is killed.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::Failure;

pub const DEFAULT_DIRS: [&str; 2] = ["/usr/lib/atom/health.d", "/etc/atom/health.d"];

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    Failed(String),
}

/// Checks by name; later directories override earlier ones.
fn collect(dirs: &[PathBuf]) -> BTreeMap<String, PathBuf> {
    let mut checks = BTreeMap::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for e in entries.flatten() {
            if let Some(name) = e.file_name().to_str().filter(|n| !n.starts_with('.')) {
                checks.insert(name.to_owned(), e.path());
            }
        }
    }
    checks
}

fn runnable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() > 0 && m.permissions().mode() & 0o111 != 0)
}

pub fn run_one(path: &Path, timeout: Duration) -> Verdict {
    let mut child = match Command::new(path).stdin(Stdio::null()).spawn() {
        Ok(c) => c,
        Err(e) => return Verdict::Failed(format!("cannot start: {e}")),
    };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Verdict::Passed,
            Ok(Some(status)) => return Verdict::Failed(format!("exited with {status}")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Verdict::Failed(format!("timed out after {timeout:?} and was killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Verdict::Failed(format!("cannot wait for it: {e}")),
        }
    }
}

/// Checks run as root: one that others could have written (or placed, through its
/// directory) is not run, and counts as failed, as for keys (ssh's StrictModes).
fn trusted(path: &Path) -> Result<(), String> {
    // A symlink is judged by what it points to, and that directory too.
    let real = std::fs::canonicalize(path).map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
    for dir in [path.parent(), real.parent()].into_iter().flatten() {
        crate::perms::check_private(dir, "health check directory").map_err(|f| f.message)?;
    }
    crate::perms::check_private(&real, "health check").map_err(|f| f.message)
}

pub fn run(dirs: &[PathBuf], timeout: Duration) -> Result<(), Failure> {
    let checks = collect(dirs);
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, path) in &checks {
        if !runnable(path) {
            tracing::info!(check = %name, path = %path.display(), "disabled (empty or not executable)");
            continue;
        }
        ran += 1;
        if let Err(why) = trusted(path) {
            tracing::error!(check = %name, path = %path.display(), reason = %why, "health check not run");
            failed.push(format!("{name} (not run: {why})"));
            continue;
        }
        let started = Instant::now();
        match run_one(path, timeout) {
            Verdict::Passed => {
                tracing::info!(check = %name, seconds = started.elapsed().as_secs_f64(), "health check passed")
            }
            Verdict::Failed(why) => {
                tracing::error!(check = %name, path = %path.display(), reason = %why, "health check FAILED");
                failed.push(format!("{name} ({why})"));
            }
        }
    }
    println!("{} of {ran} health checks passed", ran - failed.len());
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::error(format!(
            "{} of {ran} health checks failed: {}",
            failed.len(),
            failed.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn passing_failing_hanging_and_overridden_checks() {
        let d = tempfile::tempdir().unwrap();
        let (lib, etc) = (d.path().join("lib"), d.path().join("etc"));
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        script(&lib, "10-ok", "exit 0");
        script(&lib, "20-broken-upstream", "exit 1");
        std::fs::write(etc.join("20-broken-upstream"), "").unwrap(); // disabled by the admin
        let dirs = vec![lib.clone(), etc.clone()];
        assert!(run(&dirs, Duration::from_secs(5)).is_ok());

        script(&etc, "30-fails", "exit 3");
        script(&etc, "40-hangs", "sleep 30");
        let started = Instant::now();
        let err = run(&dirs, Duration::from_millis(500)).unwrap_err().message;
        assert!(started.elapsed() < Duration::from_secs(10), "hanging check was killed");
        assert!(err.contains("2 of 3 health checks failed"), "{err}");
        assert!(err.contains("30-fails (exited with exit status: 3)"), "{err}");
        assert!(err.contains("40-hangs (timed out"), "{err}");
        assert!(
            run(&[d.path().join("none")], Duration::from_secs(1)).is_ok(),
            "no checks: nothing to fail"
        );
    }

    #[test]
    fn checks_others_could_write_are_not_run() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("health.d");
        std::fs::create_dir_all(&dir).unwrap();
        let marker = d.path().join("ran");
        script(&dir, "10-planted", &format!("touch {}", marker.display()));
        std::fs::set_permissions(dir.join("10-planted"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = run(std::slice::from_ref(&dir), Duration::from_secs(5))
            .unwrap_err()
            .message;
        assert!(
            err.contains("10-planted (not run:") && err.contains("writable by everyone"),
            "{err}"
        );
        assert!(!marker.exists(), "the planted check did not run");

        std::fs::set_permissions(dir.join("10-planted"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
        let err = run(std::slice::from_ref(&dir), Duration::from_secs(5))
            .unwrap_err()
            .message;
        assert!(
            err.contains("health check directory") && err.contains("its group"),
            "{err}"
        );
        assert!(!marker.exists());

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(run(std::slice::from_ref(&dir), Duration::from_secs(5)).is_ok());
        assert!(marker.exists(), "a root-owned, owner-writable check runs");
    }
}

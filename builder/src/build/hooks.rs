//! Hooks and the stages' commands: run with their output in the stage log, a time limit
//! (a hung hook is killed with its whole process group) and the documented environment.
//!
//! Environment of every hook: `ATOM_ROOT` (the tree; `/` inside it), `ATOM_STAGE`,
//! `ATOM_HOOK` (`before`, `after` or `script`), `ATOM_NAME`, `ATOM_VERSION`, `ATOM_BOARD`,
//! `ATOM_CHANNEL`, `ATOM_BUILD_DIR`, `ATOM_OUTPUT_DIR`, `ATOM_RECIPE_DIR` (host paths,
//! also given inside the tree, where they are not reachable) and `SOURCE_DATE_EPOCH`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::chroot::Mounts;
use super::progress::StageLog;
use crate::recipe::Hook;

/// Where a chroot hook is copied inside the tree while it runs.
const IN_TREE_DIR: &str = ".atom-build-hook";

/// A hook's digest for the cache key: its bytes and where it runs.
pub fn digest(hook: &Hook, default_chroot: bool) -> Result<String> {
    let bytes = fs::read(hook.path()).with_context(|| format!("cannot read hook {}", hook.path().display()))?;
    let mut h = blake3::Hasher::new();
    h.update(&bytes);
    h.update(if hook.chroot(default_chroot) {
        b"chroot"
    } else {
        b"host"
    });
    Ok(h.finalize().to_hex().to_string())
}

pub struct HookEnv {
    pub vars: Vec<(String, String)>,
    pub tree: PathBuf,
    pub build_dir: PathBuf,
    pub default_timeout: Duration,
}

/// Runs one hook of `stage` (`when` is before, after or script).
pub fn run(hook: &Hook, default_chroot: bool, when: &str, stage: &str, env: &HookEnv, log: &StageLog) -> Result<()> {
    let path = hook.path();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let meta = fs::metadata(path).with_context(|| format!("hook {}: cannot read it", path.display()))?;
    if meta.permissions().mode() & 0o111 == 0 {
        bail!("hook {} is not executable (chmod +x it)", path.display());
    }
    let timeout = match hook.timeout() {
        Some(t) => humantime::parse_duration(t).with_context(|| format!("hook {}: timeout {t:?}", path.display()))?,
        None => env.default_timeout,
    };
    let chroot = hook.chroot(default_chroot);
    log.note(&format!(
        "hook {when} {stage}: {} ({})",
        path.display(),
        if chroot { "in the tree" } else { "on the build host" }
    ));
    let mut cmd;
    let _mounts;
    let _no_services;
    let copied;
    if chroot {
        let dir = env.tree.join(IN_TREE_DIR);
        if fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
            fs::remove_file(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let inside = dir.join(&name);
        fs::copy(path, &inside).with_context(|| format!("cannot copy hook {} into the tree", path.display()))?;
        copied = Some(dir);
        _mounts = Some(Mounts::prepare(&env.tree)?);
        _no_services = Some(super::chroot::NoServices::install(&env.tree)?);
        cmd = in_tree(&env.tree, &format!("/{IN_TREE_DIR}/{name}"));
        cmd.env("ATOM_ROOT", "/");
    } else {
        copied = None;
        _mounts = None;
        _no_services = None;
        cmd = Command::new(path);
        cmd.env("ATOM_ROOT", &env.tree);
        cmd.current_dir(&env.build_dir);
    }
    for (k, v) in &env.vars {
        cmd.env(k, v);
    }
    cmd.env("ATOM_STAGE", stage).env("ATOM_HOOK", when);
    let result = run_logged(&mut cmd, log, timeout).with_context(|| format!("hook {when} {stage} {}", path.display()));
    if let Some(dir) = copied {
        let _ = fs::remove_dir_all(dir);
    }
    result
}

/// SIGTERM and SIGINT while a command of `run_logged` runs: the command has a process
/// group of its own (so its time limit can kill all of it), which the signal does not
/// reach. Outside such a command the signals keep their default action.
struct Termination {
    requested: Arc<AtomicBool>,
    outside_command: Arc<AtomicBool>,
}

static TERMINATION: OnceLock<Option<Termination>> = OnceLock::new();

fn termination() -> Option<&'static Termination> {
    TERMINATION
        .get_or_init(|| {
            let t = Termination {
                requested: Arc::new(AtomicBool::new(false)),
                outside_command: Arc::new(AtomicBool::new(true)),
            };
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register_conditional_default(sig, t.outside_command.clone()).ok()?;
                signal_hook::flag::register(sig, t.requested.clone()).ok()?;
            }
            Some(t)
        })
        .as_ref()
}

/// Marks the time a command runs (signals are then the loop's to act on).
struct InCommand(Option<&'static Termination>);

impl Drop for InCommand {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            t.outside_command.store(true, Ordering::SeqCst);
        }
    }
}

/// How long a command asked to stop gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Runs `cmd` with stdout and stderr into the stage log, killing its process group after
/// `timeout`, or when atom-build itself is asked to stop (SIGTERM, SIGINT). The command
/// also dies if atom-build is killed outright.
pub fn run_logged(cmd: &mut Command, log: &StageLog, timeout: Duration) -> Result<()> {
    let shown = format!("{cmd:?}");
    log.note(&format!("running {shown}"));
    cmd.stdin(Stdio::null())
        .stdout(log.stdio()?)
        .stderr(log.stdio()?)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let term = termination();
    if let Some(t) = term {
        t.outside_command.store(false, Ordering::SeqCst);
    }
    let _in_command = InCommand(term);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {shown} (is it installed?)"))?;
    let started = Instant::now();
    loop {
        let stop = term.is_some_and(|t| t.requested.load(Ordering::SeqCst));
        if let Some(status) = child.try_wait()? {
            if stop {
                bail!("stopped by a signal while {shown} ran");
            }
            if status.success() {
                return Ok(());
            }
            bail!("{shown} failed ({status})");
        }
        if stop {
            let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
            let asked = Instant::now();
            while child.try_wait()?.is_none() && asked.elapsed() < STOP_GRACE {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            log.note(&format!("{shown} stopped: atom-build was asked to stop"));
            bail!("stopped by a signal while {shown} ran");
        }
        if started.elapsed() > timeout {
            let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            bail!(
                "{shown} did not finish within {} and was killed",
                humantime::format_duration(timeout)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A command inside the tree (chroot, with /proc, /sys and /dev).
pub fn in_tree(tree: &Path, program: &str) -> Command {
    let mut cmd = Command::new("chroot");
    cmd.arg(tree).arg(program);
    cmd.env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    cmd
}

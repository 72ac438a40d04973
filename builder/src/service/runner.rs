//! One attempt of a build, the same for the service's own workers and for remote ones:
//! `atom-build build` as a child in a process group of its own (the build makes its own
//! mount namespace), its log and stage events followed, the lease renewed while it runs
//! through a [`Holder`], and the child stopped when the build is no longer ours.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sha2::Digest as _;
use tokio::sync::watch;

use super::model::{Artifact, BuildSpec};
use crate::build::progress::StageEvent;

/// Lines of a failed build's log kept with it (and sent in its notices).
pub const TAIL_LINES: usize = 30;
/// How long a stopped build gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Whoever holds the build's lease: the queue itself (a local worker) or the service
/// over HTTP (a remote worker).
pub trait Holder {
    /// Renews the lease and hands on the new stage events (and, remotely, the log so
    /// far). `Ok(false)`: the build is no longer ours (cancelled, or the lease was lost).
    async fn renew(&mut self, events: Vec<StageEvent>) -> Result<bool>;
    /// The worker stops: the build goes back to the queue.
    async fn give_back(&mut self, reason: &str) -> Result<()>;
    async fn succeeded(&mut self, out: &Path, artifacts: Vec<Artifact>) -> Result<()>;
    async fn failed(&mut self, error: &str, tail: &str) -> Result<()>;
    /// What the build is now, for the log line of a build taken from us.
    async fn state_now(&mut self) -> String;
}

/// One attempt of one build.
pub struct Job<'a> {
    /// The `atom-build` program.
    pub builder: &'a Path,
    /// The build's directory: its log, events, pid file and `build/`.
    pub dir: PathBuf,
    pub recipe: PathBuf,
    pub spec: &'a BuildSpec,
    pub cache: &'a Path,
    pub attempt: i64,
    pub worker: &'a str,
    /// How often the lease is renewed.
    pub tick: Duration,
}

impl Job<'_> {
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("build.log")
    }
}

/// How a build's child ended.
enum Ended {
    Exited(ExitStatus),
    /// The build is no longer this worker's (cancelled, or the lease was lost).
    Taken,
    /// The worker is stopping.
    Stopping,
}

/// Runs the attempt to its end and tells the holder how it ended. An error means the
/// attempt could not be run or reported (the caller fails the build if it can).
pub async fn run(job: &Job<'_>, holder: &mut impl Holder, stop: &mut watch::Receiver<bool>) -> Result<()> {
    let dir = &job.dir;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log_path = job.log_path();
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let log_start = log.seek(SeekFrom::End(0))?;
    writeln!(
        log,
        "=== attempt {} on worker {}, {} ===",
        job.attempt,
        job.worker,
        jiff::Timestamp::now().round(jiff::Unit::Second)?
    )?;
    let events = dir.join(format!("events-{}.jsonl", job.attempt));
    let _ = fs::remove_file(&events);
    let mut cmd = tokio::process::Command::new(job.builder);
    cmd.arg("build")
        .arg(&job.recipe)
        .arg("--build-dir")
        .arg(dir.join("build"))
        .arg("--cache")
        .arg(job.cache)
        .arg("--events")
        .arg(&events);
    for s in &job.spec.set {
        cmd.arg("--set").arg(s);
    }
    for s in &job.spec.skip {
        cmd.arg("--skip").arg(s);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        .env("RUST_LOG", "info")
        .process_group(0);
    // The build dies with its worker (a killed worker leaves no build writing into a
    // directory the next attempt uses).
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", job.builder.display()))?;
    let pid = child.id().context("the build exited at once")?;
    // Whatever fails from here on, no build goes on without its worker.
    let result: Result<()> = async {
        fs::write(dir.join("pid"), pid.to_string())?;
        let mut follower = EventFollower::new(events);
        let ended = loop {
            tokio::select! {
                status = child.wait() => break Ended::Exited(status?),
                _ = tokio::time::sleep(job.tick) => {
                    match holder.renew(follower.read_new()).await {
                        Ok(true) => {}
                        Ok(false) => break Ended::Taken,
                        // The queue is unreachable: keep building; if the lease runs out
                        // meanwhile, the next renewal says so.
                        Err(e) => tracing::warn!(worker = job.worker, "cannot renew the lease: {e:#}"),
                    }
                }
                _ = stop.changed() => break Ended::Stopping,
            }
        };
        if !matches!(ended, Ended::Exited(_)) {
            stop_child(pid, &mut child).await;
        }
        let _ = fs::remove_file(dir.join("pid"));
        match ended {
            Ended::Taken => {
                let now = holder.state_now().await;
                writeln!(log, "=== stopped: the build is {now} ===")?;
                tracing::info!(worker = job.worker, "build stopped: no longer this worker's");
            }
            Ended::Stopping => {
                writeln!(
                    log,
                    "=== stopped: the worker is stopping; the build goes back to the queue ==="
                )?;
                holder.renew(follower.read_new()).await?;
                holder
                    .give_back("its worker stopped during the build; queued again")
                    .await?;
            }
            Ended::Exited(status) if status.success() => {
                holder.renew(follower.read_new()).await?;
                let out = dir.join("build").join("out");
                let listed = out.clone();
                let artifacts = tokio::task::spawn_blocking(move || list_artifacts(&listed)).await??;
                writeln!(log, "=== succeeded: {} artifacts ===", artifacts.len())?;
                let n = artifacts.len();
                holder.succeeded(&out, artifacts).await?;
                tracing::info!(worker = job.worker, artifacts = n, "build succeeded");
            }
            Ended::Exited(status) => {
                holder.renew(follower.read_new()).await?;
                let (error, tail) = failure_of(&log_path, log_start, status);
                writeln!(log, "=== failed: {error} ===")?;
                holder.failed(&error, &tail).await?;
                tracing::warn!(worker = job.worker, "build failed: {error}");
            }
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        stop_child(pid, &mut child).await;
    }
    result
}

async fn stop_child(pid: u32, child: &mut tokio::process::Child) {
    let group = Pid::from_raw(pid as i32);
    let _ = killpg(group, Signal::SIGTERM);
    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait().await;
    }
    // What the build started in its group and left behind.
    let _ = killpg(group, Signal::SIGKILL);
}

/// The error line of a failed build and the last lines of this attempt's log.
fn failure_of(log: &Path, from: u64, status: ExitStatus) -> (String, String) {
    let mut bytes = Vec::new();
    if let Ok(mut f) = File::open(log) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.read_to_end(&mut bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let error = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("atom-build: error: "))
        .map(str::to_string)
        .unwrap_or_else(|| format!("atom-build build ended with {status}"));
    let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
    (error, tail)
}

/// Every file the build left in out/, with its size and SHA-256.
pub fn list_artifacts(out: &Path) -> Result<Vec<Artifact>> {
    let mut list = Vec::new();
    for e in fs::read_dir(out).with_context(|| format!("cannot read {}", out.display()))? {
        let e = e?;
        if !e.file_type()?.is_file() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        // Uploads in progress (remote workers) are not artifacts yet.
        if name.starts_with('.') {
            continue;
        }
        let mut f = File::open(e.path())?;
        let mut h = sha2::Sha256::new();
        let size = std::io::copy(&mut f, &mut h)?;
        list.push(Artifact {
            name,
            size,
            sha256: hex::encode(h.finalize()),
        });
    }
    list.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(list)
}

/// Reads the child's `--events` file as it grows.
struct EventFollower {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl EventFollower {
    fn new(path: PathBuf) -> EventFollower {
        EventFollower {
            path,
            offset: 0,
            partial: String::new(),
        }
    }

    fn read_new(&mut self) -> Vec<StageEvent> {
        let Ok(mut f) = File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut more = String::new();
        let Ok(n) = f.read_to_string(&mut more) else {
            return Vec::new();
        };
        self.offset += n as u64;
        self.partial.push_str(&more);
        let mut out = Vec::new();
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            match serde_json::from_str::<StageEvent>(line.trim()) {
                Ok(e) => out.push(e),
                Err(e) => tracing::warn!("an unreadable build event {line:?}: {e}"),
            }
        }
        out
    }
}

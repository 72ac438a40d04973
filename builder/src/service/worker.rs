//! The local workers: each leases the oldest queued build, runs `atom-build build` for it
//! as a child in a process group of its own (the build makes its own mount namespace),
//! follows the child's stage events into the database, and renews the lease while the
//! child runs. A build it no longer holds (cancelled, or its lease lost) is stopped.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sha2::Digest as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::App;
use super::db::now;
use super::model::{Artifact, BuildRow, BuildSpec, BuildState};
use super::order;
use crate::build::progress::StageEvent;

/// Lines of a failed build's log kept with it (and sent in its notices).
pub const TAIL_LINES: usize = 30;
/// How long a stopped build gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Before the workers start: what this instance was running when it stopped has no
/// worker now. Leftover build processes are killed, then those builds are queued again
/// or, out of attempts, failed with the reason.
pub async fn recover(app: &App) -> Result<()> {
    for id in app.db.running_on(&app.instance).await? {
        kill_leftover(&app.build_dir(&id));
    }
    let released = app.db.release_instance(&app.instance).await?;
    let (requeued, failed) = app.db.reap(app.max_attempts).await?;
    if released > 0 {
        tracing::warn!(
            released,
            requeued = requeued.len(),
            failed = failed.len(),
            "builds were running when this instance stopped"
        );
    }
    Ok(())
}

pub fn start(app: Arc<App>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    (1..=app.workers)
        .map(|n| {
            let id = format!("{}-w{n}", app.instance);
            tokio::spawn(worker_loop(app.clone(), id, stop.clone()))
        })
        .collect()
}

/// Settles builds whose worker vanished (on any instance), every half lease.
pub async fn reaper(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let every = (app.lease / 2).max(Duration::from_millis(500));
    loop {
        match app.db.reap(app.max_attempts).await {
            Ok((requeued, failed)) => {
                for id in &requeued {
                    tracing::warn!(build = %id, "its worker stopped renewing the lease: queued again");
                }
                for id in &failed {
                    tracing::warn!(build = %id, "its worker stopped renewing the lease on the last attempt: failed");
                }
            }
            Err(e) => tracing::warn!("cannot settle lost builds: {e:#}"),
        }
        let _ = app.db.instance_seen(&app.instance, &app.public_url).await;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn worker_loop(app: Arc<App>, id: String, mut stop: watch::Receiver<bool>) {
    let idle = Duration::from_millis(500);
    let mut warned_space = false;
    while !*stop.borrow() {
        let _ = app.db.worker_seen(&id, &app.instance, None).await;
        if let Some(free) = super::housekeeping::free_space(&app.data)
            && free < app.min_free
        {
            if !warned_space {
                tracing::warn!(
                    worker = %id,
                    free,
                    min_free = app.min_free,
                    "too little free space in the data directory: no build starts until there is more"
                );
                warned_space = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(idle * 4) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        warned_space = false;
        match app.db.claim(&id, &app.instance, lease_end(&app)).await {
            Ok(Some(build)) => {
                let build_id = build.id.clone();
                tracing::info!(build = %build_id, worker = %id, attempt = build.attempts, "build started");
                if let Err(e) = run_build(&app, &id, build, &mut stop).await {
                    tracing::error!(build = %build_id, "the worker could not run the build: {e:#}");
                    let msg = format!("the service could not run the build: {}", crate::said_once(&e));
                    let _ = app
                        .db
                        .finish(&build_id, &id, BuildState::Failed, Some(&msg), None, &[])
                        .await;
                }
            }
            Ok(None) => {
                tokio::select! {
                    _ = tokio::time::sleep(idle) => {}
                    _ = stop.changed() => {}
                }
            }
            Err(e) => {
                tracing::warn!(worker = %id, "cannot reach the queue: {e:#}");
                tokio::time::sleep(idle * 4).await;
            }
        }
    }
}

fn lease_end(app: &App) -> i64 {
    now() + app.lease.as_secs().max(1) as i64
}

/// How a build's child ended.
enum Ended {
    Exited(ExitStatus),
    /// The build is no longer this worker's (cancelled, or the lease was lost).
    Taken,
    /// The service is stopping.
    Stopping,
}

async fn run_build(app: &App, worker: &str, b: BuildRow, stop: &mut watch::Receiver<bool>) -> Result<()> {
    let spec: BuildSpec = serde_json::from_str(&b.spec).context("the build's spec in the database")?;
    let dir = app.build_dir(&b.id);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log_path = dir.join("build.log");
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let log_start = log.seek(SeekFrom::End(0))?;
    writeln!(
        log,
        "=== attempt {} on worker {worker}, {} ===",
        b.attempts,
        jiff::Timestamp::now().round(jiff::Unit::Second)?
    )?;
    let events = dir.join(format!("events-{}.jsonl", b.attempts));
    let _ = fs::remove_file(&events);
    let mut cmd = tokio::process::Command::new(&app.builder);
    let recipe = order::keep_recipe(app, &spec).context("cannot write the order's recipe")?;
    cmd.arg("build")
        .arg(recipe)
        .arg("--build-dir")
        .arg(dir.join("build"))
        .arg("--cache")
        .arg(&app.cache)
        .arg("--events")
        .arg(&events);
    for s in &spec.set {
        cmd.arg("--set").arg(s);
    }
    for s in &spec.skip {
        cmd.arg("--skip").arg(s);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        .env("RUST_LOG", "info")
        .process_group(0);
    // The build dies with the service (a killed service leaves no build writing into a
    // directory the next attempt uses).
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", app.builder.display()))?;
    let pid = child.id().context("the build exited at once")?;
    // Whatever fails from here on, no build goes on without its worker.
    let result: Result<()> = async {
        fs::write(dir.join("pid"), pid.to_string())?;
        let mut follower = EventFollower::new(events);
        let tick = (app.lease / 4).clamp(Duration::from_millis(200), Duration::from_secs(1));
        let ended = loop {
            tokio::select! {
                status = child.wait() => break Ended::Exited(status?),
                _ = tokio::time::sleep(tick) => {
                    follower.forward(app, worker, &b).await;
                    match app.db.heartbeat(&b.id, worker, lease_end(app)).await {
                        Ok(true) => {}
                        Ok(false) => break Ended::Taken,
                        // The queue is unreachable: keep building; if the lease runs out
                        // meanwhile, the next heartbeat says so.
                        Err(e) => tracing::warn!(build = %b.id, "cannot renew the lease: {e:#}"),
                    }
                    let _ = app.db.worker_seen(worker, &app.instance, Some(&b.id)).await;
                }
                _ = stop.changed() => break Ended::Stopping,
            }
        };
        if !matches!(ended, Ended::Exited(_)) {
            stop_child(pid, &mut child).await;
        }
        follower.forward(app, worker, &b).await;
        let _ = fs::remove_file(dir.join("pid"));
        match ended {
            Ended::Taken => {
                let now_state = app.db.build(&b.id).await?.map(|b| b.state);
                writeln!(
                    log,
                    "=== stopped: the build is {} ===",
                    now_state.map(|s| s.as_str()).unwrap_or("gone")
                )?;
                tracing::info!(build = %b.id, "build stopped: no longer this worker's");
            }
            Ended::Stopping => {
                writeln!(
                    log,
                    "=== stopped: the service is stopping; the build goes back to the queue ==="
                )?;
                app.db
                    .requeue(&b.id, worker, "the service stopped during the build; queued again")
                    .await?;
            }
            Ended::Exited(status) if status.success() => {
                let out = dir.join("build").join("out");
                let artifacts = tokio::task::spawn_blocking(move || list_artifacts(&out)).await??;
                writeln!(log, "=== succeeded: {} artifacts ===", artifacts.len())?;
                app.db
                    .finish(&b.id, worker, BuildState::Succeeded, None, None, &artifacts)
                    .await?;
                tracing::info!(build = %b.id, artifacts = artifacts.len(), "build succeeded");
            }
            Ended::Exited(status) => {
                let (error, tail) = failure_of(&log_path, log_start, status);
                writeln!(log, "=== failed: {error} ===")?;
                app.db
                    .finish(&b.id, worker, BuildState::Failed, Some(&error), Some(&tail), &[])
                    .await?;
                tracing::warn!(build = %b.id, "build failed: {error}");
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

/// The build process group a crashed run of the service left (its pid file names the
/// group's leader). A live leader must be our build (its command line names the build's
/// directory: a reused pid is never hit); a dead leader's group id cannot have been
/// handed to another process while members of the group live (POSIX), so what is left
/// of it (hooks, their children) is ours.
fn kill_leftover(dir: &Path) {
    let Some(pid) = fs::read_to_string(dir.join("pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return;
    };
    let ours = match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let wanted = dir.join("build");
            cmdline
                .split(|b| *b == 0)
                .any(|arg| Path::new(std::ffi::OsStr::from_bytes(arg)) == wanted)
        }
        Err(_) => true,
    };
    if ours && killpg(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
        tracing::warn!(pid, dir = %dir.display(), "killed what a build left by the last run of the service still ran");
    }
    let _ = fs::remove_file(dir.join("pid"));
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
fn list_artifacts(out: &Path) -> Result<Vec<Artifact>> {
    let mut list = Vec::new();
    for e in fs::read_dir(out).with_context(|| format!("cannot read {}", out.display()))? {
        let e = e?;
        if !e.file_type()?.is_file() {
            continue;
        }
        let path = e.path();
        let mut f = File::open(&path)?;
        let mut h = sha2::Sha256::new();
        let size = std::io::copy(&mut f, &mut h)?;
        list.push(Artifact {
            name: e.file_name().to_string_lossy().into_owned(),
            size,
            sha256: hex::encode(h.finalize()),
        });
    }
    list.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(list)
}

/// Reads the child's `--events` file as it grows and moves each event into the database:
/// the current stage, and the stage durations the ETAs are made of.
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

    async fn forward(&mut self, app: &App, worker: &str, b: &BuildRow) {
        for e in self.read_new() {
            let result = if e.event == "start" {
                app.db.progress(&b.id, worker, &e.stage, e.index as i64 + 1).await
            } else {
                let done = app.db.progress(&b.id, worker, &e.stage, e.index as i64 + 1).await;
                done.and(
                    app.db
                        .record_stage(&b.id, &b.recipe_name, &e.stage, &e.event, e.seconds)
                        .await,
                )
            };
            if let Err(err) = result {
                tracing::warn!(build = %b.id, "cannot record the build's progress: {err:#}");
            }
        }
    }
}

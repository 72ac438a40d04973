//! The local workers: each leases the oldest queued build from the queue and runs it
//! (`runner`), holding the lease in the database directly. Also what settles builds
//! whose worker vanished, here or on another machine.

use std::fs;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::App;
use super::db::now;
use super::model::{Artifact, BuildRow, BuildSpec, BuildState};
use super::order;
use super::runner::{self, Holder, Job};
use crate::build::progress::StageEvent;

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

/// When a lease taken or renewed now ends.
pub(super) fn lease_end(app: &App) -> i64 {
    now() + app.lease.as_secs().max(1) as i64
}

/// How often a worker renews a lease of `lease`: a quarter of it, 0.2 s to 1 s here
/// (short leases in tests), at most a quarter remotely.
pub fn renew_every(lease: Duration) -> Duration {
    (lease / 4).clamp(Duration::from_millis(200), Duration::from_secs(1))
}

/// A local worker's lease: held in the queue directly.
struct LocalHolder<'a> {
    app: &'a App,
    build: BuildRow,
    worker: &'a str,
}

impl Holder for LocalHolder<'_> {
    async fn renew(&mut self, events: Vec<StageEvent>) -> Result<bool> {
        if let Err(e) = self.app.db.stage_events(&self.build, self.worker, &events).await {
            tracing::warn!(build = %self.build.id, "cannot record the build's progress: {e:#}");
        }
        let _ = self
            .app
            .db
            .worker_seen(self.worker, &self.app.instance, Some(&self.build.id))
            .await;
        self.app
            .db
            .heartbeat(&self.build.id, self.worker, lease_end(self.app))
            .await
    }

    async fn give_back(&mut self, reason: &str) -> Result<()> {
        self.app.db.requeue(&self.build.id, self.worker, reason).await?;
        Ok(())
    }

    async fn succeeded(&mut self, _out: &Path, artifacts: Vec<Artifact>) -> Result<()> {
        self.app
            .db
            .finish(
                &self.build.id,
                self.worker,
                BuildState::Succeeded,
                None,
                None,
                &artifacts,
            )
            .await?;
        Ok(())
    }

    async fn failed(&mut self, error: &str, tail: &str) -> Result<()> {
        self.app
            .db
            .finish(
                &self.build.id,
                self.worker,
                BuildState::Failed,
                Some(error),
                Some(tail),
                &[],
            )
            .await?;
        Ok(())
    }

    async fn state_now(&mut self) -> String {
        match self.app.db.build(&self.build.id).await {
            Ok(Some(b)) => b.state.as_str().to_string(),
            _ => "gone".into(),
        }
    }
}

async fn run_build(app: &App, worker: &str, b: BuildRow, stop: &mut watch::Receiver<bool>) -> Result<()> {
    let spec: BuildSpec = serde_json::from_str(&b.spec).context("the build's spec in the database")?;
    let recipe = order::keep_recipe(&app.templates, &app.data, &spec).context("cannot write the order's recipe")?;
    let job = Job {
        builder: &app.builder,
        dir: app.build_dir(&b.id),
        recipe,
        spec: &spec,
        cache: &app.cache,
        attempt: b.attempts,
        worker,
        tick: renew_every(app.lease),
    };
    let mut holder = LocalHolder { app, build: b, worker };
    runner::run(&job, &mut holder, stop).await
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

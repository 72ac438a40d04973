//! `atom-build serve`: the online image builder. Orders (a template of the service plus
//! overrides, or a whole recipe for trusted tokens) are queued in a database; local
//! workers lease builds, run `atom-build build` in a directory and mount namespace of their
//! own, and keep the lease alive with heartbeats; orders with the same digest (the
//! recipe's last stage key, which covers every input) share one build.
//!
//! - `db`: the one query layer (SQLite or PostgreSQL)
//! - `model`: tokens, orders, builds, artifacts
//! - `order`: an order's request checked and turned into a build's spec and digest
//! - `eta`: stage durations of past builds into queue positions and ready times
//! - `runner`: one attempt of a build (the child `atom-build build`), local or remote
//! - `worker`: the local workers, and the reaper of builds whose worker vanished
//! - `housekeeping`: expiry of finished builds' files, the free-space floor
//! - `notices`: the webhook and mails of an order whose build ended, retried with backoff;
//!   `mail`: the mail itself and its SMTP relay
//! - `api`: the HTTP API; `web`: the web page on the same port
//! - `worker_api`: the HTTP API remote workers use; `remote`: `atom-build worker`, the
//!   remote worker itself
//! - `auth`, `tokens`: API tokens and the admin command that makes them

pub mod api;
pub mod auth;
pub mod db;
pub mod eta;
pub mod housekeeping;
pub mod mail;
pub mod model;
pub mod notices;
pub mod order;
pub mod remote;
pub(crate) mod runner;
pub mod tokens;
pub mod web;
pub mod worker;
pub mod worker_api;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;

use self::db::Db;
use crate::cli::ServeArgs;

/// What every handler and worker shares.
pub struct App {
    pub db: Db,
    pub instance: String,
    pub data: PathBuf,
    pub templates: PathBuf,
    pub cache: PathBuf,
    pub workers: usize,
    pub lease: Duration,
    pub max_attempts: i64,
    pub overridable: Vec<String>,
    pub public_url: String,
    pub max_image_size: u64,
    pub expire_after: Duration,
    /// Workers take no build while the data directory has less free space.
    pub min_free: u64,
    /// The program the workers run (`atom-build build`): this one.
    pub builder: PathBuf,
    /// Set when the service stops (followed logs end then).
    pub stopping: watch::Receiver<bool>,
    /// One order at a time per token between its limit check and its insert.
    pub order_locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Order checks (recipe loads, file hashing) at once.
    pub checks: tokio::sync::Semaphore,
    /// How much of each remote attempt's log (build, attempt) this instance has written.
    pub remote_logs: std::sync::Mutex<std::collections::HashMap<(String, i64), u64>>,
    /// The SMTP relay of e-mail notices (`--smtp`).
    pub mailer: Option<mail::Mailer>,
}

impl App {
    /// The directory of a build: its log, events and `atom-build build` directory.
    pub fn build_dir(&self, id: &str) -> PathBuf {
        self.data.join("builds").join(id)
    }

    /// The largest file a remote worker may upload: a disk of the largest image, in any
    /// format, with room to spare.
    pub fn max_artifact_size(&self) -> u64 {
        self.max_image_size.saturating_mul(4).max(64 << 30)
    }
}

/// The service's default database: SQLite in the data directory.
pub fn default_database(data: &Path) -> String {
    format!("sqlite:{}", data.join("service.db").display())
}

/// Workers when `--workers` is not given: a build wants about a core and 2 GiB.
pub fn default_workers() -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| (kib >> 20) as usize)
        .unwrap_or(2);
    cores.min(mem_gib / 2).max(1)
}

/// An id for this instance, kept in its data directory across restarts: the builds it
/// was running when it stopped are found by it.
fn instance_id(data: &Path) -> Result<String> {
    let path = data.join("instance-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = db::random_id(6);
            atom_dist::fsutil::write_atomic_bytes(&path, 0o644, id.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(id)
        }
    }
}

/// Runs the service's or a remote worker's main future on a runtime of its own.
fn block_on<F: std::future::Future<Output = Result<()>>>(main: F) -> Result<()> {
    // reqwest (notices, remote workers) comes without a TLS crypto provider in this
    // workspace: ring's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(main)
}

/// Creates the data directory with its builds/, readable by root only: logs, recipes
/// and artifacts are the orders' owners' business only.
fn private_data_dir(data: &Path) -> Result<()> {
    std::fs::create_dir_all(data.join("builds"))
        .with_context(|| format!("cannot create the data directory {}", data.display()))?;
    std::fs::set_permissions(data, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", data.display()))
}

pub fn run(args: &ServeArgs) -> Result<()> {
    block_on(serve(args))
}

async fn serve(args: &ServeArgs) -> Result<()> {
    private_data_dir(&args.data)?;
    let url = args.database.clone().unwrap_or_else(|| default_database(&args.data));
    let db = Db::open(&url).await?;
    let instance = instance_id(&args.data)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    let public_url = args.public_url.clone().unwrap_or_else(|| format!("http://{addr}"));
    db.instance_seen(&instance, &public_url).await?;
    let mailer = match &args.smtp {
        Some(url) => Some(mail::Mailer::new(url, args.mail_from.as_deref())?),
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = Arc::new(App {
        db,
        instance,
        data: args.data.clone(),
        templates: args.templates.clone(),
        cache: args.cache.clone(),
        workers: args.workers.unwrap_or_else(default_workers),
        lease: args.lease,
        max_attempts: i64::from(args.max_attempts.max(1)),
        overridable: args.overridable.clone(),
        public_url,
        max_image_size: args.max_image_size,
        expire_after: args.expire_after,
        min_free: args.min_free,
        builder: std::env::current_exe().context("cannot find the atom-build program")?,
        stopping: stop_rx.clone(),
        order_locks: Default::default(),
        checks: tokio::sync::Semaphore::new(4),
        remote_logs: Default::default(),
        mailer,
    });
    worker::recover(&app).await?;
    let workers = worker::start(app.clone(), stop_rx.clone());
    let reaper = tokio::spawn(worker::reaper(app.clone(), stop_rx.clone()));
    let janitor = tokio::spawn(housekeeping::janitor(app.clone(), stop_rx.clone()));
    let notifier = tokio::spawn(notices::notifier(app.clone(), stop_rx.clone()));
    // Printed for scripts and tests that start the service on port 0.
    eprintln!(
        "atom-build serve: listening on http://{addr} (instance {}, {} workers)",
        app.instance, app.workers
    );
    tracing::info!(%addr, instance = %app.instance, workers = app.workers, "listening");
    if let Some(m) = &app.mailer {
        tracing::info!(relay = %m.relay, "e-mail notices go through {}", m.relay);
    }
    let router = api::router(app.clone());
    let mut stop_http = stop_rx.clone();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        let _ = stop_http.wait_for(|s| *s).await;
    });
    let signals = tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping: running builds go back to the queue");
        let _ = stop_tx.send(true);
    });
    server.await.context("the HTTP server failed")?;
    for w in workers {
        let _ = w.await;
    }
    reaper.abort();
    janitor.abort();
    notifier.abort();
    signals.abort();
    Ok(())
}

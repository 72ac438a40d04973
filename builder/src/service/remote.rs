//! `atom-build worker`: build capacity on another machine. Each job slot leases a build
//! from the service (`worker_api`), checks that this host's recipe comes to the build's
//! digest, runs it (`runner`), sends the log and stage events with every heartbeat,
//! uploads the artifacts and says how it ended. A worker that vanishes stops renewing its
//! lease; the service queues the build again for another worker.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio::sync::watch;

use super::housekeeping::free_space;
use super::model::{Artifact, Finish, GiveBack, Heartbeat, Lease, LeaseRequest};
use super::runner::{self, Holder, Job};
use super::worker::renew_every;
use crate::build::progress::StageEvent;
use crate::cli::WorkerArgs;

/// Log bytes sent with one heartbeat at most (well under the service's 1 MiB body limit,
/// JSON escapes included).
const LOG_CHUNK: u64 = 256 << 10;

/// The log bytes up to where a character may be cut off, as text of the same length in
/// bytes (an invalid byte becomes `?`), so offsets on both sides stay raw byte counts.
fn log_text(bytes: &[u8]) -> String {
    let mut cut = bytes.len();
    // A character cut by the chunk's end waits for the next heartbeat.
    for back in 1..=3.min(bytes.len()) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 != 0x80 {
            let need = match b {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => 1,
            };
            if need > back {
                cut = bytes.len() - back;
            }
            break;
        }
    }
    let mut text = String::with_capacity(cut);
    for chunk in bytes[..cut].utf8_chunks() {
        text.push_str(chunk.valid());
        text.extend(std::iter::repeat_n('?', chunk.invalid().len()));
    }
    text
}

/// A build id of the service (16 hex digits): safe as a directory name.
fn valid_build_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What every job slot of the worker shares.
struct Worker {
    http: reqwest::Client,
    server: String,
    token: String,
    name: String,
    data: PathBuf,
    templates: PathBuf,
    cache: PathBuf,
    min_free: u64,
    builder: PathBuf,
}

impl Worker {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server)
    }

    async fn post<T: serde::Serialize>(&self, path: &str, body: &T) -> Result<reqwest::Response> {
        self.http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.server))
    }
}

/// The token: from --token-file, or ATOM_BUILD_TOKEN (never on the command line, where
/// every user of the host could read it).
fn read_token(args: &WorkerArgs) -> Result<String> {
    let token = match &args.token_file {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read the token file {}", p.display()))?,
        None => std::env::var("ATOM_BUILD_TOKEN")
            .map_err(|_| anyhow::anyhow!("give the worker's token: --token-file FILE or ATOM_BUILD_TOKEN"))?,
    };
    let token = token.trim().to_string();
    if !token.starts_with(super::auth::PREFIX) {
        bail!("the token does not look like one of the service's (atb_…)");
    }
    Ok(token)
}

fn default_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| {
            h.chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
                .collect()
        })
        .unwrap_or_else(|| "worker".into())
}

pub fn run(args: &WorkerArgs) -> Result<()> {
    super::block_on(work(args))
}

async fn work(args: &WorkerArgs) -> Result<()> {
    let token = read_token(args)?;
    let server = args.server.trim_end_matches('/').to_string();
    if !(server.starts_with("http://") || server.starts_with("https://")) {
        bail!("--server {server:?}: give the service's URL (http://HOST:PORT or https://…)");
    }
    super::private_data_dir(&args.data)?;
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(120))
        .build()
        .context("cannot make an HTTP client")?;
    let w = Arc::new(Worker {
        http,
        server,
        token,
        name: args.name.clone().unwrap_or_else(default_name),
        data: args.data.clone(),
        templates: args.templates.clone(),
        cache: args.cache.clone(),
        min_free: args.min_free,
        builder: std::env::current_exe().context("cannot find the atom-build program")?,
    });
    let jobs = args.jobs.unwrap_or_else(super::default_workers).max(1);
    let (stop_tx, stop_rx) = watch::channel(false);
    eprintln!("atom-build worker: {} job slots for {} as {}", jobs, w.server, w.name);
    tracing::info!(server = %w.server, name = %w.name, jobs, "worker started");
    let slots: Vec<_> = (1..=jobs)
        .map(|n| tokio::spawn(slot_loop(w.clone(), format!("{}-{n}", w.name), stop_rx.clone())))
        .collect();
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("cannot handle SIGTERM")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping: running builds go back to the queue");
    let _ = stop_tx.send(true);
    for s in slots {
        let _ = s.await;
    }
    Ok(())
}

async fn slot_loop(w: Arc<Worker>, slot: String, mut stop: watch::Receiver<bool>) {
    let mut wait = Duration::from_secs(1);
    while !*stop.borrow() {
        if free_space(&w.data).is_some_and(|f| f < w.min_free) {
            tracing::warn!(%slot, "too little free space in the data directory: no build starts until there is more");
            wait = Duration::from_secs(10);
        } else {
            match lease(&w, &slot).await {
                Ok(Some(lease)) => {
                    let id = lease.build.clone();
                    tracing::info!(build = %id, %slot, attempt = lease.attempt, "build leased");
                    if let Err(e) = run_leased(&w, &slot, lease, &mut stop).await {
                        tracing::error!(build = %id, "the worker could not run the build: {e:#}");
                    }
                    let _ = std::fs::remove_dir_all(w.data.join("builds").join(&id));
                    wait = Duration::from_millis(100);
                }
                Ok(None) => wait = Duration::from_secs(1),
                Err(e) => {
                    tracing::warn!(%slot, "cannot lease a build: {e:#}");
                    wait = (wait * 2).clamp(Duration::from_secs(2), Duration::from_secs(30));
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
    }
}

async fn lease(w: &Worker, slot: &str) -> Result<Option<Lease>> {
    let r = w
        .post(
            "/v1/worker/lease",
            &LeaseRequest {
                worker: slot.to_string(),
            },
        )
        .await?;
    match r.status() {
        StatusCode::NO_CONTENT => Ok(None),
        StatusCode::OK => Ok(Some(r.json().await.context("the service's lease")?)),
        s => bail!("the service answered {s}: {}", r.text().await.unwrap_or_default()),
    }
}

/// This host's copy of the build's recipe.
fn recipe_here(w: &Worker, lease: &Lease) -> Result<PathBuf> {
    match (&lease.spec.template, &lease.spec.recipe) {
        (Some(t), _) => {
            if !super::order::valid_template_name(t) {
                bail!("the service leased a build of the template {t:?}, which is not a name");
            }
            let path = w.templates.join(format!("{t}.toml"));
            if !path.is_file() {
                bail!(
                    "this worker has no template {t:?} ({}): give it the service's templates",
                    path.display()
                );
            }
            Ok(path)
        }
        (None, Some(_)) => Ok(super::order::keep_recipe(&w.templates, &w.data, &lease.spec)?),
        (None, None) => bail!("the lease names no recipe"),
    }
}

async fn run_leased(w: &Arc<Worker>, slot: &str, lease: Lease, stop: &mut watch::Receiver<bool>) -> Result<()> {
    if !valid_build_id(&lease.build) {
        bail!(
            "the service leased a build with the id {:?}, which is not one",
            lease.build
        );
    }
    let dir = w.data.join("builds").join(&lease.build);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tick = renew_every(Duration::from_secs(lease.lease_seconds));
    let mut holder = RemoteHolder {
        w: w.clone(),
        slot,
        tick,
        build: lease.build.clone(),
        attempt: lease.attempt,
        log: dir.join("build.log"),
        sent: 0,
        pending: Vec::new(),
        last_state: "gone".into(),
    };
    // The same inputs as the service's, or the build would be another one than ordered.
    let checked = match recipe_here(w, &lease) {
        Ok(recipe) => {
            let (r, spec, cache) = (recipe.clone(), lease.spec.clone(), w.cache.clone());
            let digest = tokio::task::spawn_blocking(move || {
                crate::build::preview(&r, &spec.set, &spec.skip, &cache).map(|p| p.digest().to_string())
            })
            .await?;
            match digest {
                Ok(d) if d == lease.digest => Ok(recipe),
                Ok(d) => Err(format!(
                    "worker {slot}: its recipe comes to digest {d}, the service's to {}: the worker's templates or their files differ from the service's",
                    lease.digest
                )),
                Err(e) => Err(format!("worker {slot}: {}", crate::said_once(&e))),
            }
        }
        Err(e) => Err(format!("worker {slot}: {}", crate::said_once(&e))),
    };
    let recipe = match checked {
        Ok(r) => r,
        Err(msg) => {
            std::fs::write(
                &holder.log,
                format!("=== attempt {} on worker {slot}: {msg} ===\n", lease.attempt),
            )?;
            tracing::error!(build = %lease.build, "{msg}");
            return holder.failed(&msg, "").await;
        }
    };
    let job = Job {
        builder: &w.builder,
        dir,
        recipe,
        spec: &lease.spec,
        cache: &w.cache,
        attempt: lease.attempt,
        worker: slot,
        tick,
    };
    let result = runner::run(&job, &mut holder, stop).await;
    if let Err(e) = &result {
        // Said to the service, or the build would wait out its lease and run again here.
        let msg = format!("worker {slot}: {}", crate::said_once(e));
        let _ = holder.failed(&msg, "").await;
    }
    result
}

/// A remote worker's lease: held by the service over HTTP.
struct RemoteHolder<'a> {
    w: Arc<Worker>,
    slot: &'a str,
    tick: Duration,
    build: String,
    attempt: i64,
    log: PathBuf,
    /// Log bytes the service has.
    sent: u64,
    /// Stage events not yet taken by the service.
    pending: Vec<StageEvent>,
    last_state: String,
}

impl RemoteHolder<'_> {
    async fn log_from(&self, offset: u64) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        let Ok(mut f) = tokio::fs::File::open(&self.log).await else {
            return Ok(buf);
        };
        f.seek(std::io::SeekFrom::Start(offset)).await?;
        f.take(LOG_CHUNK).read_to_end(&mut buf).await?;
        Ok(buf)
    }

    /// One heartbeat with what is new: Ok(false) when the build is not ours any more.
    async fn beat(&mut self) -> Result<bool> {
        let bytes = self.log_from(self.sent).await?;
        let text = log_text(&bytes);
        let consumed = text.len() as u64;
        let hb = Heartbeat {
            worker: self.slot.to_string(),
            attempt: self.attempt,
            events: self.pending.clone(),
            log_offset: self.sent,
            log: text,
        };
        let r = self
            .w
            .post(&format!("/v1/worker/builds/{}/heartbeat", self.build), &hb)
            .await?;
        match r.status() {
            StatusCode::OK => {
                self.pending.clear();
                self.sent += consumed;
                Ok(true)
            }
            // Refused for good (taken, revoked, too large…): the build is not ours to go on with.
            s if s.is_client_error() && s != StatusCode::REQUEST_TIMEOUT && s != StatusCode::TOO_MANY_REQUESTS => {
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                self.last_state = format!(
                    "refused by the service ({s}): {}",
                    v["message"].as_str().unwrap_or("gone")
                );
                Ok(false)
            }
            s => bail!("the service answered {s}: {}", r.text().await.unwrap_or_default()),
        }
    }

    /// Sends the rest of the log (before the end is reported).
    async fn flush(&mut self) -> Result<bool> {
        loop {
            let size = tokio::fs::metadata(&self.log).await.map(|m| m.len()).unwrap_or(0);
            if !self.beat().await? {
                return Ok(false);
            }
            if self.sent >= size {
                return Ok(true);
            }
        }
    }

    /// Posts the end of the build, a few times if the service cannot be reached (a lost
    /// report costs the whole build).
    async fn report(&mut self, path: &str, body: &impl serde::Serialize) -> Result<()> {
        let mut wait = Duration::from_secs(1);
        for _ in 0..6 {
            match self.w.post(path, body).await {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => bail!(
                    "the service answered {}: {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ),
                Err(e) => tracing::warn!(build = %self.build, "{e:#}; trying again in {wait:?}"),
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
        bail!("cannot reach the service to report the build's end")
    }

    /// Heartbeats alone while something long runs (an upload), so the lease holds.
    fn keep_alive(&self) -> tokio::task::JoinHandle<()> {
        let w = self.w.clone();
        let path = format!("/v1/worker/builds/{}/heartbeat", self.build);
        let hb = Heartbeat {
            worker: self.slot.to_string(),
            attempt: self.attempt,
            events: Vec::new(),
            log_offset: self.sent,
            log: String::new(),
        };
        let every = self.tick;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = w.post(&path, &hb).await {
                    tracing::warn!("cannot renew the lease: {e:#}");
                }
            }
        })
    }

    async fn upload(&self, out: &Path, a: &Artifact) -> Result<()> {
        let alive = self.keep_alive();
        let result = self.try_upload(out, a).await;
        alive.abort();
        result
    }

    async fn try_upload(&self, out: &Path, a: &Artifact) -> Result<()> {
        let path = out.join(&a.name);
        let name = percent_encoding::utf8_percent_encode(&a.name, percent_encoding::NON_ALPHANUMERIC);
        let url = self
            .w
            .url(&format!("/v1/worker/builds/{}/artifacts/{name}", self.build));
        let mut wait = Duration::from_secs(1);
        let mut n = 0;
        loop {
            n += 1;
            let file = tokio::fs::File::open(&path)
                .await
                .with_context(|| format!("cannot open {}", path.display()))?;
            let sent = self
                .w
                .http
                .put(&url)
                .bearer_auth(&self.w.token)
                .header("x-atom-worker", self.slot)
                .header("x-atom-attempt", self.attempt.to_string())
                .header("x-atom-sha256", &a.sha256)
                .header(reqwest::header::CONTENT_LENGTH, a.size)
                .body(reqwest::Body::from(file))
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => bail!(
                    "uploading {}: the service answered {}: {}",
                    a.name,
                    r.status(),
                    r.text().await.unwrap_or_default()
                ),
                Err(e) if n < 3 => tracing::warn!(artifact = %a.name, "upload failed: {e:#}; again in {wait:?}"),
                Err(e) => return Err(e).with_context(|| format!("cannot upload {}", a.name)),
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
}

impl Holder for RemoteHolder<'_> {
    async fn renew(&mut self, events: Vec<StageEvent>) -> Result<bool> {
        self.pending.extend(events);
        self.beat().await
    }

    async fn give_back(&mut self, reason: &str) -> Result<()> {
        if self.flush().await? {
            let body = GiveBack {
                worker: self.slot.to_string(),
                reason: reason.to_string(),
            };
            self.report(&format!("/v1/worker/builds/{}/give-back", self.build), &body)
                .await?;
        }
        Ok(())
    }

    async fn succeeded(&mut self, out: &Path, artifacts: Vec<Artifact>) -> Result<()> {
        for a in &artifacts {
            if !self.beat().await? {
                return Ok(());
            }
            self.upload(out, a).await?;
        }
        if !self.flush().await? {
            return Ok(());
        }
        let body = Finish {
            worker: self.slot.to_string(),
            state: "succeeded".into(),
            error: None,
            log_tail: None,
            artifacts,
        };
        self.report(&format!("/v1/worker/builds/{}/finish", self.build), &body)
            .await
    }

    async fn failed(&mut self, error: &str, tail: &str) -> Result<()> {
        if !self.flush().await? {
            return Ok(());
        }
        let body = Finish {
            worker: self.slot.to_string(),
            state: "failed".into(),
            error: Some(error.to_string()),
            log_tail: Some(tail.to_string()),
            artifacts: Vec::new(),
        };
        self.report(&format!("/v1/worker/builds/{}/finish", self.build), &body)
            .await
    }

    async fn state_now(&mut self) -> String {
        self.last_state.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::log_text;

    #[test]
    fn log_text_keeps_byte_offsets() {
        assert_eq!(log_text(b"plain\n"), "plain\n");
        // An invalid byte is one '?'; the text is as long as the bytes it stands for.
        assert_eq!(log_text(b"a\xffb"), "a?b");
        // A character cut at the end waits; a whole one at the end goes.
        let e_acute = "\u{e9}".as_bytes();
        assert_eq!(log_text(&[b'x', e_acute[0]]), "x");
        assert_eq!(log_text(&[b'x', e_acute[0], e_acute[1]]), "x\u{e9}");
        let euro = "\u{20ac}".as_bytes();
        assert_eq!(log_text(&euro[..2]), "");
        assert_eq!(log_text(euro), "\u{20ac}");
        assert_eq!(log_text(b""), "");
    }
}

//! The API of remote workers (`atom-build worker`, tokens with the "worker" scope):
//!
//! - `POST /v1/worker/lease`: the oldest queued build this worker may run (200 with a
//!   `model::Lease`), or 204 when there is none
//! - `POST /v1/worker/builds/{id}/heartbeat`: renews the lease, with stage events and
//!   log bytes (`model::Heartbeat`); 409 when the build is no longer the worker's
//! - `PUT /v1/worker/builds/{id}/artifacts/{name}`: one artifact's bytes, with its SHA-256
//!   in `X-Atom-Sha256`, checked before the file takes its name
//! - `POST /v1/worker/builds/{id}/finish`: succeeded (the uploaded files must be the
//!   artifacts listed) or failed, with the error and the log's last lines
//! - `POST /v1/worker/builds/{id}/give-back`: the worker stops; the build is queued again
//!
//! A worker's files go to this instance (the one that leased the build), which serves
//! them to the orders' owners.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use futures_util::StreamExt as _;
use serde_json::json;
use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;

use super::App;
use super::api::{ApiError, ApiResult, Caller};
use super::db::REMOTE_PREFIX;
use super::model::{BuildRow, BuildSpec, BuildState, Finish, GiveBack, Heartbeat, Lease, LeaseRequest, TokenRow};
use super::runner;
use super::worker::lease_end;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/worker/lease", post(lease))
        .route("/v1/worker/builds/{id}/heartbeat", post(heartbeat))
        .route("/v1/worker/builds/{id}/artifacts/{name}", put(upload))
        .route("/v1/worker/builds/{id}/finish", post(finish))
        .route("/v1/worker/builds/{id}/give-back", post(give_back))
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// The queue's name of the caller's worker `name`, for tokens with the worker scope.
fn worker_id(caller: &TokenRow, name: &str) -> ApiResult<String> {
    if !caller.may("worker") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token is not a worker's (scope \"worker\")",
        ));
    }
    let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 64 || !name.chars().all(fine) {
        return Err(bad(format!(
            "worker name {name:?}: 1 to 64 letters, digits, '.', '_' or '-'"
        )));
    }
    Ok(format!("{REMOTE_PREFIX}{}:{name}", caller.name))
}

/// The build, if `worker` holds it now.
async fn held(app: &App, id: &str, worker: &str) -> ApiResult<BuildRow> {
    let build = app
        .db
        .build(id)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such build"))?;
    if build.state != BuildState::Running || build.worker.as_deref() != Some(worker) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_yours",
            format!("the build is {} and not this worker's", build.state.as_str()),
        ));
    }
    Ok(build)
}

/// The build, if `worker` holds it now in attempt `attempt`.
async fn held_attempt(app: &App, id: &str, worker: &str, attempt: i64) -> ApiResult<BuildRow> {
    let build = held(app, id, worker).await?;
    if build.attempts != attempt {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_yours",
            format!("attempt {} of the build is running, not {attempt}", build.attempts),
        ));
    }
    Ok(build)
}

async fn lease(
    State(app): State<Arc<App>>,
    Caller(caller): Caller,
    Json(req): Json<LeaseRequest>,
) -> ApiResult<Response> {
    let worker = worker_id(&caller, &req.worker)?;
    app.db.worker_seen(&worker, &app.instance, None).await?;
    let Some(b) = app.db.claim(&worker, &app.instance, lease_end(&app)).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let spec: BuildSpec = serde_json::from_str(&b.spec).map_err(anyhow::Error::from)?;
    tracing::info!(build = %b.id, %worker, attempt = b.attempts, "build leased to a remote worker");
    // The service's copy of the log gets the attempts of every worker.
    let dir = app.build_dir(&b.id);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    // What an earlier attempt left here is not this attempt's artifacts.
    let _ = tokio::fs::remove_dir_all(dir.join("build").join("out")).await;
    Ok(Json(Lease {
        build: b.id,
        attempt: b.attempts,
        digest: b.digest,
        recipe_name: b.recipe_name,
        spec,
        lease_seconds: app.lease.as_secs().max(1),
    })
    .into_response())
}

async fn heartbeat(
    State(app): State<Arc<App>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    Json(hb): Json<Heartbeat>,
) -> ApiResult<Json<serde_json::Value>> {
    let worker = worker_id(&caller, &hb.worker)?;
    let build = held_attempt(&app, &id, &worker, hb.attempt).await?;
    app.db.stage_events(&build, &worker, &hb.events).await?;
    append_log(&app, &build, hb.log_offset, hb.log.as_bytes()).await?;
    app.db.worker_seen(&worker, &app.instance, Some(&id)).await?;
    if !app.db.heartbeat(&id, &worker, lease_end(&app)).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_yours",
            "the build is no longer this worker's",
        ));
    }
    Ok(Json(json!({ "keep": true })))
}

/// Appends what a remote worker sent of its log to the service's copy. Bytes sent twice
/// (an answer lost on the way back) are written once; a gap (this instance restarted and
/// forgot how far it was) is marked.
async fn append_log(app: &App, build: &BuildRow, offset: u64, bytes: &[u8]) -> ApiResult<()> {
    let key = (build.id.clone(), build.attempts);
    let received = app
        .remote_logs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .copied();
    if bytes.is_empty() {
        return Ok(());
    }
    let end = offset
        .checked_add(bytes.len() as u64)
        .ok_or_else(|| bad("log_offset is out of range"))?;
    let mut out = Vec::new();
    match received {
        Some(r) if end <= r => return Ok(()),
        Some(r) if offset <= r => out.extend_from_slice(&bytes[(r - offset) as usize..]),
        None if offset == 0 => out.extend_from_slice(bytes),
        _ => {
            out.extend_from_slice(b"=== (part of the worker's log is missing here) ===\n");
            out.extend_from_slice(bytes);
        }
    }
    if !out.is_empty() {
        let path = app.build_dir(&build.id).join("build.log");
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        f.write_all(&out)
            .await
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    app.remote_logs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, end);
    Ok(())
}

/// An artifact's name: a plain file name, never a path or a hidden file.
fn valid_artifact_name(name: &str) -> bool {
    let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+');
    !name.is_empty() && name.len() <= 200 && !name.starts_with('.') && name.chars().all(fine)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> ApiResult<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad(format!("the {name} header is missing")))
}

async fn upload(
    State(app): State<Arc<App>>,
    Caller(caller): Caller,
    Path((id, name)): Path<(String, String)>,
    req: Request,
) -> ApiResult<StatusCode> {
    let worker = worker_id(&caller, header(req.headers(), "x-atom-worker")?)?;
    let want = header(req.headers(), "x-atom-sha256")?.to_ascii_lowercase();
    let attempt: i64 = header(req.headers(), "x-atom-attempt")?
        .parse()
        .map_err(|_| bad("X-Atom-Attempt is not a number"))?;
    held_attempt(&app, &id, &worker, attempt).await?;
    if !valid_artifact_name(&name) {
        return Err(bad(format!("{name:?} is not an artifact's file name")));
    }
    let out = app.build_dir(&id).join("build").join("out");
    tokio::fs::create_dir_all(&out)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    let part = out.join(format!(".{name}.{attempt}.upload"));
    let mut file = tokio::fs::File::create(&part)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", part.display()))?;
    let limit = app.max_artifact_size();
    let mut hash = sha2::Sha256::new();
    let mut size = 0u64;
    let mut body = req.into_body().into_data_stream();
    let result: ApiResult<()> = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| bad(format!("the upload broke off: {e}")))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("an artifact may be at most {limit} bytes"),
                ));
            }
            hash.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", part.display()))?;
        }
        file.sync_all()
            .await
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", part.display()))?;
        let got = hex::encode(hash.finalize_reset());
        if got != want {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "digest_mismatch",
                format!("{name}: received {size} bytes with SHA-256 {got}, the worker said {want}"),
            ));
        }
        // A worker whose lease ran out while it uploaded does not replace what the
        // build's next attempt made.
        held_attempt(&app, &id, &worker, attempt).await?;
        tokio::fs::rename(&part, out.join(&name))
            .await
            .map_err(|e| anyhow::anyhow!("cannot rename {}: {e}", part.display()))?;
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&part).await;
    }
    result?;
    tracing::info!(build = %id, %worker, artifact = %name, size, "artifact received");
    Ok(StatusCode::CREATED)
}

async fn finish(
    State(app): State<Arc<App>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    Json(f): Json<Finish>,
) -> ApiResult<Json<serde_json::Value>> {
    let worker = worker_id(&caller, &f.worker)?;
    held(&app, &id, &worker).await?;
    let done = match f.state.as_str() {
        "succeeded" => {
            let out = app.build_dir(&id).join("build").join("out");
            let here = tokio::task::spawn_blocking(move || match out.is_dir() {
                true => runner::list_artifacts(&out),
                false => Ok(Vec::new()),
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))??;
            let mut listed = f.artifacts.clone();
            listed.sort_by(|a, b| a.name.cmp(&b.name));
            if here != listed {
                let names =
                    |l: &[super::model::Artifact]| l.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ");
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "artifacts_mismatch",
                    format!(
                        "the worker lists [{}], the service holds [{}] (or their digests differ): upload them all first",
                        names(&listed),
                        names(&here)
                    ),
                ));
            }
            app.db
                .finish(&id, &worker, BuildState::Succeeded, None, None, &here)
                .await?
        }
        "failed" => {
            let error = f.error.as_deref().unwrap_or("the remote worker gave no reason");
            app.db
                .finish(
                    &id,
                    &worker,
                    BuildState::Failed,
                    Some(error),
                    f.log_tail.as_deref(),
                    &[],
                )
                .await?
        }
        other => return Err(bad(format!("state {other:?}: give succeeded or failed"))),
    };
    if !done {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_yours",
            "the build is no longer this worker's",
        ));
    }
    tracing::info!(build = %id, %worker, state = %f.state, "remote build finished");
    Ok(Json(json!({ "state": f.state })))
}

async fn give_back(
    State(app): State<Arc<App>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    Json(g): Json<GiveBack>,
) -> ApiResult<Json<serde_json::Value>> {
    let worker = worker_id(&caller, &g.worker)?;
    held(&app, &id, &worker).await?;
    let reason = format!("{worker}: {}", g.reason.chars().take(500).collect::<String>());
    app.db.requeue(&id, &worker, &reason).await?;
    tracing::info!(build = %id, %worker, "a remote worker gave the build back");
    Ok(Json(json!({ "state": "queued" })))
}

//! The HTTP API of `atom-build serve` (JSON; every route but /healthz needs a token):
//!
//! - `POST /v1/orders`: order a build (`model::OrderRequest`); 201 with the order
//! - `GET /v1/orders`: the token's orders; `GET /v1/orders/{id}`: one, with its build's
//!   state, stage, queue position, ETA and artifacts
//! - `GET /v1/orders/{id}/log`: the build's log; `?follow=1` streams it until the build ends
//! - `POST /v1/orders/{id}/cancel`; `DELETE /v1/orders/{id}`
//! - `POST|DELETE /v1/orders/{id}/pin`: keep the build's files past the expiry, or not
//! - `GET /v1/orders/{id}/artifacts/{name}`: a file the build made (Range requests work)
//! - `GET /v1/templates`: the templates orders can name
//! - `GET /`: the web page (`web`)
//!
//! An order of another token is answered as one that does not exist. The token comes in
//! `Authorization: Bearer`; GET and HEAD also take it from the web page's `atom_token`
//! cookie (SameSite=Strict), so its download links work, while every request that
//! changes something needs the header, which another site cannot make a browser send.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use super::App;
use super::db::{self, now};
use super::eta;
use super::model::{BuildRow, BuildState, OrderRequest, OrderRow, TokenRow};
use super::order::{self, Refusal};

/// Largest order body (a recipe's text).
const MAX_ORDER_BYTES: usize = 1 << 20;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such order")
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", crate::said_once(&e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        } else {
            tracing::info!(code = self.code, status = self.status.as_u16(), message = %self.message, "request refused");
        }
        let mut r = (
            self.status,
            Json(json!({ "error": self.code, "message": self.message })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

pub(super) type ApiResult<T> = Result<T, ApiError>;

/// The token a request came with.
pub struct Caller(pub TokenRow);

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Caller, ApiError> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m.to_string());
        let bearer = match parts.headers.get(header::AUTHORIZATION) {
            Some(h) => h
                .to_str()
                .ok()
                .and_then(|h| h.strip_prefix("Bearer "))
                .ok_or_else(|| unauthorized("the Authorization header is not \"Bearer TOKEN\""))?,
            None if matches!(parts.method, axum::http::Method::GET | axum::http::Method::HEAD)
                && is_download(parts.uri.path()) =>
            {
                cookie(parts, SESSION_COOKIE)
                    .ok_or_else(|| unauthorized("give a token: Authorization: Bearer atb_…"))?
            }
            None => return Err(unauthorized("give a token: Authorization: Bearer atb_…")),
        };
        match super::auth::check(&app.db, bearer.trim()).await? {
            Some(t) => Ok(Caller(t)),
            None => Err(unauthorized("unknown or revoked token")),
        }
    }
}

/// The cookie `POST /v1/session` sets for the web page's download links.
const SESSION_COOKIE: &str = "atom_token";

/// Only artifact downloads take the cookie: plain links cannot carry a header, and
/// reading an artifact changes nothing.
fn is_download(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matches!(parts[..], ["v1", "orders", _, "artifacts", _])
}

/// `POST /v1/session` (with the token in the header): the cookie for download links,
/// HttpOnly (no script reads it) and scoped to the orders' paths.
async fn session(State(app): State<Arc<App>>, headers: axum::http::HeaderMap, Caller(_): Caller) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim();
    let secure = if app.public_url.starts_with("https:") {
        "; Secure"
    } else {
        ""
    };
    let value = format!("{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/v1/orders/; Max-Age=86400{secure}");
    match header::HeaderValue::from_str(&value) {
        Ok(v) => (StatusCode::NO_CONTENT, [(header::SET_COOKIE, v)]).into_response(),
        Err(_) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_token",
            "the token is not a header value".to_string(),
        )
        .into_response(),
    }
}

/// A cookie's value from the request's Cookie headers.
fn cookie<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(';'))
        .find_map(|c| c.trim().strip_prefix(name)?.strip_prefix('='))
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/templates", get(templates))
        .route("/v1/session", post(session))
        .route("/v1/orders", post(create).get(list))
        .route("/v1/orders/{id}", get(show).delete(delete))
        .route("/v1/orders/{id}/cancel", post(cancel))
        .route("/v1/orders/{id}/log", get(log))
        .route("/v1/orders/{id}/pin", post(pin).delete(unpin))
        .route("/v1/orders/{id}/artifacts/{name}", get(artifact))
        .merge(super::worker_api::routes())
        .merge(super::web::routes())
        .layer(DefaultBodyLimit::max(MAX_ORDER_BYTES))
        .with_state(app)
}

/// An order of the caller's, with its build.
async fn owned(app: &App, caller: &TokenRow, id: &str) -> ApiResult<(OrderRow, BuildRow)> {
    let order = app
        .db
        .order(id)
        .await?
        .filter(|o| o.token_id == caller.id)
        .ok_or_else(ApiError::not_found)?;
    let build = app.db.build(&order.build_id).await?.ok_or_else(ApiError::not_found)?;
    Ok((order, build))
}

async fn create(State(app): State<Arc<App>>, Caller(caller): Caller, body: axum::body::Bytes) -> ApiResult<Response> {
    let req: OrderRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_order",
            format!("the order is not valid JSON for an order: {e}"),
        )
    })?;
    // The limit is checked and the order inserted under the token's lock: parallel
    // orders of one token are counted one after the other (within this instance).
    let lock = app
        .order_locks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(caller.id.clone())
        .or_default()
        .clone();
    let _held = lock.lock().await;
    let open = app.db.queued_orders_of(&caller.id).await?;
    if open >= caller.max_queued {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_orders",
            format!("this token has {open} orders queued or building, its limit; wait for one to finish"),
        ));
    }
    let checked = {
        let _permit = app.checks.acquire().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let (app, caller, req) = (app.clone(), caller.clone(), req.clone());
        tokio::task::spawn_blocking(move || order::check(&app, &caller, &req))
            .await
            .map_err(|e| anyhow::anyhow!("the order check failed: {e}"))?
    }
    .map_err(|r| match r {
        Refusal::Forbidden(m) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", m),
        Refusal::Bad(m) => ApiError::new(StatusCode::BAD_REQUEST, "bad_order", m),
    })?;
    let digest = checked.preview.digest().to_string();
    let t = now();
    let (build_id, new_build) = match app.db.reusable_build(&digest).await? {
        Some(b) => (b.id, None),
        None => {
            let means = app.db.stage_means(checked.recipe_name()).await?;
            let mut b = BuildRow::queued(
                db::random_id(8),
                digest.clone(),
                checked.recipe_name().to_string(),
                serde_json::to_string(&checked.spec).map_err(anyhow::Error::from)?,
                t,
                eta::predict(&checked.preview, &checked.spec.skip, &means),
            );
            b.local_only = !checked.spec.skip.iter().any(|s| s == "publish");
            (b.id.clone(), Some(b))
        }
    };
    let shared = new_build.is_none();
    let mut order = OrderRow {
        id: db::random_id(8),
        token_id: caller.id.clone(),
        build_id,
        state: "active".into(),
        created: t,
        spec: serde_json::to_string(&req).map_err(anyhow::Error::from)?,
        predicted_ready: None,
        pinned: false,
    };
    if let Some(b) = &new_build {
        // The ETA at the time of the order is kept, to be compared with what happened.
        let mut open = app.db.open_builds().await?;
        open.push(b.clone());
        order.predicted_ready = eta::schedule(&open, workers_now(&app).await?, t)
            .get(&b.id)
            .map(|e| e.ready_at);
    }
    app.db.insert_order(&order, new_build.as_ref()).await?;
    tracing::info!(order = %order.id, build = %order.build_id, token = %caller.name, shared, "order taken");
    let view = order_view(&app, &order, shared).await?;
    let mut r = (StatusCode::CREATED, Json(view)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/orders/{}", order.id)) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

/// Workers that can take builds now: those heard from within two leases (at least this
/// instance's own).
async fn workers_now(app: &App) -> ApiResult<usize> {
    let since = now() - 2 * app.lease.as_secs().max(1) as i64;
    let live = app.db.live_workers(since).await?;
    Ok((live as usize).max(app.workers).max(1))
}

async fn order_view(app: &App, order: &OrderRow, shared: bool) -> ApiResult<Value> {
    let build = app.db.build(&order.build_id).await?.ok_or_else(ApiError::not_found)?;
    let estimate = if build.state.is_open() {
        let open = app.db.open_builds().await?;
        eta::schedule(&open, workers_now(app).await?, now())
            .get(&build.id)
            .copied()
    } else {
        None
    };
    Ok(view(app, order, &build, estimate, shared))
}

/// The order as `GET /v1/orders/ID` shows it (what its notice carries).
pub(super) async fn order_json(app: &App, order: &OrderRow) -> Result<Value, ApiError> {
    order_view(app, order, false).await
}

fn time(t: Option<i64>) -> Value {
    t.and_then(|t| jiff::Timestamp::from_second(t).ok())
        .map(|t| Value::String(t.to_string()))
        .unwrap_or(Value::Null)
}

fn view(app: &App, order: &OrderRow, b: &BuildRow, estimate: Option<eta::Estimate>, shared: bool) -> Value {
    let mut request: Value = serde_json::from_str(&order.spec).unwrap_or(Value::Null);
    // The webhook's key is the orderer's secret: never shown again.
    if let Some(secret) = request.pointer_mut("/notify/secret") {
        *secret = Value::String("(hidden)".into());
    }
    let state = if order.state == "cancelled" {
        "cancelled"
    } else {
        b.state.as_str()
    };
    let artifacts: Vec<Value> = b
        .artifacts
        .iter()
        .map(|a| {
            json!({
                "name": a.name, "size": a.size, "sha256": a.sha256,
                "url": format!("/v1/orders/{}/artifacts/{}", order.id, a.name),
            })
        })
        .collect();
    json!({
        "id": order.id,
        "state": state,
        "created": time(Some(order.created)),
        "request": request,
        "shared": shared,
        "build": {
            "id": b.id,
            "digest": b.digest,
            "state": b.state.as_str(),
            "stage": b.stage,
            "stage_index": b.stage_index,
            "stages": crate::recipe::STAGES.len(),
            "attempts": b.attempts,
            "started": time(b.started),
            "finished": time(b.finished),
            "error": b.error,
            "log_tail": b.log_tail,
        },
        "queue_position": estimate.and_then(|e| e.position),
        "eta": estimate.map(|e| json!({
            "ready_at": time(Some(e.ready_at)),
            "ready_in_seconds": (e.ready_at - now()).max(0),
        })),
        "predicted_ready": time(order.predicted_ready),
        "pinned": order.pinned,
        "expires_at": match (b.state, b.finished) {
            (BuildState::Succeeded | BuildState::Failed | BuildState::Cancelled, Some(f)) if !order.pinned => {
                time(Some(f + app.expire_after.as_secs() as i64))
            }
            _ => Value::Null,
        },
        "artifacts": artifacts,
    })
}

async fn templates(State(app): State<Arc<App>>, Caller(_): Caller) -> ApiResult<Json<Value>> {
    let dir = app.templates.clone();
    let names = tokio::task::spawn_blocking(move || order::template_names(&dir))
        .await
        .map_err(|e| anyhow::anyhow!("listing the templates: {e}"))?;
    Ok(Json(json!({ "templates": names })))
}

async fn list(State(app): State<Arc<App>>, Caller(caller): Caller) -> ApiResult<Json<Value>> {
    let orders = app.db.orders_of(&caller.id).await?;
    let open = app.db.open_builds().await?;
    let schedule = eta::schedule(&open, workers_now(&app).await?, now());
    let mut out = Vec::new();
    for o in &orders {
        if let Some(b) = app.db.build(&o.build_id).await? {
            out.push(view(&app, o, &b, schedule.get(&b.id).copied(), false));
        }
    }
    Ok(Json(json!({ "orders": out })))
}

async fn show(State(app): State<Arc<App>>, Caller(caller): Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let (order, _) = owned(&app, &caller, &id).await?;
    Ok(Json(order_view(&app, &order, false).await?))
}

/// Cancels the order; its build stops when no other order waits for it.
async fn cancel(State(app): State<Arc<App>>, Caller(caller): Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let (order, build) = owned(&app, &caller, &id).await?;
    if order.state != "active" {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_active",
            format!("the order is {}", order.state),
        ));
    }
    if !build.state.is_open() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "finished",
            format!("the build has {}; delete the order instead", build.state.as_str()),
        ));
    }
    app.db.set_order_state(&order.id, "active", "cancelled").await?;
    release_build(&app, &build).await?;
    tracing::info!(order = %order.id, build = %build.id, "order cancelled");
    Ok(Json(
        order_view(&app, &app.db.order(&id).await?.ok_or_else(ApiError::not_found)?, false).await?,
    ))
}

/// Keeps the order's build files past the expiry (until unpinned or deleted).
async fn pin(State(app): State<Arc<App>>, Caller(caller): Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    set_pin(&app, &caller, &id, true).await
}

async fn unpin(State(app): State<Arc<App>>, Caller(caller): Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    set_pin(&app, &caller, &id, false).await
}

async fn set_pin(app: &App, caller: &TokenRow, id: &str, pinned: bool) -> ApiResult<Json<Value>> {
    let (order, build) = owned(app, caller, id).await?;
    if matches!(build.state, BuildState::Expired | BuildState::Removed) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "gone",
            format!("the build's files are gone ({})", build.state.as_str()),
        ));
    }
    app.db.set_pinned(&order.id, pinned).await?;
    let order = app.db.order(id).await?.ok_or_else(ApiError::not_found)?;
    Ok(Json(order_view(app, &order, false).await?))
}

/// A build no active order waits for any more is cancelled.
async fn release_build(app: &App, build: &BuildRow) -> ApiResult<()> {
    if build.state.is_open() && app.db.active_orders_of_build(&build.id).await? == 0 {
        app.db
            .cancel_build(&build.id, "cancelled: every order of it was cancelled")
            .await?;
    }
    Ok(())
}

/// Deletes the order (cancelling it first); the build's files go with the last order
/// that refers to it.
async fn delete(State(app): State<Arc<App>>, Caller(caller): Caller, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let (order, build) = owned(&app, &caller, &id).await?;
    app.db.set_order_state(&order.id, &order.state, "deleted").await?;
    release_build(&app, &build).await?;
    let build = app.db.build(&build.id).await?.ok_or_else(ApiError::not_found)?;
    if !build.state.is_open() && app.db.orders_of_build(&build.id).await? == 0 {
        remove_build_files(&app, &build).await?;
    }
    tracing::info!(order = %order.id, build = %build.id, "order deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_build_files(app: &App, build: &BuildRow) -> ApiResult<()> {
    if build.instance.as_deref().is_some_and(|i| i != app.instance) {
        // Another instance holds the files; it removes them when it sees the state.
        app.db.mark_removed(&build.id).await?;
        return Ok(());
    }
    let dir = app.build_dir(&build.id);
    tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?
    .map_err(|e| anyhow::anyhow!("cannot remove the build's files: {e}"))?;
    app.db.mark_removed(&build.id).await?;
    Ok(())
}

/// A build's files are on the instance that ran it: another instance sends the caller there.
async fn elsewhere(app: &App, build: &BuildRow, path: &str) -> ApiResult<Option<Response>> {
    match build.instance.as_deref() {
        Some(i) if i != app.instance => match app.db.instance_url(i).await? {
            Some(url) => Ok(Some(
                Redirect::temporary(&format!("{}{path}", url.trim_end_matches('/'))).into_response(),
            )),
            None => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "elsewhere",
                format!("the build ran on instance {i}, whose address is not known"),
            )),
        },
        _ => Ok(None),
    }
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: Option<String>,
}

async fn log(
    State(app): State<Arc<App>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Response> {
    let (order, build) = owned(&app, &caller, &id).await?;
    let follow = q.follow.as_deref().is_some_and(|f| f != "0" && f != "false");
    let path = format!("/v1/orders/{}/log{}", order.id, if follow { "?follow=1" } else { "" });
    if let Some(r) = elsewhere(&app, &build, &path).await? {
        return Ok(r);
    }
    let file = app.build_dir(&build.id).join("build.log");
    let body = if follow {
        Body::from_stream(follow_log(app.clone(), build.id.clone(), file))
    } else {
        Body::from(tokio::fs::read(&file).await.unwrap_or_default())
    };
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}

/// The log from its start, then what is appended, until the build has ended and all of
/// it has been sent.
fn follow_log(
    app: Arc<App>,
    build_id: String,
    file: std::path::PathBuf,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    futures_util::stream::unfold((0u64, None::<tokio::time::Instant>), move |(offset, ended_at)| {
        let (app, build_id, file) = (app.clone(), build_id.clone(), file.clone());
        async move {
            let mut ended_at = ended_at;
            loop {
                let chunk = read_from(&file, offset).await;
                if !chunk.is_empty() {
                    let next = offset + chunk.len() as u64;
                    return Some((Ok(bytes::Bytes::from(chunk)), (next, ended_at)));
                }
                if *app.stopping.borrow() {
                    // The service stops: its connections must end.
                    ended_at.get_or_insert_with(tokio::time::Instant::now);
                } else if ended_at.is_none() {
                    let open = match app.db.build(&build_id).await {
                        Ok(Some(b)) => b.state.is_open(),
                        _ => false,
                    };
                    if !open {
                        ended_at = Some(tokio::time::Instant::now());
                    }
                }
                // A cancelled build ends in the database before its worker has stopped it
                // and written the attempt's closing line: wait for that line (a while).
                if let Some(t) = ended_at
                    && (*app.stopping.borrow() || attempt_closed(&file).await || t.elapsed() > LOG_CLOSE_WAIT)
                {
                    let chunk = read_from(&file, offset).await;
                    if chunk.is_empty() {
                        return None;
                    }
                    let next = offset + chunk.len() as u64;
                    return Some((Ok(bytes::Bytes::from(chunk)), (next, ended_at)));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    })
}

/// How long a followed log waits for the closing line of a build that has ended.
const LOG_CLOSE_WAIT: Duration = Duration::from_secs(20);

/// Whether the log's last attempt has its closing line (`=== succeeded|failed|stopped`).
async fn attempt_closed(file: &std::path::Path) -> bool {
    let len = tokio::fs::metadata(file).await.map(|m| m.len()).unwrap_or(0);
    let tail = read_from(file, len.saturating_sub(64 << 10)).await;
    let text = String::from_utf8_lossy(&tail);
    let last_attempt = text.rfind("=== attempt ").unwrap_or(0);
    text[last_attempt..].lines().skip(1).any(|l| l.starts_with("=== "))
}

async fn read_from(file: &std::path::Path, offset: u64) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    let Ok(mut f) = tokio::fs::File::open(file).await else {
        return Vec::new();
    };
    if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = (&mut f).take(1 << 20).read_to_end(&mut buf).await;
    buf
}

async fn artifact(
    State(app): State<Arc<App>>,
    Caller(caller): Caller,
    Path((id, name)): Path<(String, String)>,
    req: Request,
) -> ApiResult<Response> {
    let (order, build) = owned(&app, &caller, &id).await?;
    // Only a name the build recorded: never a path.
    if !build.artifacts.iter().any(|a| a.name == name) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("the build made no {name:?}"),
        ));
    }
    if let Some(r) = elsewhere(&app, &build, &format!("/v1/orders/{}/artifacts/{name}", order.id)).await? {
        return Ok(r);
    }
    let path = app.build_dir(&build.id).join("build").join("out").join(&name);
    let resp = tower_http::services::ServeFile::new(path)
        .oneshot(req)
        .await
        .map_err(|e| anyhow::anyhow!("cannot send {name}: {e}"))?;
    let mut resp = resp.map(Body::new);
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

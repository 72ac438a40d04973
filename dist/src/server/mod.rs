//! `atom-dist serve`: the repository over HTTP(S) plus the rsync-style delta endpoint.
//!
//! One accept loop serves plain TCP or TLS with hyper's HTTP/1 server, with a bound on
//! connections, a header read timeout against slow clients, and a graceful drain on
//! shutdown. Nothing about the repository is cached in memory: every request reads the
//! current files, so publishing needs no restart.

mod clients;
mod delta;
mod error;
mod files;
mod images;
mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::repo::Repository;
pub use delta::DeltaLimits;

/// How long /metrics reuses the expiry times it read from the repository.
const EXPIRY_CACHE: Duration = Duration::from_secs(10);

pub struct AppState {
    repo: Repository,
    metrics: metrics::Metrics,
    expiries: std::sync::Mutex<Option<(std::time::Instant, Vec<crate::expiry::Expiry>)>>,
    images: images::ImageStore,
    delta: delta::DeltaService,
}

pub struct ServerConfig {
    pub repo: PathBuf,
    pub listen: SocketAddr,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub cache_dir: PathBuf,
    /// Bound of the decompressed target images in the cache.
    pub image_cache_max: u64,
    pub delta: DeltaLimits,
    pub max_connections: usize,
    /// Connections one client address may hold at once.
    pub max_connections_per_client: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    /// A connection whose client reads nothing of a response for this long is closed:
    /// otherwise a few addresses that stop reading hold every connection.
    pub write_timeout: Duration,
    pub shutdown_grace: Duration,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let mut text = state.metrics.render();
    // Read from the repository at most every EXPIRY_CACHE: fresh enough for alerts days
    // ahead, and a flood of scrapes does not re-read the tree each time.
    let cached = state.expiries.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let expiries = match cached {
        Some((at, e)) if at.elapsed() < EXPIRY_CACHE => Some(e),
        _ => {
            let st = state.clone();
            match tokio::task::spawn_blocking(move || crate::expiry::of_repository(&st.repo)).await {
                Ok(Ok(e)) => {
                    *state.expiries.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((std::time::Instant::now(), e.clone()));
                    Some(e)
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the repository's expiry times");
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "expiry task failed");
                    None
                }
            }
        }
    };
    if let Some(e) = expiries {
        metrics::render_expiries(&mut text, &e);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Counts every answer by route and status, and the bytes it announces.
async fn count(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = match req.uri().path() {
        "/healthz" => "healthz",
        "/metrics" => "metrics",
        "/v1/delta" => "delta",
        _ => "file",
    };
    let resp = next.run(req).await;
    let bytes = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    state.metrics.request(route, resp.status().as_u16(), bytes);
    resp
}

pub fn router(state: Arc<AppState>, request_timeout: Duration) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/v1/delta", post(delta::handle))
        .fallback(files::serve)
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

fn tls_acceptor(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read TLS certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("cannot read TLS key {}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS certificate and key do not match")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Binds, then serves until `shutdown` resolves; in-flight requests get `shutdown_grace`.
/// `ready` receives the bound address (useful with port 0).
pub async fn serve(
    cfg: ServerConfig,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let repo = Repository::open(&cfg.repo)?;
    let state = Arc::new(AppState {
        images: images::ImageStore::new(
            cfg.cache_dir.join("images"),
            repo.root().to_path_buf(),
            cfg.image_cache_max,
        )
        .with_context(|| format!("cannot create cache directory {}", cfg.cache_dir.display()))?,
        delta: delta::DeltaService::new(cfg.delta, cfg.cache_dir.join("deltas"))
            .with_context(|| format!("cannot create cache directory {}", cfg.cache_dir.display()))?,
        repo,
        metrics: metrics::Metrics::default(),
        expiries: std::sync::Mutex::new(None),
    });
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(tls_acceptor(cert, key)?),
        None => None,
    };
    let app = router(state.clone(), cfg.request_timeout);
    let metrics = &state.metrics;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, tls = tls.is_some(), "listening");
    ready(addr);
    let connections = Arc::new(Semaphore::new(cfg.max_connections));
    let per_client = clients::PerClient::new(cfg.max_connections_per_client);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => p?,
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(client_slot) = per_client.try_acquire(peer.ip()) else {
            // Closed at once: one address must not hold every connection.
            metrics
                .rejected_connections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(%peer, "connection refused: the client holds its share of connections");
            drop(stream);
            continue;
        };
        // The client's slot goes first: once the global permit is back, the next accept
        // must find this client's count already lowered.
        let permit = (client_slot, permit);
        let svc = TowerToHyperService::new(tower::ServiceExt::map_request(
            app.clone(),
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(clients::Peer(peer.ip()));
                req
            },
        ));
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(cfg.write_timeout));
        let stream = Box::pin(stream);
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new()).header_read_timeout(cfg.header_timeout);
        let header_timeout = cfg.header_timeout;
        match &tls {
            None => {
                let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), svc));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let conn = watcher.watch(http.serve_connection(TokioIo::new(tls_stream), svc));
                            if let Err(e) = conn.await {
                                tracing::debug!(%peer, error = %e, "connection ended with an error");
                            }
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(cfg.shutdown_grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
    Ok(())
}

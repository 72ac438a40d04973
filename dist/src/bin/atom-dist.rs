//! `atom-dist`: serves an Atom repository and the rsync-style delta endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use atom_dist::server::{self, DeltaLimits, ServerConfig};
use clap::{Args, Parser, Subcommand};

/// Serve an Atom repository over HTTP(S), with the rsync-style delta endpoint.
///
/// Static files (manifests, signatures, payloads, precomputed deltas) are served with
/// Range and ETag support, exactly as any static web server or CDN would serve the same
/// tree. POST /v1/delta?channel=C[&version=V] takes the zstd-compressed fast_rsync
/// signature of a host's running slot and answers with the zstd-compressed delta to the
/// target image. /healthz answers "ok"; /metrics is in Prometheus text format.
#[derive(Parser)]
#[command(
    name = "atom-dist",
    version,
    after_help = "EXIT STATUS:\n    0 clean shutdown (SIGTERM/SIGINT), 1 error, 2 bad command line"
)]
struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Serve(ServeArgs),
}

/// Serve a repository until SIGTERM or SIGINT (in-flight requests are finished first).
#[derive(Args)]
struct ServeArgs {
    /// Repository directory (made by atom-build publish). Changes are picked up live.
    #[arg(long)]
    repo: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// TLS certificate chain (PEM); with --tls-key, serve HTTPS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Cache directory for decompressed target images and computed deltas. Several
    /// instances may share one (e.g. on shared storage): entries are written atomically.
    #[arg(long, default_value = "/var/cache/atom-dist")]
    cache: PathBuf,
    /// Upper bound of the delta cache; least recently used deltas are evicted.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    cache_max: u64,
    /// Upper bound of the decompressed target images in the cache (each is one image's
    /// size; any client may ask for a delta to any published version). Least recently
    /// used images are evicted; the one in use is always kept.
    #[arg(long, default_value = "8G", value_parser = parse_size)]
    image_cache_max: u64,
    /// Diffs computed at once (each uses one CPU core for seconds on a drifted base).
    #[arg(long, default_value_t = 2)]
    max_diffs: usize,
    /// How long a request waits for a diff slot before a 503 with Retry-After.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    diff_queue_wait: Duration,
    /// Time allowed for a client to send its request headers (slow-loris bound).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: Duration,
    /// Time allowed for a client to upload its signature.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    body_timeout: Duration,
    /// Time allowed until a response starts (includes waiting for a diff).
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Close a connection whose client has read nothing of a response for this long (a
    /// reader that stalls on purpose would otherwise hold the connection forever).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    write_timeout: Duration,
    /// Open connections at once; further clients wait in the listen backlog.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Open connections one client address may hold; more are closed at once. Hosts
    /// behind one NAT share an address: keep this well above one.
    #[arg(long, default_value_t = 64)]
    max_connections_per_client: usize,
    /// Uncached diffs one client address may have running or queued; more get 429.
    #[arg(long, default_value_t = 1)]
    max_diffs_per_client: usize,
    /// On shutdown, how long in-flight requests may take to finish.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
}

fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s)
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = ["info", "debug", "trace"][usize::from(cli.verbose.min(2))];
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    // Under systemd the journal adds timestamps of its own.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!journald && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if journald {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
    let Command::Serve(a) = cli.command;
    let scheme = if a.tls_cert.is_some() { "https" } else { "http" };
    let cfg = ServerConfig {
        repo: a.repo,
        listen: a.listen,
        tls: a.tls_cert.zip(a.tls_key),
        cache_dir: a.cache,
        image_cache_max: a.image_cache_max,
        delta: DeltaLimits {
            max_concurrent_diffs: a.max_diffs.max(1),
            max_diffs_per_client: a.max_diffs_per_client.max(1),
            queue_wait: a.diff_queue_wait,
            body_timeout: a.body_timeout,
            cache_max_bytes: a.cache_max,
        },
        max_connections: a.max_connections.max(1),
        max_connections_per_client: a.max_connections_per_client.max(1),
        header_timeout: a.header_timeout,
        request_timeout: a.request_timeout,
        write_timeout: a.write_timeout,
        shutdown_grace: a.shutdown_grace,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("atom-dist: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(server::serve(
        cfg,
        |addr| {
            use std::io::Write;
            println!("atom-dist: listening on {scheme}://{addr}");
            let _ = std::io::stdout().flush();
        },
        shutdown_signal(),
    ));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("atom-dist: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

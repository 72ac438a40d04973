//! A real `atom-dist` on 127.0.0.1 against a real repository, driven by reqwest and raw
//! sockets: static files, the delta endpoint, caching, concurrency, limits and shutdown.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use atom_dist::manifest::{Delta, DeltaFormat, FORMAT, Image, Manifest, Payload};
use atom_dist::repo::{SignedManifest, layout};
use atom_dist::{Digest, Repository, SecretKey, delta, signature};

const BIN: &str = env!("CARGO_BIN_EXE_atom-dist");

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Publishes `image` as `version` with the library (the server does not care how).
fn publish(repo: &Repository, key: &SecretKey, version: &str, image: &[u8]) -> Manifest {
    publish_with(repo, key, version, image, vec![])
}

fn publish_with(repo: &Repository, key: &SecretKey, version: &str, image: &[u8], deltas: Vec<Delta>) -> Manifest {
    let digest = Digest::of(image);
    let rel = layout::payload(&digest);
    let payload = zstd::bulk::compress(image, 1).unwrap();
    std::fs::create_dir_all(repo.path("objects")).unwrap();
    std::fs::write(repo.path(&rel), &payload).unwrap();
    let now = jiff::Timestamp::now().round(jiff::Unit::Second).unwrap();
    let m = Manifest {
        format: FORMAT,
        channel: "stable".into(),
        version: version.parse().unwrap(),
        board: "x86_64-generic".into(),
        created: now,
        expires: now.checked_add(jiff::SignedDuration::from_hours(24)).unwrap(),
        image: Image {
            size: image.len() as u64,
            digest,
        },
        payload: Payload {
            path: rel,
            size: payload.len() as u64,
            digest: Digest::of(&payload),
        },
        min_agent: None,
        critical: Vec::new(),
        rollout: None,
        deltas,
    };
    let text = m.to_toml();
    let signed = SignedManifest {
        signature: signature::sign(text.as_bytes(), &[key]).into_bytes(),
        manifest: text.into_bytes(),
    };
    repo.commit_manifest("stable", &m.version, &signed).unwrap();
    m
}

struct Server {
    child: Child,
    url: String,
    addr: String,
    _dir: tempfile::TempDir,
    repo_dir: PathBuf,
}

impl Server {
    fn start(repo_dir: &Path, extra: &[&str]) -> Server {
        Self::start_env(repo_dir, extra, &[])
    }

    fn start_env(repo_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        // In a workspace build reqwest's rustls comes without a provider (the agent brings
        // its own): install ring before any client is made.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--repo"])
            .arg(repo_dir)
            .arg("--cache")
            .arg(dir.path().join("cache"))
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line.trim().rsplit(' ').next().unwrap().to_string();
        assert!(
            url.starts_with("http://127.0.0.1:") || url.starts_with("https://127.0.0.1:"),
            "{line}"
        );
        let addr = url.split("://").nth(1).unwrap().to_string();
        Server {
            child,
            url,
            addr,
            _dir: dir,
            repo_dir: repo_dir.to_owned(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing:\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    repo_dir: PathBuf,
    repo: Repository,
    key: SecretKey,
    v1: Vec<u8>,
    v2: Vec<u8>,
}

/// v1: 8 MiB; v2: v1 with a few changed and inserted regions.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let repo = Repository::open_or_create(&repo_dir).unwrap();
    let key = SecretKey::generate();
    let v1 = bytes(8 << 20, 1);
    let mut v2 = v1.clone();
    v2[100_000..140_000].copy_from_slice(&bytes(40_000, 2));
    v2[5_000_000..5_000_100].copy_from_slice(&bytes(100, 3));
    v2.splice(6_000_000..6_000_000, bytes(12_345, 4));
    publish(&repo, &key, "1.0.0", &v1);
    publish(&repo, &key, "2.0.0", &v2);
    Fixture {
        _dir: dir,
        repo_dir,
        repo,
        key,
        v1,
        v2,
    }
}

fn signature_body(base: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(delta::signature_of(base).serialized(), 3).unwrap()
}

fn apply(base: &[u8], delta_zst: &[u8], target_len: u64) -> Vec<u8> {
    let mut raw = Vec::new();
    delta::decompress_bounded(delta_zst, &mut raw, delta::raw_delta_limit(target_len)).unwrap();
    let mut out = Vec::new();
    delta::apply(base, &raw, target_len, &mut out).unwrap();
    out
}

fn raw_http(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    // read_to_end keeps what arrived before a reset (read_to_string would drop it).
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_files_with_range_etag_and_no_escape() {
    let f = fixture();
    let s = Server::start(&f.repo_dir, &[]);
    let c = reqwest::Client::new();
    let url = format!("{}/{}", s.url, layout::manifest("stable"));
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/toml");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let body = r.bytes().await.unwrap();
    assert_eq!(
        &body[..],
        &std::fs::read(f.repo.path(&layout::manifest("stable"))).unwrap()[..]
    );

    let r = c.get(&url).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(r.status(), 304);

    let m = Manifest::parse(&body).unwrap();
    let payload_url = format!("{}/{}", s.url, m.payload.path);
    let r = c
        .get(&payload_url)
        .header("range", "bytes=10-109")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-type"], "application/zstd");
    let part = r.bytes().await.unwrap();
    assert_eq!(
        &part[..],
        &std::fs::read(f.repo.path(&m.payload.path)).unwrap()[10..110]
    );
    let r = c.head(&payload_url).send().await.unwrap();
    assert_eq!(
        r.headers()["content-length"].to_str().unwrap(),
        m.payload.size.to_string()
    );

    for path in [
        "/../../../etc/passwd",
        "/channels/../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/.atom-publish.lock",
    ] {
        let resp = raw_http(
            &s.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        );
        let status = resp.lines().next().unwrap_or_default();
        assert!(status.contains(" 404 ") || status.contains(" 400 "), "{path}: {status}");
        assert!(!resp.contains("root:"), "{path} leaked a file");
    }
    let r = c.post(&url).body("x").send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        c.get(format!("{}/healthz", s.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "ok\n"
    );

    // A publish while the server runs is visible at once.
    let v3 = bytes(1 << 20, 9);
    publish(&f.repo, &f.key, "3.0.0", &v3);
    let now = Manifest::parse(&c.get(&url).send().await.unwrap().bytes().await.unwrap()).unwrap();
    assert_eq!(now.version.to_string(), "3.0.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_reconstructs_target_and_is_cached() {
    let f = fixture();
    let s = Server::start(&f.repo_dir, &[]);
    let c = reqwest::Client::new();
    let sig = signature_body(&f.v1);
    let post = |q: &'static str| c.post(format!("{}/v1/delta?{q}", s.url)).body(sig.clone()).send();

    let r = post("channel=stable").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-atom-cache"], "miss");
    assert_eq!(
        r.headers()["x-atom-target-digest"].to_str().unwrap(),
        Digest::of(&f.v2).to_string()
    );
    let d = r.bytes().await.unwrap();
    assert!(d.len() < 200_000, "delta of small changes is small: {}", d.len());
    let rebuilt = apply(&f.v1, &d, f.v2.len() as u64);
    assert!(Digest::of(&rebuilt) == Digest::of(&f.v2), "delta does not rebuild v2");

    let r = post("channel=stable").await.unwrap();
    assert_eq!(r.headers()["x-atom-cache"], "hit");
    assert_eq!(&r.bytes().await.unwrap()[..], &d[..]);
    assert_eq!(s.metric("atom_dist_delta_cache_hits_total").await, 1.0);
    assert_eq!(s.metric("atom_dist_delta_cache_misses_total").await, 1.0);

    // An explicit older target.
    let r = post("channel=stable&version=1.0.0").await.unwrap();
    assert_eq!(r.status(), 200);
    let same = apply(&f.v1, &r.bytes().await.unwrap(), f.v1.len() as u64);
    assert!(same == f.v1);
    assert!(s.metric("atom_dist_diff_seconds_count").await >= 2.0);
}

fn decode(format: &str, base: &[u8], delta_zst: &[u8], target_len: u64) -> Vec<u8> {
    let format = DeltaFormat::from_name(format).unwrap_or_else(|| panic!("unknown format {format}"));
    let mut raw = Vec::new();
    delta::decompress_format(
        format,
        base,
        delta_zst,
        &mut raw,
        delta::raw_delta_limit(target_len),
        None,
    )
    .unwrap();
    let mut out = Vec::new();
    delta::apply(base, &raw, target_len, &mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_base_diff_never_holds_up_signature_diffs() {
    let f = fixture();
    let s = Server::start_env(
        &f.repo_dir,
        &[
            "--max-diffs",
            "1",
            "--diff-queue-wait",
            "0s",
            "--max-diffs-per-client",
            "2",
        ],
        &[("ATOM_DIST_FAILPOINT", "diff:slow=2000")],
    );
    let c = reqwest::Client::new();
    let known = tokio::spawn(
        c.post(format!("{}/v1/delta?channel=stable&base_version=1.0.0", s.url))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c
        .post(format!("{}/v1/delta?channel=stable", s.url))
        .body(signature_body(&f.v1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the signature diff has its own permit");
    assert_eq!(known.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_on_a_published_base_gets_the_small_delta_without_a_signature() {
    let f = fixture();
    let s = Server::start(&f.repo_dir, &[]);
    let c = reqwest::Client::new();
    let url = |q: &str| format!("{}/v1/delta?channel=stable&{q}", s.url);
    let signature_answer = c
        .post(url("version=2.0.0"))
        .body(signature_body(&f.v1))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();

    // v1 is a published image: no signature, and the answer names its base.
    for cache in ["miss", "hit"] {
        let r = c.post(url("base_version=1.0.0")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let h = r.headers().clone();
        assert_eq!(h["x-atom-cache"], cache);
        assert_eq!(h["x-atom-base-digest"].to_str().unwrap(), Digest::of(&f.v1).to_string());
        assert_eq!(h["x-atom-base-size"].to_str().unwrap(), f.v1.len().to_string());
        let body = r.bytes().await.unwrap();
        let rebuilt = decode(
            h["x-atom-delta-format"].to_str().unwrap(),
            &f.v1,
            &body,
            f.v2.len() as u64,
        );
        assert!(
            Digest::of(&rebuilt) == Digest::of(&f.v2),
            "the known-base delta does not rebuild v2"
        );
        // 52,445 new (random, incompressible) bytes: byte-level matches carry little more,
        // whole blocks carry their unchanged rest too.
        assert!(
            body.len() < 52_445 + 2048 && body.len() < signature_answer.len(),
            "byte-level matches into the base beat blocks: {} vs {}",
            body.len(),
            signature_answer.len()
        );
    }
    assert_eq!(s.metric("atom_dist_delta_known_base_total").await, 2.0);

    // A base this channel never published: 404 without a body, the block answer with one.
    let r = c.post(url("base_version=9.9.9")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("unknown_base"));
    let r = c
        .post(url("base_version=9.9.9"))
        .body(signature_body(&f.v1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-atom-delta-format").is_none());
    let rebuilt = apply(&f.v1, &r.bytes().await.unwrap(), f.v2.len() as u64);
    assert!(rebuilt == f.v2);
    // The target itself is no base.
    let r = c.post(url("base_version=2.0.0")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // A target that lists a delta from the base: that very object is the answer.
    let mut v3 = f.v2.clone();
    v3[7_000_000..7_000_500].copy_from_slice(&bytes(500, 9));
    let (format, encoded) = delta::make_precomputed(&f.v1, &v3, 3, delta::Encoding::BasePrefix).unwrap();
    let rel = format!("deltas/{}-{}.zst", Digest::of(&f.v1).hex(), Digest::of(&v3).hex());
    std::fs::create_dir_all(f.repo.path("deltas")).unwrap();
    std::fs::write(f.repo.path(&rel), &encoded).unwrap();
    let listed_path = rel.clone();
    let listed = Delta {
        base_version: "1.0.0".parse().unwrap(),
        base_size: f.v1.len() as u64,
        base_digest: Digest::of(&f.v1),
        format,
        path: rel,
        size: encoded.len() as u64,
        digest: Digest::of(&encoded),
    };
    publish_with(&f.repo, &f.key, "3.0.0", &v3, vec![listed]);
    let r = c.post(url("base_version=1.0.0")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-atom-target-version"], "3.0.0");
    let fmt = r.headers()["x-atom-delta-format"].to_str().unwrap().to_owned();
    let body = r.bytes().await.unwrap();
    assert_eq!(&body[..], &encoded[..], "the publisher's delta is served as it is");
    assert!(decode(&fmt, &f.v1, &body, v3.len() as u64) == v3);
    // A damaged published delta is not passed on: one is computed.
    std::fs::write(f.repo.path(&listed_path), b"not a delta").unwrap();
    let r = c.post(url("base_version=1.0.0")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let fmt = r.headers()["x-atom-delta-format"].to_str().unwrap().to_owned();
    let body = r.bytes().await.unwrap();
    assert!(decode(&fmt, &f.v1, &body, v3.len() as u64) == v3);
    // Computed only toward the current version: 2.0.0 (which lists nothing) is refused.
    let r = c.post(url("version=2.0.0&base_version=1.0.0")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("current version"));
    // Nor from a newer base to an older target.
    let r = c.post(url("version=2.0.0&base_version=3.0.0")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // A base whose payload is gone (a fresh server, nothing decompressed yet): 404, so the
    // host sends its signature instead of retrying.
    drop(s);
    std::fs::remove_file(f.repo.path(&layout::payload(&Digest::of(&f.v1)))).unwrap();
    let s = Server::start(&f.repo_dir, &[]);
    let r = c
        .post(format!("{}/v1/delta?channel=stable&base_version=1.0.0", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("unknown_base"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_on_one_base_cost_one_diff() {
    let f = fixture();
    let s = Server::start(&f.repo_dir, &["--max-connections", "64"]);
    let c = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let sig = signature_body(&f.v1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (c, url, sig) = (c.clone(), format!("{}/v1/delta?channel=stable", s.url), sig.clone());
        tasks.push(tokio::spawn(async move {
            let r = c.post(url).body(sig).send().await.unwrap();
            (r.status().as_u16(), Digest::of(&r.bytes().await.unwrap()))
        }));
    }
    let mut digests = std::collections::BTreeSet::new();
    for t in tasks {
        let (status, digest) = t.await.unwrap();
        assert_eq!(status, 200);
        digests.insert(digest);
    }
    let elapsed = started.elapsed();
    println!("200 concurrent delta requests answered in {elapsed:?}");
    assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
    assert_eq!(digests.len(), 1, "every client got the same delta");
    assert_eq!(
        s.metric("atom_dist_delta_cache_misses_total").await,
        1.0,
        "one diff for the whole fleet"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    println!("server peak RSS {} MiB", rss_kib / 1024);
    assert!(rss_kib < 256 * 1024, "server peak RSS {rss_kib} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_distinct_diffs_get_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::open_or_create(&dir.path().join("repo")).unwrap();
    let key = SecretKey::generate();
    // A big target that shares nothing with the clients' bases: a slow diff.
    publish(&repo, &key, "1.0.0", &bytes(48 << 20, 11));
    let s = Server::start(
        &dir.path().join("repo"),
        // Both bases come from 127.0.0.1: let that address start two diffs, as two
        // clients could.
        &[
            "--max-diffs",
            "1",
            "--diff-queue-wait",
            "0s",
            "--max-diffs-per-client",
            "2",
        ],
    );
    let c = reqwest::Client::new();
    let url = format!("{}/v1/delta?channel=stable", s.url);
    let (a, b) = (signature_body(&bytes(1 << 20, 21)), signature_body(&bytes(1 << 20, 22)));
    let first = tokio::spawn(c.post(&url).body(a).send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = c.post(&url).body(b).send().await.unwrap();
    assert_eq!(second.status(), 503);
    assert!(second.headers().contains_key("retry-after"));
    let body: serde_json::Value = second.json().await.unwrap();
    assert_eq!(body["error"], "busy");
    assert_eq!(
        first.await.unwrap().unwrap().status(),
        200,
        "the running diff is not disturbed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_4xx() {
    let f = fixture();
    let s = Server::start(&f.repo_dir, &[]);
    // No connection reuse: the server closes a connection whose oversized body it refused.
    let c = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let post = |q: &str, body: Vec<u8>| c.post(format!("{}/v1/delta?{q}", s.url)).body(body).send();
    let check = |status: u16, code: &'static str| {
        move |(got, json): (u16, serde_json::Value)| {
            assert_eq!(got, status, "{json}");
            assert_eq!(json["error"], code, "{json}");
            assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    };
    async fn parts(r: reqwest::Response) -> (u16, serde_json::Value) {
        (r.status().as_u16(), r.json().await.unwrap_or_default())
    }
    let good = delta::signature_of(&f.v1).into_serialized();

    check(400, "bad_signature")(parts(post("channel=stable", b"garbage".to_vec()).await.unwrap()).await);
    check(400, "bad_signature")(
        parts(
            post("channel=stable", zstd::bulk::compress(b"garbage!garbage!", 1).unwrap())
                .await
                .unwrap(),
        )
        .await,
    );
    let truncated = zstd::bulk::compress(&good[..good.len() - 5], 1).unwrap();
    check(400, "bad_signature")(parts(post("channel=stable", truncated).await.unwrap()).await);
    let small_blocks = fast_rsync::Signature::calculate(
        &f.v1,
        fast_rsync::SignatureOptions {
            block_size: 1024,
            crypto_hash_size: 8,
        },
    );
    let r = parts(
        post(
            "channel=stable",
            zstd::bulk::compress(small_blocks.serialized(), 1).unwrap(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert!(r.1["message"].as_str().unwrap().contains("block size 1024"), "{}", r.1);
    check(400, "bad_signature")(r);
    // Far more signature than a base of this product could have.
    let mut huge = good.clone();
    while huge.len() < 16 << 20 {
        huge.extend_from_slice(&good[12..]);
    }
    let huge = zstd::bulk::compress(&huge, 1).unwrap();
    check(413, "too_large")(parts(post("channel=stable", huge).await.unwrap()).await);
    // An announced oversized body is refused before it is sent.
    let resp = raw_http(
        &s.addr,
        "POST /v1/delta?channel=stable HTTP/1.1\r\nHost: x\r\nContent-Length: 8388608\r\nConnection: close\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    let sig = signature_body(&f.v1);
    check(404, "not_found")(parts(post("channel=beta", sig.clone()).await.unwrap()).await);
    check(404, "not_found")(parts(post("channel=stable&version=9.9.9", sig.clone()).await.unwrap()).await);
    check(400, "bad_channel")(parts(post("channel=..%2Fx", sig.clone()).await.unwrap()).await);
    let r = post("version=1.0.0", sig.clone()).await.unwrap();
    assert_eq!(r.status(), 400, "missing channel");

    // The server still serves good requests after all that.
    let r = post("channel=stable", sig).await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_others_still_served() {
    let f = fixture();
    let s = Server::start(&f.repo_dir, &["--header-timeout", "1s", "--body-timeout", "1s"]);
    // Slow headers.
    let mut slow = TcpStream::connect(&s.addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    // Slow body: announces 100 kB, sends 10 bytes.
    let mut slow_body = TcpStream::connect(&s.addr).unwrap();
    slow_body
        .write_all(b"POST /v1/delta?channel=stable HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789")
        .unwrap();
    let started = Instant::now();
    let ok = reqwest::get(format!("{}/healthz", s.url)).await.unwrap();
    assert_eq!(ok.status(), 200, "others are served meanwhile");
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = String::new();
    let _ = slow.read_to_string(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "slow header client cut off: {:?}",
        started.elapsed()
    );
    assert!(!buf.contains("200 OK"), "{buf}");
    slow_body.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = String::new();
    let _ = slow_body.read_to_string(&mut buf);
    assert!(buf.starts_with("HTTP/1.1 408"), "slow body gets 408: {buf}");
}

/// A flood from one address: past its share its connections are closed at once and its
/// extra uncached diffs get 429 with Retry-After, while the server keeps room for others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_gets_only_its_share_of_connections_and_diffs() {
    let f = fixture();
    let s = Server::start(
        &f.repo_dir,
        &[
            "--max-connections",
            "16",
            "--max-connections-per-client",
            "4",
            "--max-diffs",
            "4",
            "--max-diffs-per-client",
            "1",
        ],
    );
    let mut held: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(&s.addr).unwrap()).collect();
    let mut extra = TcpStream::connect(&s.addr).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut answer = String::new();
    let started = Instant::now();
    let _ = extra.read_to_string(&mut answer);
    assert!(
        answer.is_empty(),
        "a fifth connection from one address is served: {answer}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed at once, not timed out"
    );
    held.pop();
    // The server notices the close when it reads EOF, which a loaded machine may delay.
    let c = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let freed = Instant::now();
    while c
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .map(|r| r.status())
        .ok()
        != Some(reqwest::StatusCode::OK)
    {
        assert!(
            freed.elapsed() < Duration::from_secs(10),
            "a freed connection slot is usable again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert!(s.metric("atom_dist_client_connections_refused_total").await >= 1.0);

    // Three different bases at once: only one diff of this address runs at a time.
    let bases: Vec<Vec<u8>> = (0..3u64)
        .map(|i| {
            let mut b = f.v1.clone();
            b[(i as usize) << 20..((i as usize) << 20) + 4096].copy_from_slice(&bytes(4096, 100 + i));
            b
        })
        .collect();
    let sigs: Vec<Vec<u8>> = bases.iter().map(|b| signature_body(b)).collect();
    let tasks: Vec<_> = sigs
        .into_iter()
        .map(|sig| tokio::spawn(c.post(format!("{}/v1/delta?channel=stable", s.url)).body(sig).send()))
        .collect();
    let (mut done, mut refused) = (0, 0);
    for t in tasks {
        let a = t.await.unwrap().unwrap();
        match a.status().as_u16() {
            200 => done += 1,
            429 => {
                assert!(a.headers().contains_key("retry-after"), "429 without Retry-After");
                refused += 1;
            }
            other => panic!("unexpected status {other}: {}", a.text().await.unwrap()),
        }
    }
    assert!(done >= 1 && refused >= 1, "{done} served, {refused} refused");
    assert_eq!(s.metric("atom_dist_client_diffs_refused_total").await, refused as f64);
    // Sequentially, the same address is served every time.
    let r = c
        .post(format!("{}/v1/delta?channel=stable", s.url))
        .body(signature_body(&bases[2]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn sigterm_lets_in_flight_requests_finish() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::open_or_create(&dir.path().join("repo")).unwrap();
    publish(&repo, &SecretKey::generate(), "1.0.0", &bytes(32 << 20, 5));
    let mut s = Server::start(&dir.path().join("repo"), &[]);
    let addr = s.addr.clone();
    let body = signature_body(&bytes(1 << 20, 6));
    let client = std::thread::spawn(move || {
        let mut sock = TcpStream::connect(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let head = format!(
            "POST /v1/delta?channel=stable HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        sock.write_all(head.as_bytes()).unwrap();
        sock.write_all(&body).unwrap();
        let mut resp = Vec::new();
        let _ = sock.read_to_end(&mut resp);
        resp
    });
    // SIGTERM only once the request is in flight (its diff started): on a loaded machine
    // a fixed wait can end before the server has even read it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = raw_http(&s.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        if metrics.lines().any(|l| l == "atom_dist_delta_cache_misses_total 1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the delta request never started:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = s.pid().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let resp = client.join().unwrap();
    assert!(
        resp.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&resp[..resp.len().min(200)])
    );
    let status = s.child.wait().unwrap();
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    assert!(TcpStream::connect(&s.addr).is_err(), "no longer listening");
    let _ = &s.repo_dir;
}

#[test]
fn serves_tls_with_given_certificate() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is needed for the TLS test");
    assert!(st.success());
    let s = Server::start(
        &f.repo_dir,
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
    );
    assert!(s.url.starts_with("https://"));
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&cert)
        .arg(format!("{}/healthz", s.url))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ok\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plain = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://{}/healthz", s.addr))
        .output()
        .unwrap();
    assert!(
        !plain.status.success() || !String::from_utf8_lossy(&plain.stdout).contains("ok"),
        "plain HTTP on a TLS port"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_cache_is_bounded_by_eviction() {
    let f = fixture();
    // A bound smaller than one delta keeps only the newest entry.
    let s = Server::start(&f.repo_dir, &["--cache-max", "1"]);
    let c = reqwest::Client::new();
    let url = format!("{}/v1/delta?channel=stable", s.url);
    let (a, b) = (signature_body(&f.v1), signature_body(&bytes(1 << 20, 77)));
    for (body, expect) in [(&a, "miss"), (&a, "hit"), (&b, "miss"), (&a, "miss")] {
        let r = c.post(&url).body(body.clone()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-atom-cache"], expect);
    }
    let entries = std::fs::read_dir(s._dir.path().join("cache/deltas"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".zst"))
        .count();
    assert_eq!(entries, 1, "older deltas evicted");
}

/// A client that disconnects (or times out) in the middle of its diff does not get its
/// diff slot back until the diff ends: the limits hold for orphaned diffs too, and the
/// orphan's answer still lands in the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnecting_does_not_free_a_running_diffs_slot() {
    let f = fixture();
    let s = Server::start_env(
        &f.repo_dir,
        &[
            "--max-diffs",
            "1",
            "--max-diffs-per-client",
            "1",
            "--diff-queue-wait",
            "1s",
        ],
        &[("ATOM_DIST_FAILPOINT", "diff:slow=3000")],
    );
    let url = format!("{}/v1/delta?channel=stable", s.url);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let c = reqwest::Client::new();
    let bases: Vec<Vec<u8>> = (0..3u64)
        .map(|i| {
            let mut b = f.v1.clone();
            b[..4096].copy_from_slice(&bytes(4096, 300 + i));
            b
        })
        .collect();
    assert!(
        impatient
            .post(&url)
            .body(signature_body(&bases[0]))
            .send()
            .await
            .is_err(),
        "timed out"
    );
    // Its diff still runs: the same address gets no second one, whoever asks.
    for base in &bases[1..] {
        let r = c.post(&url).body(signature_body(base)).send().await.unwrap();
        assert_eq!(r.status(), 429, "the orphaned diff still holds the client's slot");
    }
    // Once it ended, its answer is in the cache and the address is served again.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let r = c.post(&url).body(signature_body(&bases[0])).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-atom-cache"], "hit", "the orphan's answer was cached");
    let r = c.post(&url).body(signature_body(&bases[1])).send().await.unwrap();
    assert_eq!(r.status(), 200);
    drop(s);

    // The global permit too: with room for two diffs per client but one in all, the
    // orphan's permit keeps the next diff waiting until it gives up (503).
    let s = Server::start_env(
        &f.repo_dir,
        &[
            "--max-diffs",
            "1",
            "--max-diffs-per-client",
            "2",
            "--diff-queue-wait",
            "1s",
        ],
        &[("ATOM_DIST_FAILPOINT", "diff:slow=3000")],
    );
    let url = format!("{}/v1/delta?channel=stable", s.url);
    assert!(
        impatient
            .post(&url)
            .body(signature_body(&bases[0]))
            .send()
            .await
            .is_err(),
        "timed out"
    );
    let r = c.post(&url).body(signature_body(&bases[1])).send().await.unwrap();
    assert_eq!(r.status(), 503, "the orphaned diff still holds the only permit");
}

/// A cache entry whose bytes changed (a torn write, two writers, a disk error) is never
/// served: it is computed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_cache_entry_is_computed_again_not_served() {
    let f = fixture();
    let s = Server::start(&f.repo_dir, &[]);
    let url = format!("{}/v1/delta?channel=stable", s.url);
    let c = reqwest::Client::new();
    let r = c.post(&url).body(signature_body(&f.v1)).send().await.unwrap();
    assert_eq!(r.headers()["x-atom-cache"], "miss");
    let good = r.bytes().await.unwrap();
    let dir = s._dir.path().join("cache/deltas");
    let entry = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "zst"))
        .unwrap();
    let mut bytes_on_disk = std::fs::read(&entry).unwrap();
    let mid = bytes_on_disk.len() / 2;
    bytes_on_disk[mid..mid + 64].fill(0);
    std::fs::write(&entry, &bytes_on_disk).unwrap();
    let r = c.post(&url).body(signature_body(&f.v1)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-atom-cache"], "miss", "the damaged entry was not served");
    let again = r.bytes().await.unwrap();
    assert_eq!(again, good);
    assert_eq!(apply(&f.v1, &again, f.v2.len() as u64), f.v2);
}

/// A client that stops reading a large response is cut off after --write-timeout, so a
/// handful of stalled readers cannot hold every connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stalls_is_cut_off() {
    let f = fixture();
    let big = bytes(48 << 20, 9);
    let m = publish(&f.repo, &f.key, "3.0.0", &big);
    let s = Server::start(
        &f.repo_dir,
        &["--write-timeout", "2s", "--max-connections-per-client", "1"],
    );
    let mut stalled = TcpStream::connect(&s.addr).unwrap();
    stalled
        .write_all(format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", m.payload.path).as_bytes())
        .unwrap();
    // While it holds the address's only connection, others from it are refused...
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(raw_http(&s.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_empty());
    // ...until the write timeout closes it.
    let started = Instant::now();
    loop {
        let answer = raw_http(&s.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        if answer.contains("200 OK") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the stalled connection was never closed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(stalled);
}

/// Deltas to many versions do not keep every decompressed image: --image-cache-max holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decompressed_image_cache_is_bounded() {
    let f = fixture();
    let s = Server::start(&f.repo_dir, &["--image-cache-max", "1"]);
    let c = reqwest::Client::new();
    for version in ["1.0.0", "2.0.0", "1.0.0"] {
        let r = c
            .post(format!("{}/v1/delta?channel=stable&version={version}", s.url))
            .body(signature_body(&bytes(1 << 20, 5)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{version}");
        let images = std::fs::read_dir(s._dir.path().join("cache/images"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".img"))
            .count();
        assert_eq!(images, 1, "only the image in use is kept (after {version})");
    }
}

/// Expiry gauges, read from the repository (at most every 10 s): an alert can fire days ahead.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_say_when_each_channel_expires() {
    let f = fixture();
    let m = Manifest::parse(&f.repo.current("stable").unwrap().unwrap().manifest).unwrap();
    let s = Server::start(&f.repo_dir, &[]);
    let text = reqwest::get(format!("{}/metrics", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let want = format!(
        "atom_channel_expires_timestamp_seconds{{channel=\"stable\",document=\"manifest\"}} {}",
        m.expires.as_second()
    );
    assert!(text.lines().any(|l| l == want), "{want} missing:\n{text}");
}

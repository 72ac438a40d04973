//! `atom-build serve` on 127.0.0.1 with SQLite and with a real PostgreSQL (the same tests
//! on both): concurrent orders over more than the workers, identical orders sharing one
//! build, artifacts downloaded whole and by Range and checked against their SHA-256, the
//! ETA's error on a test queue, token isolation, a service killed mid-build and started
//! again (the build runs again, or fails with the reason when out of attempts), cancel
//! stopping a running build, the live log, bad orders refused, files expiring unless
//! pinned, no build starting on a full disk, remote workers, webhook and e-mail notices
//! (a real SMTP server), publishing, two instances on one PostgreSQL, and the web page in
//! a real headless Chromium. Root (builds chroot).

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use atom_test_support::postgres::Postgres;
use common::{BIN, ok};
use serde_json::{Value, json};
use sha2::Digest as _;

#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A service's world: templates, cache, data directory, database.
struct World {
    dir: tempfile::TempDir,
    database: String,
    _pg: Option<Postgres>,
}

impl World {
    fn new(backend: Backend) -> World {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "the build service's tests run builds: root"
        );
        let dir = tempfile::tempdir().unwrap();
        let (database, pg) = match backend {
            Backend::Sqlite => (format!("sqlite:{}", dir.path().join("data/service.db").display()), None),
            Backend::Postgres => {
                let pg = Postgres::start();
                (pg.database("atom_service"), Some(pg))
            }
        };
        let w = World { dir, database, _pg: pg };
        fs::create_dir_all(w.path("data")).unwrap();
        fs::create_dir_all(w.path("templates")).unwrap();
        let base = w.path("base");
        for d in ["etc", "usr/bin", "var", "run", "tmp"] {
            fs::create_dir_all(base.join(d)).unwrap();
        }
        fs::write(base.join("etc/motd"), "built by the service\n").unwrap();
        // A hook that takes SLEEP seconds (a file beside it says how many) and leaves its
        // pid, so a test can make builds slow and see them stopped.
        let hook = w.path("slow.sh");
        fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"slow hook: $$\"\necho $$ > {d}/hook-$ATOM_VERSION.tmp\nmv {d}/hook-$ATOM_VERSION.tmp {d}/hook-$ATOM_VERSION.pid\nsleep \"$(cat {d}/sleep)\"\n",
                d = w.path("").display()
            ),
        )
        .unwrap();
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
        w.set_sleep(0);
        let failing = w.path("failing.sh");
        fs::write(
            &failing,
            "#!/bin/sh\nfor i in $(seq 1 40); do echo \"failing hook line $i\"; done\nexit 3\n",
        )
        .unwrap();
        fs::set_permissions(&failing, fs::Permissions::from_mode(0o755)).unwrap();
        for (name, extra) in [
            ("quick", String::new()),
            (
                "slow",
                format!("[hooks.clean]\nbefore = [{:?}]\n", hook.display().to_string()),
            ),
            (
                "failing",
                format!("[hooks.clean]\nbefore = [{:?}]\n", failing.display().to_string()),
            ),
        ] {
            fs::write(
                w.path(&format!("templates/{name}.toml")),
                format!(
                    "[os]\nname = \"svc-{name}\"\nversion = \"1.0.0\"\n[base]\ntree = {:?}\n[image]\nsize = \"32M\"\n[outputs]\ntarball = true\n{extra}",
                    base.display().to_string()
                ),
            )
            .unwrap();
        }
        w
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn set_sleep(&self, secs: u32) {
        fs::write(self.path("sleep"), secs.to_string()).unwrap();
    }

    fn token(&self, name: &str, extra: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(["token", "add", name, "--database", &self.database])
            .args(extra)
            .output()
            .unwrap();
        ok(out).trim().to_string()
    }

    fn start(&self, extra: &[&str]) -> Service {
        self.start_at("data", extra)
    }

    /// An instance with the data directory `data` (several share the world's database).
    fn start_at(&self, data: &str, extra: &[&str]) -> Service {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--database", &self.database])
            .arg("--data")
            .arg(self.path(data))
            .arg("--templates")
            .arg(self.path("templates"))
            .arg("--cache")
            .arg(self.path("cache"))
            .args(["--lease", "3s"])
            // The default floor (10G) is more than a test machine may have free.
            .args(if extra.contains(&"--min-free") {
                &[][..]
            } else {
                &["--min-free", "64M"][..]
            })
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        let url = loop {
            let mut line = String::new();
            if lines.read_line(&mut line).unwrap() == 0 {
                panic!("the service ended before listening: {seen}");
            }
            seen.push_str(&line);
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // The rest of its log goes to a file (a full pipe would stop it).
        let log = self.path(&format!("service-{data}.log"));
        let mut f = fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        std::io::Write::write_all(&mut f, seen.as_bytes()).unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut lines, &mut f);
        });
        Service { child, url }
    }
}

impl World {
    /// `atom-build worker` for the service, with this world's templates and a cache and
    /// data directory of its own.
    fn worker(&self, s: &Service, token: &str, name: &str) -> Service {
        let token_file = self.path(&format!("{name}.token"));
        fs::write(&token_file, token).unwrap();
        let log = fs::File::create(self.path(&format!("worker-{name}.log"))).unwrap();
        let child = Command::new(BIN)
            .args([
                "worker",
                "--server",
                &s.url,
                "--name",
                name,
                "--jobs",
                "1",
                "--min-free",
                "64M",
            ])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--data")
            .arg(self.path(&format!("worker-{name}")))
            .arg("--templates")
            .arg(self.path("templates"))
            .arg("--cache")
            .arg(self.path(&format!("cache-{name}")))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Service {
            child,
            url: s.url.clone(),
        }
    }
}

struct Service {
    child: Child,
    url: String,
}

impl Service {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Api {
    http: reqwest::blocking::Client,
    url: String,
    token: String,
}

/// A client. In a workspace build reqwest carries rustls without a crypto provider
/// (another crate installs its own): the tests install ring's.
fn client() -> reqwest::blocking::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder()
}

impl Api {
    fn new(s: &Service, token: &str) -> Api {
        Api {
            http: client().timeout(Duration::from_secs(120)).build().unwrap(),
            url: s.url.clone(),
            token: token.to_string(),
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token)
    }

    fn order(&self, body: Value) -> (u16, Value) {
        let r = self
            .req(reqwest::Method::POST, "/v1/orders")
            .json(&body)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    fn ordered(&self, body: Value) -> Value {
        let (status, v) = self.order(body);
        assert_eq!(status, 201, "order refused: {v}");
        v
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let r = self.req(reqwest::Method::GET, path).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    fn show(&self, id: &str) -> Value {
        let (status, v) = self.get(&format!("/v1/orders/{id}"));
        assert_eq!(status, 200, "{v}");
        v
    }

    /// Downloads every artifact listed and checks its size and SHA-256; the bytes by name.
    fn download_all_verified(&self, arts: &[Value]) -> std::collections::HashMap<String, bytes::Bytes> {
        let mut files = std::collections::HashMap::new();
        for x in arts {
            let bytes = self
                .req(reqwest::Method::GET, x["url"].as_str().unwrap())
                .send()
                .unwrap()
                .bytes()
                .unwrap();
            assert_eq!(bytes.len() as u64, x["size"].as_u64().unwrap());
            assert_eq!(sha256(&bytes), x["sha256"].as_str().unwrap(), "{}", x["name"]);
            files.insert(x["name"].as_str().unwrap().to_string(), bytes);
        }
        files
    }

    /// Polls the order until `done` says so (or panics after `limit`).
    fn wait(&self, id: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let v = self.show(id);
            if done(&v) {
                return v;
            }
            assert!(
                started.elapsed() < limit,
                "order {id} still {} after {limit:?}",
                v["state"]
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn finished(&self, id: &str) -> Value {
        self.wait(id, Duration::from_secs(240), |v| {
            !matches!(v["state"].as_str(), Some("queued") | Some("running"))
        })
    }
}

fn template(name: &str, version: &str) -> Value {
    json!({ "template": name, "set": [format!("os.version=\"{version}\"")] })
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn timestamp(v: &Value) -> i64 {
    v.as_str().unwrap().parse::<jiff::Timestamp>().unwrap().as_second()
}

fn orders_are_built_shared_and_downloaded(backend: Backend) {
    let w = World::new(backend);
    let alice = w.token("alice", &["--max-queued", "20"]);
    let bob = w.token("bob", &[]);
    let s = w.start(&["--workers", "2"]);
    let a = Api::new(&s, &alice);
    let b = Api::new(&s, &bob);

    // A first build measures the stages the ETAs are made of.
    let first = a.ordered(template("quick", "1.0.0"));
    assert_eq!(a.finished(first["id"].as_str().unwrap())["state"], "succeeded");

    // More orders than workers, each a bit slow; one identical to another.
    w.set_sleep(2);
    let started = Instant::now();
    let mut ids = Vec::new();
    for v in ["1.1.0", "1.2.0", "1.3.0", "1.4.0", "1.5.0"] {
        ids.push(a.ordered(template("slow", v))["id"].as_str().unwrap().to_string());
    }
    let twin = a.ordered(template("slow", "1.2.0"));
    assert_eq!(twin["shared"], true, "an identical order shares the build: {twin}");
    let first_of_twin = a.show(&ids[1]);
    assert_eq!(twin["build"]["id"], first_of_twin["build"]["id"]);
    let queued = a.show(&ids[4]);
    assert!(
        queued["queue_position"].as_u64().is_some_and(|p| p >= 1),
        "the last order waits in the queue with a position: {queued}"
    );
    assert!(queued["eta"]["ready_in_seconds"].as_i64().is_some(), "{queued}");

    // Bob sees none of it and can touch none of it.
    let (status, list) = b.get("/v1/orders");
    assert_eq!(status, 200);
    assert_eq!(list["orders"].as_array().unwrap().len(), 0, "{list}");
    assert_eq!(b.get(&format!("/v1/orders/{}", ids[0])).0, 404);
    let r = b
        .req(reqwest::Method::POST, &format!("/v1/orders/{}/cancel", ids[0]))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = b
        .req(reqwest::Method::DELETE, &format!("/v1/orders/{}", ids[0]))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);

    let mut errors = Vec::new();
    for id in ids.iter().chain([twin["id"].as_str().unwrap().to_string()].iter()) {
        let v = a.finished(id);
        assert_eq!(v["state"], "succeeded", "{v}");
        if v["shared"] == false && !v["predicted_ready"].is_null() {
            let err = timestamp(&v["build"]["finished"]) - timestamp(&v["predicted_ready"]);
            errors.push(err);
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let mean_abs = errors.iter().map(|e| e.abs() as f64).sum::<f64>() / errors.len().max(1) as f64;
    println!(
        "ETA error on a queue of {} builds over 2 workers ({wall:.0} s in all): mean |error| {mean_abs:.1} s, each {errors:?}",
        errors.len()
    );
    assert!(!errors.is_empty(), "every new build had a predicted time");
    // Unknown stages are predicted at 30 s each (330 s a build): the measured stages
    // must do far better than that.
    assert!(
        mean_abs <= 60.0,
        "the ETA is off by {mean_abs:.0} s on average (wall {wall:.0} s): {errors:?}"
    );

    // Artifacts: listed with their digests, downloaded whole and by Range.
    let v = a.show(&ids[0]);
    let arts = v["artifacts"].as_array().unwrap();
    let names: Vec<&str> = arts.iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"svc-slow-1.1.0.img"), "{names:?}");
    assert!(names.contains(&"svc-slow-1.1.0.tar.zst"), "{names:?}");
    assert!(names.contains(&"build.lock.toml"), "{names:?}");
    let files = a.download_all_verified(arts);
    let img = arts.iter().find(|x| x["name"] == "svc-slow-1.1.0.img").unwrap();
    let whole = &files["svc-slow-1.1.0.img"];
    let r = a
        .req(reqwest::Method::GET, img["url"].as_str().unwrap())
        .header("Range", "bytes=1024-2047")
        .send()
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        &r.bytes().unwrap()[..],
        &whole[1024..2048],
        "the range is those bytes of the image"
    );
    // Bob cannot read Alice's log or files either.
    let r = b
        .req(reqwest::Method::GET, img["url"].as_str().unwrap())
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = b
        .req(reqwest::Method::GET, &format!("/v1/orders/{}/log", ids[0]))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    // Names the build did not record are not files to it.
    let (status, _) = a.get(&format!("/v1/orders/{}/artifacts/..%2F..%2Fservice.db", ids[0]));
    assert_eq!(status, 404);

    // The log of a build, whole.
    let log = a
        .req(reqwest::Method::GET, &format!("/v1/orders/{}/log", ids[0]))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        log.contains("=== attempt 1 on worker") && log.contains("=== succeeded"),
        "{log}"
    );

    // Deleting one of two orders of a build keeps its files; the last takes them.
    let build_dir = w.path(&format!("data/builds/{}", twin["build"]["id"].as_str().unwrap()));
    assert!(build_dir.is_dir());
    let del = |id: &str| {
        a.req(reqwest::Method::DELETE, &format!("/v1/orders/{id}"))
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(del(twin["id"].as_str().unwrap()), 204);
    assert!(build_dir.is_dir(), "the other order still has the build");
    assert_eq!(del(&ids[1]), 204);
    assert!(!build_dir.exists(), "the last order's delete removed the build's files");
    assert_eq!(a.get(&format!("/v1/orders/{}", ids[1])).0, 404);
    // A new identical order builds again (the old build is gone).
    let again = a.ordered(template("slow", "1.2.0"));
    assert_eq!(again["shared"], false, "{again}");
}

fn a_killed_service_loses_no_order(backend: Backend) {
    let w = World::new(backend);
    let t = w.token("ops", &[]);
    w.set_sleep(30);
    let mut s = w.start(&["--workers", "1"]);
    let a = Api::new(&s, &t);
    let first = a.ordered(template("slow", "2.0.0"))["id"].as_str().unwrap().to_string();
    let second = a.ordered(template("slow", "2.1.0"))["id"].as_str().unwrap().to_string();
    a.wait(&first, Duration::from_secs(120), |v| v["build"]["stage"] == "clean");
    // The hook is running (its pid file is written first thing).
    let pid_file = w.path("hook-2.0.0.pid");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pid_file.exists() {
        assert!(Instant::now() < deadline, "the slow hook never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    let hook_pid: i32 = fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    s.kill();
    w.set_sleep(1);
    // The build died with the service (or is killed by the next start).
    let s = w.start(&["--workers", "1"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{hook_pid}")).exists() {
        assert!(Instant::now() < deadline, "the killed service's build kept running");
        std::thread::sleep(Duration::from_millis(100));
    }
    let a = Api::new(&s, &t);
    let v = a.finished(&first);
    assert_eq!(v["state"], "succeeded", "the interrupted build ran again: {v}");
    assert_eq!(v["build"]["attempts"], 2, "{v}");
    let log = a
        .req(reqwest::Method::GET, &format!("/v1/orders/{first}/log"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(log.contains("=== attempt 2 on worker"), "{log}");
    assert_eq!(a.finished(&second)["state"], "succeeded");
    drop(s);

    // Out of attempts: failed, with the reason, never left running.
    w.set_sleep(30);
    let mut s = w.start(&["--workers", "1", "--max-attempts", "1"]);
    let a = Api::new(&s, &t);
    let third = a.ordered(template("slow", "2.2.0"))["id"].as_str().unwrap().to_string();
    a.wait(&third, Duration::from_secs(120), |v| v["build"]["stage"] == "clean");
    s.kill();
    let s = w.start(&["--workers", "1", "--max-attempts", "1"]);
    let a = Api::new(&s, &t);
    let v = a.finished(&third);
    assert_eq!(v["state"], "failed", "{v}");
    assert!(
        v["build"]["error"].as_str().unwrap().contains("its worker stopped"),
        "the reason is given: {v}"
    );
}

fn cancel_stops_a_running_build_and_the_log_follows_it(backend: Backend) {
    let w = World::new(backend);
    let t = w.token("dev", &[]);
    w.set_sleep(60);
    let s = w.start(&["--workers", "1"]);
    let a = Api::new(&s, &t);
    let id = a.ordered(template("slow", "3.0.0"))["id"].as_str().unwrap().to_string();
    // The live log, read while the build runs.
    let follow = a
        .req(reqwest::Method::GET, &format!("/v1/orders/{id}/log?follow=1"))
        .send()
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let mut follow = follow;
        follow.read_to_string(&mut text).unwrap();
        text
    });
    let pid_file = w.path("hook-3.0.0.pid");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pid_file.exists() {
        assert!(Instant::now() < deadline, "the slow hook never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    let hook_pid: i32 = fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    let r = a
        .req(reqwest::Method::POST, &format!("/v1/orders/{id}/cancel"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = a.show(&id);
    assert_eq!(v["state"], "cancelled", "{v}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{hook_pid}")).exists() {
        assert!(Instant::now() < deadline, "the cancelled build's hook still runs");
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = reader.join().unwrap();
    assert!(
        text.contains("stage 8/11 clean") && text.contains("hook before:"),
        "the followed log carried the build's progress: {text}"
    );
    assert!(
        text.contains("=== stopped: the build is cancelled"),
        "and ended with the build: {text}"
    );
    let r = a
        .req(reqwest::Method::POST, &format!("/v1/orders/{id}/cancel"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 409, "a cancelled order cannot be cancelled again");
    // The worker is free again.
    w.set_sleep(0);
    let next = a.ordered(template("quick", "3.1.0"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(a.finished(&next)["state"], "succeeded");
}

fn bad_orders_are_refused(backend: Backend) {
    let w = World::new(backend);
    let t = w.token("limited", &["--max-queued", "1"]);
    let trusted = w.token("trusted", &["--scope", "recipe"]);
    w.set_sleep(60);
    let s = w.start(&["--workers", "1"]);
    let a = Api::new(&s, &t);
    let r = client()
        .build()
        .unwrap()
        .get(format!("{}/v1/orders", s.url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401, "no token");
    let forged = Api::new(&s, &format!("{}x", &t[..t.len() - 1]));
    assert_eq!(forged.get("/v1/orders").0, 401, "a wrong secret");
    let cases = [
        (json!({ "template": "quick", "colour": "blue" }), 400, "unknown field"),
        (json!({ "template": "quick", "recipe": "[os]" }), 400, "not both"),
        (json!({}), 400, "template"),
        (json!({ "template": "nope" }), 400, "no template"),
        (json!({ "template": "../quick" }), 400, "a name is"),
        (
            json!({ "template": "quick", "set": ["hooks.clean.before=[\"/bin/sh\"]"] }),
            403,
            "change only",
        ),
        (
            json!({ "template": "quick", "set": ["base.tree=\"/\""] }),
            403,
            "change only",
        ),
        (json!({ "recipe": "[os]\nversion = \"1.0.0\"\n" }), 403, "recipe"),
        (json!({ "template": "quick", "publish": true }), 403, "publish"),
        (json!({ "template": "quick", "formats": ["iso"] }), 400, "formats are"),
        (
            json!({ "template": "quick", "notify": { "email": "ops@example.test" } }),
            403,
            "\"email\" scope",
        ),
        (
            json!({ "template": "quick", "notify": { "webhook": "http://127.0.0.1:1/" } }),
            400,
            "its secret",
        ),
        (
            json!({ "template": "quick", "set": ["os.version=\"x\""] }),
            400,
            "the recipe does not build",
        ),
        (
            json!({ "template": "quick", "set": ["packages.install=[\"-oDPkg::Pre-Invoke::=touch /tmp/owned\"]"] }),
            403,
            "not a package name",
        ),
        (
            json!({ "template": "quick", "set": ["image.size=\"1E\""] }),
            403,
            "at most",
        ),
    ];
    for (body, status, needle) in cases {
        let (got, v) = a.order(body.clone());
        assert_eq!(got, status, "{body}: {v}");
        assert!(
            v["message"].as_str().unwrap_or_default().contains(needle),
            "{body}: {v}"
        );
    }
    let r = a
        .req(reqwest::Method::POST, "/v1/orders")
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    // A token that may mail, on a service without a relay.
    let mailer = w.token("mailer", &["--scope", "email"]);
    let (got, v) =
        Api::new(&s, &mailer).order(json!({ "template": "quick", "notify": { "email": "ops@example.test" } }));
    assert_eq!(got, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap_or_default().contains("without --smtp"),
        "{v}"
    );
    // A whole recipe from a trusted token: its unknown key is named.
    let (got, v) = Api::new(&s, &trusted).order(json!({ "recipe": "[os]\nversion = \"1.0.0\"\ncolour = 1\n" }));
    assert_eq!(got, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("colour"), "{v}");
    // The limit of open orders.
    a.ordered(template("slow", "4.0.0"));
    let (got, v) = a.order(template("slow", "4.1.0"));
    assert_eq!(got, 429, "{v}");
}

fn files_expire_unless_pinned_and_a_full_disk_holds_the_queue(backend: Backend) {
    let w = World::new(backend);
    let t = w.token("keeper", &[]);
    // No build starts without the free space asked for.
    let s = w.start(&["--workers", "1", "--min-free", "1E"]);
    let a = Api::new(&s, &t);
    let held = a.ordered(template("quick", "5.0.0"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(a.show(&held)["state"], "queued", "no build starts on a full disk");
    drop(s);
    // The service's log reaches its file through a thread: a moment's grace.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = fs::read_to_string(w.path("service-data.log")).unwrap_or_default();
        if log.contains("too little free space") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the workers did not say why nothing starts: {log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let s = w.start(&["--workers", "1", "--expire-after", "4s"]);
    let a = Api::new(&s, &t);
    let kept = a.ordered(template("quick", "5.1.0"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = a
        .req(reqwest::Method::POST, &format!("/v1/orders/{kept}/pin"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = a.finished(&held);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(v["expires_at"].is_string(), "{v}");
    let url = v["artifacts"][0]["url"].as_str().unwrap().to_string();
    let build_dir = w.path(&format!("data/builds/{}", v["build"]["id"].as_str().unwrap()));
    let v = a.finished(&kept);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["pinned"], true);
    assert!(v["expires_at"].is_null(), "{v}");

    let v = a.wait(&held, Duration::from_secs(30), |v| v["state"] == "expired");
    assert_eq!(v["artifacts"].as_array().unwrap().len(), 0, "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while build_dir.exists() {
        assert!(Instant::now() < deadline, "the expired build's files stay");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(a.req(reqwest::Method::GET, &url).send().unwrap().status(), 404);
    let r = a
        .req(reqwest::Method::POST, &format!("/v1/orders/{held}/pin"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 409, "an expired build cannot be pinned");
    // The pinned one outlives the expiry, until unpinned.
    std::thread::sleep(Duration::from_secs(3));
    let v = a.show(&kept);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(!v["artifacts"].as_array().unwrap().is_empty());
    let r = a
        .req(reqwest::Method::DELETE, &format!("/v1/orders/{kept}/pin"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    a.wait(&kept, Duration::from_secs(30), |v| v["state"] == "expired");
}

#[test]
fn sqlite_files_expire_unless_pinned_and_a_full_disk_holds_the_queue() {
    files_expire_unless_pinned_and_a_full_disk_holds_the_queue(Backend::Sqlite);
}

#[test]
fn postgres_files_expire_unless_pinned_and_a_full_disk_holds_the_queue() {
    files_expire_unless_pinned_and_a_full_disk_holds_the_queue(Backend::Postgres);
}

fn a_vanished_remote_worker_loses_its_build(backend: Backend) {
    let w = World::new(backend);
    let t = w.token("ops", &[]);
    let farm = w.token("farm", &["--scope", "worker"]);
    w.set_sleep(60);
    // No local workers: every build runs on a remote one.
    let s = w.start(&["--workers", "0"]);
    let a = Api::new(&s, &t);
    let r = a
        .req(reqwest::Method::POST, "/v1/worker/lease")
        .json(&json!({ "worker": "intruder" }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 403, "a token without the worker scope leases nothing");
    let id = a.ordered(template("slow", "3.0.0"))["id"].as_str().unwrap().to_string();

    let mut first = w.worker(&s, &farm, "first");
    let pid_file = w.path("hook-3.0.0.pid");
    let deadline = Instant::now() + Duration::from_secs(180);
    while !pid_file.exists() {
        assert!(
            Instant::now() < deadline,
            "the remote worker never ran the build's hook"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let running = a.show(&id);
    assert_eq!(running["build"]["state"], "running", "{running}");
    // The live log is the worker's, sent with its heartbeats.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = a
            .req(reqwest::Method::GET, &format!("/v1/orders/{id}/log"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        if log.contains("=== attempt 1 on worker first-1") && log.contains("hook before:") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the service has not the remote worker's log: {log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The worker vanishes (its build dies with it).
    fs::remove_file(&pid_file).unwrap();
    first.kill();
    w.set_sleep(0);
    let _second = w.worker(&s, &farm, "second");
    let v = a.finished(&id);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["build"]["attempts"], 2, "the build ran again elsewhere: {v}");
    let log = a
        .req(reqwest::Method::GET, &format!("/v1/orders/{id}/log"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        log.contains("=== attempt 2 on worker second-1") && log.contains("=== succeeded"),
        "{log}"
    );
    // The artifacts the second worker uploaded, byte for byte.
    let arts = v["artifacts"].as_array().unwrap();
    let names: Vec<&str> = arts.iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"svc-slow-3.0.0.img"), "{names:?}");
    assert!(names.contains(&"svc-slow-3.0.0.tar.zst"), "{names:?}");
    let files = a.download_all_verified(arts);
    let bytes = &files["svc-slow-3.0.0.img"];
    // An ext4 image (the slot's file system): its superblock magic at 1080.
    assert_eq!(&bytes[1080..1082], &[0x53, 0xef], "the image is an ext4 file system");
    // The worker cleaned up after itself: its copy went to the service.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<_> = fs::read_dir(w.path("worker-second/builds")).unwrap().collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the worker kept {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn two_instances_share_one_queue(backend: Backend) {
    let w = World::new(backend);
    let t = w.token("ops", &["--max-queued", "20"]);
    w.set_sleep(2);
    let one = w.start_at("data-one", &["--workers", "1"]);
    let two = w.start_at("data-two", &["--workers", "1"]);
    let (a1, a2) = (Api::new(&one, &t), Api::new(&two, &t));
    let mut ids = Vec::new();
    for (n, v) in ["5.0.0", "5.1.0", "5.2.0", "5.3.0"].iter().enumerate() {
        let api = if n % 2 == 0 { &a1 } else { &a2 };
        ids.push(api.ordered(template("slow", v))["id"].as_str().unwrap().to_string());
    }
    // The same order through the other instance shares the build.
    let twin = a2.ordered(template("slow", "5.0.0"));
    assert_eq!(twin["shared"], true, "{twin}");
    let instance_of = |data: &str| fs::read_to_string(w.path(&format!("{data}/instance-id"))).unwrap();
    let (i1, i2) = (instance_of("data-one"), instance_of("data-two"));
    let mut ran_on = std::collections::BTreeSet::new();
    for id in &ids {
        // Either instance shows every order of the token.
        let v = a2.finished(id);
        assert_eq!(v["state"], "succeeded", "{v}");
        let build = v["build"]["id"].as_str().unwrap();
        let here = |data: &str| w.path(&format!("{data}/builds/{build}/build/out")).is_dir();
        let (holder, other, other_api) = match (here("data-one"), here("data-two")) {
            (true, false) => (&i1, &two, &a2),
            (false, true) => (&i2, &one, &a1),
            found => panic!("build {build}'s files on one instance, not {found:?}"),
        };
        ran_on.insert(holder.clone());
        // The other instance sends a download to the one holding the files.
        let url = v["artifacts"][0]["url"].as_str().unwrap();
        let r = client()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
            .get(format!("{}{url}", other.url))
            .bearer_auth(&t)
            .send()
            .unwrap();
        assert_eq!(r.status(), 307, "{url} through the instance without the files");
        let to = r.headers()["location"].to_str().unwrap().to_string();
        let bytes = other_api.http.get(&to).bearer_auth(&t).send().unwrap().bytes().unwrap();
        assert_eq!(sha256(&bytes), v["artifacts"][0]["sha256"].as_str().unwrap());
    }
    assert_eq!(
        ran_on.len(),
        2,
        "both instances' workers took builds from the one queue"
    );
}

fn an_order_publishes_with_the_service_s_key(backend: Backend) {
    let w = World::new(backend);
    ok(Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(w.path("signer"))
        .output()
        .unwrap());
    fs::write(
        w.path("templates/release.toml"),
        format!(
            "[os]\nname = \"svc-release\"\nversion = \"1.0.0\"\n[base]\ntree = {:?}\n[image]\nsize = \"32M\"\n\
             [publish]\nrepo = {:?}\nkey = {:?}\nzstd_level = 3\n",
            w.path("base").display().to_string(),
            w.path("repo").display().to_string(),
            w.path("signer.key").display().to_string()
        ),
    )
    .unwrap();
    let plain = w.token("plain", &[]);
    let release = w.token("release", &["--scope", "publish"]);
    let s = w.start(&["--workers", "1"]);
    let (p, r) = (Api::new(&s, &plain), Api::new(&s, &release));
    let (status, v) = p.order(json!({ "template": "release", "publish": true }));
    assert_eq!(status, 403, "publishing needs the scope: {v}");
    // Without "publish" the stage is skipped: nothing reaches the repository.
    let unpublished = p.ordered(json!({ "template": "release" }));
    assert_eq!(p.finished(unpublished["id"].as_str().unwrap())["state"], "succeeded");
    assert!(
        !w.path("repo/builds").exists(),
        "an order without publish published nothing"
    );
    let published = r.ordered(json!({ "template": "release", "publish": true }));
    assert_eq!(published["shared"], false, "publishing is another build: {published}");
    let v = r.finished(published["id"].as_str().unwrap());
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(
        w.path("repo/builds/stable/1.0.0/build.lock.toml").is_file(),
        "the build's lock is in the repository"
    );
    // What the service published verifies with the public key.
    let out = Command::new(BIN)
        .args(["verify", "--channel", "stable", "--key"])
        .arg(w.path("signer.pub"))
        .arg("--repo")
        .arg(w.path("repo"))
        .output()
        .unwrap();
    ok(out);
}

/// A request the webhook received: its headers (names in lower case) and body.
type Received = (std::collections::HashMap<String, String>, Vec<u8>);

/// A webhook on 127.0.0.1: records each request (headers, body); answers 500 to the
/// first (so the service must retry), 200 to the others.
struct Webhook {
    url: String,
    got: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
}

impl Webhook {
    fn start() -> Webhook {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = got.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut headers = std::collections::HashMap::new();
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.trim_end().split_once(':') {
                        headers.insert(k.to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let len: usize = headers.get("content-length").map(|l| l.parse().unwrap()).unwrap_or(0);
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let first = {
                    let mut g = seen.lock().unwrap();
                    g.push((headers, body));
                    g.len() == 1
                };
                let status = if first { "500 Internal Server Error" } else { "200 OK" };
                let _ = std::io::Write::write_all(
                    &mut conn,
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes(),
                );
            }
        });
        Webhook { url, got }
    }
}

fn notices_tell_of_each_build_s_end(backend: Backend) {
    let w = World::new(backend);
    let t = w.token("ops", &["--scope", "email"]);
    let hook = Webhook::start();
    // The relay is down when the builds end: the mails are sent when it is back.
    let smtp_port = atom_test_support::smtp::free_port();
    let relay = format!("smtp://127.0.0.1:{smtp_port}");
    let s = w.start(&[
        "--workers",
        "1",
        "--smtp",
        &relay,
        "--mail-from",
        "Atom builds <builds@example.test>",
    ]);
    let a = Api::new(&s, &t);
    let secret = "the orderer's own secret";
    let (status, v) = a.order(json!({ "template": "quick", "notify": { "webhook": "ftp://x", "secret": secret } }));
    assert_eq!(status, 400, "{v}");
    let (status, v) = a.order(json!({ "template": "quick", "notify": { "webhook": hook.url, "secret": "short" } }));
    assert_eq!(status, 400, "{v}");
    let (status, v) = a.order(json!({ "template": "quick", "notify": { "email": "not an address" } }));
    assert_eq!(status, 400, "{v}");
    let good = a.ordered(json!({
        "template": "quick", "set": ["os.version=\"4.0.0\""],
        "notify": { "webhook": hook.url, "secret": secret, "email": ["ops@example.test", "dev@example.test"] },
    }));
    assert_eq!(good["request"]["notify"]["secret"], "(hidden)", "{good}");
    let bad = a.ordered(json!({
        "template": "failing", "set": ["os.version=\"4.0.1\""],
        "notify": { "webhook": hook.url, "secret": secret, "email": "ops@example.test" },
    }));
    let (good, bad) = (good["id"].as_str().unwrap(), bad["id"].as_str().unwrap());
    assert_eq!(a.finished(good)["state"], "succeeded");
    assert_eq!(a.finished(bad)["state"], "failed");

    // Two notices delivered, one of them after a 500: three requests.
    let deadline = Instant::now() + Duration::from_secs(60);
    while hook.got.lock().unwrap().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the webhook got {} requests",
            hook.got.lock().unwrap().len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let got = hook.got.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "each notice is delivered once after its 2xx");
    let mut ids = Vec::new();
    for (headers, body) in &got {
        let mut mac = <hmac::Hmac<sha2_11::Sha256> as hmac::KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
        hmac::Mac::update(&mut mac, body);
        let want = format!("sha256={}", hex::encode(hmac::Mac::finalize(mac).into_bytes()));
        assert_eq!(
            headers.get("x-atom-signature"),
            Some(&want),
            "the body is signed with the order's secret"
        );
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["request"]["notify"]["secret"], "(hidden)");
        ids.push(v["id"].as_str().unwrap().to_string());
        if v["id"] == good {
            assert_eq!(v["state"], "succeeded", "{v}");
            assert!(!v["artifacts"].as_array().unwrap().is_empty(), "{v}");
        } else {
            assert_eq!(v["id"], bad);
            assert_eq!(v["state"], "failed", "{v}");
            let tail = v["build"]["log_tail"].as_str().unwrap();
            let lines = tail.lines().count();
            assert!(
                (1..=30).contains(&lines),
                "the failure carries the log's last lines ({lines}): {tail}"
            );
            assert!(v["build"]["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
            assert!(
                tail.contains("failing hook line 40"),
                "the hook's last line is in the tail: {tail}"
            );
            println!("a failure's notice: error {}; log tail:\n{tail}", v["build"]["error"]);
        }
    }
    // The notice answered 500 was sent again (the other one may come between).
    assert_eq!(ids.iter().filter(|i| **i == ids[0]).count(), 2, "{ids:?}");
    assert!(ids.iter().any(|i| i == good) && ids.iter().any(|i| i == bad), "{ids:?}");

    // E-mail: the first tries found no relay; a real SMTP server then gets one mail per
    // address, each once.
    let log = w.path("service-data.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fs::read_to_string(&log)
        .unwrap()
        .lines()
        .any(|l| l.contains("not delivered") && l.contains("ops@example.test"))
    {
        assert!(Instant::now() < deadline, "no failed try of a mail is logged");
        std::thread::sleep(Duration::from_millis(200));
    }
    let smtp = atom_test_support::smtp::Smtp::start(w.dir.path(), smtp_port);
    let deadline = Instant::now() + Duration::from_secs(90);
    while smtp.mails().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the SMTP server got {} mails",
            smtp.mails().len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(3));
    let mails = smtp.mails();
    assert_eq!(mails.len(), 3, "one mail per address, each once: {mails:?}");
    let mut to: Vec<String> = mails.iter().map(|m| m.to.clone()).collect();
    to.sort();
    assert_eq!(to, ["dev@example.test", "ops@example.test", "ops@example.test"]);
    for m in &mails {
        assert_eq!(m.from, "Atom builds <builds@example.test>");
        let (name, json) = &m.attachments[0];
        assert_eq!(name, "order.json");
        let v: Value = serde_json::from_slice(json).unwrap();
        assert!(
            v["request"].get("notify").is_none(),
            "a recipient sees neither the others nor the webhook: {v}"
        );
        assert!(v["request"]["template"].is_string(), "{v}");
        let id = v["id"].as_str().unwrap();
        assert!(m.text.contains(&format!("{}/v1/orders/{id}", s.url)), "{}", m.text);
        if id == good {
            assert_eq!(
                m.subject,
                format!("atom-build: order {good} succeeded (template quick)")
            );
            for art in v["artifacts"].as_array().unwrap() {
                let (sha, url) = (art["sha256"].as_str().unwrap(), art["url"].as_str().unwrap());
                assert!(
                    m.text.contains(sha) && m.text.contains(&format!("{}{url}", s.url)),
                    "{}",
                    m.text
                );
            }
        } else {
            assert_eq!(id, bad);
            assert_eq!(m.subject, format!("atom-build: order {bad} failed (template failing)"));
            let error = v["build"]["error"].as_str().unwrap();
            assert!(m.text.contains(&format!("Error:    {error}")), "{}", m.text);
            let tail: Vec<&str> = m
                .text
                .lines()
                .skip_while(|l| !l.starts_with("The build log's last lines"))
                .skip(1)
                .take_while(|l| !l.is_empty())
                .collect();
            assert!((1..=30).contains(&tail.len()), "{}", m.text);
            assert!(tail.iter().any(|l| l.trim() == "failing hook line 40"), "{}", m.text);
            println!("a failure's mail:\nSubject: {}\n\n{}", m.subject, m.text);
        }
    }
}

/// The web page in a real headless Chromium: give the token, order a template, watch
/// its stage move and its log come in live, download an artifact by its link; the
/// screenshots are kept (`target/test-artifacts/`).
#[test]
fn the_web_page_orders_watches_and_downloads() {
    use atom_test_support::browser::{Browser, artifacts_dir};
    let w = World::new(Backend::Sqlite);
    let t = w.token("web", &[]);
    w.set_sleep(6);
    let s = w.start(&["--workers", "1"]);
    let a = Api::new(&s, &t);
    // The cookie the page sets for its download links is good for reading only: a POST
    // with it and without the header is refused, so another site cannot order for you.
    let r = client()
        .build()
        .unwrap()
        .post(format!("{}/v1/orders", s.url))
        .header("cookie", format!("atom_token={t}"))
        .json(&template("quick", "5.0.1"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401, "a POST with only the cookie");
    // ... and good for downloads only, and no script can read it.
    let r = client()
        .build()
        .unwrap()
        .get(format!("{}/v1/orders", s.url))
        .header("cookie", format!("atom_token={t}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401, "a listing with only the cookie");
    let r = client()
        .build()
        .unwrap()
        .post(format!("{}/v1/session", s.url))
        .bearer_auth(&t)
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("Path=/v1/orders/") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let r = client().build().unwrap().get(format!("{}/", s.url)).send().unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );

    let b = Browser::start(w.dir.path());
    let shots = artifacts_dir();
    b.goto(&s.url);
    b.wait_text("#message", Duration::from_secs(10), |m| m.contains("token"));
    b.fill("#token", &t);
    b.click("#save-token");
    b.wait_text("#template", Duration::from_secs(10), |t| t.contains("slow"));
    assert_eq!(b.texts("#template option"), ["failing", "quick", "slow"]);
    b.select("#template", "slow");
    b.fill("#version", "5.0.0");
    b.click("#order");
    b.wait_text("#d-state", Duration::from_secs(30), |s| s == "running");
    // The slow hook sleeps: the page shows the stage and the live log meanwhile.
    let log = b.wait_text("#d-log", Duration::from_secs(30), |l| {
        l.contains("hook before: ") && l.contains("slow.sh")
    });
    assert!(log.contains("stage"), "{log}");
    // The stage comes with the next poll of the order (the log streams sooner).
    let stage = b.wait_text("#d-stage", Duration::from_secs(10), |s| s.starts_with("stage 8/"));
    assert!(stage.ends_with("clean"), "{stage:?}");
    let progress =
        b.eval("return [document.getElementById('d-progress').value, document.getElementById('d-progress').max]");
    let (value, max) = (progress[0].as_f64().unwrap(), progress[1].as_f64().unwrap());
    assert!(value >= 1.0 && value < max, "progress {value}/{max} while running");
    b.screenshot(&shots.join("service-web-running.png"));

    b.wait_text("#d-state", Duration::from_secs(120), |s| s == "succeeded");
    let id = b.text("#d-id");
    let row = b.texts(&format!("#orders tr[data-id='{id}'] td"));
    assert_eq!(row[0], id);
    assert_eq!(row[2], "succeeded", "{row:?}");
    assert!(row[1].contains("slow") && row[1].contains("5.0.0"), "{row:?}");
    // The log the page followed ended with the build.
    b.wait_text("#d-log", Duration::from_secs(10), |l| l.contains("built"));
    let order = a.show(&id);
    assert_eq!(order["request"]["set"][0], "os.version=\"5.0.0\"", "{order}");
    let names = b.texts("#d-artifacts a");
    let want: Vec<&str> = order["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, want);
    b.screenshot(&shots.join("service-web-succeeded.png"));
    let tarball = order["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"].as_str().unwrap().ends_with(".tar.zst"))
        .unwrap()
        .clone();
    let name = tarball["name"].as_str().unwrap();
    b.click(&format!("#d-artifacts a[download='{name}']"));
    let bytes = b.downloaded(name, Duration::from_secs(60));
    assert_eq!(bytes.len() as u64, tarball["size"].as_u64().unwrap());
    assert_eq!(
        sha256(&bytes),
        tarball["sha256"].as_str().unwrap(),
        "the downloaded file"
    );
    println!("screenshots in {}", shots.display());
}

#[test]
fn postgres_two_instances_share_one_queue() {
    two_instances_share_one_queue(Backend::Postgres);
}

#[test]
fn sqlite_an_order_publishes_with_the_service_s_key() {
    an_order_publishes_with_the_service_s_key(Backend::Sqlite);
}

#[test]
fn postgres_an_order_publishes_with_the_service_s_key() {
    an_order_publishes_with_the_service_s_key(Backend::Postgres);
}

#[test]
fn sqlite_notices_tell_of_each_build_s_end() {
    notices_tell_of_each_build_s_end(Backend::Sqlite);
}

#[test]
fn postgres_notices_tell_of_each_build_s_end() {
    notices_tell_of_each_build_s_end(Backend::Postgres);
}

#[test]
fn sqlite_a_vanished_remote_worker_loses_its_build() {
    a_vanished_remote_worker_loses_its_build(Backend::Sqlite);
}

#[test]
fn postgres_a_vanished_remote_worker_loses_its_build() {
    a_vanished_remote_worker_loses_its_build(Backend::Postgres);
}

#[test]
fn sqlite_orders_are_built_shared_and_downloaded() {
    orders_are_built_shared_and_downloaded(Backend::Sqlite);
}

#[test]
fn postgres_orders_are_built_shared_and_downloaded() {
    orders_are_built_shared_and_downloaded(Backend::Postgres);
}

#[test]
fn sqlite_a_killed_service_loses_no_order() {
    a_killed_service_loses_no_order(Backend::Sqlite);
}

#[test]
fn postgres_a_killed_service_loses_no_order() {
    a_killed_service_loses_no_order(Backend::Postgres);
}

#[test]
fn sqlite_cancel_stops_a_running_build_and_the_log_follows_it() {
    cancel_stops_a_running_build_and_the_log_follows_it(Backend::Sqlite);
}

#[test]
fn postgres_cancel_stops_a_running_build_and_the_log_follows_it() {
    cancel_stops_a_running_build_and_the_log_follows_it(Backend::Postgres);
}

#[test]
fn sqlite_bad_orders_are_refused() {
    bad_orders_are_refused(Backend::Sqlite);
}

#[test]
fn postgres_bad_orders_are_refused() {
    bad_orders_are_refused(Backend::Postgres);
}

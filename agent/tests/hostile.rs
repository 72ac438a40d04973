//! Hostile repositories, mirrors and disks against the real atom-update (and a real
//! atom-dist on 127.0.0.1), on a loop-device GPT disk. Each case is a defect an outside
//! review reproduced; each must end with a clear error and the running slot untouched.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Env, UPDATE};

/// The agent with a deadline: a hang fails the test instead of CI.
fn agent_within(env: &Env, args: &[&str], secs: u64) -> Output {
    let mut child = Command::new(UPDATE)
        .arg("--config")
        .arg(env.path("update.toml"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("atom-update {args:?} did not finish within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn copy_tree(from: &Path, to: &Path) {
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap()
            .success()
    );
}

fn replace(path: &Path, with: impl FnOnce(&Path)) {
    std::fs::remove_file(path).unwrap();
    with(path);
}

fn mkfifo(p: &Path) {
    assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
}

#[test]
fn a_local_repository_is_read_as_untrusted() {
    let mut env = Env::new();
    env.stop_server();
    let good = env.path("repo");
    let stick = |name: &str| {
        let dir = env.path(name);
        copy_tree(&good, &dir);
        dir
    };
    let manifest_rel = "channels/stable/manifest.toml";
    let manifest_bytes = std::fs::read(good.join(manifest_rel)).unwrap();
    let sig_rel = atom_dist::repo::layout::signature("stable", &atom_dist::Digest::of(&manifest_bytes));
    let target = atom_dist::Manifest::parse(&manifest_bytes).unwrap();

    let fifo = stick("fifo");
    replace(&fifo.join(manifest_rel), mkfifo);
    let zero = stick("zero");
    replace(&zero.join(manifest_rel), |p| symlink("/dev/zero", p).unwrap());
    let shadow = stick("shadow");
    replace(&shadow.join(&sig_rel), |p| symlink("/etc/shadow", p).unwrap());
    for (dir, want) in [
        (&fifo, "a FIFO, not a regular file"),
        (&zero, "leads out of the repository"),
        (&shadow, "leads out of the repository"),
    ] {
        let url = format!("file://{}", dir.display());
        for verb in ["check", "now"] {
            let out = agent_within(&env, &[verb, "--repository", &url], 30);
            let t = text(&out);
            assert!(!out.status.success(), "{verb} {}: {t}", dir.display());
            assert!(t.contains(want), "{verb} {}: wanted {want:?}:\n{t}", dir.display());
            assert!(!t.contains("root:"), "file contents in the error:\n{t}");
        }
    }

    // A validly signed manifest whose payload is a link to /dev/zero, or a sparse file of
    // the right size: refused before (or by) hashing, never hashed forever.
    let payload_zero = stick("payload-zero");
    replace(&payload_zero.join(&target.payload.path), |p| {
        symlink("/dev/zero", p).unwrap()
    });
    for d in &target.deltas {
        std::fs::remove_file(payload_zero.join(&d.path)).unwrap();
    }
    let url = format!("file://{}", payload_zero.display());
    let out = agent_within(&env, &["now", "--repository", &url], 60);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("leads out of the repository"), "{t}");
    assert_eq!(env.flags(2), (1, 0, 1), "slot A untouched and still good");
    assert_eq!(env.flags(3).0, 0, "slot B not bootable");
    assert!(
        !env.path("state/downloads").exists()
            || std::fs::read_dir(env.path("state/downloads")).unwrap().next().is_none(),
        "the failed routes left nothing in the downloads directory"
    );

    // A good stick: the bytes are reported as read locally, not as "downloaded 0".
    let url = format!("file://{}", good.display());
    let out = agent_within(&env, &["now", "--repository", &url], 120);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("bytes from a local repository"), "{t}");
    assert!(!t.contains("downloaded 0 bytes"), "{t}");
    let st = env.status_json();
    assert!(st["last_update"]["bytes_read_locally"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["last_update"]["bytes_downloaded"], 0, "{st}");
}

/// Signs `m` with the test key and makes it the channel's current manifest, as a publisher
/// with a broken clock (or a stolen key) could.
fn commit_as_publisher(env: &Env, m: &atom_dist::Manifest) {
    let key = atom_dist::SecretKey::load(&env.path("signer.key")).unwrap();
    let text = m.to_toml();
    let signed = atom_dist::repo::SignedManifest {
        signature: atom_dist::signature::sign(text.as_bytes(), &[&key]).into_bytes(),
        manifest: text.into_bytes(),
    };
    atom_dist::Repository::open(&env.path("repo"))
        .unwrap()
        .commit_manifest(&m.channel, &m.version, &signed)
        .unwrap();
}

#[test]
fn a_manifest_from_the_future_is_refused_and_does_not_lock_the_channel() {
    let env = Env::new();
    let current = std::fs::read(env.path("repo/channels/stable/manifest.toml")).unwrap();
    let mut m = atom_dist::Manifest::parse(&current).unwrap();
    m.created = "2099-01-01T00:00:00Z".parse().unwrap();
    m.expires = "2099-02-01T00:00:00Z".parse().unwrap();
    commit_as_publisher(&env, &m);
    let out = agent_within(&env, &["now"], 60);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(6), "{t}");
    assert!(t.contains("after this host's clock") && t.contains("2099-01-01"), "{t}");
    assert_eq!(env.flags(3).0, 0, "nothing staged");
    let state = std::fs::read_to_string(env.path("state/state.toml")).unwrap_or_default();
    assert!(
        !state.lines().any(|l| l.starts_with("stable = ") && l.contains("2099")),
        "the future date is not the replay watermark:\n{state}"
    );

    // The publisher signs over it only when told that manifest is the one from the future.
    let out = Command::new(common::sibling("atom-build"))
        .args(["publish", "--channel", "stable", "--zstd-level", "3", "--repo"])
        .arg(env.path("repo"))
        .arg("--key")
        .arg(env.path("signer.key"))
        .arg(env.path("v3.img"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("--replace-future-manifest"), "{}", text(&out));
    env.publish("v3.img", &["--replace-future-manifest"]);
    let out = env.now_ok();
    assert!(out.contains("staged 3.0.0"), "{out}");

    // A watermark in the future left by an older agent is obeyed (a clock that went back
    // must not open the door to replays) but explained, and an operator can clear it.
    let state = std::fs::read_to_string(env.path("state/state.toml")).unwrap();
    let poisoned = state
        .lines()
        .map(|l| {
            if l.starts_with("stable = ") {
                "stable = \"2099-01-01T00:00:00Z\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(poisoned, state, "the state has a watermark line for stable:\n{state}");
    for copy in ["state/state.toml", "state/state.toml.bak"] {
        std::fs::write(env.path(copy), poisoned.clone() + "\n").unwrap();
    }
    let out = agent_within(&env, &["check"], 60);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(6), "{t}");
    assert!(
        t.contains("after this host's clock") && t.contains("atom-update forget-watermark"),
        "{t}"
    );
    let out = agent_within(&env, &["forget-watermark"], 60);
    assert!(
        out.status.success() && text(&out).contains("forgotten"),
        "{}",
        text(&out)
    );
    let out = agent_within(&env, &["check"], 60);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn an_unreadable_state_file_is_never_silently_forgotten() {
    let env = Env::new();
    env.now_ok();
    let state = env.path("state/state.toml");
    let backup = env.path("state/state.toml.bak");
    let good = std::fs::read_to_string(&state).unwrap();
    assert_eq!(
        std::fs::read_to_string(&backup).unwrap(),
        good,
        "every save writes the copy too"
    );

    // A damaged state file: the copy is used, and said.
    std::fs::write(&state, "[slots\ngarbage").unwrap();
    let out = agent_within(&env, &["check"], 60);
    let t = text(&out);
    assert!(t.contains("state file unreadable; using its backup copy"), "{t}");

    // Both damaged: nothing is done without them (the floor, watermark and rejections).
    std::fs::write(&state, "[slots\ngarbage").unwrap();
    std::fs::write(&backup, "also garbage = = =").unwrap();
    env.cgpt(3, 0, 0, 0);
    for verb in ["check", "now"] {
        let out = agent_within(&env, &[verb], 60);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(6), "{verb}: refused, with the fix: {t}");
        assert!(
            t.contains("the state file is unreadable") && t.contains("no usable backup copy") && t.contains("mv "),
            "{t}"
        );
    }
    assert_eq!(env.flags(3).0, 0, "nothing staged");
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        "[slots\ngarbage",
        "not overwritten"
    );
    let out = agent_within(&env, &["status"], 60);
    assert!(
        out.status.success() && text(&out).contains("the state file is unreadable"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_rsync_route_works_for_versions_with_build_metadata() {
    let env = Env::new();
    env.image_of("t3", "3.0.0+b1", "v3b1.img", None);
    env.publish("v3b1.img", &[]);
    env.write_config(&[&env.url.clone()], "routes = [\"rsync\"]\n");
    let out = env.now_ok();
    assert!(out.contains("staged 3.0.0+b1 in slot B via rsync-delta"), "{out}");
    assert!(env.slot_holds("B", "v3b1.img"));
}

/// What the hostile mirror does with a GET for a path.
#[derive(Clone, Copy)]
enum Act {
    /// Pass the request to the real atom-dist.
    Proxy,
    /// The real answer's headers, then its body one byte every `ms` milliseconds.
    Drip { ms: u64 },
    /// `200 OK` with the real length announced, an HTML error page, then a dropped
    /// connection (a captive portal, a broken CDN edge).
    ErrorPageThenDrop,
}

/// A mirror on 127.0.0.1 in front of the real atom-dist that misbehaves for some paths.
struct HostileMirror {
    url: String,
}

fn fetch_upstream(upstream: &str, head: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let addr = upstream.trim_start_matches("http://");
    let mut up = std::net::TcpStream::connect(addr).unwrap();
    // One request per connection: keep-alive would mix answers.
    let head = head.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
    up.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    up.read_to_end(&mut answer).unwrap();
    answer
}

impl HostileMirror {
    fn start(upstream: &str, act: impl Fn(&str) -> Act + Send + Sync + 'static) -> HostileMirror {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.to_owned();
        let act = std::sync::Arc::new(act);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let (upstream, act) = (upstream.clone(), act.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let end = line == "\r\n";
                        // A request to the mirror is forwarded without its Connection header.
                        if !line.to_ascii_lowercase().starts_with("connection:") {
                            head.push_str(&line);
                        }
                        if end {
                            break;
                        }
                    }
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let answer = fetch_upstream(&upstream, &head);
                    let split = answer
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map_or(answer.len(), |i| i + 4);
                    let (headers, body) = answer.split_at(split);
                    match act(&path) {
                        Act::Proxy => {
                            let _ = conn.write_all(&answer);
                        }
                        Act::Drip { ms } => {
                            if conn.write_all(headers).is_err() {
                                return;
                            }
                            for b in body {
                                if conn.write_all(&[*b]).is_err() {
                                    return;
                                }
                                std::thread::sleep(Duration::from_millis(ms));
                            }
                        }
                        Act::ErrorPageThenDrop => {
                            let page = b"<html><body>502 Bad Gateway</body></html>\n";
                            let _ = conn.write_all(
                                format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/html\r\n\r\n",
                                    body.len()
                                )
                                .as_bytes(),
                            );
                            let _ = conn.write_all(page);
                        }
                    }
                    let _ = conn.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        HostileMirror { url }
    }
}

#[test]
fn a_dripping_manifest_times_out_the_next_mirror_is_used_and_sigterm_stops_it() {
    let env = Env::new();
    let drip = HostileMirror::start(&env.url, |path| {
        if path.ends_with("manifest.toml") {
            Act::Drip { ms: 1000 }
        } else {
            Act::Proxy
        }
    });
    // Dripping mirror first, then the real one: the next mirror is tried in bounded time.
    env.write_config(&[&drip.url, &env.url.clone()], "");
    let started = Instant::now();
    let out = agent_within(&env, &["check"], 60);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("update available"), "{t}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "bounded: {:?}",
        started.elapsed()
    );

    // Only the dripping mirror: `now` gives up by the deadline, with the reason.
    env.write_config(&[&drip.url], "");
    let out = agent_within(&env, &["now"], 60);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("before the deadline"), "{t}");

    // SIGTERM in the middle of the drip: a prompt, clean stop.
    let child = Command::new(UPDATE)
        .arg("--config")
        .arg(env.path("update.toml"))
        .arg("now")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let signalled = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "stopped in {:?}",
        signalled.elapsed()
    );
    assert!(text(&out).contains("cancelled"), "{}", text(&out));
    assert_eq!(env.flags(2), (1, 0, 1), "slot A untouched");
}

#[test]
fn a_broken_mirror_does_not_poison_the_healthy_one() {
    let env = Env::new();
    let broken = HostileMirror::start(&env.url, |path| {
        if path.contains("/objects/") {
            Act::ErrorPageThenDrop
        } else {
            Act::Proxy
        }
    });
    env.write_config(&[&broken.url, &env.url.clone()], "routes = [\"full\"]\n");
    let out = agent_within(&env, &["now"], 120);
    let t = text(&out);
    assert!(out.status.success(), "the healthy mirror's payload is used: {t}");
    assert!(t.contains("staged 2.0.0 in slot B via full-payload"), "{t}");
    assert!(env.slot_holds("B", "v2.img"));
}

#[test]
fn a_gpt_whose_slots_overlap_is_refused_and_nothing_is_written() {
    use atom_test_support::gpt::{geometry, set_geometry};
    let env = Env::new();
    let dev = Path::new(&env.loopdev);
    let (b_first, b_last) = geometry(dev, 3);
    let (a_first, a_last) = geometry(dev, 2);
    // root-b given root-a's sectors: `now` would write the running slot.
    set_geometry(dev, 3, a_first, a_last);
    for verb in [&["now"][..], &["status"], &["mark-good"]] {
        let out = agent_within(&env, verb, 60);
        let t = text(&out);
        assert!(!out.status.success(), "{verb:?}: {t}");
        assert!(
            t.contains("invalid GPT") && t.contains("overlaps partition"),
            "{verb:?}: {t}"
        );
    }
    set_geometry(dev, 3, b_first, b_last);
    assert!(env.slot_holds("A", "v1.img"), "the running slot was not written");
    env.now_ok();
}

/// A minimal OS without a CA store updates from plain-HTTP mirrors (the signature is the
/// trust there): the agent must not need the system's CA certificates for them.
#[test]
fn plain_http_mirrors_need_no_ca_store() {
    let env = Env::new();
    let empty = env.path("no-certs");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("none.pem"), "").unwrap();
    let none = [
        ("SSL_CERT_FILE", empty.join("none.pem")),
        ("SSL_CERT_DIR", empty.clone()),
    ];
    let envs: Vec<(&str, &str)> = none.iter().map(|(k, v)| (*k, v.to_str().unwrap())).collect();
    let out = env.agent_env(&["now"], &envs);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("staged 2.0.0 in slot B"), "{t}");
}

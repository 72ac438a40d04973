//! atom-update over time: the daemon (SIGHUP reload, SIGTERM in the middle of a write), a
//! server that goes away in the middle of a download, and finding the running slot without
//! bootsel's record. Same test host as update.rs: loop-device GPT disk, real atom-dist.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Env, UPDATE, failed, ok, sibling};

fn wait_for(log: &Path, needle: &str, after: usize, timeout: Duration) -> usize {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(i) = text[after.min(text.len())..].find(needle) {
            return after + i + needle.len();
        }
        assert!(
            start.elapsed() < timeout,
            "no {needle:?} in the log within {timeout:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(pid: u32, sig: &str) {
    ok(Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]));
}

fn spawn_daemon(env: &Env, failpoint: Option<&str>) -> (std::process::Child, std::path::PathBuf) {
    let log = env.path("daemon.log");
    let mut c = Command::new(UPDATE);
    c.arg("--config")
        .arg(env.path("update.toml"))
        .arg("daemon")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if let Some(f) = failpoint {
        c.env("ATOM_UPDATE_FAILPOINT", f);
    }
    (c.spawn().unwrap(), log)
}

#[test]
fn daemon_updates_reloads_on_sighup_and_stops_on_sigterm() {
    let env = Env::new();
    let url = env.url.clone();
    env.write_config(&[&url], "check_interval = \"1h\"\n");
    let (mut daemon, log) = spawn_daemon(&env, None);
    let mut at = wait_for(&log, "update staged", 0, Duration::from_secs(60));
    assert!(env.slot_holds("B", "v2.img"));

    // SIGHUP re-reads the file: the new interval and channel are in use.
    env.write_config(&[&url], "check_interval = \"2m\"\n");
    let config = std::fs::read_to_string(env.path("update.toml")).unwrap();
    std::fs::write(
        env.path("update.toml"),
        config.replace("channel = \"stable\"", "channel = \"edge\""),
    )
    .unwrap();
    signal(daemon.id(), "HUP");
    at = wait_for(
        &log,
        "configuration reloaded interval=120s channel=edge",
        at,
        Duration::from_secs(10),
    );

    // A broken file on SIGHUP: the daemon says so and keeps running on the old settings.
    std::fs::write(env.path("update.toml"), "repositories = [\n").unwrap();
    signal(daemon.id(), "HUP");
    wait_for(&log, "configuration not reloaded", at, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon kept running");

    signal(daemon.id(), "TERM");
    let status = daemon.wait().unwrap();
    assert!(status.success(), "SIGTERM is a clean stop: {status}");
    wait_for(&log, "daemon stopped", 0, Duration::from_secs(1));
}

/// "HH:MM-HH:MM" (UTC) starting `from_min` minutes from now: a window that excludes now.
fn window_from_now(from_min: u64, len_min: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60;
    let hhmm = |m: u64| format!("{:02}:{:02}", (m / 60) % 24, m % 60);
    format!("{}-{}", hhmm(now + from_min), hhmm(now + from_min + len_min))
}

#[test]
fn sighup_while_waiting_for_the_maintenance_window_applies_at_once() {
    let env = Env::new();
    let url = env.url.clone();
    // Never "immediate" here: that would reboot the test machine.
    let window = window_from_now(120, 60);
    env.write_config(
        &[&url],
        &format!("check_interval = \"1h\"\nreboot = \"window\"\nmaintenance_window = \"{window}\"\n"),
    );
    let (mut daemon, log) = spawn_daemon(&env, None);
    let at = wait_for(&log, "waiting for the maintenance window", 0, Duration::from_secs(60));
    env.write_config(&[&url], "check_interval = \"1h\"\nreboot = \"never\"\n");
    signal(daemon.id(), "HUP");
    wait_for(&log, "configuration reloaded", at, Duration::from_secs(10));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text[at..].contains("reboot=Never"), "{text}");
    signal(daemon.id(), "TERM");
    assert!(daemon.wait().unwrap().success());
}

#[test]
fn sigterm_in_the_middle_of_a_write_stops_cleanly_and_a_rerun_completes() {
    let env = Env::new();
    let url = env.url.clone();
    env.write_config(&[&url], "routes = [\"full\"]\n");
    let (mut daemon, log) = spawn_daemon(&env, Some("write-chunk:slow=300"));
    wait_for(&log, "failpoint write-chunk: slowing", 0, Duration::from_secs(60));
    let asked = Instant::now();
    signal(daemon.id(), "TERM");
    let status = daemon.wait().unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "stopped within a chunk, not at the end of the write"
    );
    assert!(status.success(), "{status}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("cancelled"), "{text}");
    assert!(!text.contains("update staged"), "{text}");
    // Half-written slot B is unbootable; A still boots; both GPT copies are valid.
    assert_eq!(env.flags(3).0, 0, "B has priority 0");
    let st = ok(Command::new(sibling("bootsel")).args(["status", "--disk", &env.loopdev]));
    assert!(st.contains("GPT primary: valid; backup: valid"), "{st}");
    assert!(st.contains("next boot: A"), "{st}");
    assert!(!env.slot_holds("B", "v2.img"));
    // The lock was released and the next run finishes the job.
    let out = env.now_ok();
    assert!(out.contains("staged 2.0.0 in slot B"), "{out}");
    assert!(env.slot_holds("B", "v2.img"));
}

#[test]
fn server_gone_in_the_middle_of_a_download_then_the_rerun_resumes() {
    let env = Env::new();
    let relay = CuttingRelay::start(&env.url, 1 << 20);
    env.write_config(&[&relay.url], "routes = [\"full\"]\n");
    let out = env.agent(&["now"]);
    let err = failed(&out, 1, "every route failed");
    assert!(err.contains("full-payload:"), "names the route that failed: {err}");
    let st = ok(Command::new(sibling("bootsel")).args(["status", "--disk", &env.loopdev]));
    assert!(st.contains("next boot: A"), "{st}");
    assert_eq!(env.flags(2), (1, 0, 1), "the running slot A is untouched");
    let partial: u64 = std::fs::read_dir(env.path("state/downloads"))
        .expect("the partial download is kept")
        .map(|e| e.unwrap())
        // Not the hidden record of where the partial file came from.
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(partial > 0, "something was downloaded before the server went away");
    assert!(partial < 1 << 20, "no more than the relay let through: {partial}");

    // The server is back on the same address: the rerun resumes with Range.
    relay.restore();
    let out = env.now_ok();
    assert!(out.contains("staged 2.0.0 in slot B"), "{out}");
    assert!(env.slot_holds("B", "v2.img"));
    let st = env.status_json();
    let downloaded = st["last_update"]["bytes_downloaded"].as_u64().unwrap();
    let manifest = std::fs::read_to_string(env.path("repo/channels/stable/manifest.toml")).unwrap();
    let payload: u64 = manifest
        .split("[payload]")
        .nth(1)
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("size = ")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    println!("payload {payload} bytes: {partial} before the server went away, {downloaded} after");
    assert_eq!(
        downloaded,
        payload - partial,
        "only the missing part was downloaded again"
    );
}

#[test]
fn running_slot_found_through_mountinfo_without_the_boot_record() {
    let env = Env::new();
    std::fs::remove_file(env.path("boot.toml")).unwrap();
    // / is not on the test disk: a clear error, not a guess.
    failed(&env.agent(&["status"]), 1, "cannot tell which slot is running");

    // In a mount namespace with slot A's partition mounted on /, as bootsel leaves it.
    ok(Command::new("partx").args(["-a", &env.loopdev]));
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -o ro \"$1\" / && exec \"$2\" --config \"$3\" status --json")
        .arg("sh")
        .arg(format!("{}p2", env.loopdev))
        .arg(UPDATE)
        .arg(env.path("update.toml"))
        .output()
        .unwrap();
    let _ = Command::new("partx").args(["-d", &env.loopdev]).status();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["booted_slot"], "A", "{st}");
    assert_eq!(st["detected_by"], "mountinfo", "{st}");
    assert_eq!(st["disk"], env.loopdev.as_str(), "{st}");
}

#[test]
fn slots_given_as_partition_devices() {
    let env = Env::new();
    ok(Command::new("partx").args(["-a", &env.loopdev]));
    let (a, b) = (format!("{}p2", env.loopdev), format!("{}p3", env.loopdev));
    let url = env.url.clone();
    env.write_config(&[&url], &format!("slot_devices = [\"{a}\", \"{b}\"]\n"));
    let st = env.status_json();
    let out = env.agent(&["now"]);
    // Bad device lists: each names the problem.
    let bad = [
        (
            format!("slot_devices = [\"{a}\", \"{}\"]\n", env.path("boot.toml").display()),
            "is not a block device",
        ),
        (
            format!("slot_devices = [\"{a}\", \"{}\"]\n", env.loopdev),
            "is not a disk partition",
        ),
        (format!("slot_devices = [\"{a}\", \"{a}\"]\n"), "same name"),
        (
            format!("slot_devices = [\"{a}\", \"{b}\"]\nlabels = [\"x\", \"y\"]\n"),
            "replaces `disk` and `labels`",
        ),
    ];
    let bad_outs: Vec<_> = bad
        .iter()
        .map(|(extra, needle)| {
            env.write_config(&[&url], extra);
            (env.agent(&["status"]), *needle)
        })
        .collect();
    let _ = Command::new("partx").args(["-d", &env.loopdev]).status();

    assert_eq!(st["disk"], env.loopdev.as_str(), "{st}");
    assert_eq!(st["slots"][0]["label"], "root-a", "{st}");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(env.slot_holds("B", "v2.img"));
    for (out, needle) in bad_outs {
        failed(&out, 1, needle);
    }
}

/// A TCP relay in front of atom-dist that passes `budget` bytes of answers, then acts as a
/// server that went away: the connection ends in the middle of the body and new connections
/// are dropped at once, until `restore`. Killing atom-dist instead is not enough: what it
/// already wrote into a loopback socket (several MB) still arrives after it is gone.
struct CuttingRelay {
    url: String,
    mode: Arc<Mutex<RelayMode>>,
}

#[derive(Clone, Copy)]
enum RelayMode {
    Budget(usize),
    Gone,
    Pass,
}

impl CuttingRelay {
    fn start(upstream_url: &str, budget: usize) -> CuttingRelay {
        let upstream = upstream_url.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mode = Arc::new(Mutex::new(RelayMode::Budget(budget)));
        let shared = mode.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if matches!(*shared.lock().unwrap(), RelayMode::Gone) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(Shutdown::Write);
                });
                let shared = shared.clone();
                std::thread::spawn(move || relay_answers(server, client, &shared));
            }
        });
        CuttingRelay { url, mode }
    }

    fn restore(&self) {
        *self.mode.lock().unwrap() = RelayMode::Pass;
    }
}

fn relay_answers(mut server: TcpStream, mut client: TcpStream, mode: &Mutex<RelayMode>) {
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = match server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let pass = {
            let mut m = mode.lock().unwrap();
            match *m {
                RelayMode::Pass => n,
                RelayMode::Gone => 0,
                RelayMode::Budget(left) => {
                    let take = n.min(left);
                    *m = if take == left {
                        RelayMode::Gone
                    } else {
                        RelayMode::Budget(left - take)
                    };
                    take
                }
            }
        };
        if client.write_all(&buf[..pass]).is_err() || pass < n {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

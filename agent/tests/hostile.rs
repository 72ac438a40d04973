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

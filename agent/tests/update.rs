//! atom-update end to end on a loop-device GPT disk against a real atom-dist on
//! 127.0.0.1, with images and repositories made by the real atom-build. Runs as root.

mod common;

use std::process::Command;

use common::{Env, SLOT_MIB, UPDATE, failed, ok, sibling, tree};

#[test]
fn precomputed_delta_route_stages_verifies_and_flips() {
    let env = Env::new();
    let manifest = std::fs::read_to_string(env.path("repo/channels/stable/manifest.toml")).unwrap();
    assert!(
        manifest.contains("format = \"fast-rsync-zstd-base-extents\""),
        "the publisher wrote a base-extents delta (the default):\n{manifest}"
    );
    let out = env.now_ok();
    assert!(out.contains("via precomputed-delta"), "{out}");
    assert!(env.slot_holds("B", "v2.img"), "slot B holds v2 exactly");
    assert_eq!(env.flags(3), (2, 3, 0), "B boots next, on trial with 3 tries");
    assert_eq!(env.flags(2), (1, 0, 1), "A untouched and still good");
    let st = env.status_json();
    assert_eq!(st["next_boot"], "B");
    assert_eq!(st["slots"][1]["version"], "2.0.0");
    assert_eq!(st["last_update"]["route"], "precomputed-delta");
    // Running it again finds the update already staged and changes nothing.
    let out = env.now_ok();
    assert!(out.contains("already staged"), "{out}");

    // Boot into B (as bootsel would), mark it good; the next update goes to A.
    ok(Command::new(sibling("bootsel")).args(["choose", "--disk", &env.loopdev]));
    env.boot_into("B", "2.0.0");
    assert_eq!(env.flags(3), (2, 2, 0));
    ok(Command::new(UPDATE)
        .arg("--config")
        .arg(env.path("update.toml"))
        .arg("mark-good"));
    assert_eq!(env.flags(3), (2, 0, 1));
    let out = env.now_ok();
    assert!(out.contains("up to date"), "{out}");
}

#[test]
fn routes_fall_through_rsync_then_full() {
    let mut env = Env::new();
    // Corrupt the precomputed delta: its digest no longer matches the manifest.
    let repo = env.path("repo");
    let delta = std::fs::read_dir(repo.join("deltas"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&delta, b"not a delta").unwrap();
    let out = env.now_ok();
    assert!(
        out.contains("route failed") && out.contains("precomputed-delta"),
        "{out}"
    );
    assert!(out.contains("via rsync-delta"), "{out}");
    assert!(env.slot_holds("B", "v2.img"));
    // The target lists a delta from the running version (the one that failed): the
    // signature goes up instead of asking for that delta again, a few bytes per 4 KiB
    // block of the running slot, compressed.
    let up = env.status_json()["last_update"]["bytes_uploaded"].as_u64().unwrap();
    assert!(up > 0 && up < (SLOT_MIB << 20) / 4096 * 12, "uploaded {up}");

    // The same with a running slot that drifted from its published image.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&env.loopdev).unwrap();
        f.write_all_at(b"drift", env.slot_offset("A") + (16 << 20)).unwrap();
        f.sync_all().unwrap();
    }
    env.cgpt(3, 0, 0, 0);
    std::fs::remove_dir_all(env.path("state")).unwrap();
    let out = env.now_ok();
    assert!(out.contains("via rsync-delta"), "{out}");
    assert!(env.slot_holds("B", "v2.img"));
    let up = env.status_json()["last_update"]["bytes_uploaded"].as_u64().unwrap();
    assert!(up > 0 && up < (SLOT_MIB << 20) / 4096 * 12, "uploaded {up}");

    // No server, a local repository only: precomputed (broken) → full payload.
    env.stop_server();
    env.cgpt(3, 0, 0, 0);
    env.write_config(&[&format!("file://{}", repo.display())], "");
    std::fs::remove_dir_all(env.path("state")).unwrap();
    let out = env.now_ok();
    assert!(out.contains("via full-payload"), "{out}");
    assert!(env.slot_holds("B", "v2.img"));
    // B already held v2: nothing needed rewriting.
    let st = env.status_json();
    assert_eq!(st["last_update"]["bytes_written"], 0, "{st}");
}

#[test]
fn a_host_that_skipped_a_version_gets_the_small_delta_from_the_server() {
    let mut env = Env::new();
    // The channel moves on to 3.0.0 with a delta from 2.0.0 only; the host runs 1.0.0.
    env.publish("v3.img", &["--deltas", "1"]);
    let manifest = std::fs::read_to_string(env.path("repo/channels/stable/manifest.toml")).unwrap();
    assert!(
        manifest.contains("base_version = \"2.0.0\"") && !manifest.contains("base_version = \"1.0.0\""),
        "{manifest}"
    );
    let out = env.now_ok();
    assert!(out.contains("no precomputed delta from the running version"), "{out}");
    assert!(out.contains("via rsync-delta"), "{out}");
    assert!(env.slot_holds("B", "v3.img"), "slot B holds v3 exactly");
    let st = env.status_json();
    let small = st["last_update"]["bytes_downloaded"].as_u64().unwrap();
    assert_eq!(st["last_update"]["bytes_uploaded"], 0, "no signature went up: {st}");

    // What the block-level answer from the same slot would have cost: never less.
    let sig = atom_dist::delta::signature_of(&std::fs::read(env.path("v1.img")).unwrap());
    std::fs::write(
        env.path("v1.sig.zst"),
        zstd::bulk::compress(sig.serialized(), 3).unwrap(),
    )
    .unwrap();
    ok(Command::new("curl")
        .args(["-fsS", "--data-binary"])
        .arg(format!("@{}", env.path("v1.sig.zst").display()))
        .arg("-o")
        .arg(env.path("block.delta.zst"))
        .arg(format!("{}/v1/delta?channel=stable&version=3.0.0", env.url)));
    let block = std::fs::metadata(env.path("block.delta.zst")).unwrap().len();
    assert!(
        small > 0 && small <= block,
        "from the published base {small} bytes, block-level {block}"
    );
    println!("skipped a version: {small} bytes from the published base, {block} block-level");

    // A diff that outlives the server's request timeout (408): asked again, it is found
    // done, still without a signature.
    env.stop_server();
    std::fs::remove_dir_all(env.path("dist-cache")).unwrap();
    env.start_server_env(
        &["--request-timeout".as_ref(), "2s".as_ref()],
        &[("ATOM_DIST_FAILPOINT", "diff:slow=3000")],
    );
    env.write_config(&[&env.url.clone()], "");
    env.cgpt(3, 0, 0, 0);
    std::fs::remove_dir_all(env.path("state")).unwrap();
    let out = env.now_ok();
    assert!(out.contains("via rsync-delta"), "{out}");
    assert!(out.contains("still computing"), "{out}");
    assert!(env.slot_holds("B", "v3.img"));
    assert_eq!(env.status_json()["last_update"]["bytes_uploaded"], 0);
}

#[test]
fn unchanged_blocks_are_not_rewritten() {
    let env = Env::new();
    env.put_image("v1.img", "B");
    // Run as systemd would: progress goes to NOTIFY_SOCKET as STATUS= lines.
    let sock_path = env.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let out = env.agent_env(&["now"], &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("via precomputed-delta"), "{text}");
    let mut statuses = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        statuses.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        statuses
            .iter()
            .any(|s| s.contains("STATUS=applying the precomputed delta")),
        "{statuses:?}"
    );
    assert!(statuses.iter().any(|s| s.contains("STATUS=verifying")), "{statuses:?}");
    let st = env.status_json();
    let written = st["last_update"]["bytes_written"].as_u64().unwrap();
    let skipped = st["last_update"]["bytes_skipped"].as_u64().unwrap();
    let a = std::fs::read(env.path("v1.img")).unwrap();
    let b = std::fs::read(env.path("v2.img")).unwrap();
    let differing = a.chunks(4096).zip(b.chunks(4096)).filter(|(x, y)| x != y).count() as u64 * 4096;
    println!("written {written}, skipped {skipped}, differing blocks {differing} bytes");
    assert_eq!(written, differing, "exactly the differing blocks are written");
    assert_eq!(written + skipped, b.len() as u64);
}

#[test]
fn mirrors_are_tried_in_order_and_dead_servers_fail_cleanly() {
    let mut env = Env::new();
    let url = env.url.clone();
    env.write_config(&["http://127.0.0.1:9", &url], "");
    let out = env.now_ok();
    assert!(out.contains("staged"), "{out}");

    // Every repository gone: a clear error, A still boots, B not bootable.
    env.stop_server();
    env.cgpt(3, 0, 0, 0);
    std::fs::remove_dir_all(env.path("state")).unwrap();
    let out = env.agent(&["now"]);
    failed(&out, 1, "cannot fetch the manifest");
    assert_eq!(env.flags(2), (1, 0, 1));
    assert_eq!(env.flags(3).0, 0);

    // The operator brings the repository on a stick: --repository replaces the mirrors for
    // one run, and what it holds is checked against the host's keys as always.
    let stick = format!("file://{}", env.path("repo").display());
    let check = env.agent(&["check", "--repository", &stick]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let out = env.agent(&["now", "--repository", &stick]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("staged 2.0.0 in slot B"));
    assert!(env.slot_holds("B", "v2.img"));
    let cfg = std::fs::read_to_string(env.path("update.toml")).unwrap();
    assert!(!cfg.contains("file://"), "the configuration is not changed");
    failed(&env.agent(&["now", "--repository", "relative/path"]), 2, "--repository");
}

#[test]
fn security_refusals() {
    let env = Env::new();
    // Unknown key.
    std::fs::remove_file(env.path("keys/signer.pub")).unwrap();
    ok(Command::new(sibling("atom-build"))
        .arg("keygen")
        .arg("--out")
        .arg(env.path("keys/other")));
    std::fs::remove_file(env.path("keys/other.key")).unwrap();
    failed(&env.agent(&["now"]), 6, "untrusted key");
    assert_eq!(env.flags(3).0, 0, "nothing written or flipped");
    std::fs::copy(env.path("signer.pub"), env.path("keys/signer.pub")).unwrap();

    // Wrong board.
    let cfg = std::fs::read_to_string(env.path("update.toml")).unwrap();
    std::fs::write(env.path("update.toml"), cfg.replace("x86_64-generic", "rpi4")).unwrap();
    failed(&env.agent(&["now"]), 6, "board");
    std::fs::write(env.path("update.toml"), &cfg).unwrap();

    // Downgrade / replay: running 3.0.0, the channel offers 2.0.0.
    env.boot_into("A", "3.0.0");
    failed(&env.agent(&["now"]), 6, "refusing a downgrade");
    assert_eq!(env.flags(3).0, 0);
    let out = env.agent(&["now", "--allow-downgrade"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(env.slot_holds("B", "v2.img"));
    env.boot_into("A", "1.0.0");

    // Expired manifest.
    env.publish("v3.img", &["--expires-in", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    failed(&env.agent(&["now"]), 6, "expired");
    let out = env.agent(&["check"]);
    assert_eq!(out.status.code(), Some(6));
    // The publisher re-signs the channel (same version and files): hosts take it again.
    env.resign(&[]);
    let out = env.now_ok();
    assert!(out.contains("staged 3.0.0 in slot B"), "{out}");
}

/// The rollback floor rises to a version only when mark-good confirms it: staging it or
/// booting it on trial leaves the floor alone. Once risen, a signed manifest offering an
/// older version (here on another channel, so it is no replay) is refused even on a host
/// that went back to an older slot.
#[test]
fn rollback_floor_rises_only_when_marked_good() {
    let env = Env::new();
    let mark_good = || {
        ok(Command::new(UPDATE)
            .arg("--config")
            .arg(env.path("update.toml"))
            .arg("mark-good"))
    };
    let floor = || env.status_json()["rollback_floor"].as_str().map(str::to_owned);
    assert_eq!(floor(), None);
    mark_good();
    assert_eq!(
        floor().as_deref(),
        Some("1.0.0"),
        "mark-good of the first image sets the floor"
    );
    env.publish("v3.img", &[]);
    // Channel "lts" offers 2.0.0.
    env.publish_to("lts", "v2.img", &[]);
    let url = env.url.clone();
    let use_channel = |c: &str| {
        env.write_config(&[&url], "");
        let cfg = std::fs::read_to_string(env.path("update.toml")).unwrap();
        std::fs::write(
            env.path("update.toml"),
            cfg.replace("channel = \"stable\"", &format!("channel = \"{c}\"")),
        )
        .unwrap();
    };
    env.now_ok();
    assert_eq!(env.flags(3).0, 2, "3.0.0 staged in B");
    assert_eq!(floor().as_deref(), Some("1.0.0"), "staging does not raise the floor");
    ok(Command::new(sibling("bootsel")).args(["choose", "--disk", &env.loopdev]));
    env.boot_into("B", "3.0.0");
    assert_eq!(
        floor().as_deref(),
        Some("1.0.0"),
        "a trial boot does not raise the floor"
    );

    // The trial fails: back on A (1.0.0), 2.0.0 from "lts" is still fine.
    env.cgpt(3, 0, 0, 0);
    env.boot_into("A", "1.0.0");
    use_channel("lts");
    let out = env.now_ok();
    assert!(out.contains("2.0.0"), "{out}");

    // 3.0.0 staged again, booted, marked good: the floor is 3.0.0 ...
    use_channel("stable");
    env.now_ok();
    ok(Command::new(sibling("bootsel")).args(["choose", "--disk", &env.loopdev]));
    env.boot_into("B", "3.0.0");
    mark_good();
    assert_eq!(floor().as_deref(), Some("3.0.0"));
    let text = ok(Command::new(UPDATE)
        .arg("--config")
        .arg(env.path("update.toml"))
        .arg("status"));
    assert!(text.contains("rollback floor: 3.0.0"), "{text}");

    // ... and after the operator goes back to A, the replayed 2.0.0 is refused.
    ok(Command::new(UPDATE)
        .arg("--config")
        .arg(env.path("update.toml"))
        .arg("rollback"));
    env.boot_into("A", "1.0.0");
    use_channel("lts");
    failed(&env.agent(&["now"]), 6, "rollback floor");
    assert_eq!(
        env.agent(&["check"]).status.code(),
        Some(3),
        "check: no acceptable update"
    );
    assert!(env.slot_holds("B", "v3.img"), "B (3.0.0) untouched");
    let out = env.agent(&["now", "--allow-downgrade"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(env.slot_holds("B", "v2.img"), "the operator's override installs it");
}

/// Keys, the keys directory and the state directory that another user could change are
/// refused before anything is fetched or written; secrets and state are owner-only.
#[test]
fn keys_and_state_that_others_could_change_are_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let env = Env::new();
    let mode = |p: &str| std::fs::metadata(env.path(p)).unwrap().mode() & 0o777;
    let chmod = |p: &str, m: u32| std::fs::set_permissions(env.path(p), std::fs::Permissions::from_mode(m)).unwrap();
    assert_eq!(
        mode("signer.key"),
        0o600,
        "atom-build keygen writes the secret key owner-only"
    );

    chmod("keys", 0o777);
    failed(&env.agent(&["now"]), 6, "keys directory");
    chmod("keys", 0o755);
    chmod("keys/signer.pub", 0o666);
    failed(&env.agent(&["check"]), 6, "writable by everyone");
    chmod("keys/signer.pub", 0o644);
    std::os::unix::fs::chown(env.path("keys/signer.pub"), Some(4242), None).unwrap();
    failed(&env.agent(&["now"]), 6, "belongs to uid 4242");
    std::os::unix::fs::chown(env.path("keys/signer.pub"), Some(0), None).unwrap();
    assert_eq!(env.flags(3).0, 0, "nothing staged while the keys were refused");

    env.now_ok();
    assert_eq!(mode("state"), 0o700, "the agent creates its state directory owner-only");
    assert_eq!(mode("state/state.toml"), 0o600);
    chmod("state", 0o775);
    failed(&env.agent(&["mark-good"]), 6, "state directory");
    chmod("state", 0o700);
    ok(Command::new(UPDATE)
        .arg("--config")
        .arg(env.path("update.toml"))
        .arg("mark-good"));
}

/// Rotation as an operator does it: ship the new public key to the hosts, publish with the
/// new key, retire the old one on the hosts; what only the retired key signed is refused.
#[test]
fn key_rotation_two_trusted_keys_then_the_old_one_retired() {
    let env = Env::new();
    ok(Command::new(sibling("atom-build"))
        .arg("keygen")
        .arg("--out")
        .arg(env.path("new")));
    std::fs::copy(env.path("new.pub"), env.path("keys/new.pub")).unwrap();
    ok(Command::new("cp")
        .arg("-a")
        .arg(env.path("repo"))
        .arg(env.path("old-signed-repo")));
    let out = env.now_ok();
    assert!(out.contains("2.0.0"), "signed by the old key, trusted: {out}");

    ok(Command::new(sibling("atom-build"))
        .args(["publish", "--channel", "stable", "--zstd-level", "3", "--repo"])
        .arg(env.path("repo"))
        .arg("--key")
        .arg(env.path("new.key"))
        .arg("--trust")
        .arg(env.path("signer.pub"))
        .arg(env.path("v3.img")));
    let out = env.now_ok();
    assert!(out.contains("3.0.0"), "signed by the new key, trusted: {out}");

    std::fs::remove_file(env.path("keys/signer.pub")).unwrap();
    let out = env.now_ok();
    assert!(
        out.contains("already staged"),
        "the new key alone still verifies: {out}"
    );
    let old = env.path("old-signed-repo").display().to_string();
    env.write_config(&[&old], "");
    failed(&env.agent(&["now"]), 6, "untrusted key");
}

#[test]
fn verification_failure_never_flips() {
    let env = Env::new();
    // A correctly signed manifest whose image digest matches nothing any route produces.
    let repo = atom_dist::Repository::open(&env.path("repo")).unwrap();
    let cur = repo.current("stable").unwrap().unwrap();
    let mut m = atom_dist::Manifest::parse(&cur.manifest).unwrap();
    m.image.digest = atom_dist::Digest::of(b"something else");
    m.version = "2.0.1".parse().unwrap();
    m.deltas.clear();
    let text = m.to_toml();
    let key = atom_dist::SecretKey::load(&env.path("signer.key")).unwrap();
    let signed = atom_dist::repo::SignedManifest {
        signature: atom_dist::signature::sign(text.as_bytes(), &[&key]).into_bytes(),
        manifest: text.into_bytes(),
    };
    repo.commit_manifest("stable", &m.version, &signed).unwrap();
    let out = env.agent(&["now"]);
    failed(&out, 4, "does not match");
    assert_eq!(env.flags(3).0, 0, "B never made bootable");
    assert_eq!(env.flags(2), (1, 0, 1));
    let st = env.status_json();
    assert_eq!(st["last_update"]["outcome"], "verification-failed");
    assert_eq!(st["next_boot"], "A");
}

#[test]
fn crash_during_write_or_download_resumes() {
    let env = Env::new();
    // The full route over HTTP: it downloads (resumable) and writes the whole image.
    let url = env.url.clone();
    env.write_config(&[&url], "routes = [\"full\"]\n");
    for (point, n) in [("download-chunk", 3), ("write-chunk", 5), ("write-chunk", 20)] {
        let out = env.agent_env(&["now"], &[("ATOM_UPDATE_FAILPOINT", &format!("{point}:{n}"))]);
        assert!(!out.status.success(), "{point}:{n} should have aborted");
        // After the crash: both GPT copies valid, B unbootable, A boots.
        let st = ok(Command::new(sibling("bootsel")).args(["status", "--disk", &env.loopdev]));
        assert!(st.contains("GPT primary: valid; backup: valid"), "{st}");
        assert!(st.contains("next boot: A"), "{st}");
    }
    let out = env.now_ok();
    assert!(out.contains("staged"), "{out}");
    assert!(env.slot_holds("B", "v2.img"));
    let st = env.status_json();
    let written = st["last_update"]["bytes_written"].as_u64().unwrap();
    let resumed = st["last_update"]["bytes_resumed"].as_u64().unwrap();
    let total = std::fs::metadata(env.path("v2.img")).unwrap().len();
    println!("after 3 crashes the final run wrote {written} of {total} bytes, resumed past {resumed}");
    assert!(written < total, "the rerun did not rewrite blocks already written");
    // The last crash came after 20 MiB; the checkpoint (every 16 MiB) vouched for 16.
    assert_eq!(resumed, 16 << 20, "resumed from the persisted checkpoint");
    assert!(!env.path("state/checkpoint.toml").exists(), "cleared once staged");
}

#[test]
fn operator_verbs_and_bad_setups() {
    let env = Env::new();
    // Rollback with nothing valid on B.
    failed(&env.agent(&["rollback"]), 7, "not bootable");
    failed(&env.agent(&["mark-bad"]), 7, "nothing to boot");
    env.now_ok();
    // Booted into the new version on B: rollback makes the previous one (A) boot next.
    ok(Command::new(sibling("bootsel")).args(["choose", "--disk", &env.loopdev]));
    env.boot_into("B", "2.0.0");
    ok(Command::new(UPDATE)
        .arg("--config")
        .arg(env.path("update.toml"))
        .arg("rollback"));
    let st = env.status_json();
    assert_eq!(st["next_boot"], "A", "{st}");
    assert_eq!(st["booted_slot"], "B");

    // Running B on trial and broken: mark-bad makes the next boot fall back to A.
    env.cgpt(3, 2, 2, 0);
    env.boot_into("B", "2.0.0");
    ok(Command::new(UPDATE)
        .arg("--config")
        .arg(env.path("update.toml"))
        .arg("mark-bad"));
    assert_eq!(env.flags(3).0, 0);
    assert_eq!(env.status_json()["next_boot"], "A");

    // check: exit 0 when an update is available, 3 when not (2.0.0 was marked bad, so it
    // is rejected until the operator forgets that).
    env.boot_into("A", "1.0.0");
    assert_eq!(env.agent(&["check"]).status.code(), Some(3));
    assert!(env.agent(&["forget-rejected", "2.0.0"]).status.success());
    assert_eq!(env.agent(&["check"]).status.code(), Some(0));
    env.boot_into("A", "2.0.0");
    assert_eq!(env.agent(&["check"]).status.code(), Some(3));
    env.boot_into("A", "1.0.0");

    // Another instance holds the lock.
    std::fs::create_dir_all(env.path("state")).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(env.path("state/lock"))
        .unwrap();
    lock.lock().unwrap();
    failed(&env.agent(&["now"]), 5, "another atom-update");
    drop(lock);

    // Image larger than the slot.
    tree(&env.path("big"), 9);
    ok(Command::new(sibling("atom-build"))
        .args([
            "image",
            "--kernel",
            "none",
            "--size",
            "48M",
            "--version",
            "9.0.0",
            "--rootfs",
        ])
        .arg(env.path("big"))
        .arg("--out")
        .arg(env.path("big.img")));
    env.publish("big.img", &[]);
    failed(&env.agent(&["now"]), 1, "holds only");

    // Not root: cannot open the disk.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", UPDATE, "--config"])
        .arg(env.path("update.toml"))
        .arg("status")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());

    // A bad config names the key.
    std::fs::write(
        env.path("bad.toml"),
        "repositories = []\nchannel = \"s\"\nboard = \"b\"\nsurprise = 1\n",
    )
    .unwrap();
    let out = Command::new(UPDATE)
        .arg("--config")
        .arg(env.path("bad.toml"))
        .arg("status")
        .output()
        .unwrap();
    failed(&out, 1, "surprise");
}

#[test]
fn a_newer_version_replaces_a_staged_one_and_a_mounted_slot_is_refused() {
    let env = Env::new();
    env.now_ok();
    assert!(env.slot_holds("B", "v2.img"));
    // 3.0.0 appears before the host rebooted into 2.0.0: it replaces the staged update.
    env.publish("v3.img", &[]);
    let out = env.now_ok();
    assert!(out.contains("staged 3.0.0 in slot B"), "{out}");
    assert!(env.slot_holds("B", "v3.img"));
    assert_eq!(env.flags(3), (2, 3, 0));
    assert_eq!(env.status_json()["slots"][1]["version"], "3.0.0");

    // The inactive slot is mounted (someone is looking at it): refused, nothing written.
    ok(Command::new("partx").args(["-a", &env.loopdev]));
    let mnt = env.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    ok(Command::new("mount")
        .args(["-o", "ro", &format!("{}p3", env.loopdev)])
        .arg(&mnt));
    env.publish_next_version_marker();
    let out = env.agent(&["now"]);
    let _ = Command::new("umount").arg(&mnt).status();
    let _ = Command::new("partx").args(["-d", &env.loopdev]).status();
    failed(&out, 1, "is mounted");
    assert!(env.slot_holds("B", "v3.img"), "the mounted slot was not touched");
}

/// A validly signed, unexpired manifest older than one the host already accepted (the same
/// version before a re-sign, say one that undoes a paused rollout) is a replay: refused,
/// and a mirror that serves it is passed over for one that is current.
#[test]
fn a_replayed_older_manifest_of_the_same_version_is_refused() {
    let env = Env::new();
    let manifest = env.path("repo/channels/stable/manifest.toml");
    env.publish(
        "v3.img",
        &["--rollout", "1h", "--rollout-start", "2099-01-01T00:00:00Z"],
    );
    let paused = std::fs::read(&manifest).unwrap();
    let out = env.now_ok();
    assert!(out.contains("being rolled out"), "{out}");

    // The publisher ends the rollout; the host takes 3.0.0 under the newer manifest.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.resign(&["--end-rollout"]);
    let current = std::fs::read(&manifest).unwrap();
    let out = env.now_ok();
    assert!(out.contains("staged 3.0.0 in slot B"), "{out}");

    // A stale mirror still serves the first manifest (its signature file is still there).
    let stale = env.path("stale-repo");
    ok(Command::new("cp").arg("-a").arg(env.path("repo")).arg(&stale));
    std::fs::write(stale.join("channels/stable/manifest.toml"), &paused).unwrap();
    let stale_url = format!("file://{}", stale.display());
    env.write_config(&[&stale_url], "");
    let err = failed(&env.agent(&["now"]), 6, "older than one this host already accepted");
    assert!(err.contains("replay"), "{err}");
    failed(&env.agent(&["check"]), 6, "older than one this host already accepted");

    // Listed first, the stale mirror is passed over for a current one.
    let good = format!("file://{}", env.path("repo").display());
    env.write_config(&[&stale_url, &good], "");
    let out = env.now_ok();
    assert!(out.contains("already staged"), "{out}");
    assert_eq!(std::fs::read(&manifest).unwrap(), current);
}

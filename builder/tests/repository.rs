//! `atom-build publish`, `verify` and `history` against real repositories on disk.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use atom_dist::manifest::DeltaFormat;
use atom_dist::repo::layout;
use atom_dist::verify::{Policy, verify_manifest};
use atom_dist::{Digest, Manifest, PublicKey, Repository, TrustedKeys, delta};
use common::*;

struct Setup {
    f: Fixture,
    key: PathBuf,
    public: PathBuf,
    repo: PathBuf,
    v1: PathBuf,
    v2: PathBuf,
}

/// A repository with v1 and v2 (v2 built on v1) published on channel "stable".
fn setup() -> Setup {
    let f = Fixture::new();
    let (key, public) = f.keygen("signer");
    let t1 = f.path("t1");
    make_tree(&t1, 40, 1);
    let v1 = f.image("v1", "1.0.0", &t1, None);
    let t2 = f.path("t2");
    make_tree(&t2, 40, 1);
    fs::write(t2.join("etc/hostname"), "atom-v2\n").unwrap();
    fs::write(t2.join("usr/share/pkg0/new"), bytes(20_000, 77)).unwrap();
    let v2 = f.image("v2", "2.0.0", &t2, Some(&v1));
    let repo = f.path("repo");
    ok(f.publish(&repo, &key, &v1));
    ok(f.publish(&repo, &key, &v2));
    Setup {
        f,
        key,
        public,
        repo,
        v1,
        v2,
    }
}

fn verify(repo: &Path, keys: &[&Path]) -> (i32, String) {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"verify", &"--repo", &repo];
    for k in keys {
        args.push(&"--key");
        args.push(k);
    }
    let out = atom_build(&args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn copy_repo(s: &Setup, name: &str) -> PathBuf {
    let dst = s.f.path(name);
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(&s.repo)
            .arg(&dst)
            .status()
            .unwrap()
            .success()
    );
    dst
}

fn current(repo: &Path) -> Manifest {
    let r = Repository::open(repo).unwrap();
    Manifest::parse(&r.current("stable").unwrap().unwrap().manifest).unwrap()
}

#[test]
fn publish_round_trip_with_precomputed_delta() {
    let s = setup();
    let mode = fs::metadata(&s.key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "secret key mode");

    let (code, out) = verify(&s.repo, &[&s.public]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK"), "{out}");

    let m = current(&s.repo);
    assert_eq!(m.version.to_string(), "2.0.0");
    let (v1_digest, _) = Digest::of_file(&s.v1).unwrap();
    let (v2_digest, v2_len) = Digest::of_file(&s.v2).unwrap();
    assert_eq!(m.image.digest, v2_digest);
    assert_eq!(m.image.size, v2_len);

    // The precomputed delta really turns v1 into v2, in every --delta-format.
    let d = m.delta_from(&v1_digest).expect("delta from v1");
    assert_eq!(d.base_version.to_string(), "1.0.0");
    assert_eq!(d.format, DeltaFormat::FastRsyncZstdBaseExtents, "the default format");
    let rebuilds = |repo: &Path, d: &atom_dist::manifest::Delta| {
        let compressed = fs::read(repo.join(&d.path)).unwrap();
        assert!(
            compressed.len() < 100_000,
            "delta of a small change is small: {} bytes",
            compressed.len()
        );
        let mut raw = Vec::new();
        let base = fs::read(&s.v1).unwrap();
        let scratch = s.f.path(".");
        delta::decompress_format(
            d.format,
            &base,
            &compressed,
            &mut raw,
            delta::raw_delta_limit(m.image.size),
            Some(&scratch),
        )
        .unwrap();
        let mut rebuilt = Vec::new();
        delta::apply(&base, &raw, m.image.size, &mut rebuilt).unwrap();
        assert!(
            Digest::of(&rebuilt) == v2_digest,
            "a {:?} delta does not reproduce v2",
            d.format
        );
    };
    rebuilds(&s.repo, d);
    for (flag, format) in [
        ("base-prefix", DeltaFormat::FastRsyncZstdBasePrefix),
        ("plain", DeltaFormat::FastRsyncZstd),
    ] {
        let repo = s.f.path(&format!("repo-{flag}"));
        ok(s.f.publish(&repo, &s.key, &s.v1));
        let out = atom_build(&[
            &"publish",
            &"--repo",
            &repo,
            &"--channel",
            &"stable",
            &"--key",
            &s.key,
            &"--delta-format",
            &flag,
            &s.v2,
        ]);
        ok(out);
        let m = current(&repo);
        let d = m.delta_from(&v1_digest).expect("delta from v1");
        assert_eq!(d.format, format, "--delta-format {flag}");
        rebuilds(&repo, d);
    }

    let hist = ok(atom_build(&[&"history", &"--repo", &s.repo, &"--channel", &"stable"]));
    assert!(hist.contains("1.0.0") && hist.contains("2.0.0"), "{hist}");
    let lines: Vec<&str> = hist.lines().filter(|l| l.ends_with('*')).collect();
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("2.0.0"), "{hist}");

    // A third version gets deltas from both earlier ones (default --deltas 2).
    let t3 = s.f.path("t3");
    make_tree(&t3, 40, 1);
    fs::write(t3.join("etc/hostname"), "atom-v3\n").unwrap();
    let v3 = s.f.image("v3", "3.0.0", &t3, Some(&s.v2));
    ok(s.f.publish(&s.repo, &s.key, &v3));
    let bases: Vec<String> = current(&s.repo)
        .deltas
        .iter()
        .map(|d| d.base_version.to_string())
        .collect();
    assert_eq!(bases, ["2.0.0", "1.0.0"]);
    assert_eq!(verify(&s.repo, &[&s.public]).0, 0);
}

#[test]
fn verify_names_every_tamper() {
    let s = setup();
    let m = current(&s.repo);
    let manifest_path = s.repo.join(layout::manifest("stable"));

    // Manifest byte flipped.
    let r = copy_repo(&s, "flip");
    let mp = r.join(layout::manifest("stable"));
    let mut bytes = fs::read(&mp).unwrap();
    let at = bytes.iter().position(|&b| b == b'2').unwrap();
    bytes[at] = b'9';
    fs::write(&mp, bytes).unwrap();
    let (code, out) = verify(&r, &[&s.public]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("manifest.toml: no signature found"), "{out}");

    // Signature swapped: v1's signature placed where v2's belongs.
    let r = copy_repo(&s, "swap");
    let store = Repository::open(&r).unwrap();
    let history = store.history("stable").unwrap();
    let v1_sig = &history[0].1.signature;
    let v2_sig_path = r.join(layout::signature(
        "stable",
        &Digest::of(&fs::read(&manifest_path).unwrap()),
    ));
    fs::write(&v2_sig_path, v1_sig).unwrap();
    let (code, out) = verify(&r, &[&s.public]);
    assert_eq!(code, 3);
    assert!(out.contains("does not match the manifest"), "{out}");

    // Unknown key.
    let (_, other_pub) = s.f.keygen("other");
    let (code, out) = verify(&s.repo, &[&other_pub]);
    assert_eq!(code, 3);
    assert!(out.contains("untrusted key"), "{out}");

    // Corrupt payload, truncated delta.
    let r = copy_repo(&s, "corrupt");
    let payload = r.join(&m.payload.path);
    let mut p = fs::read(&payload).unwrap();
    let mid = p.len() / 2;
    p[mid] ^= 0xff;
    fs::write(&payload, p).unwrap();
    let delta_path = r.join(&m.deltas[0].path);
    let d = fs::read(&delta_path).unwrap();
    fs::write(&delta_path, &d[..d.len() / 2]).unwrap();
    let (code, out) = verify(&r, &[&s.public]);
    assert_eq!(code, 3);
    assert!(out.contains("payload") && out.contains("digest"), "{out}");
    assert!(
        out.contains("delta from 1.0.0") && out.contains("bytes, the manifest says"),
        "{out}"
    );

    // An old version's payload (still a delta base for hosts on it) is checked too.
    let r = copy_repo(&s, "old-payload");
    let store = Repository::open(&r).unwrap();
    let v1_manifest = Manifest::parse(&store.history("stable").unwrap()[0].1.manifest).unwrap();
    let old = r.join(&v1_manifest.payload.path);
    let len = fs::metadata(&old).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&old)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let (code, out) = verify(&r, &[&s.public]);
    assert_eq!(code, 3);
    assert!(out.contains(&v1_manifest.payload.path), "{out}");

    // Missing repository marker.
    let out = atom_build(&[&"verify", &"--repo", &s.f.path("t1"), &"--key", &s.public]);
    fails_with(out, 1, "not an Atom repository");
}

/// A verify with a timeout: a hang (FIFO, endless read) fails the test instead of CI.
fn verify_within(repo: &Path, key: &Path, secs: u64) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_atom-build"))
        .args(["verify", "--repo"])
        .arg(repo)
        .arg("--key")
        .arg(key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("verify of {} did not finish within {secs} s", repo.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn verify_refuses_hostile_files_without_reading_them() {
    let s = setup();
    let m = current(&s.repo);
    let replace = |repo: &Path, rel: &str, with: &dyn Fn(&Path)| {
        let p = repo.join(rel);
        fs::remove_file(&p).unwrap();
        with(&p);
    };
    let to_zero = |p: &Path| std::os::unix::fs::symlink("/dev/zero", p).unwrap();
    let fifo = |p: &Path| assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
    let sparse = |p: &Path| fs::File::create(p).unwrap().set_len(64 << 30).unwrap();
    let outside = |p: &Path| std::os::unix::fs::symlink("/etc/shadow", p).unwrap();
    let manifest = layout::manifest("stable");
    let sig = layout::signature("stable", &Digest::of(&fs::read(s.repo.join(&manifest)).unwrap()));
    type Case<'a> = (&'a str, &'a str, &'a dyn Fn(&Path), &'a str);
    let cases: [Case; 7] = [
        ("m-zero", &manifest, &to_zero, "leads out of the repository"),
        ("s-zero", &sig, &to_zero, "leads out of the repository"),
        ("m-fifo", &manifest, &fifo, "a FIFO, not a regular file"),
        ("d-zero", &m.deltas[0].path, &to_zero, "leads out of the repository"),
        (
            "d-sparse",
            &m.deltas[0].path,
            &sparse,
            "68719476736 bytes, the manifest says",
        ),
        ("p-fifo", &m.payload.path, &fifo, "a FIFO, not a regular file"),
        ("p-out", &m.payload.path, &outside, "leads out of the repository"),
    ];
    for (name, rel, make, want) in cases {
        let r = copy_repo(&s, name);
        replace(&r, rel, make);
        let (code, out) = verify_within(&r, &s.public, 20);
        assert_ne!(code, 0, "{name}: {out}");
        assert!(out.contains(want), "{name}: wanted {want:?} in:\n{out}");
        assert!(!out.contains("root:"), "{name}: file contents echoed:\n{out}");
    }
}

#[test]
fn expired_and_wrong_board_are_reported() {
    let f = Fixture::new();
    let (key, public) = f.keygen("k");
    let t = f.path("t");
    make_tree(&t, 5, 1);
    let v1 = f.image("v1", "1.0.0", &t, None);
    let repo = f.path("repo");
    ok(atom_build(&[
        &"publish",
        &"--repo",
        &repo,
        &"--channel",
        &"stable",
        &"--key",
        &key,
        &"--expires-in",
        &"1s",
        &v1,
    ]));
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (code, out) = verify(&repo, &[&public]);
    assert_eq!(code, 3);
    assert!(out.contains("expired"), "{out}");

    // A host for another board rejects the manifest (the agent's check, via the library).
    let r = Repository::open(&repo).unwrap();
    let cur = r.current("stable").unwrap().unwrap();
    let trusted = TrustedKeys::new([PublicKey::load(&public).unwrap()]);
    let policy = Policy {
        trusted: &trusted,
        now: jiff::Timestamp::MIN,
        board: Some("rpi4"),
        channel: Some("stable"),
        agent: None,
    };
    let err = verify_manifest(&cur.manifest, &cur.signature, &policy).unwrap_err();
    assert!(err.to_string().contains("board"), "{err}");

    // Publishing another board's image onto the channel is refused.
    let out = f.path("other-board.img");
    ok(atom_build(&[
        &"image",
        &"--kernel",
        &"none",
        &"--rootfs",
        &t,
        &"--version",
        &"2.0.0",
        &"--board",
        &"rpi4",
        &"--size",
        &"64M",
        &"--out",
        &out,
    ]));
    let before = snapshot(&repo);
    fails_with(f.publish(&repo, &key, &out), 1, "carries board");
    assert!(snapshot(&repo) == before, "repository changed");
}

#[test]
fn failed_publishes_leave_the_repository_as_it_was() {
    let s = setup();
    let before = snapshot(&s.repo);
    let unchanged = |what: &str| assert!(snapshot(&s.repo) == before, "repository changed after {what}");

    fails_with(s.f.publish(&s.repo, &s.key, &s.v1), 1, "not newer than 2.0.0");
    unchanged("older version");
    fails_with(s.f.publish(&s.repo, &s.key, &s.v2), 1, "not newer");
    unchanged("same version");

    let (wrong_key, _) = s.f.keygen("intruder");
    let t = s.f.path("t9");
    make_tree(&t, 5, 9);
    let v9 = s.f.image("v9", "9.0.0", &t, None);
    fails_with(s.f.publish(&s.repo, &wrong_key, &v9), 1, "not signed by this key");
    unchanged("wrong key");

    let corrupt_key = s.f.path("corrupt.key");
    fs::write(
        &corrupt_key,
        "kind = \"atom-signing-key\"\nkey_id = \"00\"\nsecret = \"zz\"\n",
    )
    .unwrap();
    fails_with(s.f.publish(&s.repo, &corrupt_key, &v9), 1, "corrupt.key");
    unchanged("corrupt key");
    let err = fails_with(s.f.publish(&s.repo, &s.f.path("missing.key"), &v9), 1, "missing.key");
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the cause is said once: {err}"
    );

    let not_image = s.f.path("junk.img");
    fs::write(&not_image, vec![7u8; 1 << 20]).unwrap();
    fails_with(s.f.publish(&s.repo, &s.key, &not_image), 1, "not an Atom image");
    unchanged("not an image");

    // A directory holding someone else's files is not turned into a repository.
    let foreign = s.f.path("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("notes.txt"), "keep me").unwrap();
    fails_with(s.f.publish(&foreign, &s.key, &v9), 1, "not an Atom repository");
    assert_eq!(fs::read_dir(&foreign).unwrap().count(), 1);

    // Key rotation: the new key may take over only when the old one is named.
    let (new_key, new_pub) = s.f.keygen("next");
    fails_with(s.f.publish(&s.repo, &new_key, &v9), 1, "--trust");
    unchanged("rotation without --trust");
    ok(atom_build(&[
        &"publish",
        &"--repo",
        &s.repo,
        &"--channel",
        &"stable",
        &"--key",
        &new_key,
        &"--trust",
        &s.public,
        &"--zstd-level",
        &"3",
        &v9,
    ]));
    assert_eq!(verify(&s.repo, &[&s.public, &new_pub]).0, 0);
    let (code, out) = verify(&s.repo, &[&new_pub]);
    assert_eq!(
        code, 3,
        "history signed by the retired key is reported when only the new key is trusted"
    );
    assert!(out.contains("history/1.0.0.toml"), "{out}");
}

#[test]
fn readers_never_see_a_half_published_channel() {
    let s = setup();
    let t = s.f.path("t3");
    make_tree(&t, 40, 3);
    fs::write(t.join("big"), bytes(20 << 20, 3)).unwrap();
    let v3 = s.f.image("v3", "3.0.0", &t, None);
    let trusted = TrustedKeys::new([PublicKey::load(&s.public).unwrap()]);

    let mut child = Command::new(BIN)
        .args(["publish", "--channel", "stable", "--zstd-level", "9", "--repo"])
        .arg(&s.repo)
        .arg("--key")
        .arg(&s.key)
        .arg(&v3)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let repo = Repository::open(&s.repo).unwrap();
    let mut reads = 0;
    let mut versions = std::collections::BTreeSet::new();
    loop {
        let done = child.try_wait().unwrap().is_some();
        let cur = repo.current("stable").unwrap().unwrap();
        let policy = Policy {
            trusted: &trusted,
            now: jiff::Timestamp::now(),
            board: None,
            channel: Some("stable"),
            agent: None,
        };
        let v = verify_manifest(&cur.manifest, &cur.signature, &policy).expect("reader saw an unverifiable channel");
        // Everything the manifest names is already complete when the reader can see it.
        let m = v.manifest;
        let (digest, size) = Digest::of_file(&s.repo.join(&m.payload.path)).unwrap();
        assert!(
            digest == m.payload.digest && size == m.payload.size,
            "payload incomplete for {}",
            m.version
        );
        for d in &m.deltas {
            let (digest, _) = Digest::of_file(&s.repo.join(&d.path)).unwrap();
            assert!(digest == d.digest, "delta incomplete for {}", m.version);
        }
        versions.insert(m.version.to_string());
        reads += 1;
        if done {
            break;
        }
    }
    assert!(child.wait().unwrap().success());
    assert!(versions.contains("3.0.0"), "saw {versions:?}");
    assert!(reads > 1, "the reader ran while publishing ({reads} reads)");
    let leftovers: Vec<_> = fs::read_dir(&s.repo)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".atom-base") || n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `atom-build resign` on the test repository, signing with `key`.
fn resign(s: &Setup, key: &Path, extra: &[&str]) -> std::process::Output {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"resign", &"--repo", &s.repo, &"--channel", &"stable", &"--key", &key];
    for e in extra {
        args.push(e);
    }
    atom_build(&args)
}

fn signed_by_only(repo: &Path, public: &Path) -> bool {
    let r = Repository::open(repo).unwrap();
    let current = r.current("stable").unwrap().unwrap();
    let trusted = TrustedKeys::new([PublicKey::load(public).unwrap()]);
    let policy = Policy {
        trusted: &trusted,
        now: jiff::Timestamp::now(),
        board: None,
        channel: Some("stable"),
        agent: None,
    };
    verify_manifest(&current.manifest, &current.signature, &policy).is_ok()
}

#[test]
fn resign_extends_expiry_changes_rollouts_and_rotates_keys() {
    let s = setup();
    let before = current(&s.repo);

    // Same version and files, valid for longer; the repository still verifies.
    ok(resign(&s, &s.key, &["--expires-in", "90days"]));
    let m = current(&s.repo);
    assert_eq!(
        (&m.version, &m.image, &m.payload, &m.deltas),
        (&before.version, &before.image, &before.payload, &before.deltas)
    );
    assert!(
        m.expires.duration_since(before.expires).as_hours() > 59 * 24,
        "{} vs {}",
        m.expires,
        before.expires
    );
    assert_eq!(verify(&s.repo, &[&s.public]).0, 0, "the re-signed repository verifies");

    // A rollout started, moved (paused), then ended.
    ok(resign(&s, &s.key, &["--rollout", "48h"]));
    let r = current(&s.repo).rollout.expect("a rollout");
    assert_eq!(r.duration_secs, 48 * 3600);
    ok(resign(&s, &s.key, &["--rollout-start", "2030-01-01T00:00:00Z"]));
    let moved = current(&s.repo).rollout.expect("still a rollout");
    assert_eq!(
        (moved.start.to_string().as_str(), moved.duration_secs),
        ("2030-01-01T00:00:00Z", 48 * 3600)
    );
    ok(resign(&s, &s.key, &["--end-rollout"]));
    assert!(current(&s.repo).rollout.is_none());
    fails_with(
        resign(&s, &s.key, &["--rollout-start", "2030-01-01T00:00:00Z"]),
        1,
        "no rollout to move",
    );

    // Another key cannot re-sign the channel; with --trust the old key it takes it over.
    let (new_key, new_public) = s.f.keygen("new");
    let untouched = snapshot(&s.repo);
    fails_with(resign(&s, &new_key, &[]), 1, "not signed by this key");
    assert!(snapshot(&s.repo) == untouched, "a refused resign changes nothing");
    ok(resign(&s, &new_key, &["--trust", s.public.to_str().unwrap()]));
    assert!(signed_by_only(&s.repo, &new_public));
    assert!(
        !signed_by_only(&s.repo, &s.public),
        "the old key no longer signs the channel"
    );

    let never = atom_build(&[&"resign", &"--repo", &s.repo, &"--channel", &"edge", &"--key", &s.key]);
    fails_with(never, 1, "never been published");

    // A channel whose manifest is dated after this machine's clock: a new one would look
    // like a replay to hosts, so publish and resign refuse to make it.
    let mut future = current(&s.repo);
    future.created = "2099-01-01T00:00:00Z".parse().unwrap();
    future.expires = "2099-02-01T00:00:00Z".parse().unwrap();
    let text = future.to_toml();
    let key = atom_dist::SecretKey::load(&new_key).unwrap();
    let signed = atom_dist::repo::SignedManifest {
        signature: atom_dist::signature::sign(text.as_bytes(), &[&key]).into_bytes(),
        manifest: text.into_bytes(),
    };
    Repository::open(&s.repo)
        .unwrap()
        .commit_manifest("stable", &future.version, &signed)
        .unwrap();
    fails_with(resign(&s, &new_key, &[]), 1, "clock");
    let t3 = s.f.path("t3");
    make_tree(&t3, 5, 3);
    let v3 = s.f.image("v3", "3.0.0", &t3, None);
    fails_with(s.f.publish(&s.repo, &new_key, &v3), 1, "clock");
}

#[test]
fn publisher_hygiene_private_keys_and_stale_temporary_files() {
    let s = setup();
    // A signing key others may read (or that belongs to someone else) is refused, like ssh.
    let t3 = s.f.path("t3");
    make_tree(&t3, 40, 3);
    let v3 = s.f.image("v3", "3.0.0", &t3, Some(&s.v2));
    fs::set_permissions(&s.key, fs::Permissions::from_mode(0o644)).unwrap();
    fails_with(s.f.publish(&s.repo, &s.key, &v3), 1, "is not private: mode 0644");
    fs::set_permissions(&s.key, fs::Permissions::from_mode(0o606)).unwrap();
    fails_with(s.f.publish(&s.repo, &s.key, &v3), 1, "chmod 600");
    fs::set_permissions(&s.key, fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&s.key, Some(4242), None).unwrap();
    fails_with(s.f.publish(&s.repo, &s.key, &v3), 1, "belongs to user id 4242");
    std::os::unix::fs::chown(&s.key, Some(0), None).unwrap();

    // A publish killed between write and rename leaves hidden files: verify reports them
    // (without failing: clients never see them), the next publish removes them.
    let stale = [
        s.repo.join("objects/.abc.img.zst.tmp-77-00000000deadbeef"),
        s.repo.join("deltas/.x-y.rsync.zst.tmp123"),
        s.repo.join(".atom-base-Xy12ab"),
    ];
    for p in &stale {
        fs::write(p, b"left over").unwrap();
    }
    let (code, out) = verify(&s.repo, &[&s.public]);
    assert_eq!(code, 0, "{out}");
    for p in &stale {
        assert!(out.contains(&format!("STALE {} (9 bytes)", p.display())), "{out}");
    }
    ok(s.f.publish(&s.repo, &s.key, &v3));
    for p in &stale {
        assert!(!p.exists(), "{} was removed by the next publish", p.display());
    }
    let (code, out) = verify(&s.repo, &[&s.public]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("STALE"), "{out}");
}

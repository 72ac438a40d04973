//! Signing elsewhere and keys that stay offline: `publish --sign-later` + `sign` (in place
//! and air-gapped), passphrase-protected key files, a SoftHSM2 token through PKCS#11, and
//! `verify --root` with its expiry warnings.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run atom-build")
}

fn images(f: &Fixture) -> (PathBuf, PathBuf) {
    let t1 = f.path("t1");
    make_tree(&t1, 20, 1);
    let v1 = f.image("v1", "1.0.0", &t1, None);
    let t2 = f.path("t2");
    make_tree(&t2, 20, 2);
    let v2 = f.image("v2", "2.0.0", &t2, Some(&v1));
    (v1, v2)
}

fn secret(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

fn verify_ok(dir: &Path, extra: &[&str]) -> String {
    let mut a = vec!["verify", "--repo", "repo", "--quick"];
    a.extend_from_slice(extra);
    ok(run(dir, &a))
}

/// `sign` attaching a detached signature to the pending publication of channel stable.
fn attach(d: &Path, sig: &str) -> Output {
    run(
        d,
        &[
            "sign",
            "--repo",
            "repo",
            "--channel",
            "stable",
            "--signature",
            sig,
            "--trust",
            "signer.pub",
        ],
    )
}

#[test]
fn sign_later_in_place_and_air_gapped() {
    let f = Fixture::new();
    let d = f.dir.path();
    f.keygen("signer");
    f.keygen("other");
    let (v1, v2) = images(&f);
    let (v1, v2) = (v1.to_str().unwrap(), v2.to_str().unwrap());

    // CI: the whole publication without the key; hosts see nothing yet.
    let out = ok(run(
        d,
        &[
            "publish",
            "--repo",
            "repo",
            "--channel",
            "stable",
            "--sign-later",
            "--zstd-level",
            "3",
            v1,
        ],
    ));
    assert!(out.contains("atom-build sign"), "{out}");
    assert!(d.join("repo/pending/stable/manifest.toml").exists());
    assert!(
        !d.join("repo/channels/stable/manifest.toml").exists(),
        "nothing current before signing"
    );
    fails_with(
        run(d, &["publish", "--repo", "repo", "--channel", "stable", v1]),
        1,
        "--key is needed",
    );

    // Signing in place checks the files and commits.
    ok(run(
        d,
        &["sign", "--repo", "repo", "--channel", "stable", "--key", "signer.key"],
    ));
    assert!(!d.join("repo/pending/stable/manifest.toml").exists());
    verify_ok(d, &["--key", "signer.pub"]);

    // v2 signed on another machine that has only the manifest.
    ok(run(
        d,
        &[
            "publish",
            "--repo",
            "repo",
            "--channel",
            "stable",
            "--sign-later",
            "--trust",
            "signer.pub",
            "--zstd-level",
            "3",
            v2,
        ],
    ));
    fs::create_dir_all(d.join("airgap")).unwrap();
    fs::copy(
        d.join("repo/pending/stable/manifest.toml"),
        d.join("airgap/manifest.toml"),
    )
    .unwrap();
    let out = ok(run(
        d,
        &[
            "sign",
            "--manifest",
            "airgap/manifest.toml",
            "--key",
            "signer.key",
            "--output",
            "airgap/manifest.sig",
        ],
    ));
    assert!(
        out.contains("version 2.0.0") && out.contains("image blake3:"),
        "says what it signs: {out}"
    );
    ok(run(
        d,
        &[
            "sign",
            "--manifest",
            "airgap/manifest.toml",
            "--key",
            "other.key",
            "--output",
            "airgap/other.sig",
        ],
    ));

    // A signature by a key nobody trusts, or over other bytes, is refused before commit.
    fails_with(attach(d, "airgap/other.sig"), 1, "does not verify");
    let pending = d.join("repo/pending/stable/manifest.toml");
    let original = fs::read_to_string(&pending).unwrap();
    fs::write(&pending, format!("surprise = 1\n{original}")).unwrap();
    fails_with(
        attach(d, "airgap/manifest.sig"),
        1,
        "not in the form this atom-build writes",
    );
    fs::write(&pending, original.replace("x86_64-generic", "x86_64-other")).unwrap();
    fails_with(attach(d, "airgap/manifest.sig"), 1, "does not verify");
    fs::write(&pending, &original).unwrap();
    // A payload missing from the repository: the signer vouches for the files too.
    let m = atom_dist::Manifest::parse(original.as_bytes()).unwrap();
    let payload = d.join("repo").join(&m.payload.path);
    fs::rename(&payload, d.join("payload.bak")).unwrap();
    fails_with(attach(d, "airgap/manifest.sig"), 1, "payload");
    fs::rename(d.join("payload.bak"), &payload).unwrap();
    assert!(
        String::from_utf8_lossy(&fs::read(d.join("repo/channels/stable/manifest.toml")).unwrap()).contains("1.0.0")
    );

    ok(run(
        d,
        &[
            "sign",
            "--repo",
            "repo",
            "--channel",
            "stable",
            "--signature",
            "airgap/manifest.sig",
            "--signature",
            "airgap/other.sig",
            "--trust",
            "signer.pub",
        ],
    ));
    let out = verify_ok(d, &["--key", "signer.pub"]);
    assert!(out.starts_with("OK") || out.contains("\nOK"), "{out}");
    let current = fs::read(d.join("repo/channels/stable/manifest.toml")).unwrap();
    assert!(String::from_utf8_lossy(&current).contains("2.0.0"));
}

#[test]
fn passphrase_protected_keys() {
    let f = Fixture::new();
    let d = f.dir.path();
    secret(&d.join("pass"), "correct horse battery staple\n");
    secret(&d.join("wrong"), "incorrect horse\n");
    let out = ok(run(
        d,
        &["keygen", "--out", "enc", "--encrypt", "--passphrase-file", "pass"],
    ));
    assert!(out.contains("key id"), "{out}");
    let text = fs::read_to_string(d.join("enc.key")).unwrap();
    assert!(
        text.contains("atom-signing-key-encrypted") && !text.contains("secret ="),
        "{text}"
    );
    let (v1, _) = images(&f);
    let v1 = v1.to_str().unwrap();
    let publish = |extra: &[&str]| {
        let mut a = vec![
            "publish",
            "--repo",
            "repo",
            "--channel",
            "stable",
            "--key",
            "enc.key",
            "--zstd-level",
            "3",
        ];
        a.extend_from_slice(extra);
        a.push(v1);
        run(d, &a)
    };
    fails_with(publish(&["--passphrase-file", "wrong"]), 1, "wrong passphrase");
    fails_with(publish(&[]), 1, "no terminal");
    secret(&d.join("loose"), "correct horse battery staple\n");
    fs::set_permissions(d.join("loose"), fs::Permissions::from_mode(0o644)).unwrap();
    fails_with(publish(&["--passphrase-file", "loose"]), 1, "chmod 600");
    ok(publish(&["--passphrase-file", "pass"]));
    verify_ok(d, &["--key", "enc.pub"]);
}

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The release key lives in a SoftHSM2 token (Debian's softhsm2), generated inside it; the
/// root key is a file. Publishing, re-signing and keys.toml all go through PKCS#11.
#[test]
fn a_pkcs11_token_signs_through_softhsm2() {
    assert!(
        Path::new(SOFTHSM).exists(),
        "{SOFTHSM} is missing: install Debian's softhsm2 (tests/packages.sh does)"
    );
    let f = Fixture::new();
    let d = f.dir.path();
    fs::create_dir_all(d.join("tokens")).unwrap();
    fs::write(
        d.join("softhsm2.conf"),
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            d.join("tokens").display()
        ),
    )
    .unwrap();
    let conf = d.join("softhsm2.conf");
    let init = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "atom",
            "--pin",
            "123456",
            "--so-pin",
            "654321",
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util (Debian package softhsm2)");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    secret(&d.join("pin"), "123456\n");
    secret(&d.join("badpin"), "000000\n");
    let uri = format!(
        "pkcs11:token=atom;object=release?module-path={SOFTHSM}&pin-source=file:{}",
        d.join("pin").display()
    );
    let bad = format!(
        "pkcs11:token=atom;object=release?module-path={SOFTHSM}&pin-source=file:{}",
        d.join("badpin").display()
    );
    let hsm = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .current_dir(d)
            .env("SOFTHSM2_CONF", &conf)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = ok(hsm(&["keygen", "--in-token", &uri, "--out", "hsm"]));
    assert!(out.contains("never leaves"), "{out}");
    assert!(!d.join("hsm.key").exists(), "no secret on disk");
    fails_with(
        hsm(&["keygen", "--in-token", &uri, "--out", "hsm2"]),
        1,
        "already has a key",
    );

    let (v1, v2) = images(&f);
    let publish = |key: &str, image: &Path| {
        hsm(&[
            "publish",
            "--repo",
            "repo",
            "--channel",
            "stable",
            "--key",
            key,
            "--zstd-level",
            "3",
            image.to_str().unwrap(),
        ])
    };
    fails_with(publish(&bad, &v1), 1, "wrong PIN");
    ok(publish(&uri, &v1));
    verify_ok(d, &["--key", "hsm.pub"]);

    // Key roles with release and freshness keys both on the token, used in one publish.
    let fresh_uri = uri.replace("object=release", "object=fresh");
    ok(hsm(&["keygen", "--in-token", &fresh_uri, "--out", "fresh"]));
    f.keygen("root");
    ok(hsm(&[
        "keys",
        "--repo",
        "repo",
        "--root-key",
        "root.key",
        "--release",
        "hsm.pub",
        "--freshness",
        "fresh.pub",
        "--version",
        "1",
    ]));
    ok(hsm(&["refresh", "--repo", "repo", "--key", &fresh_uri]));
    fails_with(
        hsm(&[
            "publish",
            "--repo",
            "repo",
            "--channel",
            "stable",
            "--key",
            &fresh_uri,
            "--zstd-level",
            "3",
            v2.to_str().unwrap(),
        ]),
        1,
        "not a release key",
    );
    ok(hsm(&[
        "publish",
        "--repo",
        "repo",
        "--channel",
        "stable",
        "--key",
        &uri,
        "--timestamp-key",
        &fresh_uri,
        "--zstd-level",
        "3",
        v2.to_str().unwrap(),
    ]));
    let leaky = format!("pkcs11:token=atom;object=nope?module-path={SOFTHSM}&pin-value=123456");
    let err = fails_with(
        hsm(&["refresh", "--repo", "repo", "--key", &leaky]),
        1,
        "pin-value=(hidden)",
    );
    assert!(!err.contains("123456"), "the PIN is never printed: {err}");
    let out = verify_ok(d, &["--root", "root.pub"]);
    assert!(out.contains("keys.toml version 1"), "{out}");
}

#[test]
fn verify_checks_the_chain_and_warns_before_expiry() {
    let f = Fixture::new();
    let d = f.dir.path();
    f.keygen("signer");
    f.keygen("root");
    f.keygen("fresh");
    f.keygen("stranger");
    let (v1, _) = images(&f);
    ok(f.publish(&d.join("repo"), &d.join("signer.key"), &v1));
    ok(run(
        d,
        &[
            "keys",
            "--repo",
            "repo",
            "--root-key",
            "root.key",
            "--release",
            "signer.pub",
            "--freshness",
            "fresh.pub",
            "--version",
            "1",
        ],
    ));
    // Roles without a timestamp: a problem for hosts with the root key.
    let out = run(d, &["verify", "--repo", "repo", "--quick", "--root", "root.pub"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no timestamp.toml"));
    // The root key signs only keys.toml: not a release key.
    fails_with(
        run(d, &["refresh", "--repo", "repo", "--key", "signer.key"]),
        1,
        "not a freshness key",
    );

    ok(run(
        d,
        &["refresh", "--repo", "repo", "--key", "fresh.key", "--expires-in", "6s"],
    ));
    let out = verify_ok(d, &["--root", "root.pub"]);
    assert!(!out.contains("WARN"), "{out}");
    // Times are whole seconds (rounded): after 4.6 s between 0.9 and 1.9 s are left,
    // under a third of the 6-second lifetime.
    std::thread::sleep(std::time::Duration::from_millis(4600));
    let out = verify_ok(d, &["--root", "root.pub"]);
    assert!(out.contains("WARN channel stable: timestamp expires"), "{out}");
    assert!(out.contains("atom-build refresh"), "{out}");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let out = run(d, &["verify", "--repo", "repo", "--quick", "--root", "root.pub"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("timestamp expired"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let out = run(d, &["verify", "--repo", "repo", "--quick", "--root", "stranger.pub"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not signed by a trusted root key"));
}

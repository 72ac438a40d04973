//! Formats that evolve and keys that stay offline, end to end with the real binaries:
//! optional and critical manifest fields, `min_agent`, and key roles (root → keys.toml →
//! release-signed manifest + freshness-signed timestamp), including the migration of a
//! single-key repository, rotation, replays and expiry.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Env, failed, ok, sibling};

/// Signs `text` as channel stable's current manifest with the test key.
fn commit_manifest(env: &Env, text: &str, version: &str) {
    let repo = atom_dist::Repository::open(&env.path("repo")).unwrap();
    let key = atom_dist::SecretKey::load(&env.path("signer.key")).unwrap();
    let signed = atom_dist::repo::SignedManifest {
        signature: atom_dist::signature::sign(text.as_bytes(), &[&key]).into_bytes(),
        manifest: text.as_bytes().to_vec(),
    };
    repo.commit_manifest("stable", &version.parse().unwrap(), &signed)
        .unwrap();
}

fn current_text(env: &Env) -> String {
    let repo = atom_dist::Repository::open(&env.path("repo")).unwrap();
    String::from_utf8(repo.current("stable").unwrap().unwrap().manifest).unwrap()
}

/// A newer publisher's manifest: its critical field stops this agent, its optional
/// fields do not; `min_agent` above this agent stops it too. Nothing is written until taken.
#[test]
fn optional_fields_are_taken_critical_fields_and_min_agent_refused() {
    let env = Env::new();
    let v2 = current_text(&env);
    // Newer fields an older agent knows nothing of, at the top, in a table and in a delta.
    let newer = format!("compression_hint = \"zstd-long\"\n{v2}\n[signing_policy]\nthreshold = 2\n")
        .replace("[[deltas]]\n", "[[deltas]]\nchunk_map = \"maps/x.map\"\n");

    commit_manifest(&env, &format!("critical = [\"signing_policy\"]\n{newer}"), "2.0.0");
    let err = failed(&env.agent(&["now"]), 6, "update the agent first");
    assert!(err.contains("signing_policy"), "{err}");
    assert_eq!(env.flags(3).0, 0, "slot B untouched");

    let too_new = format!("min_agent = \"99.0.0\"\n{newer}");
    commit_manifest(&env, &too_new, "2.0.0");
    let err = failed(&env.agent(&["now"]), 6, "update the agent first");
    assert!(err.contains("needs agent 99.0.0"), "{err}");
    assert_eq!(env.flags(3).0, 0, "slot B untouched");

    // Marked critical but known here (rollout), plus unknown optional fields: installed.
    commit_manifest(
        &env,
        &format!("critical = [\"deltas.base_digest\"]\nmin_agent = \"0.0.1\"\n{newer}"),
        "2.0.0",
    );
    let out = env.now_ok();
    assert!(out.contains("staged") || out.contains("2.0.0"), "{out}");
    assert!(env.slot_holds("B", "v2.img"));
}

fn build(env: &Env, args: &[&str]) -> String {
    let mut c = Command::new(sibling("atom-build"));
    c.args(args);
    c.current_dir(env.dir.path());
    ok(&mut c)
}

fn keygen(env: &Env, name: &str) {
    build(env, &["keygen", "--out", name]);
}

fn keys(env: &Env, release: &str, freshness: &str, extra: &[&str]) -> String {
    let mut a = vec![
        "keys",
        "--repo",
        "repo",
        "--root-key",
        "root.key",
        "--release",
        release,
        "--freshness",
        freshness,
    ];
    a.extend_from_slice(extra);
    build(env, &a)
}

fn refresh(env: &Env) -> String {
    build(env, &["refresh", "--repo", "repo", "--key", "fresh.key"])
}

fn save(env: &Env, files: &[&str], to: &str) {
    std::fs::create_dir_all(env.path(to)).unwrap();
    for f in files {
        std::fs::copy(
            env.path(&format!("repo/{f}")),
            env.path(&format!("{to}/{}", f.replace('/', "_"))),
        )
        .unwrap();
    }
}

fn restore(env: &Env, files: &[&str], from: &str) {
    for f in files {
        std::fs::copy(
            env.path(&format!("{from}/{}", f.replace('/', "_"))),
            env.path(&format!("repo/{f}")),
        )
        .unwrap();
    }
}

/// A second's wait: `created` times have one-second resolution, and the replay checks
/// compare them.
fn tick() {
    std::thread::sleep(Duration::from_millis(1100));
}

#[test]
fn key_roles_migrate_rotate_and_refuse_replays() {
    let env = Env::new();
    // Migration: the single signing key becomes the release key; hosts that trust it
    // directly keep working, hosts with the root key require the whole chain.
    for k in ["root", "fresh", "release2"] {
        keygen(&env, k);
    }
    keys(&env, "signer.pub", "fresh.pub", &["--version", "1"]);
    let legacy = env.agent(&["check"]);
    assert!(legacy.status.success(), "{}", String::from_utf8_lossy(&legacy.stderr));

    std::fs::create_dir_all(env.path("keys/root")).unwrap();
    std::fs::copy(env.path("root.pub"), env.path("keys/root/root.pub")).unwrap();
    failed(&env.agent(&["check"]), 1, "has no timestamp");
    refresh(&env);
    let out = env.now_ok();
    assert!(out.contains("staged") || out.contains("2.0.0"), "{out}");
    let st: toml::Table = toml::from_str(&std::fs::read_to_string(env.path("state/state.toml")).unwrap()).unwrap();
    assert_eq!(st["keys_version"].as_integer(), Some(1), "{st}");

    // A replayed timestamp (an older one, still unexpired) is refused once a newer was seen.
    let ts = ["channels/stable/timestamp.toml"];
    save(&env, &ts, "ts-old");
    tick();
    env.publish("v3.img", &["--timestamp-key", env.path("fresh.key").to_str().unwrap()]);
    let out = env.now_ok();
    assert!(env.slot_holds("B", "v3.img"), "{out}");
    restore(&env, &ts, "ts-old");
    failed(&env.agent(&["check"]), 6, "timestamp created");
    refresh(&env);
    env.agent(&["check"])
        .status
        .success()
        .then_some(())
        .expect("fresh timestamp taken");

    // Rotation of the release key by a new keys.toml: the old key's manifest is refused,
    // the re-signed one taken.
    let keys_files = ["keys/keys.toml"];
    save(&env, &keys_files, "keys-v1");
    let keys_v1_sig = std::fs::read_dir(env.path("repo/keys/sigs")).unwrap().count();
    assert_eq!(keys_v1_sig, 1);
    tick();
    keys(&env, "release2.pub", "fresh.pub", &[]);
    failed(&env.agent(&["check"]), 6, "none of them a release key");
    build(
        &env,
        &[
            "resign",
            "--repo",
            "repo",
            "--channel",
            "stable",
            "--key",
            "release2.key",
            "--trust",
            "signer.pub",
            "--timestamp-key",
            "fresh.key",
        ],
    );
    let out = env.now_ok();
    assert!(out.contains("already staged"), "{out}");

    // keys.toml replayed (version 1, which still names the retired key): refused.
    restore(&env, &keys_files, "keys-v1");
    failed(&env.agent(&["check"]), 6, "older than version 2");

    // keys.toml signed by the freshness key instead of the root: refused.
    let forged = std::fs::read_to_string(env.path("keys-v1/keys_keys.toml"))
        .unwrap()
        .replace("version = 1", "version = 9");
    let fresh = atom_dist::SecretKey::load(&env.path("fresh.key")).unwrap();
    let sig =
        atom_dist::signature::sign_with(atom_dist::signature::Domain::Keys, forged.as_bytes(), &[&fresh]).unwrap();
    let repo = atom_dist::Repository::open(&env.path("repo")).unwrap();
    repo.commit_keys(&atom_dist::repo::SignedManifest {
        manifest: forged.into_bytes(),
        signature: sig.into_bytes(),
    })
    .unwrap();
    failed(&env.agent(&["check"]), 6, "not signed by a trusted root key");

    // An expired freshness key: its timestamps are refused (and refresh says so).
    keys(
        &env,
        "release2.pub",
        "fresh.pub",
        &["--version", "10", "--keys-expire-in", "2s"],
    );
    refresh(&env);
    env.agent(&["check"])
        .status
        .success()
        .then_some(())
        .expect("chain good before expiry");
    std::thread::sleep(Duration::from_secs(3));
    failed(&env.agent(&["check"]), 6, "freshness key");
    let out = Command::new(sibling("atom-build"))
        .current_dir(env.dir.path())
        .args(["refresh", "--repo", "repo", "--key", "fresh.key"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expired"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The root key moved away (a rotation gone wrong): an error, never a silent fallback
    // to trusting the single key still in keys/.
    std::fs::rename(env.path("keys/root/root.pub"), env.path("root.pub.moved")).unwrap();
    failed(&env.agent(&["check"]), 6, "uses key roles");
}

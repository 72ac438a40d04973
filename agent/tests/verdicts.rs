//! Never lose the last good slot: versions that failed here are not installed again, a
//! trial boot does not overwrite the last known-good slot, and mark-good/mark-bad reach
//! the disk even when the state directory is busy, full or read-only. Loop-device GPT
//! disk, real atom-dist on 127.0.0.1. Runs as root.

mod common;

use std::process::Command;

use common::{Env, failed, ok, sibling};

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What bootsel records after passing over `from` (out of tries) to boot `slot`.
fn fell_back(env: &Env, slot: &str, version: &str, from: &str) {
    env.boot_into(slot, version);
    let record = std::fs::read_to_string(env.path("boot.toml")).unwrap();
    std::fs::write(env.path("boot.toml"), format!("{record}fell_back_from = \"{from}\"\n")).unwrap();
}

fn choose(env: &Env) {
    ok(Command::new(sibling("bootsel")).args(["choose", "--disk", &env.loopdev]));
}

#[test]
fn a_version_that_fell_back_is_not_installed_again_until_the_operator_says_so() {
    let env = Env::new();
    env.now_ok();
    assert!(env.slot_holds("B", "v2.img"));
    // 2.0.0 boots on trial and never gets marked good: its tries run out.
    choose(&env);
    env.cgpt(3, 2, 0, 0);
    fell_back(&env, "A", "1.0.0", "B");

    let out = env.agent(&["now"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("not installing 2.0.0: it was rejected on this host"),
        "{}",
        text(&out)
    );
    assert_eq!(env.flags(3), (2, 0, 0), "B was not written or flipped again");
    let st = env.status_json();
    assert_eq!(st["rejected"][0]["version"], "2.0.0", "{st:#}");
    let out = env.agent(&["check"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("rejected on this host"), "{}", text(&out));

    // The override installs it once; the same boot's fallback record does not reject
    // it again.
    let out = env.agent(&["now", "--allow-rejected"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(env.flags(3).0, 2, "staged again");
    assert!(text(&env.agent(&["now"])).contains("already staged"));

    // A newer version is taken as usual; forget-rejected clears the record.
    env.publish("v3.img", &[]);
    env.now_ok();
    assert!(env.slot_holds("B", "v3.img"));
    let out = env.agent(&["forget-rejected", "2.0.0"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(env.status_json()["rejected"].as_array().unwrap().is_empty());
    failed(&env.agent(&["forget-rejected", "2.0.0"]), 7, "not rejected");
}

#[test]
fn mark_bad_rejects_the_running_version() {
    let env = Env::new();
    env.now_ok();
    choose(&env);
    env.boot_into("B", "2.0.0");
    let out = env.agent(&["mark-bad"]);
    assert!(out.status.success(), "{}", text(&out));
    env.boot_into("A", "1.0.0");
    let out = env.agent(&["now"]);
    assert!(
        out.status.success() && text(&out).contains("rejected"),
        "{}",
        text(&out)
    );
    assert_eq!(env.flags(3).0, 0, "B stays disabled");
}

#[test]
fn a_trial_boot_does_not_overwrite_the_last_good_slot() {
    let env = Env::new();
    env.now_ok();
    choose(&env);
    env.boot_into("B", "2.0.0");
    env.publish("v3.img", &[]);
    let err = failed(&env.agent(&["now"]), 7, "on trial");
    assert!(err.contains("slot A holds the last version marked good"), "{err}");
    assert!(env.slot_holds("A", "v1.img"), "A (1.0.0, good) untouched");
    assert_eq!(env.flags(2), (1, 0, 1));
    // After mark-good the update goes on.
    let out = env.agent(&["mark-good"]);
    assert!(out.status.success(), "{}", text(&out));
    env.now_ok();
    assert!(env.slot_holds("A", "v3.img"));
}

#[test]
fn mark_good_waits_for_the_lock_and_needs_no_writable_state() {
    let env = Env::new();
    env.now_ok();
    choose(&env);
    env.boot_into("B", "2.0.0");
    // A read-only state directory: mark-good still sets the disk's flag, and says what it
    // could not record.
    let state = env.path("state");
    ok(Command::new("mount").args(["--bind"]).arg(&state).arg(&state));
    ok(Command::new("mount").args(["-o", "remount,bind,ro"]).arg(&state));
    let out = env.agent(&["mark-good"]);
    let _ = Command::new("umount").arg(&state).status();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("could not be recorded"),
        "says what was not recorded: {}",
        text(&out)
    );
    assert_eq!(env.flags(3).2, 1, "marked good on the disk");

    // Another atom-update holds the lock for 3 s: mark-good waits instead of giving up.
    env.cgpt(3, 2, 1, 0);
    let lock = env.path("state/lock");
    let mut holder = Command::new("flock").arg(&lock).args(["sleep", "3"]).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let started = std::time::Instant::now();
    let out = env.agent(&["mark-good"]);
    holder.wait().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(started.elapsed().as_secs_f32() > 2.0, "it waited for the holder");
    assert_eq!(env.flags(3).2, 1);
}

//! Phased rollouts: a host takes a rolled-out version at its turn, given by the place it
//! draws once and keeps; before that `now` waits (exit 0, nothing written) and says when;
//! `--skip-rollout` takes the version at once.

mod common;

use common::Env;

/// Puts this host at `place` of every rollout (top-level keys precede the state's tables).
fn set_place(env: &Env, place: u32) {
    let path = env.path("state/state.toml");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let rest: Vec<&str> = old.lines().filter(|l| !l.starts_with("rollout_place")).collect();
    std::fs::write(&path, format!("rollout_place = {place}\n{}\n", rest.join("\n"))).unwrap();
}

fn place(env: &Env) -> Option<u64> {
    let text = std::fs::read_to_string(env.path("state/state.toml")).ok()?;
    let state: toml::Table = toml::from_str(&text).unwrap();
    state
        .get("rollout_place")
        .and_then(|v| v.as_integer())
        .map(|v| v as u64)
}

fn stdout(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_host_takes_a_phased_rollout_at_its_turn() {
    let env = Env::new();
    // 1.0.0 runs; the channel moves on to 3.0.0, rolled out over 300 days from now.
    env.publish("v3.img", &["--rollout", "300days"]);
    let manifest = std::fs::read_to_string(env.path("repo/channels/stable/manifest.toml")).unwrap();
    assert!(manifest.contains("[rollout]"), "{manifest}");

    // Before its first `now` the host has no place; `check` says the update is there.
    let check = stdout(&env.agent(&["check"]));
    assert!(
        check.contains("1.0.0 -> 3.0.0") && check.contains("turn is drawn at its first `now`"),
        "{check}"
    );

    // The last place: its turn is about 300 days away. Nothing is written, exit 0.
    std::fs::create_dir_all(env.path("state")).unwrap();
    set_place(&env, u32::MAX);
    let out = stdout(&env.agent(&["now"]));
    assert!(
        out.contains("3.0.0 is being rolled out until") && out.contains("this host's turn comes at"),
        "{out}"
    );
    assert_eq!(env.flags(3).0, 0, "B was not touched");
    assert_eq!(env.flags(2), (1, 0, 1), "A still boots");
    let st = env.status_json();
    assert_eq!(st["last_update"]["outcome"], "waiting", "{st}");
    let json: serde_json::Value = serde_json::from_str(&stdout(&env.agent(&["check", "--json"]))).unwrap();
    let turn: jiff::Timestamp = json["rollout"]["turn"].as_str().unwrap().parse().unwrap();
    let end: jiff::Timestamp = json["rollout"]["end"].as_str().unwrap().parse().unwrap();
    assert_eq!(turn, end, "the last place goes last");
    let days = jiff::Timestamp::now().duration_until(turn).as_secs() / 86400;
    assert!((298..=300).contains(&days), "turn in {days} days");

    // The first place: its turn is the rollout's start, which has passed.
    set_place(&env, 0);
    let out = env.now_ok();
    assert!(out.contains("staged 3.0.0 in slot B"), "{out}");
    assert!(env.slot_holds("B", "v3.img"));
}

#[test]
fn a_place_is_drawn_once_and_skip_rollout_takes_the_version_now() {
    let env = Env::new();
    // A rollout that starts tomorrow: no host's turn has come, whatever its place.
    let tomorrow = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24);
    env.publish("v3.img", &["--rollout", "1h", "--rollout-start", &tomorrow.to_string()]);
    let first = stdout(&env.agent(&["now"]));
    assert!(first.contains("3.0.0 is being rolled out"), "{first}");
    let drawn = place(&env).expect("the first `now` drew and kept a place");
    let again = stdout(&env.agent(&["now"]));
    assert_eq!(place(&env), Some(drawn), "the place is kept");
    assert_eq!(first, again, "so the turn does not move");
    set_place(&env, 0);
    assert!(
        stdout(&env.agent(&["now"])).contains("being rolled out"),
        "not before the start"
    );
    assert_eq!(env.flags(3).0, 0);

    // The operator's override.
    let out = stdout(&env.agent(&["now", "--skip-rollout"]));
    assert!(out.contains("staged 3.0.0 in slot B"), "{out}");
    assert!(env.slot_holds("B", "v3.img"));
}

//! kill -9 at seeded random moments of `atom-update now`, 50 times: after every kill the
//! GPT is readable, and the slot that boots next is the running one or a slot that was
//! verified; a final run completes the update. Same test host as update.rs.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Env, Rng, UPDATE, ok, sibling};

#[test]
fn kill_9_at_random_moments_never_leaves_an_unverified_slot_booting() {
    let env = Env::new();
    let seed = std::env::var("ATOM_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_a70e);
    let mut rng = Rng(seed);
    println!("seed {seed:#x} (ATOM_CRASH_SEED to replay)");
    let url = env.url.clone();
    let routes = [
        "[\"precomputed\"]",
        "[\"rsync\"]",
        "[\"full\"]",
        "[\"precomputed\", \"rsync\", \"full\"]",
    ];
    let mut staged_runs = 0;
    for round in 0..50 {
        // Slot B holds the old image again, so every run has real writing to do.
        env.put_image("v1.img", "B");
        // bootsel, not cgpt: cgpt refuses a disk whose backup GPT a kill left stale, which
        // is a state bootsel repairs on its next write.
        ok(Command::new(sibling("bootsel")).args([
            "set",
            "--disk",
            &env.loopdev,
            "--slot",
            "B",
            "--priority",
            "0",
            "--tries",
            "0",
            "--successful",
            "0",
        ]));
        let route = routes[rng.below(routes.len() as u64) as usize];
        env.write_config(&[&url], &format!("routes = {route}\n"));
        let delay = Duration::from_millis(rng.below(450));
        let mut child = Command::new(UPDATE)
            .arg("--config")
            .arg(env.path("update.toml"))
            .arg("now")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if status.success() {
            staged_runs += 1;
        }

        let st = ok(Command::new(sibling("bootsel")).args(["status", "--disk", &env.loopdev]));
        assert!(
            st.contains("GPT primary: valid;"),
            "round {round} ({route}, {delay:?}): primary GPT not valid:\n{st}"
        );
        let (a, b) = (env.flags(2), env.flags(3));
        assert_eq!(a, (1, 0, 1), "round {round}: the running slot A was touched");
        if b.0 > a.0 && b.1 > 0 {
            assert!(
                env.slot_holds("B", "v2.img"),
                "round {round} ({route}, {delay:?}): B boots next but does not hold the verified image"
            );
        } else {
            assert!(st.contains("next boot: A"), "round {round}: {st}");
        }
    }
    println!("50 kills; {staged_runs} runs finished before their kill");
    env.write_config(&[&url], "");
    let out = env.now_ok();
    assert!(out.contains("2.0.0"), "{out}");
    assert!(env.slot_holds("B", "v2.img"));
    assert_eq!(env.flags(3).0, 2, "B set to boot next after the final run");
}

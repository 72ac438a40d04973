//! A state directory without room for a route's files: the agent says so before it
//! downloads, goes on to a route that fits, and never leaves the file system full. The
//! state directory is a small tmpfs mounted for the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Env, failed, ok};

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        ok(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "atom-test-state",
            ])
            .arg(at));
        Tmpfs(at.to_owned())
    }

    fn used(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.0).unwrap();
        (st.blocks() - st.blocks_free()) as u64 * st.fragment_size() as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_state_directory_without_room_is_explained_and_never_left_full() {
    let env = Env::new();
    let url = env.url.clone();
    let state = Tmpfs::mount(&env.path("state"), "2m");
    let untouched = |env: &Env| {
        assert_eq!(env.flags(2), (1, 0, 1), "the running slot A is untouched");
        assert_eq!(env.flags(3).0, 0, "B is not made bootable");
    };

    // The full payload does not fit: refused before a byte is fetched.
    env.write_config(&[&url], "routes = [\"full\"]\n");
    let err = failed(&env.agent(&["now"]), 1, "not enough space in");
    assert!(err.contains("full-payload:") && err.contains("download"), "{err}");
    assert!(state.used() < 256 << 10, "nothing big was written: {}", state.used());
    untouched(&env);

    // An rsync answer has no size up front. Against a running slot of zeros it is about the
    // whole compressed image: the disk fills while it arrives, and the file goes at once.
    let zeros = vec![0u8; std::fs::metadata(env.path("v1.img")).unwrap().len() as usize];
    std::fs::write(env.path("zeros.img"), zeros).unwrap();
    env.put_image("zeros.img", "A");
    env.write_config(&[&url], "routes = [\"rsync\"]\n");
    let err = failed(&env.agent(&["now"]), 1, "rsync-delta:");
    assert!(
        err.contains("No space left on device") && err.contains("the file was removed"),
        "{err}"
    );
    assert!(
        state.used() < 256 << 10,
        "the partial answer was removed: {}",
        state.used()
    );
    untouched(&env);
    env.put_image("v1.img", "A");

    // With every route allowed the precomputed delta fits and the update goes through.
    env.write_config(&[&url], "");
    let out = env.now_ok();
    assert!(
        out.contains("staged 2.0.0 in slot B") && out.contains("via precomputed-delta"),
        "{out}"
    );
}

/// A route that fails after its answer arrived (here: no room to decode it) removes the
/// answer, so it cannot take the room of the next route on this run or any later one.
#[test]
fn a_failed_rsync_route_leaves_nothing_behind() {
    let env = Env::new();
    let url = env.url.clone();
    let zeros = vec![0u8; std::fs::metadata(env.path("v1.img")).unwrap().len() as usize];
    std::fs::write(env.path("zeros.img"), zeros).unwrap();
    env.put_image("zeros.img", "A");
    env.write_config(&[&url], "routes = [\"rsync\"]\n");
    // How large the answer is against a slot of zeros: one run with room.
    env.now_ok();
    let answer = env.status_json()["last_update"]["bytes_downloaded"].as_u64().unwrap();
    assert!(answer > 1 << 20, "a large answer: {answer}");
    env.cgpt(3, 0, 0, 0);
    std::fs::remove_dir_all(env.path("state")).unwrap();

    // Room for the answer, not for the answer and its decoded form together.
    let state = Tmpfs::mount(
        &env.path("state"),
        &format!("{}k", (answer * 3 / 2 + (256 << 10)) >> 10),
    );
    let err = failed(&env.agent(&["now"]), 1, "rsync-delta:");
    assert!(
        err.contains("not enough space") || err.contains("No space left on device"),
        "{err}"
    );
    assert!(
        state.used() < 256 << 10,
        "the answer was removed when the route failed: {} bytes in use",
        state.used()
    );
    assert_eq!(env.flags(2), (1, 0, 1), "the running slot A is untouched");
    assert_eq!(env.flags(3).0, 0, "B is not made bootable");
}

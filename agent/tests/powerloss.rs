//! Power loss during `atom-update now`. The test disk is a file served by atom-powercut
//! (tests/powercut), which keeps every write apart until the loop device flushes it and,
//! at a seeded random write, drops what was not flushed (or, in half the rounds, keeps a
//! random half of it) and never answers again. The agent's state directory is an ext4 on
//! the same disk, so the cut hits its state file, checkpoints and downloads too. After
//! each cut: the GPT is readable, the running slot is untouched, the slot that boots next
//! holds a verified image, and a rerun on the powered-up disk completes the update without
//! downloading again what the cut run had kept. Same test host as update.rs.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, Rng, UPDATE, detach_if_backed_by, ok, partitioned_file, sibling};

/// A disk image served by atom-powercut and attached as a loop device.
struct PoweredDisk {
    daemon: Child,
    mount: PathBuf,
    loopdev: String,
    /// Partitions of the disk mounted on the host (the agent's state file system).
    mounted: Vec<PathBuf>,
    /// Attached and mounted: a failed assertion must not leave them behind.
    live: bool,
}

#[derive(Clone, Copy, Debug)]
struct Cut {
    at_write: u64,
    /// What becomes of unflushed writes: "none", "half" or "all" (see atom-powercut).
    keep: &'static str,
    seed: u64,
    /// Count writes only from `arm()` on: setting up (mounting the state file system)
    /// writes too, and must not be cut.
    after_arm: bool,
}

const KEEP: [&str; 3] = ["none", "half", "all"];

impl PoweredDisk {
    /// Serves `image` on `<dir>/mnt/disk`; a cut leaves `<dir>/cut`.
    fn power_on(image: &Path, dir: &Path, cut: Option<Cut>) -> PoweredDisk {
        let mount = dir.join("mnt");
        std::fs::create_dir_all(&mount).unwrap();
        let _ = std::fs::remove_file(dir.join("cut"));
        let mut c = Command::new(sibling("atom-powercut"));
        c.arg("--image").arg(image).arg("--mount").arg(&mount);
        if let Some(cut) = cut {
            c.args(["--cut-at-write", &cut.at_write.to_string()])
                .args(["--keep", cut.keep, "--seed", &cut.seed.to_string()])
                .arg("--marker")
                .arg(dir.join("cut"));
            if cut.after_arm {
                c.arg("--arm-on-sigusr1");
            }
        }
        let mut daemon = c.stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(daemon.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("mounted"), "atom-powercut did not mount: {line:?}");
        let loopdev = ok(Command::new("losetup")
            .args(["-f", "--show", "-P"])
            .arg(mount.join("disk")))
        .trim()
        .to_string();
        PoweredDisk {
            daemon,
            mount,
            loopdev,
            mounted: Vec::new(),
            live: true,
        }
    }

    /// From now on writes count towards the cut.
    fn arm(&self) {
        ok(Command::new("kill").args(["-USR1", &self.daemon.id().to_string()]));
    }

    /// The device of partition `n`, once the kernel has made its node.
    fn partition(&self, n: u32) -> String {
        let dev = format!("{}p{n}", self.loopdev);
        if !Path::new(&dev).exists() {
            // The scan at attach time does not always run here; partx asks again.
            let _ = Command::new("partx").args(["-a", &self.loopdev]).status();
        }
        let start = Instant::now();
        while !Path::new(&dev).exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "{dev} never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        dev
    }

    /// Mounts partition `n` (a file system on the same powered disk) on `at`.
    fn mount_partition(&mut self, n: u32, at: &Path) {
        std::fs::create_dir_all(at).unwrap();
        ok(Command::new("mount").arg(self.partition(n)).arg(at));
        self.mounted.push(at.to_owned());
    }

    fn unmount_partitions(&mut self, lazy: bool) {
        for m in self.mounted.drain(..).rev() {
            let mut c = Command::new("umount");
            if lazy {
                c.arg("-l");
            }
            let _ = c.arg(&m).status();
        }
    }

    /// An orderly stop: what was not flushed is lost, as on a power-off after the run.
    /// Returns the number of write requests the disk saw.
    fn power_off(mut self) -> u64 {
        self.unmount_partitions(false);
        ok(Command::new("losetup").args(["-d", &self.loopdev]));
        // The kernel lets go of a detached loop device's file a moment later.
        let start = Instant::now();
        while !Command::new("umount").arg(&self.mount).status().unwrap().success() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "cannot unmount {}",
                self.mount.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.live = false;
        let mut out = String::new();
        std::io::Read::read_to_string(self.daemon.stdout.as_mut().unwrap(), &mut out).unwrap();
        assert!(self.daemon.wait().unwrap().success(), "atom-powercut failed: {out}");
        let counts = out.lines().last().unwrap_or_default().to_string();
        counts
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("atom-powercut printed no counts: {out:?}"))
    }

    /// The power is already gone (the disk answers nothing): take the pieces away.
    fn pull_plug(mut self) {
        self.live = false;
        self.tear_down();
    }

    /// Kills the disk, then lets go of its mounts and loop device.
    fn tear_down(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        // The file system's last writes fail now: its device is gone, as on a dead machine.
        self.unmount_partitions(true);
        detach_if_backed_by(&self.loopdev, &self.mount.join("disk"));
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

impl Drop for PoweredDisk {
    fn drop(&mut self) {
        if self.live {
            self.tear_down();
        }
    }
}

/// Runs `cmd` against a disk that loses power at `cut`; true if the cut came first
/// (the command is then killed), false if the command ended before it.
fn run_until_cut(cmd: &mut Command, disk: PoweredDisk, dir: &Path, what: &str) -> bool {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    let cut = loop {
        if dir.join("cut").exists() {
            break true;
        }
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{what}: ran for 2 minutes");
        std::thread::sleep(Duration::from_millis(2));
    };
    // SIGKILL takes effect once the dead disk's requests fail, that is after pull_plug.
    // A command that ended first loses power right after; an orderly power-off could hang,
    // as unmounting writes and may reach the cut.
    let _ = child.kill();
    disk.pull_plug();
    let _ = child.wait();
    cut
}

/// (priority, tries, successful) of `slot` and the slot that boots next, read from the
/// image file by bootsel, which falls back to the backup GPT where the primary is torn.
fn boot_state(disk: &Path, slot: &str) -> ((u8, u8, bool), String) {
    let st = ok(Command::new(sibling("bootsel")).args(["status", "--disk"]).arg(disk));
    let row = st
        .lines()
        .find(|l| l.split_whitespace().next() == Some(slot))
        .unwrap_or_else(|| panic!("no row for slot {slot}:\n{st}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    let next = st
        .lines()
        .find_map(|l| l.strip_prefix("next boot: "))
        .unwrap_or_else(|| panic!("no next boot:\n{st}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    (
        (cols[3].parse().unwrap(), cols[4].parse().unwrap(), cols[5] == "yes"),
        next,
    )
}

/// Bytes of resumable downloads (named by their digest) the cut run left behind.
fn kept_downloads(env: &Env) -> u64 {
    let Ok(dir) = std::fs::read_dir(env.path("state/downloads")) else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            // Downloads are named by digest; not the rsync answer, not the hidden origin records.
            name.len() > 64 && !name.starts_with("rsync") && !name.starts_with('.')
        })
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// Slot B unbootable and holding the old image (a few blocks to write) or, when `blank`,
/// zeros (every block to write); written straight to the image file.
fn reset(env: &Env, blank: bool) {
    if blank {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(env.path("disk.img"))
            .unwrap();
        f.write_all_at(&vec![0u8; (common::SLOT_MIB << 20) as usize], env.slot_offset("B"))
            .unwrap();
        f.sync_all().unwrap();
    } else {
        env.put_image("v1.img", "B");
    }
    ok(Command::new(sibling("bootsel"))
        .args(["set", "--disk"])
        .arg(env.path("disk.img"))
        .args(["--slot", "B", "--priority", "0", "--tries", "0", "--successful", "0"]));
}

/// Powers the test host's disk on; `env.loopdev` names it until `detached`.
/// The agent's state directory is the state partition's ext4, on the same disk: a cut
/// hits the state file, checkpoints and downloads as it hits the slots.
fn attach(env: &mut Env, cut: Option<Cut>) -> PoweredDisk {
    let mut disk = PoweredDisk::power_on(&env.path("disk.img"), env.dir.path(), cut);
    disk.mount_partition(4, &env.path("state"));
    env.loopdev = disk.loopdev.clone();
    env.boot_into("A", "1.0.0");
    disk
}

/// Env's helpers then work on the image file; its drop has no loop device to detach.
fn detached(env: &mut Env) {
    env.loopdev = env.path("disk.img").display().to_string();
}

fn downloaded(env: &Env) -> u64 {
    env.status_json()["last_update"]["bytes_downloaded"].as_u64().unwrap()
}

#[test]
fn power_loss_at_random_writes_never_boots_an_unverified_slot() {
    let mut env = Env::new();
    ok(Command::new("losetup").args(["-d", &env.loopdev]));
    detached(&mut env);
    let disk = PoweredDisk::power_on(&env.path("disk.img"), env.dir.path(), None);
    ok(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "state"])
        .arg(disk.partition(4)));
    disk.power_off();
    let seed = env_u64("ATOM_POWERLOSS_SEED", 0x0ff_1ce);
    let rounds = env_u64("ATOM_POWERLOSS_ROUNDS", 60);
    println!("seed {seed:#x} (ATOM_POWERLOSS_SEED to replay), {rounds} rounds");
    let mut rng = Rng(seed);
    let url = env.url.clone();
    let disk_file = env.path("disk.img");
    let mut cases = Vec::new();
    for route in ["precomputed", "rsync", "full"] {
        for blank in [false, true] {
            cases.push((route, blank));
        }
    }

    // A clean run of each case: how many writes reach the disk and how much is downloaded.
    let mut clean = Vec::new();
    for &(route, blank) in &cases {
        reset(&env, blank);
        env.write_config(&[&url], &format!("routes = [\"{route}\"]\n"));
        let disk = attach(&mut env, None);
        env.now_ok();
        let dl = downloaded(&env);
        let writes = disk.power_off();
        detached(&mut env);
        assert!(writes > 10, "{route}: only {writes} writes reached the disk");
        let b = if blank { "blank" } else { "old image" };
        println!("clean {route}, slot B {b}: {writes} write requests, {dl} bytes downloaded");
        clean.push((writes, dl));
    }

    let mut finished_before_cut = 0;
    for round in 0..rounds {
        let r = rng.below(cases.len() as u64) as usize;
        let (route, blank) = cases[r];
        // Past the clean count too: a cut after the run has ended is a case of its own.
        let cut = Cut {
            at_write: 1 + rng.below(clean[r].0 + clean[r].0 / 8),
            keep: KEEP[rng.below(2) as usize],
            seed: rng.below(u64::MAX),
            after_arm: true,
        };
        let what = format!("round {round} ({route}, blank B {blank}, {cut:?})");
        reset(&env, blank);
        env.write_config(&[&url], &format!("routes = [\"{route}\"]\n"));
        let disk = attach(&mut env, Some(cut));
        disk.arm();
        let mut agent = Command::new(UPDATE);
        agent.arg("--config").arg(env.path("update.toml")).arg("now");
        if !run_until_cut(&mut agent, disk, env.dir.path(), &what) {
            finished_before_cut += 1;
        }
        detached(&mut env);

        let (a, next) = boot_state(&disk_file, "A");
        assert_eq!(a, (1, 0, true), "{what}: the running slot A was touched");
        match next.as_str() {
            "A" => {}
            "B" => assert!(
                env.slot_holds("B", "v2.img"),
                "{what}: B boots next but does not hold the verified image"
            ),
            other => panic!("{what}: next boot is {other}"),
        }

        let disk = attach(&mut env, None);
        let kept = kept_downloads(&env);
        let out = env.now_ok();
        let again = downloaded(&env);
        disk.power_off();
        detached(&mut env);
        let (b, next) = boot_state(&disk_file, "B");
        assert_eq!(next, "B", "{what}: after the rerun B should boot next: {out}");
        assert!(b.0 > 1 && b.1 > 0, "{what}: B is not on trial: {b:?}");
        assert!(env.slot_holds("B", "v2.img"), "{what}: the rerun did not complete B");
        assert!(
            again + kept <= clean[r].1,
            "{what}: the rerun downloaded {again} bytes, the cut run had kept {kept}, a clean run takes {}",
            clean[r].1
        );
    }
    println!("{rounds} power cuts; {finished_before_cut} runs finished before theirs");
}

/// bootsel spends a try of the slot on trial at every boot: a cut at each of its writes,
/// losing all, a torn half (six seeds) or none of what was not flushed (none lost is a kill -9 of bootsel
/// on a machine that stays up), never leaves a disk that boots nothing or boots the trial
/// slot with more tries than it had, and the next boot repairs both GPT copies.
#[test]
fn power_loss_during_bootsels_tries_write() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let fresh = || {
        partitioned_file(
            &image,
            64 << 20,
            "label: gpt\nsize=8MiB, name=root-a\nsize=8MiB, name=root-b\n",
        );
        for (slot, flags) in [("A", ["1", "0", "1"]), ("B", ["2", "2", "0"])] {
            ok(Command::new(sibling("bootsel"))
                .args(["set", "--disk"])
                .arg(&image)
                .args([
                    "--slot",
                    slot,
                    "--priority",
                    flags[0],
                    "--tries",
                    flags[1],
                    "--successful",
                    flags[2],
                ]));
        }
    };
    let choose = |dev: &str| {
        let mut c = Command::new(sibling("bootsel"));
        c.args(["choose", "--disk", dev]);
        c
    };

    fresh();
    let disk = PoweredDisk::power_on(&image, dir.path(), None);
    ok(&mut choose(&disk.loopdev));
    let writes = disk.power_off();
    assert!(
        writes >= 2,
        "bootsel's tries write reached the disk in {writes} requests"
    );
    println!("bootsel choose: {writes} write requests");

    let mut cuts = 0;
    for at_write in 1..=writes + 1 {
        // Torn writes differ by seed: several per cut point.
        let keeps = ["none", "all"].into_iter().chain(std::iter::repeat_n("half", 6));
        for (k, keep) in keeps.enumerate() {
            let cut = Cut {
                at_write,
                keep,
                seed: at_write * 16 + k as u64,
                after_arm: false,
            };
            let what = format!("{cut:?}");
            fresh();
            let disk = PoweredDisk::power_on(&image, dir.path(), Some(cut));
            let dev = disk.loopdev.clone();
            if run_until_cut(&mut choose(&dev), disk, dir.path(), &what) {
                cuts += 1;
            }
            let (a, next) = boot_state(&image, "A");
            assert_eq!(a, (1, 0, true), "{what}: slot A changed");
            let (b, _) = boot_state(&image, "B");
            match next.as_str() {
                "B" => assert!(b.0 == 2 && (1..=2).contains(&b.1) && !b.2, "{what}: B {b:?}"),
                other => panic!("{what}: next boot {other}, B {b:?}"),
            }
            // The next boot: bootsel runs again on the powered-up disk.
            let disk = PoweredDisk::power_on(&image, dir.path(), None);
            ok(&mut choose(&disk.loopdev));
            disk.power_off();
            let st = ok(Command::new(sibling("bootsel")).args(["status", "--disk"]).arg(&image));
            assert!(
                st.contains("GPT primary: valid; backup: valid"),
                "{what}: not repaired:\n{st}"
            );
            let (b2, _) = boot_state(&image, "B");
            assert_eq!(b2.1 + 1, b.1, "{what}: the next boot did not spend one try");
        }
    }
    println!("{cuts} cuts of bootsel's tries write, every one recovered");
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

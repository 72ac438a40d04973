//! The initramfs logic on a real loop-device disk, in a private mount namespace: choose,
//! spend the try on disk, mount the slot read-only with /etc overlay, /var from state, and
//! the boot record. `bootsel prepare-root` runs exactly what /init runs before switch_root.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A disk image attached to a loop device with its partitions (/dev/loopNpM).
struct LoopDisk {
    dev: String,
    _dir: tempfile::TempDir,
    dir_path: PathBuf,
}

impl LoopDisk {
    fn new() -> Self {
        let (dir, image) = scratch();
        let dev = ok(Command::new("losetup").args(["-f", "--show"]).arg(&image))
            .trim()
            .to_string();
        ok(Command::new("partx").args(["-a", &dev]));
        let dir_path = dir.path().to_owned();
        let disk = LoopDisk {
            dev,
            _dir: dir,
            dir_path,
        };
        disk.fill_slot(2, "slot-a");
        disk.fill_slot(3, "slot-b");
        ok(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "state"])
            .arg(disk.part(4)));
        disk
    }

    fn part(&self, n: u32) -> String {
        format!("{}p{n}", self.dev)
    }

    fn fill_slot(&self, n: u32, name: &str) {
        let tree = self.dir_path.join(name);
        for d in ["etc", "var/lib", "sbin", "dev", "proc", "sys", "run"] {
            fs::create_dir_all(tree.join(d)).unwrap();
        }
        fs::write(tree.join("etc/hostname"), format!("{name}\n")).unwrap();
        fs::write(tree.join("sbin/init"), "#!/bin/sh\n").unwrap();
        ok(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(self.part(n)));
    }

    fn config(&self, extra: &str) -> PathBuf {
        let p = self.dir_path.join("bootsel.toml");
        fs::write(&p, format!("disk = \"{}\"\nwait_seconds = 3\n{extra}", self.dev)).unwrap();
        p
    }

    /// Runs prepare-root under a fresh mount namespace and a shell `probe` inside it (the
    /// mounts vanish with the namespace). Returns (exit ok, stdout, stderr).
    fn boot(&self, config: &Path, probe: &str) -> (bool, String, String) {
        let root = self.dir_path.join("root");
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let script = format!(
            "set -e\n\"{BIN}\" prepare-root --config \"{}\" --root \"{}\"\nR=\"{}\"\n{probe}",
            config.display(),
            root.display(),
            root.display()
        );
        let out = run(Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("partx").args(["-d", &self.dev]).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

const PROBE: &str = r#"
findmnt -rn -o TARGET,FSTYPE,OPTIONS -R "$R/sysroot" | sed "s|$R|R|"
echo "hostname: $(cat "$R/sysroot/etc/hostname")"
echo persisted > "$R/sysroot/etc/written"
echo "upper: $(cat "$R/run/atom/state/etc/upper/written" 2>/dev/null || echo none)"
echo data > "$R/sysroot/var/lib/x" || echo "var: read-only"
echo "var on state: $(cat "$R/run/atom/state/var/lib/x" 2>/dev/null || echo none)"
if touch "$R/sysroot/newfile" 2>/dev/null; then echo "root: writable"; else echo "root: read-only"; fi
echo "--- record"
cat "$R/run/atom/boot.toml"
"#;

#[test]
fn trial_slot_is_mounted_with_overlays_and_the_try_is_spent_first() {
    let disk = LoopDisk::new();
    cgpt_set(Path::new(&disk.dev), 2, 1, 0, 1);
    cgpt_set(Path::new(&disk.dev), 3, 2, 2, 0);
    let (ok_, out, err) = disk.boot(&disk.config("binds = [\"/var\"]\n"), PROBE);
    assert!(ok_, "prepare-root failed\n{out}\n{err}");
    println!("{out}\n{err}");
    assert!(err.contains("booting slot B"), "{err}");
    assert!(out.contains("R/sysroot ext4 ro"), "slot mounted read-only: {out}");
    assert!(out.contains("R/sysroot/etc overlay"), "/etc overlay: {out}");
    assert!(
        out.lines().any(|l| l.starts_with("R/sysroot/var ext4")),
        "/var bound from state: {out}"
    );
    assert!(out.contains("hostname: slot-b"), "{out}");
    assert!(out.contains("upper: persisted"), "/etc writes land on state: {out}");
    assert!(out.contains("var on state: data"), "{out}");
    assert!(out.contains("root: read-only"), "{out}");
    assert!(
        out.contains("slot = \"B\"") && out.contains("trial = true") && out.contains("tries_left = 1"),
        "{out}"
    );
    assert!(out.contains("state = \"mounted\""), "{out}");
    assert_eq!(cgpt_field(Path::new(&disk.dev), 3, "-T"), 1, "the try is on disk");

    // /etc changes persist to the next boot through the state partition.
    let (ok_, out, _) = disk.boot(&disk.config("binds = [\"/var\"]\n"), r#"cat "$R/sysroot/etc/written""#);
    assert!(ok_ && out.contains("persisted"), "{out}");
}

#[test]
fn falls_back_when_the_new_slot_is_out_of_tries() {
    let disk = LoopDisk::new();
    cgpt_set(Path::new(&disk.dev), 2, 1, 0, 1);
    cgpt_set(Path::new(&disk.dev), 3, 2, 0, 0);
    let (ok_, out, err) = disk.boot(&disk.config("binds = [\"/var\"]\n"), PROBE);
    assert!(ok_, "{out}\n{err}");
    assert!(out.contains("hostname: slot-a"), "{out}");
    assert!(
        out.contains("fell_back_from = \"B\"") && out.contains("trial = false"),
        "{out}"
    );
    assert!(err.contains("falling back"), "{err}");
}

#[test]
fn broken_state_partition_boots_without_it() {
    let disk = LoopDisk::new();
    cgpt_set(Path::new(&disk.dev), 2, 1, 0, 1);
    // Wipe the state filesystem.
    ok(Command::new("dd").args([
        "if=/dev/zero",
        &format!("of={}", disk.part(4)),
        "bs=1M",
        "count=4",
        "status=none",
    ]));
    let (ok_, out, err) = disk.boot(&disk.config("binds = [\"/var\"]\n"), PROBE);
    assert!(ok_, "{out}\n{err}");
    assert!(err.contains("state: unavailable"), "said on the console: {err}");
    assert!(out.contains("state = \"unavailable: "), "{out}");
    assert!(
        out.contains("R/sysroot/etc overlay"),
        "/etc still writable (in RAM): {out}"
    );
    assert!(out.contains("R/sysroot/var overlay"), "/var writable in RAM: {out}");
    assert!(out.contains("var on state: none"), "{out}");
    assert!(out.contains("root: read-only"), "{out}");
}

#[test]
fn stateless_tmpfs_etc() {
    let disk = LoopDisk::new();
    cgpt_set(Path::new(&disk.dev), 2, 1, 0, 1);
    let (ok_, out, err) = disk.boot(&disk.config("etc = \"tmpfs\"\nstate = \"\"\nbinds = []\n"), PROBE);
    assert!(ok_, "{out}\n{err}");
    assert!(out.contains("R/sysroot/etc overlay"), "{out}");
    assert!(out.contains("state = \"none\""), "{out}");
    assert!(out.contains("upper: none"), "{out}");
    assert!(
        out.contains("var: read-only"),
        "no binds: /var is the slot's, read-only: {out}"
    );
}

#[test]
fn failures_are_explained() {
    let disk = LoopDisk::new();
    // Nothing bootable: every slot listed with the reason.
    let (ok_, _, err) = disk.boot(&disk.config("binds = [\"/var\"]\n"), "");
    assert!(!ok_);
    assert!(err.contains("no bootable slot"), "{err}");
    assert!(
        err.contains("slot A (root-a, partition 2): priority 0, tries 0, successful 0 -> priority 0 (disabled)"),
        "{err}"
    );

    // A disk that never appears: bounded wait, then a clear message.
    let cfg = disk.dir_path.join("missing-disk.toml");
    fs::write(&cfg, "disk = \"/dev/atom-no-such-disk\"\nwait_seconds = 1\n").unwrap();
    let started = std::time::Instant::now();
    let (ok_, _, err) = disk.boot(&cfg, "");
    assert!(!ok_);
    assert!(err.contains("no usable boot disk after 1 s"), "{err}");
    assert!(started.elapsed().as_secs() < 10);

    // Slot labels missing.
    cgpt_set(Path::new(&disk.dev), 2, 1, 0, 1);
    let (ok_, _, err) = disk.boot(&disk.config("labels = [\"sys-a\", \"sys-b\"]\n"), "");
    assert!(!ok_);
    assert!(err.contains("no partition labelled \"sys-a\""), "{err}");

    // Config errors name the file and the problem.
    let bad = disk.dir_path.join("bad.toml");
    fs::write(&bad, "etc = \"sometimes\"\n").unwrap();
    let (ok_, _, err) = disk.boot(&bad, "");
    assert!(!ok_);
    assert!(err.contains("bad.toml") && err.contains("sometimes"), "{err}");
}

/// The real PID 1 path: bootsel as init of a new PID and mount namespace mounts /proc,
/// /sys, /dev and /run itself, chooses, mounts, moves the API filesystems into the slot,
/// switches root and executes the slot's /sbin/init (a busybox script that reports what
/// it sees). A reboot(2) from inside a PID namespace only ends that namespace.
#[test]
fn pid1_switches_root_into_the_chosen_slot() {
    let busybox = Path::new("/bin/busybox");
    assert!(busybox.exists(), "busybox-static is needed for this test");
    let disk = LoopDisk::new();
    // Slot B with a real init: busybox as the shell.
    let tree = disk.dir_path.join("pid1-slot");
    for d in ["etc", "var", "sbin", "bin", "dev", "proc", "sys", "run"] {
        fs::create_dir_all(tree.join(d)).unwrap();
    }
    fs::copy(busybox, tree.join("bin/busybox")).unwrap();
    fs::write(tree.join("etc/hostname"), "pid1-slot\n").unwrap();
    fs::write(
        tree.join("sbin/init"),
        "#!/bin/busybox sh\n/bin/busybox echo \"init running as pid $$\"\n/bin/busybox cat /etc/hostname /run/atom/boot.toml\n\
         /bin/busybox cat /proc/mounts\n/bin/busybox echo SWITCHED-ROOT-OK\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(tree.join("sbin/init"), fs::Permissions::from_mode(0o755)).unwrap();
    ok(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(disk.part(3)));
    cgpt_set(Path::new(&disk.dev), 2, 1, 0, 1);
    cgpt_set(Path::new(&disk.dev), 3, 2, 1, 0);
    let cfg = disk.config("binds = [\"/var\"]\nemergency_shell = \"\"\nreboot_delay_seconds = 0\n");
    let out = run(Command::new("timeout")
        .args([
            "60",
            "unshare",
            "--pid",
            "--fork",
            "--mount",
            "--propagation",
            "private",
        ])
        .arg(BIN)
        .args(["init", "--config"])
        .arg(&cfg)
        .stdin(std::process::Stdio::null()));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    println!("{stdout}\n{stderr}");
    assert!(
        stdout.contains("SWITCHED-ROOT-OK"),
        "the slot's init ran\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("init running as pid 1"), "{stdout}");
    assert!(stdout.contains("pid1-slot"), "{stdout}");
    assert!(
        stdout.contains("slot = \"B\"") && stdout.contains("trial = true"),
        "{stdout}"
    );
    assert!(
        stdout.contains("overlay /etc overlay"),
        "/etc overlay inside the new root: {stdout}"
    );
    assert!(stdout.contains(" / ext4 ro"), "root is the slot, read-only: {stdout}");
    assert_eq!(
        cgpt_field(Path::new(&disk.dev), 3, "-T"),
        0,
        "the last try was spent before booting"
    );

    // Now B is out of tries: the next boot falls back to A, which has no init: the
    // emergency path says so and ends (reboot(2) in a PID namespace ends only it).
    let out = run(Command::new("timeout")
        .args([
            "60",
            "unshare",
            "--pid",
            "--fork",
            "--mount",
            "--propagation",
            "private",
        ])
        .arg(BIN)
        .args(["init", "--config"])
        .arg(&cfg)
        .stdin(std::process::Stdio::null()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("falling back"), "{stderr}");
    assert!(
        stderr.contains("CANNOT BOOT") || stderr.contains("cannot execute"),
        "{stderr}"
    );
}

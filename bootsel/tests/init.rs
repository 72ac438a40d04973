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
        // -u, not -a: a loop device detached under load can still carry its previous
        // partitions (same layout here), which -a refuses ("error adding partition 4").
        ok(Command::new("partx").args(["-u", &dev]));
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
        self.fill_slot_with(n, name, |_| {});
    }

    /// A slot tree, changed by `extra` before it becomes the filesystem of partition `n`.
    fn fill_slot_with(&self, n: u32, name: &str, extra: impl FnOnce(&Path)) {
        let tree = self.dir_path.join(name);
        let _ = fs::remove_dir_all(&tree);
        for d in ["etc", "var/lib", "sbin", "dev", "proc", "sys", "run"] {
            fs::create_dir_all(tree.join(d)).unwrap();
        }
        fs::write(tree.join("etc/hostname"), format!("{name}\n")).unwrap();
        fs::write(tree.join("sbin/init"), "#!/bin/sh\n").unwrap();
        extra(&tree);
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
        self.boot_with(config, "", probe)
    }

    /// As [`Self::boot`], with `cmdline` standing in for /proc/cmdline.
    fn boot_with(&self, config: &Path, cmdline: &str, probe: &str) -> (bool, String, String) {
        let root = self.dir_path.join("root");
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let script = format!(
            "set -e\n\"{BIN}\" prepare-root --config \"{}\" --root \"{}\" --cmdline '{cmdline}'\nR=\"{}\"\n{probe}",
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
echo "upper: $(cat "$R/run/atom/state/etc/slots/B/upper/written" 2>/dev/null || echo none)"
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
fn a_full_state_partition_boots_with_etc_and_binds_in_ram() {
    let disk = LoopDisk::new();
    cgpt_set(Path::new(&disk.dev), 2, 1, 0, 1);
    // Fill the (fresh) state file system to the last block, reserved blocks included.
    let mnt = disk.dir_path.join("fill");
    fs::create_dir_all(&mnt).unwrap();
    ok(Command::new("mount").arg(disk.part(4)).arg(&mnt));
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "status=none"])
        .arg(format!("of={}", mnt.join("fill").display()))
        .status();
    for i in 0.. {
        if fs::create_dir(mnt.join(format!("d{i}"))).is_err() {
            break;
        }
    }
    ok(Command::new("umount").arg(&mnt));
    let (ok_, out, err) = disk.boot(&disk.config("binds = [\"/var\"]\n"), PROBE);
    assert!(ok_, "a full state partition does not stop the boot: {out}\n{err}");
    assert!(
        err.contains("/etc changes stay in RAM this boot"),
        "said on the console: {err}"
    );
    assert!(out.contains("R/sysroot/etc overlay"), "/etc writable (in RAM): {out}");
    assert!(out.contains("R/sysroot/var overlay"), "/var writable (in RAM): {out}");
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

/// `bootsel init` as PID 1 of a new PID and mount namespace (a reboot(2) there ends only
/// the namespace), bounded to 60 s.
fn init_as_pid1(cfg: &Path) -> std::process::Output {
    run(Command::new("timeout")
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
        .arg(cfg)
        .stdin(std::process::Stdio::null()))
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
    let out = init_as_pid1(&cfg);
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
    let out = init_as_pid1(&cfg);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("falling back"), "{stderr}");
    assert!(
        stderr.contains("CANNOT BOOT") || stderr.contains("cannot execute"),
        "{stderr}"
    );
}

/// A file that passes the x86 boot header checks: what kexec_file_load would be given.
fn fake_kernel(len: usize) -> Vec<u8> {
    let mut k = vec![0u8; len];
    k[0x1f1] = 1;
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    k[0x1f4..0x1f8].copy_from_slice(&((len as u32 - 1024) / 16).to_le_bytes());
    k
}

/// Slot boot files as `atom-build image` writes them; `kernel` and `initramfs` as given.
fn slot_boot_files(kernel: Vec<u8>, initramfs: Vec<u8>) -> impl FnOnce(&Path) {
    move |tree: &Path| {
        fs::create_dir_all(tree.join("boot/atom")).unwrap();
        fs::write(tree.join("boot/atom/vmlinuz"), kernel).unwrap();
        fs::write(tree.join("boot/atom/initrd.img"), initramfs).unwrap();
        fs::write(tree.join("boot/atom/kernel-release"), "6.1.0-57-amd64\n").unwrap();
    }
}

fn zstd_like(len: usize) -> Vec<u8> {
    let mut z = vec![0u8; len];
    z[..4].copy_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]);
    z
}

fn hand_over_line(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("cmdline "))
        .unwrap_or_else(|| panic!("no hand-over in {out}"))
        .to_owned()
}

#[test]
fn a_slot_with_its_own_kernel_is_handed_over_and_the_second_stage_does_not_choose_again() {
    let disk = LoopDisk::new();
    disk.fill_slot_with(3, "slot-b", slot_boot_files(fake_kernel(64 * 1024), zstd_like(4096)));
    cgpt_set(Path::new(&disk.dev), 2, 1, 0, 1);
    cgpt_set(Path::new(&disk.dev), 3, 2, 2, 0);
    let cfg = disk.config("binds = [\"/var\"]\n");
    let (ok_, out, err) = disk.boot_with(&cfg, "console=ttyS0 root=/dev/sda9 rw panic=1", "");
    assert!(ok_, "{out}\n{err}");
    assert!(out.contains("boot/atom/vmlinuz (kernel 6.1.0-57-amd64)"), "{out}");
    let line = hand_over_line(&out);
    let part_b = cgpt_uuid(Path::new(&disk.dev), 3);
    assert!(line.starts_with("console=ttyS0 panic=1 root=PARTUUID="), "{line}");
    assert!(!line.contains("/dev/sda9") && !line.contains(" rw "), "{line}");
    assert!(line.contains(&format!("atom.partuuid={part_b}")), "{line}");
    assert!(line.contains("atom.slot=B") && line.contains("atom.tries_left=1") && line.contains("atom.trial=1"));
    assert_eq!(
        cgpt_field(Path::new(&disk.dev), 3, "-T"),
        1,
        "the first stage spent the try"
    );

    // The second stage, given that line, mounts B without spending another try.
    let (ok_, out, err) = disk.boot_with(&cfg, &line, PROBE);
    assert!(ok_, "{out}\n{err}");
    assert!(err.contains("second stage: slot B chosen by the first stage"), "{err}");
    assert!(out.contains("hostname: slot-b") && out.contains("switch_root"), "{out}");
    assert!(out.contains("slot = \"B\"") && out.contains("tries_left = 1"), "{out}");
    assert!(out.contains("kernel = \""), "the record names the kernel: {out}");
    assert_eq!(cgpt_field(Path::new(&disk.dev), 3, "-T"), 1, "no second try spent");

    // A hand-over naming another disk GUID or partition is refused, not guessed at.
    let wrong = line.replace(&part_b, "00000000-0000-0000-0000-000000000000");
    let (ok_, _, err) = disk.boot_with(&cfg, &wrong, "");
    assert!(
        !ok_ && err.contains("not the 00000000-0000-0000-0000-000000000000"),
        "{err}"
    );
}

#[test]
fn a_slot_whose_kernel_or_initramfs_is_broken_falls_back_in_the_same_boot() {
    let cases: [(&str, Vec<u8>, Vec<u8>, &str); 3] = [
        (
            "not a kernel",
            b"#!/bin/sh\n".repeat(100),
            zstd_like(4096),
            "not a Linux kernel",
        ),
        (
            "truncated",
            fake_kernel(64 * 1024)[..8192].to_vec(),
            zstd_like(4096),
            "truncated",
        ),
        (
            "bad initramfs",
            fake_kernel(64 * 1024),
            vec![0u8; 4096],
            "not an initramfs",
        ),
    ];
    for (what, kernel, initramfs, said) in cases {
        let disk = LoopDisk::new();
        disk.fill_slot_with(3, "slot-b", slot_boot_files(kernel, initramfs));
        cgpt_set(Path::new(&disk.dev), 2, 1, 0, 1);
        cgpt_set(Path::new(&disk.dev), 3, 2, 2, 0);
        let (ok_, out, err) = disk.boot(&disk.config("binds = [\"/var\"]\n"), PROBE);
        assert!(ok_, "{what}: {out}\n{err}");
        assert!(
            err.contains("slot B cannot boot") && err.contains(said),
            "{what}: {err}"
        );
        assert!(err.contains("slot B marked failed"), "{what}: {err}");
        assert!(out.contains("hostname: slot-a"), "{what}: booted A instead: {out}");
        assert!(out.contains("fell_back_from = \"B\""), "{what}: {out}");
        assert_eq!(
            cgpt_field(Path::new(&disk.dev), 3, "-T"),
            0,
            "{what}: B has no tries left"
        );
        assert_eq!(cgpt_field(Path::new(&disk.dev), 3, "-S"), 0, "{what}");
    }
}

#[test]
fn an_unmountable_marked_good_slot_falls_back_to_the_other() {
    let disk = LoopDisk::new();
    // A is marked good and preferred, but its file system is gone; B is bootable.
    cgpt_set(Path::new(&disk.dev), 2, 2, 0, 1);
    cgpt_set(Path::new(&disk.dev), 3, 1, 0, 1);
    ok(Command::new("dd").args([
        "if=/dev/zero",
        &format!("of={}", disk.part(2)),
        "bs=1M",
        "count=2",
        "status=none",
    ]));
    let cfg = disk.config("binds = [\"/var\"]\n");
    let (ok_, out, err) = disk.boot(&cfg, PROBE);
    assert!(ok_, "{out}\n{err}");
    assert!(
        err.contains("slot A cannot boot") && err.contains("cannot mount"),
        "{err}"
    );
    assert!(out.contains("hostname: slot-b"), "{out}");
    assert!(out.contains("fell_back_from = \"A\""), "{out}");
    assert_eq!(
        cgpt_field(Path::new(&disk.dev), 2, "-S"),
        0,
        "A is no longer marked good"
    );
    // The next boot goes straight to B; with B broken too, nothing loops: a clear stop.
    let (ok_, out, _) = disk.boot(&cfg, "echo hostname: $(cat \"$R/sysroot/etc/hostname\")");
    assert!(ok_ && out.contains("hostname: slot-b"), "{out}");
    ok(Command::new("dd").args([
        "if=/dev/zero",
        &format!("of={}", disk.part(3)),
        "bs=1M",
        "count=2",
        "status=none",
    ]));
    let (ok_, _, err) = disk.boot(&cfg, "");
    assert!(!ok_, "{err}");
    assert!(err.contains("no bootable slot") && err.contains("this boot:"), "{err}");
}

#[test]
fn a_second_stage_that_cannot_mount_its_slot_marks_it_failed() {
    let disk = LoopDisk::new();
    disk.fill_slot_with(3, "slot-b", slot_boot_files(fake_kernel(64 * 1024), zstd_like(4096)));
    cgpt_set(Path::new(&disk.dev), 2, 1, 0, 1);
    cgpt_set(Path::new(&disk.dev), 3, 2, 2, 0);
    let cfg = disk.config("binds = [\"/var\"]\n");
    let (ok_, out, err) = disk.boot(&cfg, "");
    assert!(ok_, "{out}\n{err}");
    let line = hand_over_line(&out);
    // The slot's own initramfs has the wrong file system type for its root.
    let (ok_, _, err) = disk.boot_with(&cfg, &format!("{line} bootsel.root_fstype=xfs"), "");
    assert!(!ok_);
    assert!(err.contains("slot B cannot boot") && err.contains("xfs"), "{err}");
    assert!(err.contains("marked failed"), "{err}");
    assert_eq!(cgpt_field(Path::new(&disk.dev), 3, "-T"), 0);
    // The first stage then boots A.
    let (ok_, out, err) = disk.boot(&cfg, PROBE);
    assert!(ok_ && out.contains("hostname: slot-a"), "{out}\n{err}");
}

#[test]
fn state_symlinks_and_setuid_files_do_not_reach_the_system() {
    let disk = LoopDisk::new();
    cgpt_set(Path::new(&disk.dev), 2, 1, 0, 1);
    let cfg = disk.config("binds = [\"/var\"]\n");
    // First boot seeds the state; then plant a symlink where /var's source is.
    let (ok_, out, err) = disk.boot(&cfg, "");
    assert!(ok_, "{out}\n{err}");
    let (ok_, out, err) = disk.boot(
        &cfg,
        "rm -rf \"$R/run/atom/state/var\" && ln -s /etc \"$R/run/atom/state/var\" && echo planted",
    );
    assert!(ok_ && out.contains("planted"), "{out}\n{err}");
    let probe = "findmnt -rn -o TARGET,FSTYPE,OPTIONS -R \"$R/sysroot\" | sed \"s|$R|R|\"";
    let (ok_, out, err) = disk.boot(&cfg, probe);
    assert!(ok_, "{out}\n{err}");
    assert!(err.contains("is a symlink"), "{err}");
    assert!(out.contains("R/sysroot/var overlay"), "/var falls back to RAM: {out}");
    for line in out
        .lines()
        .filter(|l| l.contains("R/sysroot/etc") || l.contains("R/sysroot/var"))
    {
        assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");
    }
}

/// The emergency shell is bounded: an unattended host does not stay in it forever.
#[test]
fn the_emergency_shell_times_out_and_the_host_reboots() {
    let dir = tempfile::tempdir().unwrap();
    let shell = dir.path().join("hanging-shell");
    fs::write(&shell, "#!/bin/sh\necho SHELL-OPEN\nexec sleep 600\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&shell, fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = dir.path().join("bootsel.toml");
    fs::write(
        &cfg,
        format!(
            "disk = \"/dev/atom-no-such-disk\"\nwait_seconds = 1\nemergency_shell = \"{}\"\nemergency_shell_timeout_seconds = 2\n",
            shell.display()
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = init_as_pid1(&cfg);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stdout.contains("SHELL-OPEN"), "{stdout}\n{stderr}");
    assert!(stderr.contains("emergency shell timed out after 2 s"), "{stderr}");
    assert!(started.elapsed().as_secs() < 30, "bounded: {:?}", started.elapsed());
}

/// `bootsel attach`: a distribution initramfs mounted the slot from `root=PARTUUID=`;
/// bootsel adds state, overlays and the record, and refuses a root that is not the slot.
#[test]
fn attach_adds_state_to_a_root_the_distribution_initramfs_mounted() {
    let disk = LoopDisk::new();
    disk.fill_slot_with(3, "slot-b", slot_boot_files(fake_kernel(64 * 1024), zstd_like(4096)));
    cgpt_set(Path::new(&disk.dev), 2, 1, 0, 1);
    cgpt_set(Path::new(&disk.dev), 3, 2, 2, 0);
    let cfg = disk.config("binds = [\"/var\"]\n");
    let (ok_, out, err) = disk.boot(&cfg, "");
    assert!(ok_, "{out}\n{err}");
    let line = hand_over_line(&out);
    let attach = |partition: u32| {
        let script = format!(
            "set -e\nR={dir}/attach\nrm -rf $R && mkdir -p $R/root $R/run\nmount -o ro {part} $R/root\n\
             BOOTSEL_NO_REBOOT=1 \"{BIN}\" attach --root $R/root --run $R/run --config {cfg} --cmdline '{line}'\n\
             findmnt -rn -o TARGET,FSTYPE,OPTIONS -R $R/root | sed \"s|$R|R|\"\ncat $R/run/atom/boot.toml\n",
            dir = disk.dir_path.display(),
            part = disk.part(partition),
            cfg = cfg.display(),
        );
        let o = run(Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]));
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok_, out, err) = attach(3);
    assert!(ok_, "{out}\n{err}");
    assert!(out.contains("R/root/etc overlay") && out.contains("nosuid"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("R/root/var ext4")), "{out}");
    assert!(out.contains("slot = \"B\"") && out.contains("tries_left = 1"), "{out}");
    assert_eq!(cgpt_field(Path::new(&disk.dev), 3, "-T"), 1, "no try spent by attach");

    // The initramfs mounted A although the hand-over names B: refused, B marked failed.
    let (ok_, _, err) = attach(2);
    assert!(!ok_, "{err}");
    assert!(err.contains("is not slot B's partition"), "{err}");
    assert!(err.contains("marked failed"), "{err}");
    assert_eq!(cgpt_field(Path::new(&disk.dev), 3, "-T"), 0);
}

/// Per-slot /etc layers: a host of an earlier bootsel (one shared layer) boots a new image
/// in B; the shared layer becomes A's, and is merged for B's image (host edits kept, the
/// image's new system user and defaults arrive, a conflict with `.atom-new` beside it).
/// Edits under B stay B's: a boot of A returns to A's /etc, and B boots again without
/// merging twice.
#[test]
fn each_slot_has_its_own_etc_merged_at_its_images_first_boot() {
    let disk = LoopDisk::new();
    let slot = |n: u32, name: &str, passwd: &'static str, motd: &'static str, sshd: &'static str| {
        disk.fill_slot_with(n, name, move |t: &Path| {
            fs::write(t.join("etc/passwd"), passwd).unwrap();
            fs::write(t.join("etc/shadow"), "root:IMAGE:1::::::\n").unwrap();
            fs::write(t.join("etc/motd"), motd).unwrap();
            fs::create_dir_all(t.join("etc/ssh")).unwrap();
            fs::write(t.join("etc/ssh/sshd_config"), sshd).unwrap();
        })
    };
    slot(2, "slot-a", "root:x:0:0::/root:/bin/sh\n", "v1\n", "Port 22\n");
    slot(
        3,
        "slot-b",
        "root:x:0:0::/root:/bin/sh\n_chrony:x:101:101::/:/usr/sbin/nologin\n",
        "v2\n",
        "Port 22\nKexAlgorithms sntrup761x25519-sha512\n",
    );
    // The shared layer of an earlier bootsel, made while A ran.
    let mnt = disk.dir_path.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    ok(Command::new("mount").arg(disk.part(4)).arg(&mnt));
    for (rel, text) in [
        (
            "etc/upper/passwd",
            "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        ),
        ("etc/upper/ssh/sshd_config", "Port 2222\n"),
        ("etc/upper/local.conf", "mine\n"),
    ] {
        fs::create_dir_all(mnt.join(rel).parent().unwrap()).unwrap();
        fs::write(mnt.join(rel), text).unwrap();
    }
    fs::create_dir_all(mnt.join("etc/work")).unwrap();
    ok(Command::new("umount").arg(&mnt));

    let cfg = disk.config("");
    let show = r#"
E="$R/sysroot/etc"
echo "passwd: $(cut -d: -f1 "$E/passwd" | tr '\n' ' ')"
echo "motd: $(cat "$E/motd")"
echo "sshd: $(head -1 "$E/ssh/sshd_config")"
echo "sshd new: $(cat "$E/ssh/sshd_config.atom-new" 2>/dev/null | tail -1 || true)"
echo "local: $(cat "$E/local.conf" 2>/dev/null || echo none)"
echo "written: $(cat "$E/written" 2>/dev/null || echo none)"
echo "shadow: $(grep ^root: "$E/shadow")"
"#;
    // First boot of B's image (B on trial).
    cgpt_set(Path::new(&disk.dev), 2, 1, 0, 1);
    cgpt_set(Path::new(&disk.dev), 3, 2, 2, 0);
    // atom-update's `etc` verbs on the booted system (its /run and /etc are under $R).
    let agent = Path::new(BIN).with_file_name("atom-update");
    assert!(
        agent.exists(),
        "{} is missing: cargo build --workspace first",
        agent.display()
    );
    let verbs = format!(
        r#"
cat > "$R/update.toml" <<EOF
repositories = ["/nonexistent"]
channel = "stable"
board = "x86_64-generic"
boot_record = "$R/run/atom/boot.toml"
etc_dir = "$R/sysroot/etc"
state_dir = "$R/agent-state"
EOF
U="{agent} --config $R/update.toml"
echo '--- diff'; $U etc diff
echo '--- conflicts'; $U etc conflicts
echo '--- json'; $U etc conflicts --json | tr -d ' \n'; echo
echo '--- reset'; $U etc reset /etc/ssh/sshd_config
echo "sshd after reset: $(head -1 "$R/sysroot/etc/ssh/sshd_config")"
echo '--- conflicts after'; $U etc conflicts
echo '--- resolve'; $U etc resolve /etc/passwd 2>&1 || echo "exit $?"
"#,
        agent = agent.display()
    );
    let probe = format!(
        "{show}sed -i 's/^root:[^:]*:/root:ROTATED:/' \"$R/sysroot/etc/shadow\"\necho \"shared kept: $(cat \"$R/run/atom/state/etc/upper/local.conf\")\"\necho in-b > \"$R/sysroot/etc/written\"\necho '--- merge'\ncat \"$R/run/atom/state/etc/slots/B/merge.toml\"\n{verbs}"
    );
    let (ok_, out, err) = disk.boot(&cfg, &probe);
    println!("{out}\n{err}");
    assert!(ok_, "{err}");
    assert!(err.contains("booting slot B"), "{err}");
    assert!(
        err.contains("the shared layer of an earlier bootsel is now also slot A's"),
        "{err}"
    );
    assert!(
        out.contains("shared kept: mine"),
        "A's older bootsel still finds its layer: {out}"
    );
    assert!(err.contains("merged slot A's changes for this image"), "{err}");
    assert!(
        out.contains("passwd: root alice _chrony "),
        "local user kept, system user arrived: {out}"
    );
    assert!(out.contains("motd: v2"), "the image's change arrives: {out}");
    assert!(out.contains("sshd: Port 2222"), "the host's change kept: {out}");
    assert!(
        out.contains("sshd new: KexAlgorithms"),
        "the image's version beside it: {out}"
    );
    assert!(out.contains("local: mine"), "{out}");
    assert!(
        out.contains("path = \"ssh/sshd_config\""),
        "the conflict recorded: {out}"
    );
    let section = |name: &str| -> String {
        out.split(&format!("--- {name}\n"))
            .nth(1)
            .and_then(|rest| rest.split("\n---").next())
            .unwrap_or_default()
            .to_owned()
    };
    let diff = section("diff");
    for want in [
        "modified  /etc/passwd",
        "modified  /etc/ssh/sshd_config",
        "added     /etc/local.conf",
        "added     /etc/written",
    ] {
        assert!(diff.contains(want), "diff lacks {want:?}:\n{diff}");
    }
    assert!(!diff.contains("motd"), "{diff}");
    assert!(
        section("conflicts").contains(
            "UNRESOLVED /etc/ssh/sshd_config: changed on this host and in the new image; the image's version: \
             /etc/ssh/sshd_config.atom-new"
        ),
        "{out}"
    );
    assert!(section("json").contains("\"unresolved\":true"), "{out}");
    assert!(out.contains("sshd after reset: Port 22"), "{out}");
    assert!(
        section("conflicts after").contains("resolved   /etc/ssh/sshd_config"),
        "{out}"
    );
    let resolve = section("resolve");
    assert!(
        resolve.contains("is not a conflict of the last merge") && resolve.contains("exit 7"),
        "{out}"
    );

    // A boots (a rollback): A's /etc as A last had it, nothing of what B wrote.
    cgpt_set(Path::new(&disk.dev), 3, 0, 0, 0);
    let (ok_, out, err) = disk.boot(&cfg, show);
    assert!(ok_, "{err}");
    assert!(err.contains("booting slot A"), "{err}");
    assert!(!err.contains("merged"), "A's layer is A's own: no merge: {err}");
    assert!(out.contains("passwd: root alice "), "{out}");
    assert!(out.contains("motd: v1"), "{out}");
    assert!(out.contains("written: none"), "B's edits stay B's: {out}");
    assert!(err.contains("carried shadow changed under slot B for root"), "{err}");
    assert!(
        out.contains("shadow: root:ROTATED:"),
        "the password rotated under B is not undone: {out}"
    );

    // B again: its layer is kept, not merged a second time.
    cgpt_set(Path::new(&disk.dev), 3, 2, 0, 1);
    let (ok_, out, err) = disk.boot(&cfg, show);
    assert!(ok_, "{err}");
    assert!(err.contains("booting slot B"), "{err}");
    assert!(!err.contains("merged"), "{err}");
    assert!(out.contains("written: in-b"), "{out}");
}

/// A symlink planted on the state partition where a slot's /etc layer should be: never
/// followed (PID 1 would write, delete and mount wherever it points); /etc stays in RAM.
#[test]
fn a_symlinked_etc_layer_on_state_is_refused() {
    let disk = LoopDisk::new();
    let target = disk.dir_path.join("elsewhere");
    fs::create_dir_all(target.join("upper")).unwrap();
    fs::write(target.join("upper/keep"), "untouched\n").unwrap();
    let mnt = disk.dir_path.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    ok(Command::new("mount").arg(disk.part(4)).arg(&mnt));
    fs::create_dir_all(mnt.join("etc/slots")).unwrap();
    std::os::unix::fs::symlink(&target, mnt.join("etc/slots/B")).unwrap();
    ok(Command::new("umount").arg(&mnt));
    cgpt_set(Path::new(&disk.dev), 2, 1, 0, 1);
    cgpt_set(Path::new(&disk.dev), 3, 2, 2, 0);
    let (ok_, out, err) = disk.boot(
        &disk.config(""),
        r#"echo x > "$R/sysroot/etc/probe"; findmnt -rn -o TARGET,OPTIONS "$R/sysroot/etc" | sed "s|$R|R|""#,
    );
    assert!(ok_, "{out}\n{err}");
    assert!(err.contains("is a symlink"), "{err}");
    assert!(err.contains("stay in RAM"), "{err}");
    assert_eq!(
        fs::read_dir(target.join("upper")).unwrap().count(),
        1,
        "nothing written through the link"
    );
    assert_eq!(fs::read_to_string(target.join("upper/keep")).unwrap(), "untouched\n");
}

/// A merge that cannot complete (here: a conflict on a file whose name leaves no room for
/// `.atom-new`) still boots, with this slot given an unmerged copy of the old slot's layer,
/// the failure on record, and the old slot's layer untouched.
#[test]
fn a_failed_merge_boots_with_an_unmerged_copy() {
    let disk = LoopDisk::new();
    let long = "n".repeat(250);
    let (l1, l2) = (long.clone(), long.clone());
    disk.fill_slot_with(2, "slot-a", move |t: &Path| {
        fs::write(t.join("etc").join(&l1), "a\n").unwrap()
    });
    disk.fill_slot_with(3, "slot-b", move |t: &Path| {
        fs::write(t.join("etc").join(&l2), "b\n").unwrap()
    });
    let cfg = disk.config("");
    // A boots and the host changes the file; then B's image, which changed it too.
    cgpt_set(Path::new(&disk.dev), 2, 1, 0, 1);
    cgpt_set(Path::new(&disk.dev), 3, 0, 0, 0);
    let (ok_, _, err) = disk.boot(
        &cfg,
        &format!("echo host > \"$R/sysroot/etc/{long}\"\necho mine > \"$R/sysroot/etc/mine\""),
    );
    assert!(ok_, "{err}");
    cgpt_set(Path::new(&disk.dev), 3, 2, 2, 0);
    let (ok_, out, err) = disk.boot(
        &cfg,
        &format!(
            "echo \"long: $(cat \"$R/sysroot/etc/{long}\")\"\necho \"mine: $(cat \"$R/sysroot/etc/mine\")\"\n\
             grep -c 'the /etc merge failed' \"$R/run/atom/state/etc/slots/B/merge.toml\"\n\
             echo \"A's: $(cat \"$R/run/atom/state/etc/slots/A/upper/mine\")\""
        ),
    );
    assert!(ok_, "the boot goes on: {out}\n{err}");
    assert!(err.contains("booting slot B"), "{err}");
    assert!(err.contains("this slot gets them unmerged"), "{err}");
    assert!(out.contains("long: host") && out.contains("mine: mine"), "{out}");
    assert!(out.contains("\n1\n"), "the failure is on record: {out}");
    assert!(out.contains("A's: mine"), "A's layer untouched: {out}");
}

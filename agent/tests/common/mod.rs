//! The test host for atom-update: a loop-device GPT disk, images and a repository made by
//! the real atom-build, and a real atom-dist on 127.0.0.1. Runs as root.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub const UPDATE: &str = env!("CARGO_BIN_EXE_atom-update");

pub fn sibling(name: &str) -> PathBuf {
    let p = Path::new(UPDATE).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        p.display()
    );
    p
}

pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A root filesystem; `variant` changes a few files, as a security update would.
pub fn tree(dir: &Path, variant: u64) {
    for i in 0..60u64 {
        let d = dir.join(format!("usr/share/p{}", i % 6));
        std::fs::create_dir_all(&d).unwrap();
        let mut data = bytes(50_000 + (i as usize * 3001) % 100_000, i);
        if i % 20 == variant % 20 && variant > 1 {
            data[1000..3000].copy_from_slice(&bytes(2000, variant * 1000 + i));
        }
        std::fs::write(d.join(format!("f{i}")), data).unwrap();
    }
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("etc/os-version"), format!("{variant}\n")).unwrap();
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub loopdev: String,
    pub server: Option<Child>,
    pub url: String,
}

pub const SLOT_MIB: u64 = 40;

impl Env {
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Keys, images v1..v3 (each built on the previous), v1 and v2 published, a disk
    /// with v1 in slot A (booted, good) and slot B empty, and atom-dist serving the repo.
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let p = |s: &str| dir.path().join(s);
        ok(Command::new(sibling("atom-build"))
            .arg("keygen")
            .arg("--out")
            .arg(p("signer")));
        std::fs::create_dir_all(p("keys")).unwrap();
        std::fs::copy(p("signer.pub"), p("keys/signer.pub")).unwrap();
        let mut env = Env {
            dir,
            loopdev: String::new(),
            server: None,
            url: String::new(),
        };
        for v in 1..=3u64 {
            tree(&env.path(&format!("t{v}")), v);
            let base = (v > 1).then(|| format!("v{}.img", v - 1));
            env.image_of(
                &format!("t{v}"),
                &format!("{v}.0.0"),
                &format!("v{v}.img"),
                base.as_deref(),
            );
        }
        env.publish("v1.img", &[]);
        env.publish("v2.img", &[]);

        let disk = env.path("disk.img");
        partitioned_file(
            &disk,
            128 << 20,
            &format!(
                "label: gpt\nsize=4MiB, name=esp\nsize={SLOT_MIB}MiB, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name=root-a\n\
                 size={SLOT_MIB}MiB, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name=root-b\nname=state\n"
            ),
        );
        let loopdev = ok(Command::new("losetup").args(["-f", "--show"]).arg(&disk))
            .trim()
            .to_string();
        env.loopdev = loopdev;
        env.put_image("v1.img", "A");
        env.cgpt(2, 1, 0, 1);
        env.boot_into("A", "1.0.0");
        env.start_server();
        env.write_config(&[&env.url.clone()], "");
        env
    }

    pub fn publish(&self, image: &str, extra: &[&str]) {
        self.publish_to("stable", image, extra);
    }

    pub fn publish_to(&self, channel: &str, image: &str, extra: &[&str]) {
        ok(self
            .signing("publish", channel)
            .args(["--zstd-level", "3"])
            .args(extra)
            .arg(self.path(image)));
    }

    /// `atom-build resign` of channel stable with the test key.
    pub fn resign(&self, extra: &[&str]) {
        ok(self.signing("resign", "stable").args(extra));
    }

    fn signing(&self, verb: &str, channel: &str) -> Command {
        let mut c = Command::new(sibling("atom-build"));
        c.args([verb, "--channel", channel, "--repo"])
            .arg(self.path("repo"))
            .arg("--key")
            .arg(self.path("signer.key"));
        c
    }

    /// Builds image `out` of `version` from tree `tree` (with `base` for a stable layout).
    pub fn image_of(&self, tree: &str, version: &str, out: &str, base: Option<&str>) {
        let mut c = Command::new(sibling("atom-build"));
        c.args([
            "image",
            "--kernel",
            "none",
            "--size",
            "32M",
            "--version",
            version,
            "--rootfs",
        ])
        .arg(self.path(tree))
        .arg("--out")
        .arg(self.path(out));
        if let Some(b) = base {
            c.arg("--base").arg(self.path(b));
        }
        ok(&mut c);
    }

    /// Publishes 4.0.0 (the 3.0.0 tree again) so there is something newer to install.
    pub fn publish_next_version_marker(&self) {
        self.image_of("t3", "4.0.0", "v4.img", Some("v3.img"));
        self.publish("v4.img", &[]);
    }

    pub fn start_server(&mut self) {
        self.start_server_with(&[]);
    }

    /// atom-dist on a free loopback port with `extra` flags (e.g. TLS).
    pub fn start_server_with(&mut self, extra: &[&std::ffi::OsStr]) {
        self.start_server_env(extra, &[]);
    }

    /// atom-dist with `extra` flags and environment (e.g. a failpoint).
    pub fn start_server_env(&mut self, extra: &[&std::ffi::OsStr], env: &[(&str, &str)]) {
        let mut child = Command::new(sibling("atom-dist"))
            .args(["serve", "--listen", "127.0.0.1:0", "--repo"])
            .arg(self.path("repo"))
            .arg("--cache")
            .arg(self.path("dist-cache"))
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        self.url = line.trim().rsplit(' ').next().unwrap().to_string();
        self.server = Some(child);
    }

    pub fn stop_server(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn slot_offset(&self, slot: &str) -> u64 {
        // sfdisk starts at 1 MiB; the ESP takes 4 MiB; slots follow each other.
        (5 + if slot == "A" { 0 } else { SLOT_MIB }) << 20
    }

    pub fn put_image(&self, image: &str, slot: &str) {
        use std::os::unix::fs::FileExt;
        let data = std::fs::read(self.path(image)).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&self.loopdev).unwrap();
        f.write_all_at(&data, self.slot_offset(slot)).unwrap();
        f.sync_all().unwrap();
    }

    pub fn slot_holds(&self, slot: &str, image: &str) -> bool {
        use std::os::unix::fs::FileExt;
        let want = std::fs::read(self.path(image)).unwrap();
        let mut got = vec![0u8; want.len()];
        std::fs::File::open(&self.loopdev)
            .unwrap()
            .read_exact_at(&mut got, self.slot_offset(slot))
            .unwrap();
        got == want
    }

    pub fn cgpt(&self, part: u32, p: u8, t: u8, s: u8) {
        ok(Command::new("cgpt").args([
            "add",
            "-i",
            &part.to_string(),
            "-P",
            &p.to_string(),
            "-T",
            &t.to_string(),
            "-S",
            &s.to_string(),
            &self.loopdev,
        ]));
    }

    pub fn flags(&self, part: u32) -> (u8, u8, u8) {
        let f = |flag: &str| -> u8 {
            ok(Command::new("cgpt").args(["show", "-i", &part.to_string(), flag, &self.loopdev]))
                .trim()
                .parse()
                .unwrap()
        };
        (f("-P"), f("-T"), f("-S"))
    }

    /// What bootsel would have left after booting `slot` with `version` in it.
    pub fn boot_into(&self, slot: &str, version: &str) {
        let part = if slot == "A" { 2 } else { 3 };
        std::fs::write(
            self.path("boot.toml"),
            format!(
                "slot = \"{slot}\"\nlabel = \"root-{}\"\npartition = {part}\npartuuid = \"x\"\ndisk = \"{}\"\n\
                 reason = \"test\"\ntrial = false\ntries_left = 0\nstate = \"none\"\n",
                slot.to_lowercase(),
                self.loopdev
            ),
        )
        .unwrap();
        std::fs::write(
            self.path("release"),
            format!("version = \"{version}\"\nboard = \"x86_64-generic\"\n"),
        )
        .unwrap();
    }

    pub fn write_config(&self, repos: &[&str], extra: &str) {
        let repos: Vec<String> = repos.iter().map(|r| format!("\"{r}\"")).collect();
        std::fs::write(
            self.path("update.toml"),
            format!(
                "repositories = [{}]\nchannel = \"stable\"\nboard = \"x86_64-generic\"\nkeys_dir = \"{}\"\n\
                 state_dir = \"{}\"\nboot_record = \"{}\"\nrelease_file = \"{}\"\nhttp_timeout_secs = 5\nhttp_retries = 1\n{extra}",
                repos.join(", "),
                self.path("keys").display(),
                self.path("state").display(),
                self.path("boot.toml").display(),
                self.path("release").display()
            ),
        )
        .unwrap();
    }

    pub fn agent(&self, args: &[&str]) -> Output {
        self.agent_env(args, &[])
    }

    pub fn agent_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(UPDATE);
        c.arg("--config").arg(self.path("update.toml")).args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    pub fn now_ok(&self) -> String {
        let out = self.agent(&["now"]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "atom-update now failed: {text}");
        text
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = self.agent(&["status", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop_server();
        detach_if_backed_by(&self.loopdev, &self.path("disk.img"));
    }
}

/// Detaches `loopdev` only if it is still backed by `file`: after a failure midway the
/// name may already be free and given to another test (or to the benchmark).
pub fn detach_if_backed_by(loopdev: &str, file: &Path) {
    let backing = Command::new("losetup")
        .args(["-n", "-O", "BACK-FILE", loopdev])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if backing == file.display().to_string() {
        let _ = Command::new("losetup").args(["-d", loopdev]).status();
    }
}

/// A new file of `len` bytes, partitioned by sfdisk from `script`.
pub fn partitioned_file(path: &Path, len: u64, script: &str) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
    let mut sf = Command::new("sfdisk")
        .arg("--quiet")
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut sf.stdin.take().unwrap(), script.as_bytes()).unwrap();
    assert!(sf.wait().unwrap().success(), "sfdisk {}", path.display());
}

/// A seeded xorshift: the crash and power-loss tests replay a failing run from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

pub fn failed(out: &Output, code: i32, needle: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "expected exit {code}: {err}");
    assert!(err.contains(needle), "stderr should mention {needle:?}: {err}");
    err
}

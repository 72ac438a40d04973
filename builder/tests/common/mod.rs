//! Helpers for the atom-build integration tests: run the real binary on real files.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_atom-build");

pub fn atom_build(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(BIN);
    for a in args {
        c.arg(a);
    }
    c.env("RUST_LOG", "warn").output().expect("run atom-build")
}

pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "atom-build failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts a failure with exit code `code` and a one-line error containing `needle`.
pub fn fails_with(out: Output, code: i32, needle: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "expected exit {code}; stderr: {stderr}");
    if code == 1 {
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with("atom-build: error: "), "error line: {stderr}");
        assert!(last.contains(needle), "error {last:?} should mention {needle:?}");
    }
    stderr
}

/// Deterministic pseudo-random bytes (xorshift), so trees are the same on every run.
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

/// A root filesystem of `files` files spread over a few directories, with a symlink.
pub fn make_tree(root: &Path, files: usize, seed: u64) {
    for i in 0..files {
        let dir = root.join(format!("usr/share/pkg{}", i % 12));
        fs::create_dir_all(&dir).unwrap();
        let len = 2_000 + (i * 7919) % 120_000;
        fs::write(dir.join(format!("file{i:04}")), bytes(len, seed + i as u64)).unwrap();
    }
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/hostname"), "atom\n").unwrap();
    std::os::unix::fs::symlink("hostname", root.join("etc/name-link")).unwrap();
}

/// Every file under `dir` with its content, to show a directory was left as it was.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Fixture {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn keygen(&self, name: &str) -> (PathBuf, PathBuf) {
        ok(atom_build(&[&"keygen", &"--out", &self.path(name)]));
        (self.path(&format!("{name}.key")), self.path(&format!("{name}.pub")))
    }

    /// Builds image `name`.img of `version` from a tree made with `seed`.
    pub fn image(&self, name: &str, version: &str, tree: &Path, base: Option<&Path>) -> PathBuf {
        self.image_of_size(name, version, tree, base, "64M")
    }

    /// An image of `size`: from 256M on, ext4 keeps backup superblocks.
    pub fn image_of_size(&self, name: &str, version: &str, tree: &Path, base: Option<&Path>, size: &str) -> PathBuf {
        let out = self.path(&format!("{name}.img"));
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"image",
            &"--kernel",
            &"none",
            &"--rootfs",
            &tree,
            &"--version",
            &version,
            &"--size",
            &size,
            &"--out",
            &out,
        ];
        if let Some(b) = base.as_ref() {
            args.push(&"--base");
            args.push(b);
        }
        ok(atom_build(&args));
        out
    }

    pub fn publish(&self, repo: &Path, key: &Path, image: &Path) -> Output {
        atom_build(&[
            &"publish",
            &"--repo",
            &repo,
            &"--channel",
            &"stable",
            &"--key",
            &key,
            &"--zstd-level",
            &"3",
            &image,
        ])
    }
}

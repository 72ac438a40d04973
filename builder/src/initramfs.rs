//! `atom-build initramfs`: a zstd-compressed newc cpio with the static bootsel as `/init`,
//! the kernel modules it loads (dependencies first) and its `/etc/bootsel.toml`.
//!
//! The archive is reproducible: entries in a fixed order, owner root, every time stamp
//! SOURCE_DATE_EPOCH, inode numbers counted from 1.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use bootsel::initconfig::Config;

use crate::cli::InitramfsArgs;
use crate::modules::ModulesDep;

const CONFIG_PATH: &str = "etc/bootsel.toml";
/// Where bootsel mounts the slot; it must exist in the archive.
pub(crate) const DIRS: &[&str] = &["bin", "dev", "etc", "lib", "proc", "run", "sys", "sysroot", "tmp"];
pub(crate) const ZSTD_LEVEL: i32 = 19;

/// What goes into an initramfs.
pub struct Spec<'a> {
    pub bootsel: &'a Path,
    pub kernel_modules: Option<&'a Path>,
    pub modules: &'a [String],
    pub config: Option<&'a Path>,
    pub shell: Option<&'a Path>,
}

/// A built initramfs: the compressed archive and what it holds.
pub struct Built {
    pub compressed: Vec<u8>,
    pub uncompressed_len: usize,
    pub modules: Vec<String>,
}

pub fn run(args: &InitramfsArgs, epoch: i64) -> Result<()> {
    let spec = Spec {
        bootsel: &args.bootsel,
        kernel_modules: args.kernel_modules.as_deref(),
        modules: &args.modules,
        config: args.config.as_deref(),
        shell: args.shell.as_deref(),
    };
    let built = build(&spec, epoch)?;
    atom_dist::fsutil::write_atomic_bytes(&args.out, 0o644, &built.compressed)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!(
        "built {}: {} bytes ({} uncompressed), /init {}, {} module(s){}",
        args.out.display(),
        built.compressed.len(),
        built.uncompressed_len,
        args.bootsel.display(),
        built.modules.len(),
        if args.shell.is_some() { ", emergency shell" } else { "" }
    );
    for m in &built.modules {
        println!("  /{m}");
    }
    Ok(())
}

pub fn build(spec: &Spec, epoch: i64) -> Result<Built> {
    let init = fs::read(spec.bootsel).with_context(|| format!("cannot read {}", spec.bootsel.display()))?;
    require_static(&init).with_context(|| format!("{} cannot be /init", spec.bootsel.display()))?;
    let mut archive = Archive::new(epoch);
    for d in DIRS {
        archive.dir(d);
    }
    archive.char_device("dev/console", 0o600, (5, 1));
    archive.file("init", 0o755, init);

    let mut config: toml::Table = match spec.config {
        Some(p) => {
            let text = fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("{} is not valid TOML", p.display()))?
        }
        None => toml::Table::new(),
    };
    if config.contains_key("modules") {
        bail!("the config lists `modules`; give them as --module NAME instead, so their dependencies are resolved");
    }
    let loaded = match spec.kernel_modules {
        Some(dir) => add_modules(&mut archive, dir, spec.modules)?,
        None => Vec::new(),
    };
    config.insert(
        "modules".into(),
        toml::Value::Array(loaded.iter().map(|m| toml::Value::String(format!("/{m}"))).collect()),
    );
    match spec.shell {
        Some(shell) => {
            let bin = fs::read(shell).with_context(|| format!("cannot read {}", shell.display()))?;
            require_static(&bin).with_context(|| format!("{} cannot be the emergency shell", shell.display()))?;
            archive.file("bin/busybox", 0o755, bin);
            archive.symlink("bin/sh", "busybox");
            config
                .entry("emergency_shell")
                .or_insert_with(|| toml::Value::String("/bin/sh".into()));
        }
        None => {
            config
                .entry("emergency_shell")
                .or_insert_with(|| toml::Value::String(String::new()));
        }
    }
    let text = toml::to_string(&config).context("cannot write the bootsel config")?;
    Config::parse(&text).map_err(|e| anyhow::anyhow!("the bootsel config is not valid: {e}"))?;
    archive.file(CONFIG_PATH, 0o644, text.into_bytes());

    let cpio = archive.finish()?;
    let compressed = zstd::bulk::compress(&cpio, ZSTD_LEVEL).context("cannot compress the initramfs")?;
    Ok(Built {
        compressed,
        uncompressed_len: cpio.len(),
        modules: loaded,
    })
}

/// Adds the modules and their dependencies under lib/modules/; returns their archive paths
/// in load order.
pub(crate) fn add_modules(archive: &mut Archive, dir: &Path, wanted: &[String]) -> Result<Vec<String>> {
    let dep = ModulesDep::load(dir)?;
    let mut out = Vec::new();
    for rel in dep.resolve(wanted)? {
        let src = dir.join(&rel);
        let raw = fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
        let (name, bytes) = if let Some(plain) = rel.strip_suffix(".zst") {
            let bytes = zstd::stream::decode_all(&raw[..]).with_context(|| format!("cannot decompress {rel}"))?;
            (plain.to_owned(), bytes)
        } else if rel.ends_with(".ko") {
            (rel.clone(), raw)
        } else {
            bail!("{rel}: only plain and zstd-compressed modules are supported (finit_module gets the plain file)");
        };
        let path = format!("lib/modules/{name}");
        if let Some((dirs, _)) = path.rsplit_once('/') {
            for (end, _) in dirs.match_indices('/').chain([(dirs.len(), "")]) {
                archive.dir(&dirs[..end]);
            }
        }
        archive.file(&path, 0o644, bytes);
        out.push(path);
    }
    Ok(out)
}

/// `/init` runs before any library exists: a dynamically linked one would panic the kernel
/// with an unhelpful "No working init found".
pub(crate) fn require_static(elf: &[u8]) -> Result<()> {
    use object::elf::{FileHeader64, PT_INTERP};
    use object::read::elf::{FileHeader, ProgramHeader};
    let header = FileHeader64::<object::Endianness>::parse(elf).context("not a 64-bit ELF executable")?;
    let endian = header.endian().context("not a 64-bit ELF executable")?;
    let headers = header
        .program_headers(endian, elf)
        .context("unreadable ELF program headers")?;
    ensure!(
        !headers.iter().any(|h| h.p_type(endian) == PT_INTERP),
        "it is dynamically linked (build it static, e.g. bootsel/build-static.sh)"
    );
    Ok(())
}

/// A newc archive assembled in memory (initramfs contents are a few MiB).
pub(crate) struct Archive {
    out: Vec<u8>,
    next_ino: u32,
    mtime: u32,
    dirs: std::collections::HashSet<String>,
}

impl Archive {
    pub(crate) fn new(epoch: i64) -> Self {
        Archive {
            out: Vec::new(),
            next_ino: 1,
            mtime: u32::try_from(epoch).unwrap_or(0),
            dirs: Default::default(),
        }
    }

    fn header(&mut self, name: &str, mode: u32, nlink: u32) -> cpio::newc::Builder {
        let ino = self.next_ino;
        self.next_ino += 1;
        cpio::newc::Builder::new(name)
            .ino(ino)
            .mode(mode)
            .uid(0)
            .gid(0)
            .nlink(nlink)
            .mtime(self.mtime)
    }

    fn put(&mut self, b: cpio::newc::Builder, data: &[u8]) {
        let mut w = b.write(&mut self.out, data.len() as u32);
        // Writing into a Vec cannot fail.
        let _ = w.write_all(data);
        let _ = w.finish();
    }

    pub(crate) fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_owned()) {
            let h = self.header(name, 0o040755, 2);
            self.put(h, &[]);
        }
    }

    pub(crate) fn file(&mut self, name: &str, perm: u32, data: Vec<u8>) {
        let h = self.header(name, 0o100000 | perm, 1);
        self.put(h, &data);
    }

    pub(crate) fn symlink(&mut self, name: &str, target: &str) {
        let h = self.header(name, 0o120777, 1);
        self.put(h, target.as_bytes());
    }

    pub(crate) fn char_device(&mut self, name: &str, perm: u32, (major, minor): (u32, u32)) {
        let h = self
            .header(name, 0o020000 | perm, 1)
            .rdev_major(major)
            .rdev_minor(minor);
        self.put(h, &[]);
    }

    pub(crate) fn finish(self) -> Result<Vec<u8>> {
        cpio::newc::trailer(self.out).context("cannot finish the cpio archive")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_lists_entries_in_order_with_fixed_metadata() {
        let mut a = Archive::new(1_577_836_800);
        a.dir("etc");
        a.dir("etc");
        a.file("etc/x", 0o644, b"hello".to_vec());
        a.symlink("bin/sh", "busybox");
        a.char_device("dev/console", 0o600, (5, 1));
        let bytes = a.finish().unwrap();
        let mut r = &bytes[..];
        let mut seen = Vec::new();
        loop {
            let entry = cpio::NewcReader::new(r).unwrap();
            if entry.entry().is_trailer() {
                break;
            }
            let e = entry.entry();
            seen.push((e.name().to_owned(), e.mode(), e.mtime(), e.ino(), e.rdev_major()));
            r = entry.finish().unwrap();
        }
        assert_eq!(
            seen,
            [
                ("etc".to_owned(), 0o040755, 1_577_836_800, 1, 0),
                ("etc/x".to_owned(), 0o100644, 1_577_836_800, 2, 0),
                ("bin/sh".to_owned(), 0o120777, 1_577_836_800, 3, 0),
                ("dev/console".to_owned(), 0o020600, 1_577_836_800, 4, 5),
            ]
        );
    }

    #[test]
    fn dynamic_executables_are_refused() {
        let sh = fs::read("/bin/sh").unwrap();
        let e = require_static(&sh).unwrap_err().to_string();
        assert!(e.contains("dynamically linked"), "{e}");
        assert!(require_static(b"#!/bin/sh\n").is_err());
    }
}

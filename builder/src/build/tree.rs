//! Whole trees: their digest (what a cache key says about a directory on the build host)
//! and their copies (into and out of the cache).

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::run;

/// blake3 over every entry's relative path, type, mode, owner, modification time,
/// extended attributes, hard-link identity and contents (files) or target (symlinks), in
/// name order: everything `cp -a` carries into the tree, so equal digests mean equal
/// results. A single file is digested the same way.
pub fn digest(root: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let mut links: std::collections::HashMap<(u64, u64), usize> = std::collections::HashMap::new();
    for (n, entry) in walkdir::WalkDir::new(root).sort_by_file_name().into_iter().enumerate() {
        let entry = entry.with_context(|| format!("cannot walk {}", root.display()))?;
        let m = entry
            .metadata()
            .with_context(|| format!("cannot stat {}", entry.path().display()))?;
        let rel = entry.path().strip_prefix(root)?;
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update(&[0]);
        h.update(
            format!(
                "{:o} {}:{} {}.{}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec()
            )
            .as_bytes(),
        );
        if m.nlink() > 1 && !m.is_dir() {
            let first = *links.entry((m.dev(), m.ino())).or_insert(n);
            h.update(format!(" link{first}").as_bytes());
        }
        if let Ok(names) = xattr::list(entry.path()) {
            let mut names: Vec<_> = names.collect();
            names.sort();
            for name in names {
                h.update(name.as_encoded_bytes());
                h.update(&xattr::get(entry.path(), &name).ok().flatten().unwrap_or_default());
            }
        }
        let ft = m.file_type();
        if ft.is_file() {
            h.update(format!(" f{}", m.len()).as_bytes());
            let mut f =
                fs::File::open(entry.path()).with_context(|| format!("cannot read {}", entry.path().display()))?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        } else if ft.is_symlink() {
            h.update(b" l");
            h.update(fs::read_link(entry.path())?.as_os_str().as_encoded_bytes());
        } else if ft.is_block_device() || ft.is_char_device() {
            h.update(format!(" d{}", m.rdev()).as_bytes());
        }
        h.update(&[0]);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Copies the contents of `src` into the (new or empty) directory `dst`, keeping owners,
/// modes, links, times and extended attributes; reflinks where the filesystem can.
pub fn copy(src: &Path, dst: &Path) -> Result<()> {
    fs::create_dir_all(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    let mut from = src.as_os_str().to_owned();
    from.push("/.");
    run(Command::new("cp")
        .args(["-a", "--reflink=auto", "--"])
        .arg(from)
        .arg(dst))
    .with_context(|| format!("cannot copy {} to {}", src.display(), dst.display()))?;
    Ok(())
}

/// Removes a tree that may hold read-only directories (as a root tree does).
pub fn remove(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(_) => fs::remove_dir_all(path).with_context(|| format!("cannot remove {}", path.display())),
    }
}

//! The staged tree into the mounted base image, for a layout-stable build: everything
//! that frees space happens first (removed entries, replaced links and hard links, files
//! that shrink), then the filesystem is synced, so the journal has committed those frees
//! before anything is allocated (ext4 reuses a freed block only after the commit, whose
//! timing would otherwise decide where new data lands); then every entry is created or
//! updated in one fixed order (depth first, by name), a changed file only in the 4 KiB
//! blocks that changed.
//!
//! Why not rsync: its generator (directories, links) and receiver (files) are separate
//! processes creating entries concurrently, so new inodes got their numbers in an order
//! that depended on timing, and two builds of the same tree differed. Here one thread,
//! pinned to one CPU (ext4 keeps per-CPU allocation groups for small files and per-CPU
//! free counters that steer the inode allocator), makes every entry; the mount uses
//! `nodelalloc`, so blocks are allocated at write time in that order, not by the
//! writeback threads.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::sys::stat::{Mode, SFlag, mknod};
use nix::unistd::{Gid, Uid, fchownat};

const BLOCK: usize = 4096;

#[derive(Default, Debug)]
pub struct Stats {
    pub removed: usize,
    pub created: usize,
    pub rewritten_blocks: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Link,
    Special,
}

fn kind(m: &fs::Metadata) -> Kind {
    let t = m.file_type();
    if t.is_dir() {
        Kind::Dir
    } else if t.is_file() {
        Kind::File
    } else if t.is_symlink() {
        Kind::Link
    } else {
        Kind::Special
    }
}

/// Makes `dst` (the mounted image) hold exactly `src`, leaving `dst/lost+found` alone.
pub fn sync(src: &Path, dst: &Path) -> Result<Stats> {
    let pinned = Pinned::to_one_cpu()?;
    let mut s = Syncer {
        stats: Stats::default(),
        links: HashMap::new(),
    };
    s.prune(src, dst, true)?;
    let dir = File::open(dst).with_context(|| format!("cannot open {}", dst.display()))?;
    nix::unistd::syncfs(&dir).context("cannot sync the image after the removals")?;
    s.update_dir(src, dst, true)?;
    meta(src, &fs::symlink_metadata(src)?, dst)?;
    drop(pinned);
    Ok(s.stats)
}

struct Syncer {
    stats: Stats,
    /// Hard links: the source inode and where its first path landed in the image.
    links: HashMap<(u64, u64), PathBuf>,
}

fn sorted_names(dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    Ok(names)
}

impl Syncer {
    /// Removes what `src` does not have (or has as another kind of entry).
    fn prune(&mut self, src: &Path, dst: &Path, top: bool) -> Result<()> {
        for name in sorted_names(dst)? {
            if top && name == "lost+found" {
                continue;
            }
            let d = dst.join(&name);
            let dm = fs::symlink_metadata(&d)?;
            match fs::symlink_metadata(src.join(&name)) {
                Ok(sm) if kind(&sm) == kind(&dm) && !replaced(&src.join(&name), &sm, &d, &dm)? => match kind(&dm) {
                    Kind::Dir => self.prune(&src.join(&name), &d, false)?,
                    Kind::File if dm.len() > sm.len() => {
                        OpenOptions::new().write(true).open(&d)?.set_len(sm.len())?;
                    }
                    _ => {}
                },
                _ => {
                    if dm.is_dir() {
                        fs::remove_dir_all(&d)
                    } else {
                        fs::remove_file(&d)
                    }
                    .with_context(|| format!("cannot remove {}", d.display()))?;
                    self.stats.removed += 1;
                }
            }
        }
        Ok(())
    }

    fn update_dir(&mut self, src: &Path, dst: &Path, top: bool) -> Result<()> {
        for name in sorted_names(src)? {
            if top && name == "lost+found" {
                continue;
            }
            let (s, d) = (src.join(&name), dst.join(&name));
            let sm = fs::symlink_metadata(&s).with_context(|| format!("cannot stat {}", s.display()))?;
            let exists = fs::symlink_metadata(&d).is_ok();
            match kind(&sm) {
                Kind::Dir => {
                    if !exists {
                        fs::create_dir(&d).with_context(|| format!("cannot create {}", d.display()))?;
                        self.stats.created += 1;
                    }
                    self.update_dir(&s, &d, false)?;
                }
                Kind::File => self.update_file(&s, &sm, &d, exists)?,
                Kind::Link => {
                    if !exists {
                        symlink(fs::read_link(&s)?, &d)
                            .with_context(|| format!("cannot create link {}", d.display()))?;
                        self.stats.created += 1;
                    }
                }
                Kind::Special => {
                    if !exists {
                        let ft = sm.file_type();
                        let flag = if ft.is_char_device() {
                            SFlag::S_IFCHR
                        } else if ft.is_block_device() {
                            SFlag::S_IFBLK
                        } else if ft.is_fifo() {
                            SFlag::S_IFIFO
                        } else {
                            SFlag::S_IFSOCK
                        };
                        mknod(&d, flag, Mode::from_bits_truncate(sm.mode() & 0o7777), sm.rdev())
                            .with_context(|| format!("cannot create {}", d.display()))?;
                        self.stats.created += 1;
                    }
                }
            }
            meta(&s, &sm, &d)?;
        }
        Ok(())
    }

    /// Only creates or grows: `prune` removed what must be replaced and shrank the rest.
    fn update_file(&mut self, s: &Path, sm: &fs::Metadata, d: &Path, exists: bool) -> Result<()> {
        if sm.nlink() > 1 {
            let id = (sm.dev(), sm.ino());
            if let Some(first) = self.links.get(&id) {
                fs::hard_link(first, d).with_context(|| format!("cannot link {}", d.display()))?;
                self.stats.created += 1;
                return Ok(());
            }
            self.links.insert(id, d.to_path_buf());
        }
        if exists {
            self.stats.rewritten_blocks += rewrite_changed_blocks(s, d)?;
        } else {
            let mut from = File::open(s).with_context(|| format!("cannot read {}", s.display()))?;
            let mut to = File::create(d).with_context(|| format!("cannot create {}", d.display()))?;
            std::io::copy(&mut from, &mut to).with_context(|| format!("cannot write {}", d.display()))?;
            to.flush()?;
            self.stats.created += 1;
        }
        Ok(())
    }
}

/// Whether the image's entry must be removed and made again: a link with another target,
/// a special file of another kind, or a hard-linked file (links are made afresh, in order).
fn replaced(s: &Path, sm: &fs::Metadata, d: &Path, dm: &fs::Metadata) -> Result<bool> {
    Ok(match kind(sm) {
        Kind::Link => fs::read_link(s)? != fs::read_link(d)?,
        Kind::Special => sm.rdev() != dm.rdev() || sm.mode() != dm.mode(),
        Kind::File => sm.nlink() > 1 || dm.nlink() > 1,
        Kind::Dir => false,
    })
}

/// Writes the blocks of `d` that differ from `s`, then sets its length; returns how many.
fn rewrite_changed_blocks(s: &Path, d: &Path) -> Result<u64> {
    let mut from = File::open(s).with_context(|| format!("cannot read {}", s.display()))?;
    let to = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d)
        .with_context(|| format!("cannot open {}", d.display()))?;
    let len = from.metadata()?.len();
    let mut a = vec![0u8; BLOCK];
    let mut b = vec![0u8; BLOCK];
    let mut offset = 0u64;
    let mut written = 0;
    loop {
        let n = read_full(&mut from, &mut a)?;
        if n == 0 {
            break;
        }
        let m = read_full_at(&to, &mut b[..n], offset)?;
        if m != n || a[..n] != b[..n] {
            to.write_all_at(&a[..n], offset)
                .with_context(|| format!("cannot write {}", d.display()))?;
            written += 1;
        }
        offset += n as u64;
    }
    if to.metadata()?.len() != len {
        to.set_len(len)?;
    }
    Ok(written)
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn read_full_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Owner, mode, extended attributes and modification time of `s` onto `d`, each only when
/// it differs (an unchanged inode stays untouched).
fn meta(s: &Path, sm: &fs::Metadata, d: &Path) -> Result<()> {
    let dm = fs::symlink_metadata(d)?;
    if dm.uid() != sm.uid() || dm.gid() != sm.gid() {
        fchownat(
            nix::fcntl::AT_FDCWD,
            d,
            Some(Uid::from_raw(sm.uid())),
            Some(Gid::from_raw(sm.gid())),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .with_context(|| format!("cannot chown {}", d.display()))?;
    }
    let is_link = sm.file_type().is_symlink();
    // chown clears set-id bits, so the mode comes after it.
    if !is_link && fs::symlink_metadata(d)?.mode() & 0o7777 != sm.mode() & 0o7777 {
        fs::set_permissions(d, fs::Permissions::from_mode(sm.mode() & 0o7777))
            .with_context(|| format!("cannot chmod {}", d.display()))?;
    }
    sync_xattrs(s, d)?;
    if dm.mtime() != sm.mtime() || dm.mtime_nsec() != sm.mtime_nsec() {
        let t = filetime::FileTime::from_unix_time(sm.mtime(), sm.mtime_nsec() as u32);
        filetime::set_symlink_file_times(d, t, t).with_context(|| format!("cannot set times on {}", d.display()))?;
    }
    Ok(())
}

fn sync_xattrs(s: &Path, d: &Path) -> Result<()> {
    let names = |p: &Path| -> Result<Vec<std::ffi::OsString>> {
        let mut v: Vec<_> = xattr::list(p)
            .with_context(|| format!("cannot list extended attributes of {}", p.display()))?
            .collect();
        v.sort();
        Ok(v)
    };
    let (sn, dn) = (names(s)?, names(d)?);
    for n in &dn {
        if !sn.contains(n) {
            xattr::remove(d, n).with_context(|| format!("cannot remove {n:?} from {}", d.display()))?;
        }
    }
    for n in &sn {
        let v = xattr::get(s, n)?.unwrap_or_default();
        if xattr::get(d, n).ok().flatten().as_ref() != Some(&v) {
            xattr::set(d, n, &v).with_context(|| format!("cannot set {n:?} on {}", d.display()))?;
        }
    }
    Ok(())
}

/// This thread on one CPU (the first it may use) while it lives; the old mask after.
struct Pinned(Option<nix::sched::CpuSet>);

impl Pinned {
    fn to_one_cpu() -> Result<Pinned> {
        use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
        let me = nix::unistd::Pid::from_raw(0);
        let old = sched_getaffinity(me).context("cannot read this thread's CPUs")?;
        let Some(cpu) = (0..CpuSet::count()).find(|c| old.is_set(*c).unwrap_or(false)) else {
            bail!("this thread may run on no CPU");
        };
        let mut one = CpuSet::new();
        one.set(cpu)?;
        sched_setaffinity(me, &one).context("cannot pin the image build to one CPU")?;
        Ok(Pinned(Some(old)))
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &old);
        }
    }
}

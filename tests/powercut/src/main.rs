//! atom-powercut: a disk file that can lose power, for the agent's power-loss test.
//!
//! Serves one file, `<mount>/disk`, over FUSE, backed by an image file. Writes stay in
//! this process's memory until the kernel asks for an fsync of the file, which a loop
//! device on `<mount>/disk` sends for every flush of the block device (fsync, O_SYNC,
//! BLKFLSBUF); only then do they reach the image. So the image holds exactly what a disk
//! with a volatile write cache would keep after a power loss.
//!
//! With `--cut-at-write N` the power goes at the Nth write request: that write is not
//! done, the unflushed ones are dropped (`--keep none`), or a seeded random half of their
//! 512-byte sectors reaches the image (`--keep half`: a disk whose cache drained partly,
//! tearing pages), or all of
//! them do (`--keep all`: the writer was killed but the machine stayed up). Then the
//! `--marker` file appears and no request is answered again: the processes using the disk
//! hang until they are killed, as on a dead machine; kill this process too and unmount.
//!
//! With `--arm-on-sigusr1` only the writes after SIGUSR1 count towards the cut.
//!
//! Without a cut it counts writes and flushes and prints them on unmount, which is how a
//! test learns the range to draw cut points from.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::Parser;
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request,
};

const PAGE: u64 = 4096;
/// What a disk writes atomically; `--keep half` tears pages at this grain.
const SECTOR: u64 = 512;
const ROOT: u64 = 1;
const DISK: u64 = 2;
const TTL: Duration = Duration::from_secs(3600);

#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Image file that holds what was flushed.
    #[arg(long)]
    image: PathBuf,
    /// Empty directory to mount on; the disk appears as `<mount>/disk`.
    #[arg(long)]
    mount: PathBuf,
    /// Lose power at this write request (1 = the first).
    #[arg(long)]
    cut_at_write: Option<u64>,
    /// What becomes of the unflushed writes at the cut.
    #[arg(long, value_enum, default_value_t = Keep::None)]
    keep: Keep,
    /// Seed for `--keep half`'s choice of pages.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Count write requests towards the cut only after SIGUSR1, so a test can set up (mount
    /// file systems, which write) before the power may go.
    #[arg(long)]
    arm_on_sigusr1: bool,
    /// Written when the power goes, with what was kept and lost.
    #[arg(long)]
    marker: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Keep {
    None,
    Half,
    All,
}

#[derive(Default, Clone, Copy)]
struct Counts {
    writes: u64,
    flushes: u64,
    bytes_written: u64,
}

struct Disk {
    image: File,
    size: u64,
    /// Written but not yet flushed: page number to contents.
    unflushed: BTreeMap<u64, Box<[u8]>>,
    counts: Arc<Mutex<Counts>>,
    cut_at: Option<u64>,
    keep: Keep,
    seed: u64,
    armed: Arc<AtomicBool>,
    armed_writes: u64,
    marker: Option<PathBuf>,
    dead: bool,
}

impl Disk {
    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o700, 0, 2)
        } else {
            (FileType::RegularFile, 0o600, self.size, 1)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        }
    }

    fn page(&self, n: u64) -> std::io::Result<Box<[u8]>> {
        if let Some(p) = self.unflushed.get(&n) {
            return Ok(p.clone());
        }
        let mut p = vec![0u8; PAGE as usize].into_boxed_slice();
        self.image.read_exact_at(&mut p, n * PAGE)?;
        Ok(p)
    }

    fn read_range(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let len = len.min(self.size.saturating_sub(offset));
        let mut out = vec![0u8; len as usize];
        self.image.read_exact_at(&mut out, offset)?;
        if len == 0 {
            return Ok(out);
        }
        for (&n, p) in self.unflushed.range(offset / PAGE..=(offset + len - 1) / PAGE) {
            let (start, end) = ((n * PAGE).max(offset), ((n + 1) * PAGE).min(offset + len));
            out[(start - offset) as usize..(end - offset) as usize]
                .copy_from_slice(&p[(start - n * PAGE) as usize..(end - n * PAGE) as usize]);
        }
        Ok(out)
    }

    fn write_range(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let end = offset + data.len() as u64;
        let mut at = offset;
        while at < end {
            let n = at / PAGE;
            let stop = ((n + 1) * PAGE).min(end);
            let mut p = self.page(n)?;
            p[(at - n * PAGE) as usize..(stop - n * PAGE) as usize]
                .copy_from_slice(&data[(at - offset) as usize..(stop - offset) as usize]);
            self.unflushed.insert(n, p);
            at = stop;
        }
        Ok(())
    }

    /// Writes the unflushed sectors `keep` picks (by sector number) to the image.
    fn flush_pages(&mut self, keep: impl Fn(u64) -> bool) -> std::io::Result<usize> {
        let mut kept = 0;
        for (&n, p) in &self.unflushed {
            for (i, sector) in p.chunks(SECTOR as usize).enumerate() {
                let at = n * PAGE + i as u64 * SECTOR;
                if keep(at / SECTOR) {
                    self.image.write_all_at(sector, at)?;
                    kept += 1;
                }
            }
        }
        self.image.sync_data()?;
        self.unflushed.clear();
        Ok(kept)
    }

    fn cut(&mut self, write: u64) -> std::io::Result<()> {
        let pending = self.unflushed.len();
        let seed = self.seed;
        let kept = match self.keep {
            Keep::None => {
                self.unflushed.clear();
                0
            }
            Keep::Half => self.flush_pages(|s| mix(seed ^ s.wrapping_mul(0x9E37_79B9_7F4A_7C15)) & 1 == 1)?,
            Keep::All => self.flush_pages(|_| true)?,
        };
        self.dead = true;
        if let Some(m) = &self.marker {
            std::fs::write(
                m,
                format!("power cut at write {write}: {kept} sectors of {pending} unflushed pages kept\n"),
            )?;
        }
        Ok(())
    }
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// After the cut nothing is answered: the caller hangs as on a dead machine.
macro_rules! dead_end {
    ($self:ident, $reply:ident) => {
        if $self.dead {
            std::mem::forget($reply);
            return;
        }
    };
}

impl Filesystem for Disk {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        // One page per write request, so a cut can fall between any two pages.
        config.set_max_write(PAGE as u32).map_err(|_| libc::EINVAL)?;
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        dead_end!(self, reply);
        if parent == ROOT && name == "disk" {
            reply.entry(&TTL, &self.attr(DISK), 0);
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        dead_end!(self, reply);
        match ino {
            ROOT | DISK => reply.attr(&TTL, &self.attr(ino)),
            _ => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        dead_end!(self, reply);
        reply.opened(0, 0);
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        dead_end!(self, reply);
        match self.read_range(offset as u64, size.into()) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        dead_end!(self, reply);
        let offset = offset as u64;
        if offset + data.len() as u64 > self.size {
            reply.error(libc::ENOSPC);
            return;
        }
        let n = {
            let mut c = self.counts.lock().unwrap();
            c.writes += 1;
            c.writes
        };
        if self.armed.load(Ordering::Relaxed) {
            self.armed_writes += 1;
        }
        if self.cut_at == Some(self.armed_writes) {
            if let Err(e) = self.cut(n) {
                eprintln!("atom-powercut: cut failed: {e}");
            }
            std::mem::forget(reply);
            return;
        }
        match self.write_range(offset, data) {
            Ok(()) => {
                self.counts.lock().unwrap().bytes_written += data.len() as u64;
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        // close(2), not a durability point.
        dead_end!(self, reply);
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        dead_end!(self, reply);
        self.counts.lock().unwrap().flushes += 1;
        match self.flush_pages(|_| true) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let image = File::options()
        .read(true)
        .write(true)
        .open(&args.image)
        .with_context(|| format!("cannot open {}", args.image.display()))?;
    let size = image.metadata()?.len();
    if size % PAGE != 0 {
        anyhow::bail!("{}: size {size} is not a multiple of {PAGE}", args.image.display());
    }
    let counts = Arc::new(Mutex::new(Counts::default()));
    let armed = Arc::new(AtomicBool::new(!args.arm_on_sigusr1));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, armed.clone()).context("cannot handle SIGUSR1")?;
    let disk = Disk {
        image,
        size,
        unflushed: BTreeMap::new(),
        counts: counts.clone(),
        cut_at: args.cut_at_write,
        keep: args.keep,
        armed,
        armed_writes: 0,
        seed: args.seed,
        marker: args.marker,
        dead: false,
    };
    let mut session = fuser::Session::new(
        disk,
        &args.mount,
        &[MountOption::FSName("atom-powercut".into()), MountOption::RW],
    )
    .with_context(|| format!("cannot mount on {}", args.mount.display()))?;
    println!("mounted {}", args.mount.join("disk").display());
    // Until `umount`.
    session.run().context("FUSE session failed")?;
    let c = *counts.lock().unwrap();
    println!("writes {} flushes {} bytes {}", c.writes, c.flushes, c.bytes_written);
    Ok(())
}

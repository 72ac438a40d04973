//! `atom-install`: puts an installer medium's disk onto a machine's disk.
//!
//! 1. [`read_medium`]: the signed description, the release manifest (and keys.toml under
//!    key roles) are verified against the publisher's keys before anything else.
//! 2. [`choose_target`]: the configured disk (path, serial, WWID, the only empty one), or
//!    the operator's answer on the console.
//! 3. [`plan_layout`]: the image's table laid out on the target (state grows; kept
//!    partitions stay); a target too small or a kept partition in the way stops here.
//! 4. [`table::clear`]: the target's table goes first, so no half-written disk can boot.
//! 5. [`write_and_verify`]: the image streams onto the target, hashed as it goes; the
//!    digests must match the description and the manifest.
//! 6. [`Plan::write`](table::Plan::write): only then the partition table.
//! 7. [`grow_state`]: the state filesystem fills its grown partition.

mod console;
mod grow;
pub mod pid1;
mod stream;
pub mod table;
pub mod target;

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use atom_dist::install::{self as medium, Anchor, Documents, Verified};
use atom_dist::keys::TrustedKeys;

/// What an install needs to know.
pub struct Options {
    /// The medium's `atom` directory.
    pub medium: PathBuf,
    /// The publisher's keys: `*.pub` (single key), or `root/*.pub` (key roles).
    pub keys: PathBuf,
    /// `None`: ask on the console.
    pub target: Option<String>,
    pub keep_partlabel: Vec<String>,
    /// The block device the medium is on, never a target.
    pub medium_device: Option<PathBuf>,
    /// Ask before erasing even when the target is configured.
    pub confirm: bool,
    pub wait: Duration,
}

/// What was installed.
#[derive(Debug, serde::Serialize)]
pub struct Installed {
    pub target: PathBuf,
    pub version: String,
    pub board: String,
    pub disk_bytes: u64,
    /// The state filesystem's size after growing (None: it did not grow).
    pub state_bytes: Option<u64>,
    pub kept: Vec<String>,
    /// Problems after the disk became bootable (the state filesystem did not grow).
    pub warnings: Vec<String>,
}

impl Installed {
    /// One line: what went where, and the state filesystem's new size.
    pub fn summary(&self) -> String {
        format!(
            "installed {} ({}) onto {}{}",
            self.version,
            self.board,
            self.target.display(),
            self.state_bytes
                .map(|b| format!("; state filesystem {} MiB", b >> 20))
                .unwrap_or_default()
        )
    }
}

/// The whole install; on an error after step 4 the target has no bootable table.
pub fn run(opts: &Options) -> Result<Installed> {
    let verified = read_medium(&opts.medium, &opts.keys)?;
    let d = &verified.description;
    say(&format!(
        "medium: version {} for {} (channel {}), signed by {}; disk image {} bytes",
        d.version, d.board, d.channel, verified.signed_by, d.disk.size
    ));
    let target = choose_target(opts)?;
    let mut disk = open_target(&target)?;
    let target_len = std::io::Seek::seek(&mut disk, std::io::SeekFrom::End(0))
        .with_context(|| format!("cannot size {}", target.display()))?;
    check_sector_size(&disk, &target)?;

    let path = opts.medium.join(medium::DISK);
    let file = File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let compressed = file.metadata()?.len();
    if compressed != d.disk.compressed_size {
        bail!(
            "{} is {compressed} bytes, the signed description says {}: the medium is damaged or was changed",
            path.display(),
            d.disk.compressed_size
        );
    }
    let mut decoder = zstd::stream::read::Decoder::new(file).context("the disk image is not zstd")?;
    // The builder's level needs a 4 MiB window; an unverified frame asking for more than
    // 16 MiB is refused instead of taking the memory of a small board.
    decoder.window_log_max(24).context("zstd")?;
    // One byte more than described: a longer stream is refused, not read forever.
    let mut src = decoder.take(d.disk.size + 1);
    let mut head = vec![0u8; medium::HEAD_BYTES as usize];
    let n = stream::fill(&mut src, &mut head).context("cannot read the disk image")?;
    head.truncate(n);
    // Signed: the image's table is parsed only once its bytes are the publisher's.
    if atom_dist::digest::Digest::of(&head) != d.disk.head_digest {
        bail!(
            "the disk image's first MiB (its partition table) does not match the signed description: \
             the image was changed or damaged; refused, nothing was written"
        );
    }

    let (existing, kept) = kept_partitions(&mut disk, &target, &opts.keep_partlabel)?;
    let plan = plan_layout(&head, target_len, kept, &target)?;

    say(&format!("clearing the partition table of {}", target.display()));
    table::clear(&mut disk, existing.as_ref(), plan.kept())
        .with_context(|| format!("while clearing the partition table of {}", target.display()))?;
    let result = write_and_verify(&verified, &head, &mut src, &mut disk, &plan).and_then(|()| {
        say("the disk image matches its signature: writing the partition table");
        plan.write(&mut disk).map_err(|e| {
            // Part of the new table may be on the disk: clear it again.
            match table::clear(&mut disk, existing.as_ref(), plan.kept()) {
                Ok(()) => e,
                Err(again) => e.context(format!("and clearing it again failed: {again:#}")),
            }
        })
    });
    if let Err(e) = result {
        // The table was cleared before the first byte: whatever was written cannot boot.
        let kept = if plan.kept().is_empty() {
            String::new()
        } else {
            " (a table of only the kept partitions is on it)".to_string()
        };
        return Err(e.context(format!(
            "nothing bootable was written: {} has no Atom partition table{kept}",
            target.display()
        )));
    }
    let reread = table::reread(&disk);
    drop(disk);
    let mut warnings = Vec::new();
    let state_bytes = match reread.and_then(|()| grow_state(&plan, &target, opts.wait)) {
        Ok(grown) => grown,
        Err(e) => {
            warnings.push(format!(
                "{e:#}: the state filesystem keeps its image size (the system boots; grow it with resize2fs)"
            ));
            None
        }
    };
    Ok(Installed {
        target,
        version: d.version.to_string(),
        board: d.board.clone(),
        disk_bytes: d.disk.size,
        state_bytes,
        kept: plan
            .kept()
            .iter()
            .map(|(i, p)| format!("{i} {}", p.partition_name.as_str()))
            .collect(),
        warnings,
    })
}

pub(crate) fn say(line: &str) {
    console::line(&format!("atom-install: {line}"));
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let path = dir.join(name);
    let f = File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut bytes = Vec::new();
    // Documents are small; a huge file is not read whole.
    f.take(1 << 20).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Step 1.
pub fn read_medium(dir: &Path, keys: &Path) -> Result<Verified> {
    let root = keys.join("root");
    let anchor = if root.is_dir() {
        Anchor::Roles(TrustedKeys::load_dir(&root).context("the publisher's root keys")?)
    } else {
        Anchor::Single(TrustedKeys::load_dir(keys).context("the publisher's keys")?)
    };
    let description = read(dir, medium::DESCRIPTION)?;
    let description_sig = read(dir, medium::DESCRIPTION_SIG)?;
    let manifest = read(dir, medium::MANIFEST)?;
    let manifest_sig = read(dir, medium::MANIFEST_SIG)?;
    let keys_doc = match (read(dir, medium::KEYS), read(dir, medium::KEYS_SIG)) {
        (Ok(k), Ok(s)) => Some((k, s)),
        _ => None,
    };
    let docs = Documents {
        description: &description,
        description_sig: &description_sig,
        manifest: &manifest,
        manifest_sig: &manifest_sig,
        keys: keys_doc.as_ref().map(|(k, s)| (k.as_slice(), s.as_slice())),
    };
    medium::verify(&docs, &anchor).with_context(|| format!("the medium in {} is refused", dir.display()))
}

/// Step 2.
fn choose_target(opts: &Options) -> Result<PathBuf> {
    let disks = target::list(Path::new("/sys/block"));
    let medium = opts.medium_device.as_deref();
    for d in &disks {
        let what = if medium.is_some_and(|m| m == d.path) {
            ", the installer's medium"
        } else {
            ""
        };
        say(&format!("disk {}{what}", d.describe()));
    }
    let Some(spec) = &opts.target else {
        let disks: Vec<_> = disks
            .into_iter()
            .filter(|d| medium.is_none_or(|m| m != d.path) && !d.read_only)
            .collect();
        let stdin = std::io::stdin();
        let chosen = target::ask(&disks, &mut stdin.lock(), &mut console::Out)?;
        return chosen.context("no disk chosen: nothing was written");
    };
    // Disks appear late (USB, slow controllers): the configured one is waited for; `empty`
    // must give the same answer on two scans two seconds apart, so a second empty disk
    // that is still appearing is not a coin toss.
    let deadline = std::time::Instant::now() + opts.wait;
    let mut previous: Option<PathBuf> = None;
    let path = loop {
        let disks = target::list(Path::new("/sys/block"));
        match target::select(spec, &disks, medium) {
            Ok(p) if spec != "empty" || previous.as_ref() == Some(&p) => break p,
            Ok(p) => {
                previous = Some(p);
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => {
                previous = None;
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    if opts.confirm {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let disk = target::describe(Path::new("/sys/block"), &name);
        let disk = target::Disk {
            path: path.clone(),
            ..disk
        };
        let stdin = std::io::stdin();
        if target::ask(&[disk], &mut stdin.lock(), &mut console::Out)?.is_none() {
            bail!("not confirmed: nothing was written");
        }
    }
    Ok(path)
}

/// Exclusive: the kernel refuses while any partition of it is mounted or in use.
fn open_target(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
        .with_context(|| {
            format!(
                "cannot open {} for writing alone (is a partition of it mounted or in use?)",
                path.display()
            )
        })
}

fn check_sector_size(disk: &File, path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    nix::ioctl_read_bad!(blksszget, 0x1268, libc::c_int);
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int.
    unsafe { blksszget(disk.as_raw_fd(), &mut size) }
        .with_context(|| format!("{} is not a block device (BLKSSZGET)", path.display()))?;
    if size != table::SECTOR as libc::c_int {
        bail!(
            "{} has {size}-byte logical sectors; the disk image is laid out for 512 (4K-native disks are not supported yet)",
            path.display()
        );
    }
    Ok(())
}

/// The target's table and the partitions of it to keep. A pattern that matches nothing is
/// an error before anything is written: a typo must not cost the data it meant to keep.
fn kept_partitions(disk: &mut File, target: &Path, keep: &[String]) -> Result<(Option<gptman::GPT>, table::Kept)> {
    if keep.is_empty() {
        return Ok((None, Vec::new()));
    }
    let Some(existing) = table::read_existing(disk) else {
        bail!(
            "partitions to keep ({}) were named, but {} has no GPT that reads: nothing was written",
            keep.join(", "),
            target.display()
        );
    };
    let kept = table::kept(Some(&existing), keep);
    for pattern in keep {
        if !kept
            .iter()
            .any(|(_, p)| table::glob(pattern, p.partition_name.as_str()))
        {
            let names: Vec<String> = existing
                .iter()
                .filter(|(_, p)| p.is_used())
                .map(|(i, p)| format!("{i} {:?}", p.partition_name.as_str()))
                .collect();
            bail!(
                "--keep-partlabel {pattern:?} matches no partition of {} (it has: {}): nothing was written",
                target.display(),
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                }
            );
        }
    }
    Ok((Some(existing), kept))
}

/// Step 3.
fn plan_layout(
    head: &[u8],
    target_len: u64,
    kept: Vec<(u32, gptman::GPTPartitionEntry)>,
    target: &Path,
) -> Result<table::Plan> {
    let plan =
        table::plan(head, target_len, kept).with_context(|| format!("cannot install onto {}", target.display()))?;
    for (i, p) in plan.kept() {
        say(&format!(
            "keeping partition {:?} (sectors {}-{}) as partition {i}",
            p.partition_name.as_str(),
            p.starting_lba,
            p.ending_lba
        ));
    }
    Ok(plan)
}

/// Step 5.
fn write_and_verify(v: &Verified, head: &[u8], src: &mut dyn Read, disk: &mut File, plan: &table::Plan) -> Result<()> {
    let d = &v.description;
    let (root_a, root_a_len) = plan
        .partition("root-a")
        .context("the disk image has no root-a partition")?;
    if root_a != d.image.offset || d.image.size > root_a_len {
        bail!(
            "the signed description puts the slot image at byte {} ({} bytes); the image's root-a is at {root_a} ({root_a_len} bytes)",
            d.image.offset,
            d.image.size
        );
    }
    let span = stream::Span {
        start: head.len() as u64,
        write_end: plan.image_end,
        image_offset: d.image.offset,
        image_len: d.image.size,
    };
    let total = d.disk.size;
    let mut shown = 0;
    let mut progress = |pos: u64| {
        let pct = pos * 100 / total.max(1);
        if pct >= shown + 10 {
            shown = pct / 10 * 10;
            say(&format!("written {shown}% ({} of {} MiB)", pos >> 20, total >> 20));
        }
    };
    let hashed = stream::copy(head, src, disk, &span, &mut progress)?;
    if hashed.size != d.disk.size {
        bail!(
            "the disk image is {}{} bytes, the signed description says {}: refused",
            hashed.size,
            if hashed.size > d.disk.size { "+" } else { "" },
            d.disk.size
        );
    }
    if hashed.disk != d.disk.digest {
        bail!(
            "the disk image's digest is {}, the signed description says {}: the image was changed or damaged; refused",
            hashed.disk,
            d.disk.digest
        );
    }
    if hashed.image != v.manifest.image.digest {
        bail!(
            "the slot image's digest is {}, the release manifest says {}: refused",
            hashed.image,
            v.manifest.image.digest
        );
    }
    Ok(())
}

/// Step 7: `None` when the image's last partition is not `state` or has nothing to grow.
fn grow_state(plan: &table::Plan, target: &Path, wait: Duration) -> Result<Option<u64>> {
    let Some((number, bytes)) = plan.grows() else {
        return Ok(None);
    };
    let node = bootsel::sysfs::partition_node(target, number, wait).map_err(anyhow::Error::msg)?;
    let scratch = Path::new("/run/atom-install");
    fs::create_dir_all(scratch).ok();
    let scratch = if scratch.is_dir() {
        scratch.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let grown = grow::grow(&node, bytes, &scratch)?;
    say(&format!(
        "state filesystem on {} grown to {} MiB",
        node.display(),
        grown >> 20
    ));
    Ok(Some(grown))
}

//! `atom-build image`: root filesystem → reproducible ext4 slot image.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use atom_dist::release::{RELEASE_PATH, Release};
use atom_dist::{Digest, fsutil, manifest};
use filetime::FileTime;

use crate::cli::ImageArgs;
use crate::cmd::run;
use crate::{ext4, slot_boot};

/// Used when SOURCE_DATE_EPOCH is unset (2020-01-01T00:00:00Z). Not 0: e2fsprogs treats
/// a fake time of 0 as "use the real clock".
const DEFAULT_EPOCH: i64 = 1_577_836_800;
const MIN_IMAGE_BYTES: u64 = 16 << 20;

pub fn run_image(args: &ImageArgs) -> Result<()> {
    let epoch = source_date_epoch()?;
    let report = build(args, epoch)?;
    println!(
        "built {} (version {}, board {}): {} bytes, {}",
        args.out.display(),
        args.version,
        args.board,
        report.size,
        report.digest
    );
    match &report.kernel {
        Some(k) => println!(
            "  kernel {} in /boot/atom, initramfs {} bytes ({} module(s))",
            k.release, k.initramfs_bytes, k.modules
        ),
        None => println!("  no kernel of its own (--kernel none): the first stage's kernel boots it"),
    }
    Ok(())
}

pub fn source_date_epoch() -> Result<i64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => {
            let t: i64 = v
                .trim()
                .parse()
                .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number"))?;
            anyhow::ensure!(t > 0, "SOURCE_DATE_EPOCH must be positive");
            Ok(t)
        }
        Err(_) => Ok(DEFAULT_EPOCH),
    }
}

pub struct ImageReport {
    pub size: u64,
    pub digest: Digest,
    pub kernel: Option<slot_boot::Installed>,
}

pub fn build(args: &ImageArgs, epoch: i64) -> Result<ImageReport> {
    manifest::check_name("board", &args.board)?;
    anyhow::ensure!(
        args.size.is_multiple_of(4096) && args.size >= MIN_IMAGE_BYTES,
        "--size {} must be a multiple of 4096 and at least {} MiB",
        args.size,
        MIN_IMAGE_BYTES >> 20
    );
    let source_meta =
        fs::metadata(&args.rootfs).with_context(|| format!("cannot read root filesystem {}", args.rootfs.display()))?;
    if let Some(base) = &args.base {
        fs::metadata(base).with_context(|| format!("cannot read base image {}", base.display()))?;
    }
    let out_dir = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let work = tempfile::Builder::new()
        .prefix(".atom-build-")
        .tempdir_in(out_dir)
        .with_context(|| format!("cannot create a work directory in {}", out_dir.display()))?;
    let staging = work.path().join("root");
    stage_rootfs(&args.rootfs, source_meta.is_dir(), &staging)?;
    let kernel = slot_boot::install(&staging, args, epoch)?;
    write_release(
        &staging,
        &Release {
            version: args.version.clone(),
            board: args.board.clone(),
        },
    )?;
    let data_bytes = clamp_times_and_measure(&staging, epoch)?;
    if data_bytes > args.size {
        bail!(
            "image size {} MiB is too small for the root filesystem ({} MiB of file data alone)",
            args.size >> 20,
            data_bytes.div_ceil(1 << 20)
        );
    }

    let conf = work.path().join("mke2fs.conf");
    fs::write(&conf, ext4::MKE2FS_CONF).context("cannot write mke2fs.conf")?;
    let tmp_image = work.path().join("image");
    let result = match &args.base {
        None => build_plain(args, epoch, &conf, &staging, &tmp_image),
        Some(base) => build_on_base(args, epoch, &conf, &staging, base, &tmp_image, work.path()),
    };
    if let Err(e) = result {
        if ext4::is_out_of_space(&e) {
            bail!(
                "image size {} MiB is too small for the root filesystem ({} MiB of file data plus ext4 metadata)",
                args.size >> 20,
                data_bytes.div_ceil(1 << 20)
            );
        }
        return Err(e);
    }
    ext4::fsck_check(&tmp_image)?;
    let (digest, size) = Digest::of_file(&tmp_image).context("cannot hash the new image")?;
    fs::rename(&tmp_image, &args.out).with_context(|| format!("cannot move the image to {}", args.out.display()))?;
    fsutil::sync_dir(out_dir).with_context(|| format!("cannot sync {}", out_dir.display()))?;
    Ok(ImageReport { size, digest, kernel })
}

fn stage_rootfs(rootfs: &Path, is_dir: bool, staging: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .mode(0o755)
        .create(staging)
        .context("cannot create staging directory")?;
    if is_dir {
        let mut src = rootfs.as_os_str().to_owned();
        src.push("/.");
        run(Command::new("cp").arg("-a").arg("--").arg(src).arg(staging))
            .with_context(|| format!("cannot copy root filesystem {}", rootfs.display()))?;
    } else {
        run(Command::new("tar")
            .args(["-x", "-p", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-f"])
            .arg(rootfs)
            .arg("-C")
            .arg(staging))
        .with_context(|| {
            format!(
                "cannot unpack root filesystem {} (not a tar archive?)",
                rootfs.display()
            )
        })?;
    }
    Ok(())
}

/// Creates `usr/lib/atom/release`, refusing to follow a symlink out of the tree.
fn write_release(staging: &Path, release: &Release) -> Result<()> {
    let (parent, _) = RELEASE_PATH.rsplit_once('/').expect("release path has a directory");
    create_dirs_in_tree(staging, Path::new(parent))?;
    let path = staging.join(RELEASE_PATH);
    if fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
        bail!("/{RELEASE_PATH} in the root filesystem is not a regular file");
    }
    fs::write(&path, release.to_toml()).with_context(|| format!("cannot write {}", path.display()))
}

/// Creates the directories of `rel` under `staging` where missing, refusing a component
/// that is a symlink or a file (writing through it could land outside the tree).
pub fn create_dirs_in_tree(staging: &Path, rel: &Path) -> Result<()> {
    let mut dir = staging.to_path_buf();
    for component in rel.components() {
        dir.push(component);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!(
                "/{} in the root filesystem is not a directory",
                dir.strip_prefix(staging)?.display()
            ),
            Err(_) => fs::DirBuilder::new()
                .mode(0o755)
                .create(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?,
        }
    }
    Ok(())
}

/// Clamps every timestamp to `epoch` (files newer than it get exactly `epoch`) and returns
/// the bytes of data blocks the tree needs.
fn clamp_times_and_measure(root: &Path, epoch: i64) -> Result<u64> {
    let clamp = FileTime::from_unix_time(epoch, 0);
    let mut data = 0u64;
    for entry in walkdir::WalkDir::new(root).contents_first(true) {
        let entry = entry.with_context(|| format!("cannot walk {}", root.display()))?;
        let meta = entry
            .metadata()
            .with_context(|| format!("cannot stat {}", entry.path().display()))?;
        data += meta.size().div_ceil(4096) * 4096;
        if meta.mtime() > epoch || meta.atime() > epoch || meta.mtime_nsec() != 0 || meta.atime_nsec() != 0 {
            let m = FileTime::from_unix_time(meta.mtime().min(epoch), 0);
            let a = FileTime::from_unix_time(meta.atime().min(epoch), 0);
            filetime::set_symlink_file_times(entry.path(), a.min(clamp), m.min(clamp))
                .with_context(|| format!("cannot set times on {}", entry.path().display()))?;
        }
    }
    Ok(data)
}

fn identifiers(args: &ImageArgs) -> (String, String) {
    (
        ext4::derived_uuid("fs-uuid", &args.version, &args.board),
        ext4::derived_uuid("dir-hash-seed", &args.version, &args.board),
    )
}

fn build_plain(args: &ImageArgs, epoch: i64, conf: &Path, staging: &Path, image: &Path) -> Result<()> {
    let f = fs::File::create(image).with_context(|| format!("cannot create {}", image.display()))?;
    f.set_len(args.size).context("cannot size the image file")?;
    drop(f);
    let (uuid, hash_seed) = identifiers(args);
    ext4::mkfs(&ext4::MkfsParams {
        conf,
        epoch,
        uuid: &uuid,
        hash_seed: &hash_seed,
        source: staging,
        image,
    })?;
    let work = image.parent().expect("image is inside the work directory");
    ext4::normalize(image, conf, epoch, &fs_paths(staging)?, work, ext4::Origin::Mkfs)
}

/// A mount that is undone on every path: `unmount` on success (errors reported), a lazy
/// unmount when dropped on an error path so the work directory can still be removed.
struct Mounted(Option<PathBuf>);

impl Mounted {
    fn unmount(mut self) -> Result<()> {
        let path = self.0.take().expect("mounted until unmount");
        run(Command::new("umount").arg(&path)).map(drop)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = Command::new("umount").arg("-l").arg(path).status();
        }
    }
}

fn build_on_base(
    args: &ImageArgs,
    epoch: i64,
    conf: &Path,
    staging: &Path,
    base: &Path,
    image: &Path,
    work: &Path,
) -> Result<()> {
    let base_release = Release::parse(&ext4::read_file(base, RELEASE_PATH).context("--base is not an Atom image")?)?;
    if base_release.board != args.board {
        bail!(
            "--base is an image for board {:?}, building for {:?}",
            base_release.board,
            args.board
        );
    }
    run(Command::new("cp").arg("--sparse=always").arg("--").arg(base).arg(image))
        .context("cannot copy the base image")?;
    let base_size = fs::metadata(image)?.len();
    if base_size != args.size {
        resize(conf, epoch, image, base_size, args.size)?;
    }
    // Each version gets its own filesystem UUID, so the two slots never share one. With
    // metadata_csum_seed this touches only the superblock. The directory hash seed stays
    // the base's: changing it would re-hash every directory.
    let (uuid, _) = identifiers(args);
    run(ext4::e2fs_tool("tune2fs", conf, epoch).arg("-U").arg(&uuid).arg(image))?;

    let mnt = work.join("mnt");
    fs::create_dir(&mnt).context("cannot create mount point")?;
    run(Command::new("mount")
        // nodelalloc: blocks are allocated as tree_sync writes, in its order.
        .args(["-t", "ext4", "-o", "loop,noatime,nodelalloc"])
        .arg(image)
        .arg(&mnt))
    .context("cannot mount the base image (building with --base needs root and loop devices)")?;
    let guard = Mounted(Some(mnt.clone()));
    let stats = crate::tree_sync::sync(staging, &mnt).context("cannot sync the new tree into the base image")?;
    tracing::debug!(?stats, "synced into the base image");
    guard.unmount()?;

    ext4::normalize(image, conf, epoch, &fs_paths(staging)?, work, ext4::Origin::Mounted)
}

/// Every path the image will hold, as debugfs names them.
fn fs_paths(staging: &Path) -> Result<Vec<String>> {
    let mut paths = vec!["/".to_string(), "/lost+found".to_string()];
    for entry in walkdir::WalkDir::new(staging).min_depth(1) {
        let entry = entry?;
        let rel = entry.path().strip_prefix(staging)?;
        let rel = rel
            .to_str()
            .with_context(|| format!("file name {} is not UTF-8", rel.display()))?;
        if rel != "lost+found" {
            paths.push(format!("/{rel}"));
        }
    }
    Ok(paths)
}

fn resize(conf: &Path, epoch: i64, image: &Path, from: u64, to: u64) -> Result<()> {
    run(ext4::e2fs_tool("e2fsck", conf, epoch).args(["-f", "-y"]).arg(image))?;
    if to > from {
        fs::OpenOptions::new().write(true).open(image)?.set_len(to)?;
    }
    run(ext4::e2fs_tool("resize2fs", conf, epoch)
        .arg(image)
        .arg(format!("{}K", to / 1024)))
    .context("cannot resize the base image to --size")?;
    if to < from {
        fs::OpenOptions::new().write(true).open(image)?.set_len(to)?;
    }
    Ok(())
}

//! The disk's formats (raw, raw.zst, qcow2, vmdk, vhd), the record of what the disk
//! holds (STEM.toml) and the SHA256SUMS lines of every file written.
//!
//! qemu-img does the VM formats: it is what every cloud documents for its uploads, and
//! `qemu-img compare` checks each one against the raw disk.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tempfile::NamedTempFile;

use crate::cli::{DiskArgs, DiskFormat, Firmware};

/// zstd level of raw.zst. On a 1 GiB Debian disk (2 threads): level 9 gave 90.8 MB in
/// 6.5 s, 12 gave 90.4 MB in 13 s, 19 gave 84.5 MB in 124 s; 7% is not worth 20 times the
/// time of every build.
const ZSTD_LEVEL: i32 = 9;
pub const SUMS: &str = "SHA256SUMS";

/// STEM.toml: what a disk holds, to tie it to the signed release.
#[derive(Debug, Serialize)]
pub struct Record {
    pub version: String,
    pub board: String,
    /// Digest of the slot image written to root-a (the digest a signed manifest carries).
    pub image: String,
    pub image_size: u64,
    pub firmware: Firmware,
    /// The raw disk's size in bytes.
    pub size: u64,
    pub outputs: Vec<Output>,
}

#[derive(Debug, Serialize)]
pub struct Output {
    pub file: String,
    pub format: DiskFormat,
    pub sha256: String,
}

/// Where `format` of the raw disk `raw` goes.
pub fn path_of(raw: &Path, format: DiskFormat) -> PathBuf {
    let name = raw
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".img").unwrap_or(&name);
    raw.with_file_name(match format {
        DiskFormat::Raw => name.clone(),
        DiskFormat::RawZst => format!("{name}.zst"),
        DiskFormat::Qcow2 => format!("{stem}.qcow2"),
        DiskFormat::Vmdk => format!("{stem}.vmdk"),
        DiskFormat::Vhd => format!("{stem}.vhd"),
    })
}

/// Writes every format of the finished raw disk `raw` (still a temporary file beside
/// OUT), the record and the sums; returns the paths written.
pub fn write(raw: NamedTempFile, args: &DiskArgs, mut record: Record) -> Result<Vec<PathBuf>> {
    let mut formats = args.formats.clone();
    formats.sort();
    formats.dedup();
    let mut written = Vec::new();
    for &format in formats.iter().filter(|f| **f != DiskFormat::Raw) {
        let out = path_of(&args.out, format);
        convert(raw.path(), format, &out).with_context(|| format!("cannot write {}", out.display()))?;
        written.push((out, format));
    }
    if formats.contains(&DiskFormat::Raw) {
        readable(raw.as_file())?;
        raw.persist(&args.out)
            .with_context(|| format!("cannot create {}", args.out.display()))?;
        written.insert(0, (args.out.clone(), DiskFormat::Raw));
    }
    for (path, format) in &written {
        record.outputs.push(Output {
            file: file_name(path),
            format: *format,
            sha256: sha256_of(path)?,
        });
    }
    let record_path = args.out.with_file_name(format!("{}.toml", stem_of(&args.out)));
    let text = format!(
        "# Written by atom-build disk: what this disk holds. `image` is the digest of the slot\n\
         # image written to root-a ({} here), as a signed manifest of that version carries it.\n{}",
        record.version,
        toml::to_string(&record).context("cannot write the disk record")?
    );
    write_atomically(&record_path, text.as_bytes())?;
    let mut sums: Vec<(String, String)> = record
        .outputs
        .iter()
        .map(|o| (o.file.clone(), o.sha256.clone()))
        .collect();
    sums.push((file_name(&record_path), hex::encode(Sha256::digest(text.as_bytes()))));
    let sums_path = args.out.with_file_name(SUMS);
    update_sums(&sums_path, &sums)?;
    Ok(written
        .into_iter()
        .map(|(p, _)| p)
        .chain([record_path, sums_path])
        .collect())
}

fn convert(raw: &Path, format: DiskFormat, out: &Path) -> Result<()> {
    let dir = out.parent().unwrap_or(Path::new("."));
    let tmp = NamedTempFile::new_in(dir).with_context(|| format!("cannot write into {}", dir.display()))?;
    let options: &[&str] = match format {
        DiskFormat::Raw => unreachable!("raw is the disk itself"),
        DiskFormat::RawZst => {
            compress(raw, tmp.as_file())?;
            readable(tmp.as_file())?;
            tmp.persist(out)?;
            return Ok(());
        }
        DiskFormat::Qcow2 => &["-O", "qcow2"],
        DiskFormat::Vmdk => &["-O", "vmdk", "-o", "subformat=streamOptimized"],
        // force_size: the virtual size stays exactly the raw size (Azure wants whole MiB),
        // not qemu's CHS rounding.
        DiskFormat::Vhd => &["-O", "vpc", "-o", "subformat=fixed,force_size=on"],
    };
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-q", "-f", "raw"])
        .args(options)
        .arg(raw)
        .arg(tmp.path());
    match crate::cmd::run(&mut cmd) {
        Err(e) if which_missing("qemu-img") => bail!("{e:#}: qemu-img is not installed (Debian package qemu-utils)"),
        r => r.map(drop)?,
    }
    readable(tmp.as_file())?;
    tmp.persist(out)?;
    Ok(())
}

fn which_missing(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_err()
}

fn compress(raw: &Path, out: &File) -> Result<()> {
    let input = File::open(raw).context("cannot read the raw disk")?;
    let mut encoder = zstd::stream::Encoder::new(BufWriter::new(out), ZSTD_LEVEL)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    encoder.multithread(threads)?;
    encoder.include_checksum(true)?;
    encoder.set_pledged_src_size(Some(input.metadata()?.len()))?;
    io::copy(&mut io::BufReader::with_capacity(1 << 20, input), &mut encoder).context("cannot compress the disk")?;
    encoder.finish()?.flush()?;
    out.sync_all().context("cannot flush the compressed disk")
}

/// Adds `files` (in one directory) to that directory's SHA256SUMS; returns its path.
pub fn add_to_sums(files: &[PathBuf]) -> Result<PathBuf> {
    let Some(first) = files.first() else {
        bail!("no files to sum")
    };
    let sums_path = first.with_file_name(SUMS);
    let sums = files
        .iter()
        .map(|f| Ok((file_name(f), sha256_of(f)?)))
        .collect::<Result<Vec<_>>>()?;
    update_sums(&sums_path, &sums)?;
    Ok(sums_path)
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => break,
            n => hasher.update(&buf[..n]),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Replaces the lines of `files` in the directory's SHA256SUMS and keeps the others (other
/// versions' disks in the same directory), sorted by name, in `sha256sum -c` format.
fn update_sums(path: &Path, files: &[(String, String)]) -> Result<()> {
    let mut lines = BTreeMap::new();
    match fs::read_to_string(path) {
        Ok(text) => {
            for line in text.lines() {
                if let Some((sum, name)) = line.split_once("  ") {
                    lines.insert(name.to_string(), sum.to_string());
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    for (name, sum) in files {
        lines.insert(name.clone(), sum.clone());
    }
    let text: String = lines.iter().map(|(name, sum)| format!("{sum}  {name}\n")).collect();
    write_atomically(path, text.as_bytes())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = NamedTempFile::new_in(dir).with_context(|| format!("cannot write into {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    readable(tmp.as_file())?;
    tmp.persist(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    Ok(())
}

/// Temporary files are created 0600; outputs are for web servers and other users.
fn readable(file: &File) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(fs::Permissions::from_mode(0o644))
        .context("cannot make the output readable")
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn stem_of(raw: &Path) -> String {
    let name = file_name(raw);
    name.strip_suffix(".img").unwrap_or(&name).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_go_beside_the_raw_disk() {
        let raw = Path::new("/out/atom-1.0.0.disk.img");
        assert_eq!(path_of(raw, DiskFormat::Raw), raw);
        assert_eq!(
            path_of(raw, DiskFormat::RawZst),
            Path::new("/out/atom-1.0.0.disk.img.zst")
        );
        assert_eq!(path_of(raw, DiskFormat::Qcow2), Path::new("/out/atom-1.0.0.disk.qcow2"));
        assert_eq!(path_of(raw, DiskFormat::Vhd), Path::new("/out/atom-1.0.0.disk.vhd"));
        assert_eq!(stem_of(raw), "atom-1.0.0.disk");
    }

    #[test]
    fn sums_keep_other_files_and_replace_ours() {
        let dir = tempfile::tempdir().unwrap();
        let sums = dir.path().join(SUMS);
        fs::write(&sums, "aa  old.img\nbb  mine.img\n").unwrap();
        update_sums(
            &sums,
            &[("mine.img".into(), "cc".into()), ("new.qcow2".into(), "dd".into())],
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(&sums).unwrap(),
            "cc  mine.img\ndd  new.qcow2\naa  old.img\n"
        );
    }
}

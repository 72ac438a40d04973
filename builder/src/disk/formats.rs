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
#[derive(Debug, Serialize, serde::Deserialize)]
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

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Output {
    pub file: String,
    pub format: DiskFormat,
    pub sha256: String,
}

/// The record beside the raw disk `raw`.
pub fn record_path(raw: &Path) -> PathBuf {
    raw.with_file_name(format!("{}.toml", stem_of(raw)))
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
/// OUT), the record and the sums; returns the paths written. All or nothing for the disk
/// files: every format is made in a temporary file first, and only when all are made do
/// they replace what an earlier build left; then the record, then the sums.
pub fn write(raw: NamedTempFile, args: &DiskArgs, mut record: Record) -> Result<Vec<PathBuf>> {
    let mut formats = args.formats.clone();
    formats.sort();
    formats.dedup();
    let dir = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let _lock = DirLock::take(dir)?;
    let mut made: Vec<(NamedTempFile, PathBuf, DiskFormat)> = Vec::new();
    for &format in formats.iter().filter(|f| **f != DiskFormat::Raw) {
        let out = path_of(&args.out, format);
        let tmp = convert(raw.path(), format, dir).with_context(|| format!("cannot write {}", out.display()))?;
        made.push((tmp, out, format));
    }
    if formats.contains(&DiskFormat::Raw) {
        readable(raw.as_file())?;
        made.insert(0, (raw, args.out.clone(), DiskFormat::Raw));
    }
    for (tmp, out, format) in &made {
        record.outputs.push(Output {
            file: file_name(out),
            format: *format,
            sha256: sha256_of(tmp.path())?,
        });
    }
    let mut written = Vec::new();
    for (tmp, out, _) in made {
        tmp.persist(&out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        written.push(out);
    }
    let record_path = record_path(&args.out);
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
    written.push(record_path);
    written.push(sums_path);
    Ok(written)
}

/// A format of `raw`, in a temporary file in `dir`.
fn convert(raw: &Path, format: DiskFormat, dir: &Path) -> Result<NamedTempFile> {
    let tmp = NamedTempFile::new_in(dir).with_context(|| format!("cannot write into {}", dir.display()))?;
    let options: &[&str] = match format {
        DiskFormat::Raw => unreachable!("raw is the disk itself"),
        DiskFormat::RawZst => {
            compress(raw, tmp.as_file())?;
            readable(tmp.as_file())?;
            return Ok(tmp);
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
    crate::cmd::run_from(&mut cmd, Some("qemu-utils"))?;
    readable(tmp.as_file())?;
    Ok(tmp)
}

/// An exclusive lock on the output directory while its disk files and SHA256SUMS change:
/// two builds writing into one directory must not drop each other's sums.
struct DirLock(#[allow(dead_code)] nix::fcntl::Flock<File>);

impl DirLock {
    fn take(dir: &Path) -> Result<Self> {
        let f = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("cannot lock {}", dir.display()))?;
        Ok(Self(lock))
    }
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
/// versions' disks in the same directory), sorted by name, in `sha256sum -c` format. Lines
/// of other tools' forms (`HASH *NAME`, BSD `SHA256 (NAME) = HASH`, escaped names) are
/// read; a line that is none of them is kept as it was, at the end.
fn update_sums(path: &Path, files: &[(String, String)]) -> Result<()> {
    let mut lines = BTreeMap::new();
    let mut foreign = Vec::new();
    match fs::read_to_string(path) {
        Ok(text) => {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                match parse_sum_line(line) {
                    Some((name, sum)) => {
                        lines.insert(name, sum);
                    }
                    None => foreign.push(line.to_string()),
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    for (name, sum) in files {
        lines.insert(name.clone(), sum.clone());
    }
    let mut text: String = lines.iter().map(|(name, sum)| sum_line(name, sum)).collect();
    for line in foreign {
        text.push_str(&line);
        text.push('\n');
    }
    write_atomically(path, text.as_bytes())
}

/// (name, lower-case hex digest) of one SHA256SUMS line in any form sha256sum reads.
fn parse_sum_line(line: &str) -> Option<(String, String)> {
    let is_digest = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let (escaped, line) = match line.strip_prefix('\\') {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let (name, sum) = if let Some(rest) = line.strip_prefix("SHA256 (") {
        let (name, sum) = rest.rsplit_once(") = ")?;
        (name, sum)
    } else {
        let (sum, rest) = line.split_at_checked(64)?;
        let name = rest.strip_prefix("  ").or_else(|| rest.strip_prefix(" *"))?;
        (name, sum)
    };
    if !is_digest(sum) || name.is_empty() {
        return None;
    }
    let name = if escaped { unescape(name)? } else { name.to_string() };
    Some((name, sum.to_ascii_lowercase()))
}

/// GNU coreutils' form: a name with a backslash or newline is escaped and the line starts
/// with a backslash.
fn sum_line(name: &str, sum: &str) -> String {
    if name.contains(['\\', '\n', '\r']) {
        let escaped = name.replace('\\', "\\\\").replace('\n', "\\n").replace('\r', "\\r");
        format!("\\{sum}  {escaped}\n")
    } else {
        format!("{sum}  {name}\n")
    }
}

fn unescape(name: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = name.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next()? {
            '\\' => '\\',
            'n' => '\n',
            'r' => '\r',
            _ => return None,
        });
    }
    Some(out)
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
        let [a, b, c, d] = ["a", "b", "c", "d"].map(|x| x.repeat(64));
        let dir = tempfile::tempdir().unwrap();
        let sums = dir.path().join(SUMS);
        fs::write(&sums, format!("{a}  old.img\n{b}  mine.img\n")).unwrap();
        update_sums(
            &sums,
            &[("mine.img".into(), c.clone()), ("new.qcow2".into(), d.clone())],
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(&sums).unwrap(),
            format!("{c}  mine.img\n{d}  new.qcow2\n{a}  old.img\n")
        );
    }

    #[test]
    fn sums_read_every_form_sha256sum_reads() {
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        let c = "c".repeat(64);
        let dir = tempfile::tempdir().unwrap();
        let sums = dir.path().join(SUMS);
        fs::write(
            &sums,
            format!("{a} *bin.img\nSHA256 (bsd.img) = {b}\n\\{c}  new\\nline\nnot a sum line\n"),
        )
        .unwrap();
        update_sums(&sums, &[("mine".into(), a.clone())]).unwrap();
        let text = fs::read_to_string(&sums).unwrap();
        assert_eq!(
            text,
            format!(
                "{a}  bin.img\n{}  bsd.img\n{a}  mine\n\\{c}  new\\nline\nnot a sum line\n",
                "b".repeat(64)
            )
        );
        assert_eq!(parse_sum_line(&format!("\\{c}  new\\nline")).unwrap().0, "new\nline");
        assert!(parse_sum_line("short  name").is_none());
        assert!(parse_sum_line(&format!("{a}name")).is_none());
    }
}

//! The medium's files: the disk (zstd) and the documents that tie it to the signed release.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use atom_dist::digest::Digest;
use atom_dist::install::{self as medium, Anchor, Description, Documents};
use atom_dist::keys::{KeyId, PublicKey, TrustedKeys};
use atom_dist::manifest::Manifest;
use atom_dist::repo::Repository;
use atom_dist::signature::{self, Domain};

use crate::cli::InstallerArgs;

const ZSTD_LEVEL: i32 = 9;
const CHUNK: usize = 1 << 20;

/// The keys the installer trusts, as hosts of the repository hold them.
pub enum Trust {
    Single(Vec<PublicKey>),
    Roles(Vec<PublicKey>),
}

impl Trust {
    pub fn keys(&self) -> &[PublicKey] {
        match self {
            Trust::Single(k) | Trust::Roles(k) => k,
        }
    }

    fn anchor(&self) -> Anchor {
        match self {
            Trust::Single(k) => Anchor::Single(TrustedKeys::new(k.iter().cloned())),
            Trust::Roles(k) => Anchor::Roles(TrustedKeys::new(k.iter().cloned())),
        }
    }
}

pub struct Staged {
    pub description: Description,
    /// BLAKE3 of install.toml as written.
    pub description_digest: Digest,
    pub signed_by: KeyId,
    pub trust: Trust,
}

/// Writes the medium's files into `dir` and verifies them as the installer will.
pub fn stage(args: &InstallerArgs, dir: &Path, epoch: i64) -> Result<Staged> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let record_path = crate::disk::record_path(&args.disk);
    let record: crate::disk::Record = toml::from_str(&fs::read_to_string(&record_path).with_context(|| {
        format!(
            "cannot read {} (the record atom-build disk writes beside the disk)",
            record_path.display()
        )
    })?)
    .with_context(|| format!("{} is not a disk record", record_path.display()))?;
    let repo = Repository::open(&args.repo)?;
    let version: semver::Version = record.version.parse().context("the disk record's version")?;
    let Some((_, signed)) = repo.history(&args.channel)?.into_iter().find(|(v, _)| *v == version) else {
        bail!(
            "version {version} is not in the history of channel {} of {}: publish the disk's slot image first",
            args.channel,
            args.repo.display()
        );
    };
    let manifest = Manifest::parse(&signed.manifest).context("the release manifest")?;
    let keys = repo.keys()?;

    let key = crate::signing::load(&args.key, args.passphrase_file.as_deref())?;
    let trust = match (&keys, args.trust.is_empty()) {
        (Some(_), true) => bail!(
            "{} uses key roles: give its root public keys with --trust (the installer trusts them as hosts do)",
            args.repo.display()
        ),
        (Some(_), false) => Trust::Roles(load_keys(&args.trust)?),
        (None, true) => Trust::Single(vec![key.public_key()]),
        (None, false) => Trust::Single(load_keys(&args.trust)?),
    };

    let (root_a, root_a_len) = root_a(&args.disk)?;
    ensure!(
        manifest.image.size <= root_a_len,
        "the published image of {version} is {} bytes; the disk's root-a is {root_a_len}",
        manifest.image.size
    );
    let disk_path = dir.join(medium::DISK);
    let packed = pack(&args.disk, &disk_path, root_a, manifest.image.size)?;
    if packed.image != manifest.image.digest {
        bail!(
            "the disk's root-a holds {}, not the published image of {version} ({}): build the disk from that image",
            packed.image,
            manifest.image.digest
        );
    }
    let description = Description {
        format: medium::FORMAT,
        version: manifest.version.clone(),
        board: manifest.board.clone(),
        channel: manifest.channel.clone(),
        // SOURCE_DATE_EPOCH: the same inputs give the same medium.
        created: jiff::Timestamp::from_second(epoch).context("SOURCE_DATE_EPOCH")?,
        disk: medium::Disk {
            file: medium::DISK.into(),
            compressed_size: fs::metadata(&disk_path)?.len(),
            size: packed.size,
            digest: packed.disk,
            head_digest: packed.head,
        },
        image: medium::SlotImage {
            offset: root_a,
            size: manifest.image.size,
            digest: manifest.image.digest,
        },
        critical: Vec::new(),
    };
    let text = description.to_toml();
    let sig = signature::sign_with(Domain::Install, text.as_bytes(), &[key.as_ref()])?;
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        atom_dist::fsutil::write_atomic_bytes(&path, 0o644, bytes)
            .with_context(|| format!("cannot write {}", path.display()))
    };
    write(medium::DESCRIPTION, text.as_bytes())?;
    write(medium::DESCRIPTION_SIG, sig.as_bytes())?;
    write(medium::MANIFEST, &signed.manifest)?;
    write(medium::MANIFEST_SIG, &signed.signature)?;
    if let Some(k) = &keys {
        write(medium::KEYS, &k.manifest)?;
        write(medium::KEYS_SIG, &k.signature)?;
    }

    // What the installer will check, checked now: a wrong --trust or --key fails here,
    // not on the machine.
    let docs = Documents {
        description: text.as_bytes(),
        description_sig: sig.as_bytes(),
        manifest: &signed.manifest,
        manifest_sig: &signed.signature,
        keys: keys.as_ref().map(|k| (k.manifest.as_slice(), k.signature.as_slice())),
    };
    let verified = medium::verify(&docs, &trust.anchor())
        .context("the medium does not verify with the keys the installer will trust (--trust, --key)")?;
    Ok(Staged {
        description,
        description_digest: Digest::of(text.as_bytes()),
        signed_by: verified.signed_by,
        trust,
    })
}

fn load_keys(paths: &[std::path::PathBuf]) -> Result<Vec<PublicKey>> {
    paths
        .iter()
        .map(|p| PublicKey::load(p).with_context(|| format!("--trust {}", p.display())))
        .collect()
}

/// Byte offset and length of the disk's root-a.
fn root_a(disk: &Path) -> Result<(u64, u64)> {
    let mut f = File::open(disk).with_context(|| format!("cannot read {}", disk.display()))?;
    let gpt = gptman::GPT::read_from(&mut f, 512).with_context(|| format!("{} has no GPT", disk.display()))?;
    let (_, p) = gpt
        .iter()
        .find(|(_, p)| p.is_used() && p.partition_name.as_str() == "root-a")
        .with_context(|| format!("{} has no root-a partition", disk.display()))?;
    Ok((p.starting_lba * 512, (p.ending_lba + 1 - p.starting_lba) * 512))
}

/// Compresses the disk into `out`, hashing it whole and the slot image inside it.
fn pack(disk: &Path, out: &Path, image_offset: u64, image_len: u64) -> Result<medium::DiskDigests> {
    let mut src = File::open(disk).with_context(|| format!("cannot read {}", disk.display()))?;
    let size = src.seek(SeekFrom::End(0))?;
    src.seek(SeekFrom::Start(0))?;
    let file = File::create(out).with_context(|| format!("cannot write {}", out.display()))?;
    let mut enc = zstd::stream::Encoder::new(BufWriter::new(file), ZSTD_LEVEL)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    enc.multithread(threads)?;
    enc.include_checksum(true)?;
    enc.set_pledged_src_size(Some(size))?;
    let mut hasher = medium::DiskHasher::new(image_offset, image_len);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        enc.write_all(&buf[..n]).context("cannot compress the disk")?;
    }
    let w = enc.finish()?;
    w.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .context("cannot flush the compressed disk")?;
    Ok(hasher.finish())
}

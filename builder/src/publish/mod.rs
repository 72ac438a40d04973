//! `atom-build publish`: image → payload, deltas and a signed manifest in a channel.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use atom_dist::digest::HashingWriter;
use atom_dist::manifest::{self, Delta, DeltaFormat, Image, Manifest, Payload, Rollout};
use atom_dist::release::{RELEASE_PATH, Release};
use atom_dist::repo::{SignedManifest, layout};
use atom_dist::roles::{KeysDoc, Role};
use atom_dist::signature::{Domain, Signer};
use atom_dist::verify::{Policy, verify_manifest};
use atom_dist::{Digest, PublicKey, Repository, TrustedKeys, delta, fsutil, signature};
use jiff::Timestamp;
use memmap2::Mmap;
use semver::Version;

use crate::cli::{PublishArgs, Signing};
use crate::ext4;

mod progress;
use progress::{Metered, Step};

/// Files this run created; removed again unless the publish completes, so a failed
/// publish leaves the repository as it was.
struct NewFiles(Vec<PathBuf>);

impl NewFiles {
    /// Hands the files over (to another list that will remove them if the publish fails).
    fn take(mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for NewFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

fn map(path: &Path) -> Result<Mmap> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: images are private files of this process or read-only repository content;
    // nothing truncates them while the map is alive.
    unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))
}

/// Writes a content-addressed file with `fill`, returning (digest, size) of what was written.
fn write_object(
    path: &Path,
    new_files: &mut NewFiles,
    fill: impl FnOnce(&mut HashingWriter<BufWriter<&mut File>>) -> io::Result<()>,
) -> Result<(Digest, u64)> {
    let dir = path.parent().expect("object paths have a parent");
    fsutil::create_dir_synced(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let existed = path.exists();
    let mut result = None;
    fsutil::write_atomic(path, 0o644, |f| {
        let mut w = HashingWriter::new(BufWriter::new(f));
        fill(&mut w)?;
        let (mut buf, digest, len) = w.finish();
        buf.flush()?;
        result = Some((digest, len));
        Ok(())
    })
    .with_context(|| format!("cannot write {}", path.display()))?;
    if !existed {
        new_files.0.push(path.to_owned());
    }
    Ok(result.expect("fill ran"))
}

pub fn run(args: &PublishArgs) -> Result<()> {
    if args.signing.key.is_none() && !args.sign_later {
        bail!("--key is needed to sign (or --sign-later to leave the publication for `atom-build sign`)");
    }
    if args.sign_later && (args.signing.key.is_some() || args.signing.timestamp_key.is_some()) {
        bail!("--sign-later signs nothing: leave out --key and --timestamp-key");
    }
    if let Some(d) = args.rollout {
        // Before the expensive part: the manifest would refuse it at the end.
        Rollout::check_duration(d.as_secs()).context("--rollout")?;
    }
    for field in &args.critical {
        if !manifest::KNOWN_FIELDS.contains(&field.as_str()) {
            bail!(
                "--critical {field:?} is not a manifest field (fields: {})",
                manifest::KNOWN_FIELDS.join(", ")
            );
        }
    }
    let release =
        Release::parse(&ext4::read_file(&args.image, RELEASE_PATH).context("the image is not an Atom image")?)
            .with_context(|| format!("bad /{RELEASE_PATH} in {}", args.image.display()))?;
    let (image_digest, image_size) =
        Digest::of_file(&args.image).with_context(|| format!("cannot read {}", args.image.display()))?;

    let repo = Repository::open_or_create(&args.signing.repo)?;
    let keys = Publisher::load(&args.signing, &repo)?;
    let lock = repo.lock()?;
    crate::publish::clean_stale_temp_files(&repo, &lock)?;
    let trusted = &keys.trusted;
    let now = Timestamp::now().round(jiff::Unit::Second)?;
    let previous = current_manifest(&repo, &args.signing.channel, trusted)?;
    if let Some(prev) = &previous {
        check_clock(now, prev, args.signing.replace_future_manifest)?;
        if release.version <= prev.version {
            bail!(
                "version {} is not newer than {} on channel {:?}; versions must increase",
                release.version,
                prev.version,
                args.signing.channel
            );
        }
        if release.board != prev.board {
            bail!(
                "channel {:?} carries board {:?}, the image is for {:?}",
                args.signing.channel,
                prev.board,
                release.board
            );
        }
    }

    let mut new_files = NewFiles(Vec::new());
    let payload_rel = layout::payload(&image_digest);
    let bases = delta_bases(&repo, args, &release, &image_digest, trusted)?;
    // The payload's compression and each delta are independent: side by side they use
    // every core (zstd's own threads for the payload, one thread per delta).
    let (payload, deltas) = std::thread::scope(|scope| {
        let payload = scope.spawn(|| compress_payload(&repo, args, &payload_rel, image_size));
        let deltas = make_deltas(&repo, args, &image_digest, bases);
        let payload = payload.join().expect("the payload thread does not panic");
        (payload, deltas)
    });
    let (payload_files, payload_digest, payload_size) = payload?;
    new_files.0.extend(payload_files.take());
    let deltas = write_deltas(&repo, &image_digest, deltas?, &mut new_files)?;
    let expires_in = args.expires_in;
    let manifest = Manifest {
        format: manifest::FORMAT,
        channel: args.signing.channel.clone(),
        version: release.version.clone(),
        board: release.board.clone(),
        created: now,
        expires: now
            .checked_add(jiff::SignedDuration::try_from(expires_in)?)
            .context("--expires-in is too far in the future")?,
        min_agent: args.min_agent.clone(),
        critical: args.critical.clone(),
        image: Image {
            size: image_size,
            digest: image_digest,
        },
        payload: Payload {
            path: payload_rel,
            size: payload_size,
            digest: payload_digest,
        },
        rollout: args.rollout.map(|d| Rollout {
            start: args.rollout_start.unwrap_or(now),
            duration_secs: d.as_secs(),
        }),
        deltas,
    };
    if args.sign_later {
        let text = manifest.to_toml();
        Manifest::parse(text.as_bytes()).context("internal error: generated manifest does not parse")?;
        let pending = repo.write_pending(&manifest.channel, text.as_bytes())?;
        new_files.0.clear();
        println!(
            "wrote the unsigned publication of {} {} on channel {}: {}\n\
             sign it here:   atom-build sign --repo {} --channel {} --key KEY\n\
             or elsewhere:   atom-build sign --manifest manifest.toml --key KEY --output manifest.sig\n\
             then attach:    atom-build sign --repo {} --channel {} --signature manifest.sig",
            release.board,
            release.version,
            manifest.channel,
            pending.display(),
            repo.root().display(),
            manifest.channel,
            repo.root().display(),
            manifest.channel
        );
        return Ok(());
    }
    let key = keys.signer()?;
    // A key on a token or in an HSM can take a while (or wait for a touch).
    let step = Step::start("signing", 0);
    sign_and_commit(&repo, &manifest, key)?;
    step.finish(&format!("signed by {}", key.key_id()));
    new_files.0.clear();
    keys.vouch(&repo, &args.signing, &manifest)?;

    if let Some(r) = &manifest.rollout {
        println!(
            "rollout: hosts take {} from {} to {}",
            release.version,
            r.start,
            r.end()
        );
    }
    println!(
        "published {} {} on channel {} (signed by {}): payload {} bytes, {} delta(s){}",
        release.board,
        release.version,
        args.signing.channel,
        key.key_id(),
        payload_size,
        manifest.deltas.len(),
        manifest
            .deltas
            .iter()
            .map(|d| format!(" from {}: {} bytes", d.base_version, d.size))
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(())
}

/// What a killed publish left (it held the lock we now hold, so nothing writes these).
pub(crate) fn clean_stale_temp_files(repo: &Repository, lock: &atom_dist::repo::PublishLock) -> Result<()> {
    for (path, size) in repo.remove_stale_temp_files(lock)? {
        tracing::warn!(path = %path.display(), size, "removed a temporary file a killed publish left behind");
    }
    Ok(())
}

/// Who signs, and which keys the channel's current manifest may already be signed by.
pub(crate) struct Publisher {
    signer: Option<Box<dyn Signer>>,
    pub trusted: TrustedKeys,
    /// The repository's keys.toml (key roles), read as the publisher's own file.
    pub roles: Option<KeysDoc>,
}

impl Publisher {
    /// Loads the signing key first (asking for a passphrase or PIN before any long work).
    pub fn load(s: &Signing, repo: &Repository) -> Result<Self> {
        manifest::check_name("channel", &s.channel)?;
        let signer = match &s.key {
            Some(spec) => Some(crate::signing::load(spec, s.passphrase_file.as_deref())?),
            None => None,
        };
        let roles = repo_roles(repo)?;
        let mut trusted: Vec<PublicKey> = signer.iter().map(|k| k.public_key()).collect();
        for p in &s.trust {
            trusted.push(PublicKey::load(p)?);
        }
        if let Some(doc) = &roles {
            trusted.extend(doc.release.iter().filter_map(|k| k.public_key().ok()));
            if let Some(k) = &signer {
                check_role(doc, Role::Release, &k.key_id())?;
            }
        }
        Ok(Publisher {
            signer,
            trusted: TrustedKeys::new(trusted),
            roles,
        })
    }

    pub fn signer(&self) -> Result<&dyn Signer> {
        self.signer.as_deref().context("--key is needed to sign")
    }

    /// With `--timestamp-key`, the new manifest becomes current for hosts with root keys too.
    pub fn vouch(&self, repo: &Repository, s: &Signing, m: &Manifest) -> Result<()> {
        let Some(spec) = &s.timestamp_key else {
            if self.roles.is_some() {
                println!(
                    "key roles: hosts with root keys take it after `atom-build refresh --repo {} --channel {}`",
                    repo.root().display(),
                    m.channel
                );
            }
            return Ok(());
        };
        let doc = self
            .roles
            .as_ref()
            .context("--timestamp-key: the repository has no keys.toml (see `atom-build keys`)")?;
        let key = crate::signing::load(spec, s.passphrase_file.as_deref())?;
        crate::refresh::stamp(repo, doc, &m.channel, key.as_ref(), s.timestamp_expires_in)?;
        Ok(())
    }
}

/// The repository's keys.toml, if it uses key roles.
pub(crate) fn repo_roles(repo: &Repository) -> Result<Option<KeysDoc>> {
    match repo.keys()? {
        None => Ok(None),
        Some(signed) => {
            Ok(Some(KeysDoc::parse(&signed.manifest).with_context(|| {
                format!("{}/keys/keys.toml", repo.root().display())
            })?))
        }
    }
}

/// A key that signs for `role` must be listed for it, or hosts with root keys refuse.
pub(crate) fn check_role(doc: &KeysDoc, role: Role, id: &atom_dist::KeyId) -> Result<()> {
    let listed = doc.keys(role);
    match listed.iter().find(|k| &k.key_id == id) {
        Some(k) if k.expires <= Timestamp::now() => bail!(
            "key {id} is a {role} key of this repository's keys.toml, but it expired at {}; sign with a current \
             one (the root key holder lists new keys with `atom-build keys`)",
            k.expires
        ),
        Some(_) => Ok(()),
        None => bail!(
            "key {id} is not a {role} key in this repository's keys.toml ({:?}): hosts with root keys would \
             refuse what it signs",
            listed.iter().map(|k| k.key_id.to_string()).collect::<Vec<_>>()
        ),
    }
}

/// Hosts refuse a manifest created before one they accepted (a replay), so a new one must
/// not be dated before the channel's current one, unless the operator says that one is
/// from the future (`--replace-future-manifest`): hosts refused it and never recorded it.
pub(crate) fn check_clock(now: Timestamp, current: &Manifest, replace_future: bool) -> Result<()> {
    if now >= current.created {
        return Ok(());
    }
    if replace_future {
        tracing::warn!(
            created = %current.created,
            "the channel's current manifest is dated after this clock; replacing it as asked"
        );
        return Ok(());
    }
    bail!(
        "this machine's clock ({now}) is behind the channel's current manifest (created {}): if this clock \
         is wrong, fix it (hosts would refuse the new manifest as a replay); if it is right, that manifest is \
         from the future, hosts refused it, and --replace-future-manifest signs over it",
        current.created
    );
}

/// Signs `manifest` and makes it the channel's current one (the last, atomic step).
pub(crate) fn sign_and_commit(repo: &Repository, manifest: &Manifest, key: &dyn Signer) -> Result<()> {
    let text = manifest.to_toml();
    // Parse our own output back: the publisher never signs what a client would reject.
    Manifest::parse(text.as_bytes()).context("internal error: generated manifest does not parse")?;
    let signed = SignedManifest {
        signature: signature::sign_with(Domain::Manifest, text.as_bytes(), &[key])?.into_bytes(),
        manifest: text.into_bytes(),
    };
    repo.commit_manifest(&manifest.channel, &manifest.version, &signed)?;
    Ok(())
}

/// The channel's current manifest, checked with the publisher's keys. Expiry is not held
/// against it: re-publishing is how an expired channel is revived.
pub(crate) fn current_manifest(repo: &Repository, channel: &str, trusted: &TrustedKeys) -> Result<Option<Manifest>> {
    let Some(current) = repo.current(channel)? else {
        return Ok(None);
    };
    let policy = Policy {
        trusted,
        now: Timestamp::MIN,
        board: None,
        channel: Some(channel),
        agent: None,
    };
    match verify_manifest(&current.manifest, &current.signature, &policy) {
        Ok(v) => Ok(Some(v.manifest)),
        Err(e) => {
            let signers = signature::signers(&current.signature).unwrap_or_default();
            bail!(
                "channel {channel:?} in {} is not signed by this key ({e}); it is signed by {:?}. \
                 Use the repository's key, or --trust OLD.pub to rotate keys",
                repo.root().display(),
                signers.iter().map(|k| k.to_string()).collect::<Vec<_>>()
            )
        }
    }
}

/// The payload's zstd window (2^24 = 16 MiB), below what hosts accept
/// ([`delta::MAX_WINDOW_LOG`]).
const PAYLOAD_WINDOW_LOG: u32 = 24;

/// Writes the full payload; returns the file it created (if new), its digest and size.
fn compress_payload(
    repo: &Repository,
    args: &PublishArgs,
    payload_rel: &str,
    image_size: u64,
) -> Result<(NewFiles, Digest, u64)> {
    tracing::info!(path = %payload_rel, "writing full payload");
    let image_file = File::open(&args.image)?;
    let mut new_files = NewFiles(Vec::new());
    let mut step = Step::start("compressing the payload", image_size);
    let (digest, size) = write_object(&repo.path(payload_rel), &mut new_files, |w| {
        let mut enc = zstd::stream::write::Encoder::new(w, args.payload_level)?;
        enc.include_checksum(true)?;
        enc.long_distance_matching(true)?;
        // LDM would otherwise pick a 128 MiB window, and every host decoding the payload
        // holds one window: 16 MiB keeps the agent within its 32 MiB budget, for a
        // payload 0.3% larger than with 32 MiB (1 GiB Debian image, level 12).
        enc.window_log(PAYLOAD_WINDOW_LOG)?;
        enc.multithread(std::thread::available_parallelism().map_or(1, |n| n.get() as u32))?;
        io::copy(
            &mut Metered {
                inner: &image_file,
                step: &mut step,
            },
            &mut enc,
        )?;
        enc.finish()?;
        Ok(())
    })?;
    step.finish(&format!("payload: {size} bytes"));
    Ok((new_files, digest, size))
}

/// A published version a delta starts from.
struct Base {
    version: Version,
    digest: Digest,
    size: u64,
}

/// The last `--deltas` distinct images of the channel whose manifests still verify.
fn delta_bases(
    repo: &Repository,
    args: &PublishArgs,
    release: &Release,
    image_digest: &Digest,
    trusted: &TrustedKeys,
) -> Result<Vec<Base>> {
    let mut bases: Vec<Base> = Vec::new();
    for (version, signed) in repo.history(&args.signing.channel)?.into_iter().rev() {
        if bases.len() >= args.deltas {
            break;
        }
        let policy = Policy {
            trusted,
            now: Timestamp::MIN,
            board: Some(&release.board),
            channel: Some(&args.signing.channel),
            agent: None,
        };
        match verify_manifest(&signed.manifest, &signed.signature, &policy) {
            Ok(v)
                if v.manifest.image.digest != *image_digest
                    && !bases.iter().any(|b| b.digest == v.manifest.image.digest) =>
            {
                bases.push(Base {
                    version,
                    digest: v.manifest.image.digest,
                    size: v.manifest.image.size,
                });
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(%version, error = %e, "skipping history entry as a delta base"),
        }
    }
    Ok(bases)
}

/// A delta made, not yet written to the repository.
struct MadeDelta {
    base: Base,
    format: DeltaFormat,
    encoded: Vec<u8>,
}

/// Makes the delta from each base, one thread per base.
fn make_deltas(
    repo: &Repository,
    args: &PublishArgs,
    image_digest: &Digest,
    bases: Vec<Base>,
) -> Result<Vec<MadeDelta>> {
    if bases.is_empty() {
        return Ok(Vec::new());
    }
    let target = map(&args.image)?;
    let encoding = args.delta_format.encoding();
    std::thread::scope(|scope| {
        let threads: Vec<_> = bases
            .into_iter()
            .map(|base| {
                let target = &target;
                scope.spawn(move || delta_from(repo, args.zstd_level, encoding, image_digest, base, target))
            })
            .collect();
        let mut out = Vec::new();
        for t in threads {
            if let Some(d) = t.join().expect("delta threads do not panic")? {
                out.push(d);
            }
        }
        Ok(out)
    })
}

/// The delta from `base` to the mapped target image, or None when the base's payload is
/// missing or damaged (the publish goes on without that delta).
fn delta_from(
    repo: &Repository,
    zstd_level: i32,
    encoding: delta::Encoding,
    image_digest: &Digest,
    base: Base,
    target: &Mmap,
) -> Result<Option<MadeDelta>> {
    let version = &base.version;
    let payload = repo.path(&layout::payload(&base.digest));
    let Ok(compressed) = File::open(&payload) else {
        tracing::warn!(%version, path = %payload.display(), "base payload missing; no delta from it");
        return Ok(None);
    };
    let scratch = tempfile::Builder::new()
        .prefix(atom_dist::fsutil::SCRATCH_PREFIX)
        .tempfile_in(repo.root())?;
    let mut file = scratch.reopen()?;
    let mut hashing = HashingWriter::new(BufWriter::new(&mut file));
    let mut step = Step::start(format!("decompressing base {version}"), base.size);
    let mut dec = zstd::stream::read::Decoder::new(compressed)?;
    dec.window_log_max(31)?;
    io::copy(
        &mut Metered {
            inner: dec,
            step: &mut step,
        },
        &mut hashing,
    )
    .with_context(|| format!("cannot decompress {}", payload.display()))?;
    step.finish("base decompressed");
    let (mut w, digest, _) = hashing.finish();
    w.flush()?;
    drop(w);
    if digest != base.digest {
        tracing::warn!(%version, "base payload does not match its manifest; no delta from it");
        return Ok(None);
    }
    let base_map = map(scratch.path())?;
    tracing::info!(base = %version, to = %image_digest, "computing delta");
    let step = Step::start(format!("delta from {version}"), 0);
    // Each image is walked once in chunks whose pages are dropped behind the walk: the
    // publish's memory stays bounded by what the encoding keeps, not the images' size.
    let started = std::time::Instant::now();
    let sig = delta::signature_in_chunks(&base_map, &mut |c| release_pages(&base_map, c));
    let signed = started.elapsed();
    let raw = delta::make_raw_in_chunks(&sig, target, &mut |c| release_pages(target, c))?;
    let diffed = started.elapsed();
    let (format, encoded) = delta::encode_raw(&base_map, &sig, &raw, zstd_level, encoding)?;
    let raw_len = raw.len();
    drop(raw);
    let encoded_at = started.elapsed();
    // Every host on this base gets it: a delta that does not rebuild the image must not
    // be published (the chunked diff and the prefix are this publisher's own work).
    delta::check_rebuilds(
        format,
        &base_map,
        &encoded,
        target.len() as u64,
        image_digest,
        Some(repo.root()),
        &mut || release_pages(&base_map, &base_map),
    )
    .with_context(|| format!("the delta from {version}"))?;
    step.finish(&format!(
        "delta from {version}: {} bytes ({}, {raw_len} bytes raw; signature {:.1} s, diff {:.1} s, \
         encoding {:.1} s, rebuild check {:.1} s)",
        encoded.len(),
        format.name(),
        signed.as_secs_f64(),
        (diffed - signed).as_secs_f64(),
        (encoded_at - diffed).as_secs_f64(),
        (started.elapsed() - encoded_at).as_secs_f64(),
    ));
    Ok(Some(MadeDelta { base, format, encoded }))
}

/// Drops `chunk`'s pages from this process's memory (they stay in the page cache).
fn release_pages(map: &Mmap, chunk: &[u8]) {
    let offset = chunk.as_ptr() as usize - map.as_ptr() as usize;
    // SAFETY: a read-only map of a file: dropped pages read back from the file.
    if let Err(e) = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, chunk.len()) } {
        tracing::debug!(error = %e, "madvise(DONTNEED) failed; pages stay resident");
    }
}

fn write_deltas(
    repo: &Repository,
    image_digest: &Digest,
    made: Vec<MadeDelta>,
    new_files: &mut NewFiles,
) -> Result<Vec<Delta>> {
    let mut out = Vec::new();
    for MadeDelta { base, format, encoded } in made {
        let rel = layout::delta(&base.digest, image_digest);
        let (digest, size) = write_object(&repo.path(&rel), new_files, |w| w.write_all(&encoded))?;
        out.push(Delta {
            base_version: base.version,
            base_size: base.size,
            base_digest: base.digest,
            format,
            path: rel,
            size,
            digest,
        });
    }
    Ok(out)
}

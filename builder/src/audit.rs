//! `atom-build verify` and `atom-build history`: read-only checks of a repository.

use std::fs::File;
use std::io::{self, Read};

use anyhow::Result;
use atom_dist::localfile;
use atom_dist::repo::RepoError;
use atom_dist::verify::{Policy, verify_manifest};
use atom_dist::{Digest, Manifest, PublicKey, Repository, TrustedKeys};
use jiff::Timestamp;

use crate::cli::{HistoryArgs, VerifyArgs};

fn load_keys(paths: &[std::path::PathBuf]) -> Result<TrustedKeys> {
    let mut keys = Vec::new();
    for p in paths {
        if p.is_dir() {
            let dir = TrustedKeys::load_dir(p)?;
            keys.extend(dir.ids().filter_map(|id| dir.get(id)).cloned());
        } else {
            keys.push(PublicKey::load(p)?);
        }
    }
    Ok(TrustedKeys::new(keys))
}

/// Returns the number of problems found (each already printed).
pub fn run_verify(args: &VerifyArgs) -> Result<usize> {
    let mut trusted = load_keys(&args.keys)?;
    let repo = Repository::open(&args.repo)?;
    let channels = match &args.channel {
        Some(c) => vec![c.clone()],
        None => repo.channels()?,
    };
    let now = Timestamp::now();
    let mut problems = Vec::new();
    let roots = if args.roots.is_empty() {
        None
    } else {
        let roots = load_keys(&args.roots)?;
        // History was signed by release keys that may have expired since: all listed ones.
        if let Some(doc) = audit_keys(&repo, &roots, now, &mut problems)? {
            let mut all: Vec<PublicKey> = trusted.ids().filter_map(|id| trusted.get(id)).cloned().collect();
            all.extend(doc.release.iter().filter_map(|k| k.public_key().ok()));
            trusted = TrustedKeys::new(all);
        }
        Some(roots)
    };
    for channel in &channels {
        audit_channel(&repo, channel, &trusted, now, args.quick, &mut problems)?;
        if let Some(roots) = &roots {
            audit_chain(&repo, channel, roots, now, &mut problems)?;
        }
    }
    for p in &problems {
        println!("PROBLEM {p}");
    }
    let at_least = jiff::SignedDuration::try_from(args.warn_within)?;
    for e in atom_dist::expiry::of_repository(&repo)? {
        if args
            .channel
            .as_ref()
            .is_some_and(|c| e.channel.as_ref().is_some_and(|ec| ec != c))
        {
            continue;
        }
        // An expired manifest is a PROBLEM above; expired role documents are checked as
        // problems only with --root, so say it here too.
        if e.expires <= now && e.document != "manifest" {
            println!(
                "WARN {} expired at {}: hosts with root keys refuse the repository{}",
                e.describe(),
                e.expires,
                if e.document == "timestamp" {
                    " (run atom-build refresh; is its timer running?)"
                } else {
                    ""
                }
            );
        } else if e.expires > now && e.due(now, at_least) {
            println!(
                "WARN {} expires at {} (in {}); {}",
                e.describe(),
                e.expires,
                humantime::format_duration(std::time::Duration::from_secs(
                    e.expires.duration_since(now).as_secs().max(0) as u64
                )),
                match e.document {
                    "manifest" => "re-sign it (atom-build resign) or publish",
                    "timestamp" => "run atom-build refresh (is its timer running?)",
                    _ => "the root key holder must sign a new keys.toml (atom-build keys)",
                }
            );
        }
    }
    report_stale_temp_files(&repo)?;
    if problems.is_empty() {
        println!(
            "OK: {} channel(s) in {} verified: {}",
            channels.len(),
            args.repo.display(),
            channels.join(", ")
        );
    }
    Ok(problems.len())
}

/// keys.toml against the root keys, as a host checks it.
fn audit_keys(
    repo: &Repository,
    roots: &TrustedKeys,
    now: Timestamp,
    problems: &mut Vec<String>,
) -> Result<Option<atom_dist::roles::KeysDoc>> {
    let Some(signed) = repo.keys()? else {
        problems.push("keys/keys.toml is missing: hosts with root keys refuse every channel".into());
        return Ok(None);
    };
    match atom_dist::roles::verify_keys(&signed.manifest, &signed.signature, roots, now, None) {
        Ok(v) => {
            println!(
                "keys.toml version {} signed by root key {}: release {:?}, freshness {:?}",
                v.doc.version,
                v.signed_by,
                v.doc.release.iter().map(|k| k.key_id.to_string()).collect::<Vec<_>>(),
                v.doc.freshness.iter().map(|k| k.key_id.to_string()).collect::<Vec<_>>()
            );
            Ok(Some(v.doc))
        }
        Err(e) => {
            problems.push(format!("keys/keys.toml: {e}"));
            Ok(None)
        }
    }
}

/// The whole chain a host with root keys checks: keys.toml → timestamp → manifest.
fn audit_chain(
    repo: &Repository,
    channel: &str,
    roots: &TrustedKeys,
    now: Timestamp,
    problems: &mut Vec<String>,
) -> Result<()> {
    let (Some(keys), Some(ts)) = (repo.keys()?, repo.timestamp(channel)?) else {
        problems.push(format!(
            "channel {channel}: no timestamp.toml (run atom-build refresh): hosts with root keys refuse the channel"
        ));
        return Ok(());
    };
    let named = match atom_dist::timestamp::TimestampDoc::parse(&ts.manifest) {
        Ok(t) => t.manifest,
        Err(e) => {
            problems.push(format!("channel {channel}: timestamp.toml: {e}"));
            return Ok(());
        }
    };
    let Some(manifest) = repo.manifest_by_digest(channel, &named)? else {
        problems.push(format!(
            "channel {channel}: the manifest the timestamp names ({named}) is missing"
        ));
        return Ok(());
    };
    let docs = atom_dist::verify::RoleDocs {
        keys: &keys.manifest,
        keys_sig: &keys.signature,
        timestamp: &ts.manifest,
        timestamp_sig: &ts.signature,
        manifest: &manifest.manifest,
        manifest_sig: &manifest.signature,
    };
    let policy = Policy {
        trusted: roots,
        now,
        board: None,
        channel: Some(channel),
        agent: None,
    };
    match atom_dist::verify::verify_chain(&docs, &policy, Default::default()) {
        Ok(c) => {
            if let Some(current) = repo.current(channel)?
                && current.manifest != manifest.manifest
            {
                println!(
                    "NOTE channel {channel}: manifest.toml differs from the manifest the timestamp names ({}): \
                     hosts with root keys keep that one until the next atom-build refresh",
                    c.verified.manifest.version
                );
            }
        }
        Err(e) => problems.push(format!("channel {channel}: key roles: {e}")),
    }
    Ok(())
}

/// Leftovers of a killed publish: harmless to clients (hidden, never named by a manifest),
/// but they take space; the next publish or resign removes them. Not a problem for the exit
/// code, and not reported while a publish runs (its temporary files are live).
fn report_stale_temp_files(repo: &Repository) -> Result<()> {
    let Some(_lock) = repo.try_lock()? else {
        println!("NOTE a publish is running; its temporary files are not reported");
        return Ok(());
    };
    for (path, size) in repo.stale_temp_files()? {
        println!(
            "STALE {} ({size} bytes): left by a publish that was killed; the next publish or resign removes it",
            path.display()
        );
    }
    Ok(())
}

fn audit_channel(
    repo: &Repository,
    channel: &str,
    trusted: &TrustedKeys,
    now: Timestamp,
    quick: bool,
    problems: &mut Vec<String>,
) -> Result<()> {
    let current = match repo.current(channel) {
        Ok(Some(c)) => c,
        Ok(None) => {
            problems.push(format!(
                "channel {channel}: {}",
                RepoError::NoSuchChannel(channel.into())
            ));
            return Ok(());
        }
        Err(e) => {
            problems.push(format!("channel {channel}: {e}"));
            return Ok(());
        }
    };
    let policy = Policy {
        trusted,
        now,
        board: None,
        channel: Some(channel),
        agent: None,
    };
    let manifest = match verify_manifest(&current.manifest, &current.signature, &policy) {
        Ok(v) => v.manifest,
        Err(e) => {
            problems.push(format!("channel {channel}: manifest.toml: {e}"));
            return Ok(());
        }
    };
    let mut checked = std::collections::BTreeSet::new();
    check_files(repo, channel, &manifest, quick, &mut checked, problems);

    // History: every manifest must still verify (expiry is expected there), and the files
    // it names are still served (clients on old versions use them as delta bases).
    let history_policy = Policy {
        now: atom_dist::verify::AUDIT_HISTORY,
        ..policy
    };
    let history = repo.history(channel)?;
    if !history.iter().any(|(v, _)| v == &manifest.version) {
        problems.push(format!(
            "channel {channel}: current version {} is missing from history/",
            manifest.version
        ));
    }
    for (version, signed) in history {
        match verify_manifest(&signed.manifest, &signed.signature, &history_policy) {
            Ok(v) => check_files(repo, channel, &v.manifest, quick, &mut checked, problems),
            Err(e) => problems.push(format!("channel {channel}: history/{version}.toml: {e}")),
        }
    }
    Ok(())
}

/// Size before a byte is read, then the digest: a hostile tree (FIFO, link to /dev/zero,
/// 64 GiB sparse file, symlink out) costs nothing but an error.
fn check_file(repo: &Repository, rel: &str, size: u64, digest: &Digest) -> Result<File, String> {
    localfile::check(repo.root(), rel, size, digest)
        .map(|f| f.file)
        .map_err(|e| e.to_string())
}

/// Checks each file a manifest names, once per run (`checked` holds the paths done).
fn check_files(
    repo: &Repository,
    channel: &str,
    m: &Manifest,
    quick: bool,
    checked: &mut std::collections::BTreeSet<String>,
    problems: &mut Vec<String>,
) {
    if !checked.insert(m.payload.path.clone()) {
        return;
    }
    let payload = match check_file(repo, &m.payload.path, m.payload.size, &m.payload.digest) {
        Ok(f) => Some(f),
        Err(e) => {
            problems.push(format!("channel {channel}: payload {e}"));
            None
        }
    };
    if let Some(payload) = payload
        && !quick
        && let Err(e) = check_payload_image(payload, m)
    {
        problems.push(format!("channel {channel}: payload {}: {e}", m.payload.path));
    }
    for d in m.deltas.iter().filter(|d| checked.insert(d.path.clone())) {
        if let Err(e) = check_file(repo, &d.path, d.size, &d.digest) {
            problems.push(format!("channel {channel}: delta from {}: {e}", d.base_version));
        }
    }
}

fn check_payload_image(payload: File, m: &Manifest) -> Result<(), String> {
    let mut dec = zstd::stream::read::Decoder::new(payload).map_err(|e| e.to_string())?;
    dec.window_log_max(atom_dist::delta::MAX_WINDOW_LOG)
        .map_err(|e| e.to_string())?;
    // One byte past the image is enough to tell a payload that decompresses too far.
    let (digest, len) = Digest::of_reader(io::BufReader::new(dec).take(m.image.size + 1))
        .map_err(|e| format!("does not decompress: {e}"))?;
    if len != m.image.size || digest != m.image.digest {
        return Err(format!(
            "decompresses to {len} bytes {digest}, manifest image is {} bytes {}",
            m.image.size, m.image.digest
        ));
    }
    Ok(())
}

pub fn run_history(args: &HistoryArgs) -> Result<()> {
    let repo = Repository::open(&args.repo)?;
    let history = repo.history(&args.channel)?;
    anyhow::ensure!(!history.is_empty(), RepoError::NoSuchChannel(args.channel.clone()));
    let current = repo.current(&args.channel)?.map(|c| c.manifest);
    println!(
        "{:<16} {:<26} {:<26} {:>14}  current",
        "VERSION", "CREATED", "EXPIRES", "IMAGE BYTES"
    );
    for (version, signed) in history {
        // Listing is informational; the signature is checked by `verify`.
        match Manifest::parse(&signed.manifest) {
            Ok(m) => println!(
                "{:<16} {:<26} {:<26} {:>14}  {}",
                version,
                m.created.to_string(),
                m.expires.to_string(),
                m.image.size,
                if current.as_deref() == Some(&signed.manifest[..]) {
                    "*"
                } else {
                    ""
                }
            ),
            Err(e) => println!("{version:<16} unreadable: {e}"),
        }
    }
    Ok(())
}

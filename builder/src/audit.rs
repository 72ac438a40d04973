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
    let trusted = load_keys(&args.keys)?;
    let repo = Repository::open(&args.repo)?;
    let channels = match &args.channel {
        Some(c) => vec![c.clone()],
        None => repo.channels()?,
    };
    let now = Timestamp::now();
    let mut problems = Vec::new();
    for channel in &channels {
        audit_channel(&repo, channel, &trusted, now, args.quick, &mut problems)?;
    }
    for p in &problems {
        println!("PROBLEM {p}");
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

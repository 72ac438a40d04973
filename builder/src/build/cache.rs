//! The stage cache. An entry holds one stage's result (the tree after it, or the files it
//! made) under a key that hashes the stage's name, its inputs and the previous stage's
//! key, so a key names everything the result depends on (osbuild's scheme): a changed
//! input anywhere before a stage changes its key. Entries are written under a temporary
//! name and renamed into place, so a crashed or parallel build never leaves half of one.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::tree;

/// Bumped when a stage's implementation changes what it builds from the same inputs.
const KEY_SCHEME: &str = "atom-build stage cache 1";

/// The named inputs of a stage: option digests, file digests, hook digests.
pub type Inputs = BTreeMap<String, String>;

/// The running atom-build's own digest: a changed builder (units, initramfs code, mke2fs
/// settings) must not reuse what an older one made.
fn builder_digest() -> &'static str {
    static DIGEST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIGEST.get_or_init(|| match fs::read("/proc/self/exe") {
        Ok(bytes) => blake3::hash(&bytes).to_hex().to_string(),
        Err(_) => env!("CARGO_PKG_VERSION").to_string(),
    })
}

pub fn key(stage: &str, inputs: &Inputs, previous: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(KEY_SCHEME.as_bytes());
    h.update(&[0]);
    h.update(builder_digest().as_bytes());
    h.update(&[0]);
    h.update(stage.as_bytes());
    h.update(&[0]);
    for (k, v) in inputs {
        h.update(k.as_bytes());
        h.update(&[0]);
        h.update(v.as_bytes());
        h.update(&[0]);
    }
    h.update(previous.as_bytes());
    h.finalize().to_hex().to_string()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryMeta {
    pub stage: String,
    /// `os.name` of the recipe that made it (for listing and explaining misses).
    pub recipe: String,
    pub key: String,
    pub previous: String,
    pub created: jiff::Timestamp,
    pub inputs: Inputs,
}

pub struct Cache {
    root: PathBuf,
}

pub struct Hit {
    pub dir: PathBuf,
    pub meta: EntryMeta,
}

impl Cache {
    pub fn open(root: &Path) -> Result<Cache> {
        for sub in ["entries", "tmp"] {
            fs::create_dir_all(root.join(sub))
                .with_context(|| format!("cannot create the cache {}", root.join(sub).display()))?;
        }
        Ok(Cache {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join("entries").join(key)
    }

    pub fn lookup(&self, key: &str) -> Option<Hit> {
        let dir = self.entry_dir(key);
        let text = fs::read_to_string(dir.join("entry.toml")).ok()?;
        let meta: EntryMeta = toml::from_str(&text).ok()?;
        if meta.key != key {
            return None;
        }
        // The entry's directory mtime says when it was last used, for `cache prune`.
        let _ = filetime::set_file_mtime(&dir, filetime::FileTime::now());
        Some(Hit { dir, meta })
    }

    /// Stores what `fill` puts into a fresh directory as the entry `meta.key`. Another
    /// build storing the same key first wins; both results are equal by construction.
    pub fn store(&self, meta: &EntryMeta, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{}.", meta.key))
            .tempdir_in(self.root.join("tmp"))
            .context("cannot create a cache entry")?;
        fill(tmp.path())?;
        fs::write(tmp.path().join("entry.toml"), toml::to_string(meta)?).context("cannot write a cache entry")?;
        let dir = self.entry_dir(&meta.key);
        let staged = tmp.keep();
        match fs::rename(&staged, &dir) {
            Ok(()) => Ok(dir),
            Err(_) if dir.join("entry.toml").is_file() => {
                tree::remove(&staged)?;
                Ok(dir)
            }
            Err(e) => {
                let _ = tree::remove(&staged);
                Err(e).with_context(|| format!("cannot store cache entry {}", dir.display()))
            }
        }
    }

    /// Removes an entry (a forced rerun replaces it).
    pub fn evict(&self, key: &str) -> Result<()> {
        let dir = self.entry_dir(key);
        if dir.exists() {
            let gone = self
                .root
                .join("tmp")
                .join(format!("{key}.evicted.{}", std::process::id()));
            fs::rename(&dir, &gone).with_context(|| format!("cannot evict {}", dir.display()))?;
            tree::remove(&gone)?;
        }
        Ok(())
    }

    pub fn entries(&self) -> Result<Vec<(EntryMeta, PathBuf, SystemTime)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.root.join("entries")).context("cannot list the cache")? {
            let dir = e?.path();
            let Ok(text) = fs::read_to_string(dir.join("entry.toml")) else {
                continue;
            };
            let Ok(meta) = toml::from_str::<EntryMeta>(&text) else {
                continue;
            };
            let used = fs::metadata(&dir)
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((meta, dir, used));
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.2));
        Ok(out)
    }

    /// Why `stage` of `recipe` misses: the inputs that differ from its most recently
    /// used entry, or that an earlier stage changed.
    pub fn explain_miss(&self, recipe: &str, stage: &str, inputs: &Inputs, previous: &str) -> String {
        let Ok(entries) = self.entries() else {
            return "no cache".into();
        };
        let Some((last, _, _)) = entries
            .into_iter()
            .find(|(m, _, _)| m.recipe == recipe && m.stage == stage)
        else {
            return "not built before".into();
        };
        let mut changed: Vec<String> = Vec::new();
        for (k, v) in inputs {
            if last.inputs.get(k) != Some(v) {
                changed.push(k.clone());
            }
        }
        for k in last.inputs.keys() {
            if !inputs.contains_key(k) {
                changed.push(format!("{k} (removed)"));
            }
        }
        if !changed.is_empty() {
            format!(
                "changed since the cached build of {}: {}",
                last.created,
                changed.join(", ")
            )
        } else if last.previous != previous {
            "an earlier stage changed".into()
        } else {
            "entry missing".into()
        }
    }

    /// Removes entries not used within `older_than` (all with `None`); also leftovers
    /// of crashed builds. Returns (entries removed, bytes freed).
    pub fn prune(&self, older_than: Option<Duration>) -> Result<(usize, u64)> {
        let now = SystemTime::now();
        let mut removed = 0;
        let mut bytes = 0;
        for (_, dir, used) in self.entries()? {
            let old = match older_than {
                None => true,
                Some(d) => now.duration_since(used).unwrap_or_default() > d,
            };
            if old {
                bytes += du(&dir);
                tree::remove(&dir)?;
                removed += 1;
            }
        }
        for e in fs::read_dir(self.root.join("tmp"))? {
            let p = e?.path();
            let stale = fs::metadata(&p)
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() > Duration::from_secs(24 * 3600))
                .unwrap_or(true);
            if stale || older_than.is_none() {
                bytes += du(&p);
                tree::remove(&p)?;
            }
        }
        Ok((removed, bytes))
    }
}

pub fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    walkdir::WalkDir::new(path)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// `atom-build cache list|prune`.
pub fn run(args: &crate::cli::CacheArgs) -> Result<()> {
    let cache = Cache::open(&args.cache)?;
    match &args.action {
        crate::cli::CacheAction::List => {
            let entries = cache.entries()?;
            if entries.is_empty() {
                println!("the cache {} is empty", cache.root().display());
            }
            for (m, dir, used) in entries {
                let used: jiff::Timestamp = used.try_into().unwrap_or(jiff::Timestamp::UNIX_EPOCH);
                println!(
                    "{}  {:<10} {:<16} {:>8} MiB  used {}",
                    &m.key[..16],
                    m.stage,
                    m.recipe,
                    du(&dir) >> 20,
                    used.round(jiff::Unit::Second).unwrap_or(used)
                );
            }
            Ok(())
        }
        crate::cli::CacheAction::Prune { older_than, all } => {
            if older_than.is_none() && !all {
                bail!("say what to prune: --older-than DURATION (e.g. 30days) or --all");
            }
            let (n, bytes) = cache.prune(if *all { None } else { *older_than })?;
            println!("removed {n} cache entries, {} MiB", bytes >> 20);
            Ok(())
        }
    }
}

//! `build.lock.toml`: what a build was made of (recipe digest, package versions, mirrors,
//! base image, hooks, stage keys, SOURCE_DATE_EPOCH). `--locked` rebuilds exactly that or
//! refuses, saying what is no longer the same.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const FILE_NAME: &str = "build.lock.toml";

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub arch: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    pub format: u32,
    pub name: String,
    pub version: semver::Version,
    pub board: String,
    pub recipe_digest: String,
    pub source_date_epoch: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
    /// Digest of a tarball or tree base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_source: Option<String>,
    /// The image the build was layout-stable against (repository image digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_image: Option<String>,
    /// Digest of every hook and script, by where the recipe names it.
    #[serde(default)]
    pub hooks: BTreeMap<String, String>,
    /// Digest of every file from the build host the build read (sources, agent, keys,
    /// kernel, bootsel…), by the input's name.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Each stage's cache key.
    #[serde(default)]
    pub stages: BTreeMap<String, String>,
    /// The image's digest (atom_dist's), when the build made one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", rename = "package")]
    pub packages: Vec<Package>,
}

impl Lock {
    pub fn read(path: &Path) -> Result<Lock> {
        let text = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let lock: Lock = toml::from_str(&text).with_context(|| format!("{} is not a build lock", path.display()))?;
        if lock.format != 1 {
            bail!(
                "{}: lock format {} is not known to this atom-build",
                path.display(),
                lock.format
            );
        }
        Ok(lock)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = format!(
            "# Written by atom-build build; rebuild exactly this with --locked {FILE_NAME}.\n{}",
            toml::to_string(self)?
        );
        atom_dist::fsutil::write_atomic_bytes(path, 0o644, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Refuses a locked build whose recipe or hooks are not the locked ones.
    pub fn check_inputs(
        &self,
        recipe_digest: &str,
        hooks: &BTreeMap<String, String>,
        files: &BTreeMap<String, String>,
        base_source: Option<&str>,
    ) -> Result<()> {
        if self.recipe_digest != recipe_digest {
            bail!(
                "--locked: the recipe is not the one locked (digest {} now, {} in the lock); a locked build \
                 builds exactly what was locked",
                &recipe_digest[..16],
                &self.recipe_digest[..16.min(self.recipe_digest.len())]
            );
        }
        for (k, v) in hooks {
            if self.hooks.get(k) != Some(v) {
                bail!("--locked: {k} is not the locked one (its contents changed)");
            }
        }
        if let Some(k) = self.hooks.keys().find(|k| !hooks.contains_key(*k)) {
            bail!("--locked: {k} was part of the locked build and is gone");
        }
        for (k, v) in files {
            if self.files.get(k).is_some_and(|locked| locked != v) {
                bail!("--locked: {k} is not the locked file (its contents or attributes changed)");
            }
        }
        if self.base_source.as_deref() != base_source {
            bail!("--locked: the base tree or tarball is not the locked one (its contents changed)");
        }
        Ok(())
    }
}

/// Packages installed in a Debian tree (name, version, architecture), sorted.
pub fn dpkg_packages(tree: &Path) -> Result<Vec<Package>> {
    let admin = tree.join("var/lib/dpkg");
    if !admin.join("status").is_file() {
        return Ok(Vec::new());
    }
    let out = crate::cmd::run(
        std::process::Command::new("dpkg-query")
            .arg(format!("--admindir={}", admin.display()))
            .args([
                "-W",
                "-f",
                "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n",
            ]),
    )
    .context("cannot list the tree's packages")?;
    let mut list: Vec<Package> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let status = f.next()?;
            if !status.starts_with("ii") {
                return None;
            }
            Some(Package {
                name: f.next()?.to_string(),
                version: f.next()?.to_string(),
                arch: f.next()?.to_string(),
            })
        })
        .collect();
    list.sort();
    Ok(list)
}

/// The SBOM-style package list published beside the image: name, version, architecture.
pub fn packages_tsv(list: &[Package]) -> String {
    let mut s = String::from("# package\tversion\tarchitecture\n");
    for p in list {
        s.push_str(&format!("{}\t{}\t{}\n", p.name, p.version, p.arch));
    }
    s
}

pub fn parse_tsv(text: &str) -> Vec<Package> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some(Package {
                name: f.next()?.to_string(),
                version: f.next()?.to_string(),
                arch: f.next()?.to_string(),
            })
        })
        .collect()
}

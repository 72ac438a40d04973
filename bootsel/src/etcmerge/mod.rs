//! The three-way merge of a host's `/etc` layer into a new image's `/etc`.
//!
//! Inputs: *base*, the `/etc` of the image the host ran; *local*, the host's overlay upper
//! layer over it (files it changed or added, whiteouts for files it deleted); *new*, the
//! `/etc` of the image about to boot. Output: a new upper layer for the new image, written
//! beside the old one and swapped in atomically ([`layer::replace`]), so a merge cut off
//! halfway leaves the old layer in place and the next boot merges again.
//!
//! For each entry of the local layer:
//! - the same as the new image's (type, mode, owner, xattrs, bytes): dropped from the layer,
//!   so it follows future updates (Flatcar's pruning);
//! - the image did not change it (base = new), or the host added it: kept;
//! - changed on both sides: the host's kept, the image's written beside it as
//!   `NAME.atom-new`, a conflict recorded; account files (`passwd`, `group`, `shadow`, …)
//!   are merged by entry name instead (new system users arrive, local ones stay);
//! - deleted by the host (whiteout): stays deleted, recorded if the image changed it;
//! - the policy of the new image ([`policy`]) may say a path always follows the image or is
//!   never merged.
//!
//! Entries the host never touched are not in the layer, so they follow the new image.

pub mod accounts;
pub mod copy;
pub mod entry;
pub mod layer;
pub mod policy;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use entry::{Kind, Meta, same};
use policy::{Policy, Rule};

/// Suffix of the image's version of a file both sides changed.
pub const NEW_SUFFIX: &str = ".atom-new";

/// Under the run directory (`/run`): the running image's own `/etc`, read-only, as it is
/// below the overlay (what `atom-update etc diff` compares with).
pub const IMAGE_ETC: &str = "atom/image-etc";
/// Under the run directory: the state partition's per-slot layers (`slots/<A|B>/…`).
pub const LAYERS: &str = "atom/state/etc";

/// Beside `merge.toml`: conflicts an operator marked as looked at (`atom-update etc
/// resolve`); a new merge starts a new list.
pub const RESOLVED: &str = "resolved.toml";

/// What the merge that made a slot's layer did: `slots/<slot>/merge.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MergeRecord {
    pub from_slot: String,
    pub report: Report,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Kept as the host has them (changed or added only by the host, or never merged).
    pub kept: Vec<String>,
    /// Dropped from the layer: identical to the new image's, or its policy says to follow it.
    pub follows_image: Vec<String>,
    /// Account files merged by entry name, with the names that arrived from the image.
    pub merged: Vec<(String, Vec<String>)>,
    pub conflicts: Vec<Conflict>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    /// Relative to /etc.
    pub path: String,
    pub what: String,
    /// Where the image's version was put, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_version: Option<String>,
}

struct Merge<'a> {
    base: &'a Path,
    local: &'a Path,
    new: &'a Path,
    out: &'a Path,
    policy: &'a Policy,
    report: Report,
}

/// Merges `local` (an upper layer over `base`) for `new` into `out`, which must not exist.
pub fn merge(base: &Path, local: &Path, new: &Path, out: &Path, policy: &Policy) -> io::Result<Report> {
    let mut m = Merge {
        base,
        local,
        new,
        out,
        policy,
        report: Report::default(),
    };
    copy::entry(local, out)?;
    m.dir("")?;
    Ok(m.report)
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

impl Merge<'_> {
    fn at(&self, root: &Path, rel: &str) -> PathBuf {
        if rel.is_empty() {
            root.to_owned()
        } else {
            root.join(rel)
        }
    }

    fn dir(&mut self, rel: &str) -> io::Result<()> {
        let mut names: Vec<_> = fs::read_dir(self.at(self.local, rel))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            let Some(name) = name.to_str() else {
                // Not UTF-8: copied as it is, never merged.
                let src = self.at(self.local, rel).join(&name);
                copy::tree(&src, &self.at(self.out, rel).join(&name))?;
                continue;
            };
            let child = join(rel, name);
            self.entry(&child)?;
        }
        Ok(())
    }

    fn keep(&mut self, rel: &str) -> io::Result<()> {
        copy::tree(&self.at(self.local, rel), &self.at(self.out, rel))?;
        self.report.kept.push(rel.to_owned());
        Ok(())
    }

    fn conflict(&mut self, rel: &str, what: &str, image_version: Option<String>) {
        self.report.conflicts.push(Conflict {
            path: rel.to_owned(),
            what: what.to_owned(),
            image_version,
        });
    }

    fn entry(&mut self, rel: &str) -> io::Result<()> {
        let (l, b, n) = (
            self.at(self.local, rel),
            self.at(self.base, rel),
            self.at(self.new, rel),
        );
        if let Some(name) = rel.strip_suffix(NEW_SUFFIX)
            && Meta::of(&n)?.is_none()
            && Meta::of(&self.at(self.local, name))?.is_some()
        {
            return self.earlier_conflict(rel, name);
        }
        match self.policy.rule(rel) {
            Rule::NeverMerge => return self.keep(rel),
            Rule::FollowImage => {
                self.report.follows_image.push(rel.to_owned());
                return Ok(());
            }
            Rule::Merge => {}
        }
        let local = Meta::of(&l)?.expect("listed by read_dir");
        let (base, new) = (Meta::of(&b)?, Meta::of(&n)?);
        let image_changed = !same(&b, &n)?;
        match local.kind {
            Kind::Whiteout => {
                if new.is_some() && image_changed {
                    self.conflict(rel, "deleted on this host, changed in the new image", None);
                }
                copy::whiteout(&self.at(self.out, rel), &local)?;
                self.report.kept.push(rel.to_owned());
                Ok(())
            }
            Kind::Dir if entry::is_opaque(&l) => {
                // Replaced as a whole on this host: the image's contents stay hidden.
                if !entry::same_tree(&b, &n)? {
                    self.conflict(rel, "replaced on this host, changed in the new image", None);
                }
                self.keep(rel)
            }
            Kind::Dir if new.as_ref().is_none_or(|m| m.kind == Kind::Dir) => {
                let out = self.at(self.out, rel);
                // Copied up unchanged: the image's new mode, owner and xattrs apply.
                if new.is_some() && same(&l, &b)? && image_changed {
                    copy::entry(&n, &out)?;
                } else {
                    copy::entry(&l, &out)?;
                }
                self.dir(rel)?;
                // A directory the overlay only copied up to hold changed children, now
                // empty and the same as the image's: nothing left to keep.
                let out = self.at(self.out, rel);
                if fs::read_dir(&out)?.next().is_none() && same(&l, &n)? {
                    fs::remove_dir(&out)?;
                }
                Ok(())
            }
            _ if same(&l, &n)? => {
                self.report.follows_image.push(rel.to_owned());
                Ok(())
            }
            // The image did not change it (or neither had it): the host's version stands.
            _ if !image_changed => self.keep(rel),
            // Copied up but never changed (a touch, a chmod back, an edit undone, a reset):
            // the image's change, such as a security fix, arrives.
            _ if local.kind != Kind::Dir && base.is_some() && same(&l, &b)? => {
                self.report.follows_image.push(rel.to_owned());
                Ok(())
            }
            Kind::File
                if accounts::FILES.contains(&rel)
                    && new.as_ref().is_some_and(|m| m.kind == Kind::File)
                    && base.as_ref().is_none_or(|m| m.kind == Kind::File) =>
            {
                self.accounts(rel, &l, &b, &n)
            }
            _ => {
                self.keep(rel)?;
                let Some(new) = new else {
                    self.conflict(rel, "changed on this host, removed from the new image", None);
                    return Ok(());
                };
                let what = if new.kind != local.kind {
                    "a different type on this host and in the new image"
                } else {
                    "changed on this host and in the new image"
                };
                let beside = format!("{rel}{NEW_SUFFIX}");
                if matches!(new.kind, Kind::File | Kind::Symlink(_)) && Meta::of(&self.at(self.out, &beside))?.is_none()
                {
                    copy::entry(&n, &self.at(self.out, &beside))?;
                    self.conflict(rel, what, Some(beside));
                } else {
                    self.conflict(rel, what, None);
                }
                Ok(())
            }
        }
    }

    /// `NAME.atom-new` beside a host file, from an earlier merge, whose image has no new
    /// version this time: the conflict is still open, so its copy and record stay.
    fn earlier_conflict(&mut self, rel: &str, name: &str) -> io::Result<()> {
        if Meta::of(&self.at(self.out, rel))?.is_some() {
            return Ok(());
        }
        copy::entry(&self.at(self.local, rel), &self.at(self.out, rel))?;
        self.conflict(name, "unresolved from an earlier update", Some(rel.to_owned()));
        Ok(())
    }

    fn accounts(&mut self, rel: &str, l: &Path, b: &Path, n: &Path) -> io::Result<()> {
        let read = |p: &Path| -> io::Result<Option<Vec<u8>>> {
            let len = match fs::symlink_metadata(p) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(Vec::new())),
                Err(e) => return Err(e),
            };
            if len > accounts::MAX_BYTES {
                return Ok(None);
            }
            fs::read(p).map(Some)
        };
        let (Some(base), Some(local), Some(new)) = (read(b)?, read(l)?, read(n)?) else {
            // Far beyond any real account file: not merged, the host's kept.
            self.keep(rel)?;
            let beside = format!("{rel}{NEW_SUFFIX}");
            copy::entry(n, &self.at(self.out, &beside))?;
            self.conflict(rel, "too large to merge by entry", Some(beside));
            return Ok(());
        };
        let merged = accounts::merge(&base, &local, &new, rel);
        let out = self.at(self.out, rel);
        copy::entry(l, &out)?;
        fs::write(&out, &merged.text)?;
        for (name, id) in &merged.collisions {
            self.conflict(
                rel,
                &format!("the image's new entry {name} has id {id}, which an entry of this host has: not added"),
                None,
            );
        }
        self.report.merged.push((rel.to_owned(), merged.added));
        Ok(())
    }
}

#[cfg(test)]
mod tests;

//! `/usr/lib/atom/etc.toml` in the image: which paths of `/etc` the merge treats specially.
//!
//! ```toml
//! follow_image = ["os-release", "atom"]   # always the image's: host changes are dropped
//! never_merge = ["ssh", "machine-id"]     # always the host's: kept as they are, never pruned
//! ```
//!
//! Paths are relative to `/etc`; a directory covers everything below it. Unknown keys are
//! errors (a typo would silently change what survives an update).

use serde::Deserialize;

pub const PATH: &str = "usr/lib/atom/etc.toml";
const MAX_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub follow_image: Vec<String>,
    #[serde(default)]
    pub never_merge: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    Merge,
    FollowImage,
    NeverMerge,
}

fn covers(prefix: &str, rel: &str) -> bool {
    let prefix = prefix.trim_matches('/');
    !prefix.is_empty() && (rel == prefix || rel.strip_prefix(prefix).is_some_and(|r| r.starts_with('/')))
}

impl Policy {
    pub fn parse(bytes: &[u8]) -> Result<Policy, String> {
        if bytes.len() > MAX_BYTES {
            return Err(format!("{PATH} is {} bytes; at most {MAX_BYTES}", bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| format!("{PATH} is not UTF-8"))?;
        let p: Policy = toml::from_str(text).map_err(|e| format!("{PATH}: {}", e.message()))?;
        for path in p.follow_image.iter().chain(&p.never_merge) {
            if path.split('/').any(|c| c == "..") || path.trim_matches('/').is_empty() {
                return Err(format!("{PATH}: {path:?} is not a path below /etc"));
            }
        }
        Ok(p)
    }

    /// The rule for `rel` (relative to /etc); `never_merge` wins over `follow_image`.
    pub fn rule(&self, rel: &str) -> Rule {
        if self.never_merge.iter().any(|p| covers(p, rel)) {
            Rule::NeverMerge
        } else if self.follow_image.iter().any(|p| covers(p, rel)) {
            Rule::FollowImage
        } else {
            Rule::Merge
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_cover_directories_not_names() {
        let p = Policy::parse(b"follow_image = [\"os-release\", \"atom/\"]\nnever_merge = [\"ssh\"]\n").unwrap();
        assert_eq!(p.rule("os-release"), Rule::FollowImage);
        assert_eq!(p.rule("os-release.d"), Rule::Merge);
        assert_eq!(p.rule("atom/update.toml"), Rule::FollowImage);
        assert_eq!(p.rule("ssh/sshd_config"), Rule::NeverMerge);
        assert_eq!(p.rule("sshd"), Rule::Merge);
        assert!(Policy::parse(b"follow = []").is_err());
        assert!(Policy::parse(b"never_merge = [\"../x\"]").is_err());
        assert!(Policy::parse(b"never_merge = [\"/\"]").is_err());
    }
}

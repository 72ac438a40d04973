//! Which keys this host trusts, and in which scheme.
//!
//! With root keys in `<keys_dir>/root/*.pub` the host uses key roles: the root key signs
//! `keys.toml`, which names the release keys (manifests) and freshness keys (timestamps),
//! and all three signatures are required. Without root keys, the `*.pub` files in
//! `keys_dir` sign manifests directly (the single-key scheme of repositories made before
//! key roles). A host with root keys never falls back to the single-key scheme: a mirror
//! cannot downgrade it by leaving `keys.toml` out.

use std::path::PathBuf;

use atom_dist::TrustedKeys;
use semver::Version;

use crate::config::Settings;
use crate::error::Failure;

/// This agent's version: the package's, or `ATOM_AGENT_VERSION` at build time (a
/// distribution's own version, or the test suite building an "older" agent from this tree).
pub const AGENT_VERSION: &str = match option_env!("ATOM_AGENT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

pub fn agent_version() -> Version {
    // A test covers that the constant parses; a bad ATOM_AGENT_VERSION fails it at build.
    AGENT_VERSION.parse().unwrap_or_else(|_| Version::new(0, 0, 0))
}

pub enum Trust {
    /// Keys that sign manifests directly.
    Single(TrustedKeys),
    /// Root keys: everything else comes from the root-signed `keys.toml`.
    Roles(TrustedKeys),
}

pub fn root_keys_dir(s: &Settings) -> PathBuf {
    s.keys_dir.join("root")
}

impl Trust {
    pub fn load(s: &Settings) -> Result<Trust, Failure> {
        crate::perms::check_keys_dir(&s.keys_dir)?;
        let root_dir = root_keys_dir(s);
        // The directory's presence decides: one emptied by mistake (a key renamed during a
        // root rotation) must not drop the host back to trusting a release key alone.
        if root_dir.exists() {
            crate::perms::check_keys_dir(&root_dir)?;
            let root = TrustedKeys::load_dir(&root_dir).map_err(|e| {
                Failure::refused(format!(
                    "{e}: a host with {} uses key roles and needs its root key(s) there; remove the \
                     directory only to go back to the single-key scheme",
                    root_dir.display()
                ))
            })?;
            return Ok(Trust::Roles(root));
        }
        let keys = TrustedKeys::load_dir(&s.keys_dir).map_err(|e| {
            Failure::error(format!(
                "{e}; install the publisher's key (a root key into {}, or a single signing key into {})",
                root_dir.display(),
                s.keys_dir.display()
            ))
        })?;
        Ok(Trust::Single(keys))
    }

    pub fn keys(&self) -> &TrustedKeys {
        match self {
            Trust::Single(k) | Trust::Roles(k) => k,
        }
    }

    pub fn scheme(&self) -> &'static str {
        match self {
            Trust::Single(_) => "single-key",
            Trust::Roles(_) => "key-roles",
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_agent_version_is_semver() {
        assert!(
            super::AGENT_VERSION.parse::<semver::Version>().is_ok(),
            "{}",
            super::AGENT_VERSION
        );
    }
}

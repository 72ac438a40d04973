//! Command line of `atom-update`, defined once with clap derive.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub const AFTER_HELP: &str = "\
EXIT STATUS:
    0  success (for `now`: updated, already staged, already up to date, waiting for its
       rollout turn, or the offered version was rejected on this host before;
       for `check`: an update is available)
    1  error (the message says what; the running slot still boots)
    2  bad command line
    3  `check`: no update available
    4  the written slot did not verify; nothing was made bootable
    5  another atom-update is running
    6  refused for security: bad signature, expired manifest, wrong board, downgrade,
       keys, CA file or state that someone other than root could change
    7  not allowed in the current state (e.g. rollback with no valid other slot, or `now`
       while this slot is on trial and the other holds the last version marked good)

FILES:
    /etc/atom/update.toml   configuration (--config)
    /etc/atom/keys/*.pub    trusted publisher keys
    tls_ca (update.toml)    the only CAs trusted for HTTPS mirrors, if set
    /run/atom/boot.toml     what bootsel chose at boot
    /var/lib/atom/          state, downloads, lock";

/// The Atom update agent.
///
/// Keeps this host on the newest signed image of its channel: writes the inactive slot
/// (cheapest route first: precomputed delta, rsync-style delta from atom-dist, full
/// payload), verifies it against the signed digest, then sets it to boot next on trial.
/// A failed boot falls back to the other slot by itself.
#[derive(Debug, Parser)]
#[command(name = "atom-update", version = crate::trust::AGENT_VERSION, after_help = AFTER_HELP)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check, write, verify and flip now, in one go.
    Now {
        /// Install a version older than the running one or than the rollback floor, the
        /// newest version marked good here (operator override).
        #[arg(long)]
        allow_downgrade: bool,
        /// Do not reboot even if the reboot policy says so.
        #[arg(long)]
        no_reboot: bool,
        /// Take a version that is being rolled out in phases now, not at this host's turn.
        #[arg(long)]
        skip_rollout: bool,
        /// Install the offered version even though it failed on this host before (a
        /// fallback from it, or mark-bad); `forget-rejected` clears the record for good.
        #[arg(long)]
        allow_rejected: bool,
        /// Write the other slot even while this slot is on trial (not yet marked good) and
        /// the other one holds the last version marked good: a failure of both then leaves
        /// nothing good to boot.
        #[arg(long)]
        force: bool,
        /// Use this repository for this run instead of the configured ones (repeat for
        /// several, tried in order), e.g. file:///media/usb/atom-repo on a host without
        /// network. What it offers is checked against this host's keys as always.
        #[arg(long = "repository", value_name = "URL|PATH", value_parser = crate::config::parse_repo)]
        repositories: Vec<crate::config::Repo>,
    },
    /// Is there an update, and how big is it by each route?
    Check {
        #[arg(long)]
        json: bool,
        /// Ask this repository instead of the configured ones (repeatable).
        #[arg(long = "repository", value_name = "URL|PATH", value_parser = crate::config::parse_repo)]
        repositories: Vec<crate::config::Repo>,
    },
    /// Slots, versions, boot flags, the booted slot, fallbacks and the last update result.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The running system passed its health checks: keep booting this slot, and raise
    /// the rollback floor to its version (older versions are refused from now on).
    MarkGood,
    /// The running system is broken: make the next boot fall back to the other slot.
    MarkBad {
        /// Even if the other slot is not bootable either.
        #[arg(long)]
        force: bool,
    },
    /// Make the other slot boot next (if it holds a bootable system).
    Rollback,
    /// Allow a version that failed on this host to be installed again (after a fixed
    /// re-publish under the same version, or a failure that was not the version's fault).
    ForgetRejected {
        /// The version, as `status` lists it under "rejected".
        version: String,
    },
    /// Forget the channel's replay watermark (the newest manifest date accepted), when an
    /// older agent recorded one from a manifest dated in the future: until then every
    /// correctly dated manifest is refused as a replay. Replays of older manifests are
    /// possible again until the next accepted one, so check the mirrors first.
    ForgetWatermark,
    /// This host's /etc against its image's, and the conflicts of the last merge (at the
    /// first boot of an update, bootsel merges the host's /etc changes for the new image).
    #[command(subcommand)]
    Etc(EtcVerb),
    /// Check periodically (with jitter); SIGHUP reloads the configuration.
    Daemon,
    /// Run the boot health checks (every executable in the health directories).
    HealthCheck {
        /// Time each check may take before it is killed and counts as failed.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Directories of checks; later ones override same-named checks of earlier ones.
        #[arg(long = "dir", value_name = "DIR")]
        dirs: Vec<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum EtcVerb {
    /// What this host changed against the image: modified, added, deleted (like
    /// `ostree admin config-diff`).
    Diff {
        #[arg(long)]
        json: bool,
    },
    /// Files both this host and the new image changed at the last update: the host's
    /// version was kept, the image's written beside it as NAME.atom-new. Remove the
    /// .atom-new (or `reset`) once looked at.
    Conflicts {
        #[arg(long)]
        json: bool,
    },
    /// Mark conflicts of the last merge as looked at (for one without an .atom-new, such as
    /// a file the image removed); `status` no longer counts them.
    Resolve {
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<String>,
    },
    /// Back to the image's version of each PATH (under /etc), dropping PATH.atom-new; it
    /// then follows future updates again.
    Reset {
        #[arg(long)]
        json: bool,
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from(["atom-update", "--config", "/x.toml", "now", "--allow-downgrade"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Now {
                allow_downgrade: true,
                no_reboot: false,
                skip_rollout: false,
                ..
            }
        ));
        assert!(Cli::try_parse_from(["atom-update", "frobnicate"]).is_err());
    }
}

//! `atom-update daemon`: periodic updates with jitter; SIGHUP reloads the configuration,
//! SIGTERM/SIGINT cancel cleanly (a running write stops at the next chunk; the inactive
//! slot stays unbootable until a later run completes it).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::{RebootPolicy, Settings};
use crate::error::Failure;
use crate::update::{self, Options, Outcome};

/// Up to 10% of the interval, so a fleet does not check in at the same second.
fn jitter(interval: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seed = u64::from(nanos) ^ u64::from(std::process::id()).rotate_left(17);
    let max = interval.as_millis() as u64 / 10;
    Duration::from_millis(if max == 0 { 0 } else { seed % max })
}

/// SIGHUP: the new settings, or the old ones kept when the new file does not load.
fn reload_if_asked(config: &Path, settings: &mut Settings, reload: &AtomicBool) -> bool {
    if !reload.swap(false, Ordering::Relaxed) {
        return false;
    }
    match Settings::load(config) {
        Ok(s) => {
            *settings = s;
            tracing::info!(
                interval = ?settings.check_interval, channel = %settings.channel,
                reboot = ?settings.reboot, "configuration reloaded"
            );
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "configuration not reloaded; keeping the old one");
            false
        }
    }
}

/// The reboot policy's wait, which a SIGHUP interrupts: the reloaded settings may move the
/// maintenance window or turn reboots off, and apply at once.
fn wait_to_reboot(config: &Path, settings: &mut Settings, stop: &AtomicBool, reload: &AtomicBool) {
    loop {
        if settings.reboot == RebootPolicy::Never || stop.load(Ordering::Relaxed) {
            return;
        }
        crate::reboot::when_allowed(settings, &|| {
            stop.load(Ordering::Relaxed) || reload.load(Ordering::Relaxed)
        });
        if stop.load(Ordering::Relaxed) || !reload.load(Ordering::Relaxed) {
            return;
        }
        // A reload that fails keeps the old settings, and the wait goes on with them.
        reload_if_asked(config, settings, reload);
    }
}

pub fn run(config: &Path) -> Result<(), Failure> {
    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| Failure::error(e.to_string()))?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())
        .map_err(|e| Failure::error(e.to_string()))?;
    let mut settings = Settings::load(config).map_err(Failure::error)?;
    tracing::info!(interval = ?settings.check_interval, "daemon started");
    let mut staged_here = false;
    while !stop.load(Ordering::Relaxed) {
        let opts = Options {
            allow_downgrade: false,
            allow_rejected: false,
            force: false,
            skip_rollout: false,
            cancel: &stop,
            progress: false,
        };
        let mut until_turn = None;
        match update::now(&settings, &opts) {
            Ok(Outcome::Waiting { version, turn, .. }) => {
                tracing::info!(%version, %turn, "phased rollout: checking again at this host's turn");
                until_turn = Some(Duration::try_from(jiff::Timestamp::now().duration_until(turn)).unwrap_or_default());
            }
            Ok(Outcome::Staged { version, .. }) => {
                tracing::info!(%version, "update staged");
                staged_here = true;
                wait_to_reboot(config, &mut settings, &stop, &reload);
            }
            // Staged by this daemon at an earlier check whose reboot wait a reload ended
            // (reboots off, then on again). One an operator staged (`now --no-reboot`) is
            // theirs to reboot into.
            Ok(Outcome::AlreadyStaged { version }) if staged_here => {
                tracing::info!(%version, "update already staged");
                wait_to_reboot(config, &mut settings, &stop, &reload);
            }
            Ok(other) => tracing::info!(outcome = ?other, "no update applied"),
            Err(e) => tracing::warn!(error = %e, "update failed; will retry at the next check"),
        }
        let checked = Instant::now();
        let next = |s: &Settings| {
            let regular = s.check_interval + jitter(s.check_interval);
            // A rollout turn sooner than the next regular check is not left waiting for it.
            checked + until_turn.map_or(regular, |t| t.min(regular))
        };
        let mut wake = next(&settings);
        while Instant::now() < wake && !stop.load(Ordering::Relaxed) {
            if reload_if_asked(config, &mut settings, &reload) {
                // A new interval counts from the last check, not from the reload.
                wake = next(&settings);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    tracing::info!("daemon stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_bounded() {
        for _ in 0..100 {
            assert!(jitter(Duration::from_secs(600)) < Duration::from_secs(60));
        }
        assert_eq!(jitter(Duration::from_millis(5)), Duration::ZERO);
    }
}

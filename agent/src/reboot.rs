//! The reboot policy after an update is staged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::config::{RebootPolicy, Settings};

fn minute_of_day_utc() -> u16 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    ((secs % 86_400) / 60) as u16
}

fn reboot_now() {
    tracing::warn!("rebooting into the new slot");
    let status = std::process::Command::new("systemctl").arg("reboot").status();
    if !status.is_ok_and(|s| s.success()) {
        let _ = std::process::Command::new("reboot").status();
    }
}

/// Reboots now (`immediate`), or waits for the maintenance window (`window`).
pub fn when_allowed(s: &Settings, stop: &AtomicBool) {
    match (s.reboot, s.window) {
        (RebootPolicy::Never, _) => {}
        (RebootPolicy::Immediate, _) => reboot_now(),
        (RebootPolicy::Window, Some(w)) => {
            if !w.contains(minute_of_day_utc()) {
                tracing::info!("update staged; waiting for the maintenance window to reboot");
            }
            while !stop.load(Ordering::Relaxed) {
                if w.contains(minute_of_day_utc()) {
                    reboot_now();
                    return;
                }
                std::thread::sleep(Duration::from_secs(20));
            }
        }
        (RebootPolicy::Window, None) => {}
    }
}

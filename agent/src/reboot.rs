//! The reboot policy after an update is staged.

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

/// Reboots now (`immediate`), or waits for the maintenance window (`window`). Returns
/// without rebooting once `interrupted` says so (a stop, or a reload whose settings may
/// move the window or turn reboots off).
pub fn when_allowed(s: &Settings, interrupted: &dyn Fn() -> bool) {
    match (s.reboot, s.window) {
        (RebootPolicy::Never, _) => {}
        (RebootPolicy::Immediate, _) => reboot_now(),
        (RebootPolicy::Window, Some(w)) => {
            if !w.contains(minute_of_day_utc()) {
                tracing::info!("update staged; waiting for the maintenance window to reboot");
            }
            loop {
                if w.contains(minute_of_day_utc()) {
                    reboot_now();
                    return;
                }
                for _ in 0..100 {
                    if interrupted() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        (RebootPolicy::Window, None) => {}
    }
}

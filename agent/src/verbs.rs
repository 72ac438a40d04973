//! The verbs that only change boot flags, and `status`.

use bootsel::SlotName;
use bootsel::select::why_not_bootable;
use serde_json::json;

use crate::config::Settings;
use crate::error::Failure;
use crate::host::{self, Detection, Host};
use crate::state::{Lock, State};

fn flags_json(f: bootsel::SlotFlags) -> serde_json::Value {
    json!({ "priority": f.priority, "tries": f.tries, "successful": f.successful, "bootable": f.is_bootable() })
}

pub fn status(s: &Settings, as_json: bool) -> Result<(), Failure> {
    let host = Host::detect(s)?;
    let (_, table) = host::load_table(&host.disk, s, false)?;
    // Status still shows the disk when the state file is broken, and says so.
    let state = State::load(&s.state_dir).unwrap_or_else(|e| {
        eprintln!("atom-update: warning: {e}");
        State::default()
    });
    let next = table.decide().map(|(n, _)| n);
    let version_of = |name: SlotName| -> Option<String> {
        if name == host.running {
            Some(host.release.version.to_string())
        } else {
            state.slots.get(name.as_str()).map(|c| c.version.clone())
        }
    };
    let kernel_of = |name: SlotName| -> Option<String> {
        if name == host.running {
            Some(host::running_kernel())
        } else {
            state.slots.get(name.as_str()).and_then(|c| c.kernel.clone())
        }
    };
    let fell_back_from = host.record.as_ref().and_then(|r| r.fell_back_from.clone());
    if as_json {
        let slots: Vec<_> = table
            .slots()
            .iter()
            .map(|sl| {
                json!({
                    "slot": sl.name.as_str(), "label": sl.label, "partition": sl.partition,
                    "version": version_of(sl.name), "kernel": kernel_of(sl.name),
                    "booted": sl.name == host.running,
                    "flags": flags_json(sl.flags),
                })
            })
            .collect();
        let rejected: Vec<_> = state
            .rejected
            .iter()
            .map(|(digest, r)| json!({"version": r.version, "digest": digest, "why": r.why, "time": r.time}))
            .collect();
        let doc = json!({
            "rejected": rejected,
            "disk": host.disk, "board": host.release.board, "booted_slot": host.running.as_str(),
            "booted_version": host.release.version.to_string(),
            "booted_kernel": host::running_kernel(),
            "detected_by": match &host.detection { Detection::BootRecord(p) => format!("boot record {}", p.display()), Detection::Mountinfo => "mountinfo".into() },
            "fell_back_from": fell_back_from,
            "boot_trial": host.record.as_ref().map(|r| r.trial),
            "next_boot": next.map(|n| n.as_str()),
            "slots": slots,
            "last_update": state.last,
            "rollback_floor": state.rollback_floor,
            "etc_unresolved_conflicts": crate::etc::unresolved(s),
        });
        println!("{doc:#}");
        return Ok(());
    }
    println!(
        "booted: slot {} running {} ({}) on {}, kernel {}",
        host.running,
        host.release.version,
        host.release.board,
        host.disk.display(),
        host::running_kernel()
    );
    if let Some(from) = &fell_back_from {
        println!("last boot FELL BACK: slot {from} ran out of tries without being marked good");
    }
    println!(
        "{:<5} {:<10} {:<12} {:<18} {:>8} {:>5} {:>10}  STATE",
        "SLOT", "LABEL", "VERSION", "KERNEL", "PRIORITY", "TRIES", "SUCCESSFUL"
    );
    for sl in table.slots() {
        let mut notes = Vec::new();
        if sl.name == host.running {
            notes.push("booted".to_string());
        }
        if Some(sl.name) == next {
            notes.push("boots next".to_string());
        }
        if let Some(w) = why_not_bootable(sl.flags) {
            notes.push(format!("not bootable: {w}"));
        }
        println!(
            "{:<5} {:<10} {:<12} {:<18} {:>8} {:>5} {:>10}  {}",
            sl.name.as_str(),
            sl.label,
            version_of(sl.name).unwrap_or_else(|| "unknown".into()),
            kernel_of(sl.name).unwrap_or_else(|| "-".into()),
            sl.flags.priority,
            sl.flags.tries,
            if sl.flags.successful { "yes" } else { "no" },
            notes.join(", ")
        );
    }
    if let Some(floor) = &state.rollback_floor {
        println!("rollback floor: {floor} (marked good here; older versions are refused)");
    }
    for r in state.rejected.values() {
        println!("rejected: {} ({}, {}); not installed again", r.version, r.why, r.time);
    }
    let conflicts = crate::etc::unresolved(s);
    if conflicts > 0 {
        println!("/etc: {conflicts} unresolved conflict(s) from the last merge (atom-update etc conflicts)");
    }
    match &state.last {
        Some(l) => println!("last update: {} at {}: {}", l.outcome, l.time, l.message),
        None => println!("last update: none recorded"),
    }
    Ok(())
}

/// How long mark-good and mark-bad wait for a running update to release the lock.
const VERDICT_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The lock for a boot verdict. The verdict goes on the disk even when /var cannot hold
/// the lock (read-only or broken state directory): then no update can run either (it needs
/// the lock), so nothing races the write.
fn verdict_lock(s: &Settings) -> Result<Option<Lock>, Failure> {
    match Lock::acquire_waiting(&s.state_dir, VERDICT_LOCK_WAIT) {
        Ok(l) => Ok(Some(l)),
        // Held too long, or a state directory others could change (a security refusal).
        Err(f) if f.kind != crate::error::Kind::Error => Err(f),
        Err(f) => {
            tracing::warn!(error = %f, "no lock (state directory unusable); recording the verdict on the disk only");
            Ok(None)
        }
    }
}

pub fn mark_good(s: &Settings) -> Result<(), Failure> {
    let _lock = verdict_lock(s)?;
    let host = Host::detect(s)?;
    let (mut disk, mut table) = host::load_table(&host.disk, s, true)?;
    // The disk first: the GPT verdict must not depend on a writable, non-full /var.
    if table.slot(host.running).flags.successful {
        println!("slot {} is already marked good", host.running);
    } else {
        table.mark_successful(host.running);
        table.commit(&mut disk).map_err(|e| Failure::error(e.to_string()))?;
        tracing::info!(slot = %host.running, version = %host.release.version, "marked good");
        println!("slot {} ({}) marked good", host.running, host.release.version);
    }
    if let Err(e) = remember_running_version_and_floor(s, &host) {
        tracing::warn!(error = %e, "marked good on the disk, but the state file was not updated");
        eprintln!(
            "atom-update: warning: slot {} is marked good, but {} could not be recorded in the state file ({e}): \
             the rollback floor and fallback records are not updated",
            host.running, host.release.version
        );
    }
    Ok(())
}

pub fn forget_rejected(s: &Settings, version: &str) -> Result<(), Failure> {
    let _lock = Lock::acquire(&s.state_dir)?;
    let mut state = State::load(&s.state_dir)?;
    match state.forget_rejected(version) {
        0 => Err(Failure::not_allowed(format!("{version} is not rejected on this host"))),
        n => {
            state.save(&s.state_dir)?;
            tracing::info!(%version, images = n, "rejection forgotten");
            println!("{version} may be installed again");
            Ok(())
        }
    }
}

pub fn forget_watermark(s: &Settings) -> Result<(), Failure> {
    let _lock = Lock::acquire(&s.state_dir)?;
    let mut state = State::load(&s.state_dir)?;
    match state.newest_manifest.remove(&s.channel) {
        None => Err(Failure::not_allowed(format!(
            "channel {} has no replay watermark",
            s.channel
        ))),
        Some(t) => {
            state.save(&s.state_dir)?;
            tracing::warn!(channel = %s.channel, watermark = %t, "replay watermark forgotten");
            println!("replay watermark of channel {} ({t}) forgotten", s.channel);
            Ok(())
        }
    }
}

/// Records the running slot's version (the first image of a host was not written by the
/// agent; without this, `status` could not name its version once the other slot runs) and
/// raises the rollback floor to it, in one write of the state file.
fn remember_running_version_and_floor(s: &Settings, host: &Host) -> Result<(), Failure> {
    let mut state = State::load(&s.state_dir)?;
    let version = host.release.version.to_string();
    let entry = state.slots.entry(host.running.as_str().to_owned()).or_default();
    let kernel = Some(host::running_kernel());
    let new_version = entry.version != version || entry.kernel != kernel;
    if new_version {
        if entry.version != version {
            entry.digest = String::new();
        }
        entry.version = version;
        entry.kernel = kernel;
    }
    if state.raise_floor(&host.release.version) {
        state.save(&s.state_dir)?;
        tracing::info!(floor = %host.release.version, "rollback floor raised: older versions are refused from now on");
    } else if new_version && let Err(e) = state.save(&s.state_dir) {
        tracing::warn!(error = %e, "cannot record the running slot's version");
    }
    Ok(())
}

pub fn mark_bad(s: &Settings, force: bool) -> Result<(), Failure> {
    let _lock = verdict_lock(s)?;
    let host = Host::detect(s)?;
    let (mut disk, mut table) = host::load_table(&host.disk, s, true)?;
    let other = table.slot(host.running.other()).flags;
    if !other.is_bootable() && !force {
        return Err(Failure::not_allowed(format!(
            "slot {} is not bootable ({}); marking the running slot bad would leave nothing to boot (use --force)",
            host.running.other(),
            why_not_bootable(other).unwrap_or("unknown")
        )));
    }
    table.disable(host.running);
    table.commit(&mut disk).map_err(|e| Failure::error(e.to_string()))?;
    tracing::warn!(slot = %host.running, version = %host.release.version, "marked bad; the next boot falls back");
    let recorded = State::load(&s.state_dir).and_then(|mut state| {
        if state.reject_slot(host.running.as_str(), "marked bad on this host") {
            state.save(&s.state_dir)?;
        }
        Ok(())
    });
    if let Err(e) = recorded {
        tracing::warn!(error = %e, "marked bad on the disk, but the rejection was not recorded");
    }
    println!(
        "slot {} marked bad; the next boot uses slot {}",
        host.running,
        host.running.other()
    );
    Ok(())
}

pub fn rollback(s: &Settings) -> Result<(), Failure> {
    let _lock = Lock::acquire(&s.state_dir)?;
    let host = Host::detect(s)?;
    let (mut disk, mut table) = host::load_table(&host.disk, s, true)?;
    let other = host.running.other();
    table.prefer(other).map_err(|e| Failure::not_allowed(e.to_string()))?;
    table.commit(&mut disk).map_err(|e| Failure::error(e.to_string()))?;
    let state = State::load(&s.state_dir).unwrap_or_default();
    let version = state
        .slots
        .get(other.as_str())
        .map_or("unknown version".to_string(), |c| c.version.clone());
    tracing::warn!(slot = %other, %version, "rollback: the other slot boots next");
    println!("slot {other} ({version}) boots next");
    Ok(())
}

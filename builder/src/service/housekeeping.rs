//! Files of finished builds are kept `--expire-after` (unless an order pinned them), so
//! unclaimed images do not hold the disk; files of builds gone from the database
//! (expired, or removed by a delete on another instance) are removed here.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::watch;

use super::App;
use super::db::now;

pub async fn janitor(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let every = (app.expire_after / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        if let Err(e) = sweep(&app).await {
            tracing::warn!("cannot expire old builds: {e:#}");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn sweep(app: &App) -> Result<()> {
    let before = now() - app.expire_after.as_secs() as i64;
    for id in app.db.expiring(&app.instance, before).await? {
        if app.db.expire(&id, before).await? {
            tracing::info!(build = %id, "build expired: its files are removed");
        }
    }
    for id in app.db.gone_here(&app.instance).await? {
        let dir = app.build_dir(&id);
        if !dir.exists() {
            continue;
        }
        let shown = dir.display().to_string();
        match tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await? {
            Ok(()) => tracing::info!(build = %id, dir = %shown, "removed the files of a build"),
            Err(e) => tracing::warn!(build = %id, "cannot remove {shown}: {e}"),
        }
    }
    Ok(())
}

/// Free bytes for unprivileged writers where the builds live.
pub fn free_space(dir: &std::path::Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    Some((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

//! Progress of a long update: a bar on a terminal, periodic log lines otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

use crate::slotio::WriteStats;

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    downloaded: Arc<AtomicU64>,
    read_locally: Arc<AtomicU64>,
    last_logged_percent: Arc<AtomicU64>,
    on_write: Box<dyn Fn(WriteStats) + Send + Sync>,
    on_download: Box<dyn Fn(u64) + Send + Sync>,
    on_local_read: Box<dyn Fn(u64) + Send + Sync>,
}

impl Progress {
    pub fn new(interactive: bool, total: u64) -> Self {
        let downloaded = Arc::new(AtomicU64::new(0));
        let last = Arc::new(AtomicU64::new(0));
        let bar = (interactive && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg}\n{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        });
        let on_write: Box<dyn Fn(WriteStats) + Send + Sync> = {
            let (bar, dl, last) = (bar.clone(), downloaded.clone(), last.clone());
            Box::new(move |s: WriteStats| match &bar {
                Some(b) => {
                    b.set_position(s.total);
                    b.set_message(format!(
                        "downloaded {} MiB, reused {} MiB, written {} MiB",
                        dl.load(Ordering::Relaxed) >> 20,
                        s.skipped >> 20,
                        s.written >> 20
                    ));
                }
                None => {
                    let percent = s.total.saturating_mul(100) / total.max(1);
                    if percent >= last.load(Ordering::Relaxed) + 10 {
                        last.store(percent, Ordering::Relaxed);
                        tracing::info!(
                            percent,
                            written = s.written,
                            reused = s.skipped,
                            downloaded = dl.load(Ordering::Relaxed),
                            "writing slot"
                        );
                    }
                }
            })
        };
        let on_download: Box<dyn Fn(u64) + Send + Sync> = {
            let dl = downloaded.clone();
            Box::new(move |n| {
                dl.fetch_add(n, Ordering::Relaxed);
            })
        };
        let read_locally = Arc::new(AtomicU64::new(0));
        let on_local_read: Box<dyn Fn(u64) + Send + Sync> = {
            let r = read_locally.clone();
            Box::new(move |n| {
                r.fetch_add(n, Ordering::Relaxed);
            })
        };
        Progress {
            bar,
            total,
            downloaded,
            read_locally,
            on_local_read,
            last_logged_percent: last,
            on_write,
            on_download,
        }
    }

    pub fn phase(&self, what: &str) {
        notify_status(what);
        self.last_logged_percent.store(0, Ordering::Relaxed);
        match &self.bar {
            Some(b) => {
                b.set_position(0);
                b.set_length(self.total);
                b.set_message(what.to_owned());
            }
            None => tracing::info!("{what}"),
        }
    }

    pub fn write_callback(&self) -> &dyn Fn(WriteStats) {
        &*self.on_write
    }

    pub fn download_callback(&self) -> &dyn Fn(u64) {
        &*self.on_download
    }

    pub fn local_read_callback(&self) -> &dyn Fn(u64) {
        &*self.on_local_read
    }

    pub fn downloaded(&self) -> u64 {
        self.downloaded.load(Ordering::Relaxed)
    }

    /// Bytes read from a local repository (a directory, a stick): not over any network.
    pub fn read_locally(&self) -> u64 {
        self.read_locally.load(Ordering::Relaxed)
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A STATUS= line for `systemctl status` when run by systemd (no-op otherwise).
pub fn notify_status(what: &str) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(what)]);
}

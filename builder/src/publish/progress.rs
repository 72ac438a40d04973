//! What `publish` shows while it works (minutes for a large image): on a terminal a bar
//! per step (payload compression, each base's decompression and delta, signing), else a
//! log line every 10 s and one at each step's end, with its rate.

use std::io::{self, IsTerminal, Read};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

const LOG_EVERY: Duration = Duration::from_secs(10);

/// Steps run side by side (the payload beside each delta): one bar each, drawn together.
fn bars() -> &'static MultiProgress {
    static BARS: std::sync::OnceLock<MultiProgress> = std::sync::OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// One step of the publish: `total` bytes to go through (0 when it has no byte count,
/// such as a diff).
pub struct Step {
    what: String,
    total: u64,
    done: u64,
    started: Instant,
    logged: Instant,
    bar: Option<ProgressBar>,
}

impl Step {
    pub fn start(what: impl Into<String>, total: u64) -> Step {
        let what = what.into();
        let bar = io::stderr().is_terminal().then(|| {
            let bar = if total > 0 {
                ProgressBar::new(total).with_style(
                    ProgressStyle::with_template(
                        "{msg:30} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                )
            } else {
                ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{msg:30} {spinner} {elapsed}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                )
            };
            bar.set_message(what.clone());
            let bar = bars().add(bar);
            if total == 0 {
                bar.enable_steady_tick(Duration::from_millis(200));
            }
            bar
        });
        tracing::info!(step = %what, bytes = total, "publish step started");
        let now = Instant::now();
        Step {
            what,
            total,
            done: 0,
            started: now,
            logged: now,
            bar,
        }
    }

    pub fn advance(&mut self, n: u64) {
        self.done += n;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
        } else if self.logged.elapsed() >= LOG_EVERY {
            self.logged = Instant::now();
            tracing::info!(
                step = %self.what,
                done = self.done,
                total = self.total,
                mib_per_s = format!("{:.1}", rate(self.done, self.started.elapsed())),
                "publishing"
            );
        }
    }

    /// Ends the step, logging its time and rate; `extra` says what came out.
    pub fn finish(self, extra: &str) {
        let seconds = self.started.elapsed();
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let secs = format!("{:.1}", seconds.as_secs_f64());
        if self.total > 0 {
            let mib_per_s = format!("{:.1}", rate(self.done, seconds));
            tracing::info!(step = %self.what, seconds = secs, mib_per_s, "{extra}");
        } else {
            tracing::info!(step = %self.what, seconds = secs, "{extra}");
        }
    }
}

fn rate(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / t.as_secs_f64().max(1e-3)
}

/// A reader that moves a step's bar as it is read.
pub struct Metered<'a, R> {
    pub inner: R,
    pub step: &'a mut Step,
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.step.advance(n as u64);
        Ok(n)
    }
}

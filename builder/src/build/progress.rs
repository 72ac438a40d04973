//! What a build shows while it runs: one live line per stage on a terminal (stage,
//! step, elapsed time), plain log lines otherwise; and each stage's own log file, which
//! the commands of the stage write to and a failure quotes the end of.

use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

pub struct Progress {
    quiet: bool,
    tty: bool,
    total: usize,
    bar: Option<ProgressBar>,
    started: Instant,
    events: Option<File>,
}

/// One line of `atom-build build --events FILE` (JSON lines): what the build service
/// reads for a build's stage, progress and the stage durations its ETAs come from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StageEvent {
    pub stage: String,
    pub index: usize,
    pub total: usize,
    /// "start", or how the stage ended: "built", "cached", "skipped", "failed".
    pub event: String,
    #[serde(default)]
    pub seconds: f64,
}

impl Progress {
    pub fn new(quiet: bool, total: usize) -> Progress {
        Progress {
            quiet,
            tty: std::io::stderr().is_terminal(),
            total,
            bar: None,
            started: Instant::now(),
            events: None,
        }
    }

    /// Also writes each stage's start and end to `path` as JSON lines (appended).
    pub fn with_events(mut self, path: Option<&Path>) -> Result<Progress> {
        if let Some(path) = path {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("--events {}: cannot open it", path.display()))?;
            self.events = Some(f);
        }
        Ok(self)
    }

    fn event(&self, index: usize, name: &str, event: &str) {
        if let Some(mut f) = self.events.as_ref() {
            let e = StageEvent {
                stage: name.to_string(),
                index,
                total: self.total,
                event: event.to_string(),
                seconds: self.started.elapsed().as_secs_f64(),
            };
            let line = serde_json::to_string(&e).expect("an event serializes");
            // One write per line: a reader never sees half of one.
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }

    /// A stage ended with an error (the error itself is the build's to report).
    pub fn failed(&mut self, index: usize, name: &str) {
        self.event(index, name, "failed");
        self.clear();
    }

    pub fn stage(&mut self, index: usize, name: &str, what: &str) {
        self.started = Instant::now();
        self.event(index, name, "start");
        if self.quiet {
            return;
        }
        if self.tty {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{prefix}] {msg} ({elapsed})").expect("valid template"),
            );
            bar.set_prefix(format!("{}/{} {name}", index + 1, self.total));
            bar.set_message(what.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            self.bar = Some(bar);
        } else {
            tracing::info!(stage = name, "stage {}/{} {name}: {what}", index + 1, self.total);
        }
    }

    /// A step inside the running stage (a hook, a command).
    pub fn step(&self, what: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(what.to_string());
        } else if !self.quiet {
            tracing::info!("  {what}");
        }
    }

    /// The stage's verdict line: built, cached, skipped.
    pub fn done(&mut self, index: usize, name: &str, verdict: &str) {
        let secs = self.started.elapsed().as_secs_f64();
        let word = verdict.split_whitespace().next().unwrap_or("built");
        self.event(index, name, if word == "nothing" { "skipped" } else { word });
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if !self.quiet {
            eprintln!("[{}/{}] {name:<9} {verdict} ({secs:.1} s)", index + 1, self.total);
        }
    }

    /// A stage that is taken from the cache or skipped starts here (its time is the
    /// restore's).
    pub fn restart_clock(&mut self) {
        self.started = Instant::now();
    }

    pub fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// A stage's log file: commands write their output here, the build its own notes.
pub struct StageLog {
    pub path: PathBuf,
    file: File,
}

impl StageLog {
    pub fn create(dir: &Path, index: usize, stage: &str) -> Result<StageLog> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{:02}-{stage}.log", index + 1));
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(StageLog { path, file })
    }

    pub fn note(&self, line: &str) {
        let _ = writeln!(&self.file, "# {line}");
    }

    /// For a child's stdout and stderr.
    pub fn stdio(&self) -> Result<Stdio> {
        Ok(Stdio::from(
            self.file.try_clone().context("cannot share the stage log")?,
        ))
    }

    /// The last `n` lines, for a failure message.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let text = fs::read_to_string(&self.path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }
}

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

pub struct Progress {
    quiet: bool,
    tty: bool,
    total: usize,
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Progress {
    pub fn new(quiet: bool, total: usize) -> Progress {
        Progress {
            quiet,
            tty: std::io::stderr().is_terminal(),
            total,
            bar: None,
            started: Instant::now(),
        }
    }

    pub fn stage(&mut self, index: usize, name: &str, what: &str) {
        self.started = Instant::now();
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
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if !self.quiet {
            eprintln!("[{}/{}] {name:<9} {verdict} ({secs:.1} s)", index + 1, self.total);
        }
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

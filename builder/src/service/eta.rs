//! When a build will be ready: each stage predicted from the measured durations of past
//! builds (a stage the cache holds is predicted at what restoring it took before), then
//! the queue played out over the live workers.

use std::collections::HashMap;

use super::model::{BuildRow, BuildState, StageMean};
use crate::build::Preview;

/// A stage never measured: built, or taken from the cache.
const UNKNOWN_BUILT: f64 = 30.0;
const UNKNOWN_CACHED: f64 = 1.0;

/// The mean of one stage's durations with this verdict: this recipe's own builds first,
/// else every recipe's.
fn mean(means: &[StageMean], stage: &str, verdict: &str) -> Option<f64> {
    let of = |own: bool| {
        means
            .iter()
            .find(|m| m.stage == stage && m.verdict == verdict && m.own_recipe == own && m.samples > 0)
            .map(|m| m.seconds)
    };
    of(true).or_else(|| of(false))
}

/// Seconds the whole build should take.
pub fn predict(preview: &Preview, skip: &[String], means: &[StageMean]) -> f64 {
    preview
        .stages
        .iter()
        .map(|(stage, _, cached)| {
            if skip.iter().any(|s| s == stage) {
                mean(means, stage, "skipped").unwrap_or(0.0)
            } else if *cached {
                mean(means, stage, "cached").unwrap_or(UNKNOWN_CACHED)
            } else {
                mean(means, stage, "built").unwrap_or(UNKNOWN_BUILT)
            }
        })
        .sum()
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// 1 for the next build to start; none once running.
    pub position: Option<usize>,
    /// Unix time the build should be ready at.
    pub ready_at: i64,
}

/// Plays the open builds (running first, then the queue in order) over `workers` workers.
pub fn schedule(open: &[BuildRow], workers: usize, now: i64) -> HashMap<String, Estimate> {
    let predicted = |b: &BuildRow| b.predicted_seconds.unwrap_or(UNKNOWN_BUILT).max(0.0);
    let running: Vec<&BuildRow> = open.iter().filter(|b| b.state == BuildState::Running).collect();
    // Builds run by workers this instance does not count (another instance's) still hold one.
    let workers = workers.max(running.len()).max(1);
    let mut free_at: Vec<f64> = vec![0.0; workers];
    let mut out = HashMap::new();
    for (slot, b) in running.iter().enumerate() {
        let elapsed = (now - b.started.unwrap_or(now)).max(0) as f64;
        // A build that overran its prediction is assumed to be almost done.
        let left = (predicted(b) - elapsed).max(1.0);
        free_at[slot] = left;
        out.insert(
            b.id.clone(),
            Estimate {
                position: None,
                ready_at: now + left.ceil() as i64,
            },
        );
    }
    let queued = open.iter().filter(|b| b.state == BuildState::Queued);
    for (i, b) in queued.enumerate() {
        let (slot, start) = free_at
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("at least one worker");
        let ready = start + predicted(b);
        free_at[slot] = ready;
        out.insert(
            b.id.clone(),
            Estimate {
                position: Some(i + 1),
                ready_at: now + ready.ceil() as i64,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(id: &str, state: BuildState, started: Option<i64>, predicted: f64) -> BuildRow {
        BuildRow {
            state,
            started,
            ..BuildRow::queued(id.into(), String::new(), "r".into(), String::new(), 0, predicted)
        }
    }

    #[test]
    fn the_queue_is_played_over_the_workers() {
        let now = 1000;
        let open = [
            build("r1", BuildState::Running, Some(990), 30.0),
            build("q1", BuildState::Queued, None, 20.0),
            build("q2", BuildState::Queued, None, 20.0),
            build("q3", BuildState::Queued, None, 5.0),
        ];
        let e = schedule(&open, 2, now);
        assert_eq!(e["r1"].ready_at, 1020);
        // q1 takes the idle worker, q2 the one r1 frees, q3 the one q1 frees.
        assert_eq!(
            e["q1"],
            Estimate {
                position: Some(1),
                ready_at: 1020
            }
        );
        assert_eq!(
            e["q2"],
            Estimate {
                position: Some(2),
                ready_at: 1040
            }
        );
        assert_eq!(
            e["q3"],
            Estimate {
                position: Some(3),
                ready_at: 1025
            }
        );
        // One worker: strictly one after the other.
        let e = schedule(&open, 1, now);
        assert_eq!(e["q3"].ready_at, 1065);
    }

    #[test]
    fn an_overrun_build_is_almost_done_and_running_builds_hold_workers() {
        let open = [
            build("a", BuildState::Running, Some(0), 10.0),
            build("b", BuildState::Running, Some(0), 10.0),
            build("q", BuildState::Queued, None, 10.0),
        ];
        let e = schedule(&open, 1, 100);
        assert_eq!(e["a"].ready_at, 101);
        assert_eq!(e["q"].ready_at, 111);
    }
}

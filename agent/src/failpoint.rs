//! Fault injection for tests, from `ATOM_UPDATE_FAILPOINT`:
//!
//! * `<point>:<n>` aborts the process (no cleanup, like `kill -9`) the n-th time the named
//!   point is reached;
//! * `<point>:slow=<ms>` sleeps that long at every hit, so a test can signal the process or
//!   stop the server while it is in the middle of that phase.
//!
//! Points: `write-chunk` (after a chunk of the slot is written), `download-chunk` (after a
//! piece of a download).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static HITS: AtomicU64 = AtomicU64::new(0);

pub fn hit(name: &str) {
    // Never in the installer's /init: the kernel passes unknown command-line words to PID 1
    // as its environment.
    if std::process::id() == 1 {
        return;
    }
    let Ok(spec) = std::env::var("ATOM_UPDATE_FAILPOINT") else {
        return;
    };
    let Some((point, action)) = spec.split_once(':') else {
        return;
    };
    if point != name {
        return;
    }
    let hits = HITS.fetch_add(1, Ordering::Relaxed) + 1;
    if let Some(ms) = action.strip_prefix("slow=").and_then(|ms| ms.parse::<u64>().ok()) {
        if hits == 1 {
            eprintln!("atom-update: failpoint {name}: slowing every hit by {ms} ms");
        }
        std::thread::sleep(Duration::from_millis(ms));
    } else if action.parse::<u64>().ok() == Some(hits) {
        eprintln!("atom-update: failpoint {name}:{hits} reached; aborting");
        std::process::abort();
    }
}

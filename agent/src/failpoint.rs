//! Crash injection for tests: `ATOM_UPDATE_FAILPOINT=<name>:<n>` aborts the process (no
//! cleanup, like `kill -9`) the n-th time the named point is reached. Points: `write-chunk`
//! (after a chunk of the slot is written), `download-chunk` (after a piece of a download).

use std::sync::atomic::{AtomicU64, Ordering};

static HITS: AtomicU64 = AtomicU64::new(0);

pub fn hit(name: &str) {
    let Ok(spec) = std::env::var("ATOM_UPDATE_FAILPOINT") else {
        return;
    };
    let Some((point, n)) = spec.split_once(':') else { return };
    if point != name {
        return;
    }
    let Ok(n) = n.parse::<u64>() else { return };
    if HITS.fetch_add(1, Ordering::Relaxed) + 1 == n {
        eprintln!("atom-update: failpoint {name}:{n} reached; aborting");
        std::process::abort();
    }
}

//! What the installer says goes to every console the kernel writes to: `/dev/console` is
//! only the last `console=`, and a machine with a screen and a serial port must show the
//! question and the verdict on both.

use std::io::Write;
use std::sync::Mutex;

static EXTRA: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());

/// As PID 1: opens the active consoles other than the last (which is stderr).
pub fn mirror_all() {
    let Ok(active) = std::fs::read_to_string("/sys/class/tty/console/active") else {
        return;
    };
    let names: Vec<&str> = active.split_whitespace().collect();
    // The list is in reverse order of console=: the first name is /dev/console.
    let mut extra = EXTRA.lock().unwrap_or_else(|e| e.into_inner());
    for name in names.iter().skip(1) {
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(format!("/dev/{name}")) {
            extra.push(f);
        }
    }
}

fn each(bytes: &[u8]) {
    let _ = std::io::stderr().write_all(bytes);
    let mut extra = EXTRA.lock().unwrap_or_else(|e| e.into_inner());
    for f in extra.iter_mut() {
        let _ = f.write_all(bytes);
    }
}

pub fn line(text: &str) {
    each(format!("{text}\n").as_bytes());
}

/// A writer onto every console (for the questions).
pub struct Out;

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        each(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

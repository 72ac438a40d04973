//! bootsel's /etc/bootsel.toml and the bootsel.* words of the kernel command line.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = bootsel::initconfig::Config::parse(text);
    let mut c = bootsel::initconfig::Config::default();
    let _ = c.apply_cmdline(text);
    // Whatever the command line did, the result is still a valid configuration.
    assert!(!c.labels[0].is_empty() && c.labels[0] != c.labels[1]);
});

//! The channel manifest and the image's release file, as a host receives them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = atom_dist::manifest::Manifest::parse(data) {
        // Whatever parses must print and parse back to the same thing.
        let again = atom_dist::manifest::Manifest::parse(m.to_toml().as_bytes()).expect("round trip");
        assert_eq!(again.to_toml(), m.to_toml());
    }
    let _ = atom_dist::release::Release::parse(data);
});

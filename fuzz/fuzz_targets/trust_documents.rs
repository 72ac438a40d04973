//! keys.toml and a channel's timestamp, as a host with root keys receives them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(k) = atom_dist::roles::KeysDoc::parse(data) {
        let again = atom_dist::roles::KeysDoc::parse(k.to_toml().as_bytes()).expect("round trip");
        assert_eq!(again, k);
        let _ = k.soonest_expiry();
    }
    if let Ok(t) = atom_dist::timestamp::TimestampDoc::parse(data) {
        let again = atom_dist::timestamp::TimestampDoc::parse(t.to_toml().as_bytes()).expect("round trip");
        assert_eq!(again, t);
    }
});

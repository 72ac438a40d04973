//! The detached signature file next to a manifest, checked against a fixed key.
#![no_main]
use std::sync::OnceLock;

use atom_dist::keys::{SecretKey, TrustedKeys};
use libfuzzer_sys::fuzz_target;

fn trusted() -> &'static (SecretKey, TrustedKeys) {
    static KEYS: OnceLock<(SecretKey, TrustedKeys)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let k = SecretKey::generate();
        let t = TrustedKeys::new([k.public()]);
        (k, t)
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = atom_dist::signature::signers(data);
    let manifest = b"format = 1\n";
    assert!(
        atom_dist::signature::verify(manifest, data, &trusted().1).is_err(),
        "a signature the fuzzer made up verified"
    );
});

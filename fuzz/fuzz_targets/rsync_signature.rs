//! The body of POST /v1/delta: a host's signature of its running slot, parsed by atom-dist.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = atom_dist::delta::check_signature_header(data);
    let limit = atom_dist::delta::signature_limit(1 << 20);
    if let Ok(sig) = atom_dist::delta::parse_signature(data.to_vec(), limit) {
        // A signature that parses must be usable for a diff without panicking.
        let target = vec![7u8; 10_000];
        let _ = atom_dist::delta::make_with_signature(&sig, &target, 1, std::io::sink());
    }
});

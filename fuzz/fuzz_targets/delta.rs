//! A delta as a host downloads it: its declared size (read to reserve room), zstd-compressed
//! (plain, with the base as prefix, or with base extents as prefix), its copy commands
//! read, then applied to the running slot.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let base: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    let target_len = u64::from(data.first().copied().unwrap_or(0)) * 512;
    let limit = atom_dist::delta::raw_delta_limit(target_len);
    let mut raw = Vec::new();
    if let Ok(n) = atom_dist::delta::decompress_bounded(data, &mut raw, limit) {
        assert!(n <= limit);
    }
    let declared = atom_dist::delta::declared_size(data);
    let mut raw = Vec::new();
    if let Ok(n) = atom_dist::delta::decompress_with_base(&base, data, &mut raw, limit) {
        assert!(n <= limit && raw.len() as u64 == n);
        assert_eq!(declared, Some(n), "a decodable prefixed delta declares its size");
    }
    let mut raw = Vec::new();
    if let Ok(n) = atom_dist::delta::extents::decompress(&base, data, &mut raw, limit, None) {
        assert!(n <= limit && raw.len() as u64 == n);
        let prefix = atom_dist::delta::extents::prefix_size(data, base.len() as u64);
        assert!(prefix.is_some_and(|p| p <= base.len() as u64));
    }
    if atom_dist::delta::commands::copied_ranges(data).is_ok() {
        // A delta that reads as commands splices onto nothing as itself.
        let mut whole = Vec::new();
        atom_dist::delta::commands::splice(&mut whole, data).expect("a readable delta splices");
        assert_eq!(whole, data);
    }
    let mut out = Vec::new();
    if atom_dist::delta::apply(&base, data, target_len, &mut out).is_ok() {
        assert_eq!(out.len() as u64, target_len);
    }
});

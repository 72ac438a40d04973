//! `atom-build image` on real files with the real mke2fs, e2fsck and (for --base) a real
//! loop mount. Runs as root.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

fn same_offset_block_share(a: &Path, b: &Path) -> f64 {
    let (a, b) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    assert_eq!(a.len(), b.len());
    let blocks = a.len() / 4096;
    let same = a.chunks(4096).zip(b.chunks(4096)).filter(|(x, y)| x == y).count();
    same as f64 / blocks as f64
}

fn digest(p: &Path) -> String {
    blake3::hash(&fs::read(p).unwrap()).to_hex().to_string()
}

fn release_of(image: &Path) -> String {
    let out = Command::new("debugfs")
        .args(["-R", "cat /usr/lib/atom/release"])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn same_input_gives_same_bytes_from_directory_and_tarball() {
    let f = Fixture::new();
    let tree = f.path("tree");
    make_tree(&tree, 60, 1);
    let a = f.image("a", "1.0.0", &tree, None);
    // Touch the source: timestamps are clamped, so this must not change the image.
    Command::new("touch").arg(tree.join("etc/hostname")).status().unwrap();
    let b = f.image("b", "1.0.0", &tree, None);
    assert_eq!(digest(&a), digest(&b), "two builds of the same tree differ");

    let tarball = f.path("tree.tar.gz");
    let st = Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let c = f.image("c", "1.0.0", &tarball, None);
    assert_eq!(digest(&a), digest(&c), "tarball build differs from directory build");

    let release = release_of(&a);
    assert!(
        release.contains("version = \"1.0.0\"") && release.contains("board = \"x86_64-generic\""),
        "{release}"
    );
    // A different version is a different image (release file, UUID).
    let d = f.image("d", "1.0.1", &tree, None);
    assert_ne!(digest(&a), digest(&d));
}

#[test]
fn base_build_keeps_unchanged_blocks_in_place_and_is_reproducible() {
    let f = Fixture::new();
    let v1_tree = f.path("v1");
    make_tree(&v1_tree, 200, 1);
    let v1 = f.image("v1", "1.0.0", &v1_tree, None);

    // v2: a security-update-like change: a few files patched (one grows), some removed,
    // some added.
    let v2_tree = f.path("v2");
    make_tree(&v2_tree, 200, 1);
    for i in [3usize, 50, 51, 120] {
        let p = v2_tree.join(format!("usr/share/pkg{}/file{i:04}", i % 12));
        let mut data = fs::read(&p).unwrap();
        data[100..200].copy_from_slice(&bytes(100, 99 + i as u64));
        if i == 50 {
            data.extend_from_slice(&bytes(30_000, 7));
        }
        fs::write(&p, data).unwrap();
    }
    for i in [10usize, 11] {
        fs::remove_file(v2_tree.join(format!("usr/share/pkg{}/file{i:04}", i % 12))).unwrap();
    }
    fs::write(v2_tree.join("usr/share/pkg0/added"), bytes(50_000, 1234)).unwrap();
    // A new package directory: the kernel creates it (generation, i_version, checksummed
    // directory block) and the build must still be clean and reproducible.
    fs::create_dir_all(v2_tree.join("usr/lib/newpkg/sub")).unwrap();
    for i in 0..5u64 {
        fs::write(v2_tree.join(format!("usr/lib/newpkg/sub/f{i}")), bytes(70_000, 500 + i)).unwrap();
    }

    let plain = f.image("v2-plain", "2.0.0", &v2_tree, None);
    let stable = f.image("v2-stable", "2.0.0", &v2_tree, Some(&v1));
    let plain_share = same_offset_block_share(&v1, &plain);
    let stable_share = same_offset_block_share(&v1, &stable);
    let total_blocks = fs::metadata(&v1).unwrap().len() / 4096;
    println!(
        "4 KiB blocks identical at the same offset as v1 ({total_blocks} blocks): \
         plain build {:.2}% ({} differ), --base build {:.2}% ({} differ)",
        plain_share * 100.0,
        ((1.0 - plain_share) * total_blocks as f64).round(),
        stable_share * 100.0,
        ((1.0 - stable_share) * total_blocks as f64).round()
    );
    assert!(stable_share > plain_share, "--base must keep more blocks in place");
    assert!(stable_share > 0.99, "--base build rewrote too much: {stable_share}");
    // File data of the --base build matches v2 exactly (checked via debugfs, no mount).
    assert!(release_of(&stable).contains("2.0.0"));
    let out = Command::new("debugfs")
        .args(["-R", "cat /usr/share/pkg2/file0050"])
        .arg(&stable)
        .output()
        .unwrap();
    assert!(
        out.stdout == fs::read(v2_tree.join("usr/share/pkg2/file0050")).unwrap(),
        "file content differs"
    );
    let gone = Command::new("debugfs")
        .args(["-R", "stat /usr/share/pkg10/file0010"])
        .arg(&stable)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("not found"),
        "deleted file still present"
    );

    let again = f.image("v2-stable-again", "2.0.0", &v2_tree, Some(&v1));
    assert_eq!(digest(&stable), digest(&again), "--base build is not reproducible");
}

/// The layout-stable build of a tree with many new files, directories and links gives the
/// same bytes every time: new entries are created in one fixed order on one CPU with
/// allocation at write time (a parallel copier made inode numbers depend on timing).
#[test]
fn base_build_with_many_added_files_is_reproducible() {
    let f = Fixture::new();
    let v1_tree = f.path("v1");
    make_tree(&v1_tree, 120, 3);
    // 512 MiB: several block groups, so backup superblocks too.
    let v1 = f.image_of_size("v1", "1.0.0", &v1_tree, None, "512M");
    let v2_tree = f.path("v2");
    make_tree(&v2_tree, 120, 3);
    for d in 0..40u64 {
        let dir = v2_tree.join(format!("usr/lib/pkg{d:02}/share/data"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..40u64 {
            fs::write(
                dir.join(format!("f{i:02}")),
                bytes(300 + (i as usize * 997) % 9000, d * 100 + i),
            )
            .unwrap();
        }
        std::os::unix::fs::symlink("share/data/f00", v2_tree.join(format!("usr/lib/pkg{d:02}/default"))).unwrap();
        fs::hard_link(dir.join("f01"), dir.join("f01.link")).unwrap();
    }
    fs::remove_dir_all(v2_tree.join("usr/share/pkg5")).unwrap();
    // Other work on the machine syncs filesystems at any moment; and the builds are
    // seconds apart (the wall clock must not reach the image).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let syncing = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                nix::unistd::sync();
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        })
    };
    let a = f.image_of_size("v2-a", "2.0.0", &v2_tree, Some(&v1), "512M");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let b = f.image_of_size("v2-b", "2.0.0", &v2_tree, Some(&v1), "512M");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let c = f.image_of_size("v2-c", "2.0.0", &v2_tree, Some(&v1), "512M");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    syncing.join().unwrap();
    let differ = |x: &Path, y: &Path| 1.0 - same_offset_block_share(x, y);
    assert_eq!(
        digest(&a),
        digest(&b),
        "differs in {:.4}% of blocks",
        differ(&a, &b) * 100.0
    );
    assert_eq!(
        digest(&a),
        digest(&c),
        "differs in {:.4}% of blocks",
        differ(&a, &c) * 100.0
    );
    let out = Command::new("debugfs")
        .args(["-R", "cat /usr/lib/pkg07/share/data/f05"])
        .arg(&a)
        .output()
        .unwrap();
    assert_eq!(
        out.stdout,
        fs::read(v2_tree.join("usr/lib/pkg07/share/data/f05")).unwrap()
    );
    let links = Command::new("debugfs")
        .args(["-R", "stat /usr/lib/pkg07/share/data/f01.link"])
        .arg(&a)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&links.stdout).contains("Links: 2"),
        "hard link kept"
    );
}

#[test]
fn bad_inputs_fail_with_one_clear_line_and_write_nothing() {
    let f = Fixture::new();
    let tree = f.path("tree");
    make_tree(&tree, 5, 1);
    let out = f.path("out.img");
    let run = |rootfs: &Path, size: &str| {
        atom_build(&[
            &"image",
            &"--kernel",
            &"none",
            &"--rootfs",
            &rootfs,
            &"--version",
            &"1.0.0",
            &"--size",
            &size,
            &"--out",
            &out,
        ])
    };

    fails_with(run(&f.path("missing"), "64M"), 1, "cannot read root filesystem");
    let not_tar = f.path("not-a-tarball");
    fs::write(&not_tar, "hello").unwrap();
    fails_with(run(&not_tar, "64M"), 1, "not a tar archive");

    let big = f.path("big");
    make_tree(&big, 5, 2);
    fs::write(big.join("huge"), bytes(40 << 20, 5)).unwrap();
    fails_with(run(&big, "32M"), 1, "too small for the root filesystem");
    fs::write(big.join("huge"), bytes(30 << 20, 5)).unwrap();
    // Fits as data, not with ext4 metadata: mke2fs itself runs out of space.
    fails_with(run(&big, "32M"), 1, "too small");
    fails_with(run(&tree, "1000000"), 1, "multiple of 4096");
    fails_with(run(&tree, "lots"), 2, "");
    let bad_version = atom_build(&[
        &"image",
        &"--kernel",
        &"none",
        &"--rootfs",
        &tree,
        &"--version",
        &"one",
        &"--size",
        &"64M",
        &"--out",
        &out,
    ]);
    fails_with(bad_version, 2, "");
    let bad_board = atom_build(&[
        &"image",
        &"--kernel",
        &"none",
        &"--rootfs",
        &tree,
        &"--version",
        &"1.0.0",
        &"--board",
        &"../x",
        &"--size",
        &"64M",
        &"--out",
        &out,
    ]);
    fails_with(bad_board, 1, "board");
    let not_image = f.path("not-an-image");
    fs::write(&not_image, vec![0u8; 1 << 20]).unwrap();
    let bad_base = atom_build(&[
        &"image",
        &"--kernel",
        &"none",
        &"--rootfs",
        &tree,
        &"--version",
        &"2.0.0",
        &"--size",
        &"64M",
        &"--out",
        &out,
        &"--base",
        &not_image,
    ]);
    fails_with(bad_base, 1, "not an Atom image");

    assert!(!out.exists(), "no output after failures");
    let leftovers: Vec<_> = fs::read_dir(f.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".atom-build"))
        .collect();
    assert!(leftovers.is_empty(), "work directories left behind: {leftovers:?}");
}

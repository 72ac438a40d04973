//! The merge on real directory trees (root: owners, whiteouts and trusted xattrs).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use super::*;

struct Trees {
    _dir: tempfile::TempDir,
    base: PathBuf,
    local: PathBuf,
    new: PathBuf,
    out: PathBuf,
}

fn trees() -> Trees {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s);
    for d in ["base", "local", "new"] {
        fs::create_dir(p(d)).unwrap();
    }
    Trees {
        base: p("base"),
        local: p("local"),
        new: p("new"),
        out: p("out"),
        _dir: dir,
    }
}

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn whiteout(root: &Path, rel: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    copy::whiteout(
        &path,
        &Meta {
            kind: Kind::Whiteout,
            mode: 0,
            uid: 0,
            gid: 0,
        },
    )
    .unwrap();
}

fn read(root: &Path, rel: &str) -> Option<String> {
    fs::read_to_string(root.join(rel)).ok()
}

fn run(t: &Trees, policy: &Policy) -> Report {
    merge(&t.base, &t.local, &t.new, &t.out, policy).unwrap()
}

#[test]
fn every_rule_of_the_merge() {
    let t = trees();
    // Changed only here: kept.
    write(&t.base, "hostname", "atom\n");
    write(&t.new, "hostname", "atom\n");
    write(&t.local, "hostname", "web-7\n");
    // Added only here: kept.
    write(&t.local, "app/local.conf", "x=1\n");
    // Changed only in the image, never touched here: not in the layer, so it follows.
    write(&t.base, "motd", "old\n");
    write(&t.new, "motd", "new\n");
    // Copied up here but identical to the new image (the host applied the same fix): pruned.
    write(&t.base, "resolv.conf", "nameserver 1.1.1.1\n");
    write(&t.new, "resolv.conf", "nameserver 9.9.9.9\n");
    write(&t.local, "resolv.conf", "nameserver 9.9.9.9\n");
    // Changed on both sides: the host's kept, the image's beside it, a conflict.
    write(&t.base, "ssh/sshd_config", "Port 22\n");
    write(
        &t.new,
        "ssh/sshd_config",
        "Port 22\nKexAlgorithms sntrup761x25519-sha512\n",
    );
    write(&t.local, "ssh/sshd_config", "Port 2222\n");
    // Deleted here, changed in the image: stays deleted, recorded.
    write(&t.base, "cron.d/job", "a\n");
    write(&t.new, "cron.d/job", "b\n");
    whiteout(&t.local, "cron.d/job");
    // Deleted here, unchanged in the image: stays deleted, quietly.
    write(&t.base, "issue", "x\n");
    write(&t.new, "issue", "x\n");
    whiteout(&t.local, "issue");
    // Changed here, removed from the image: kept, recorded.
    write(&t.base, "legacy.conf", "a\n");
    write(&t.local, "legacy.conf", "b\n");
    // A host file that happens to end in .atom-new: the host's, kept.
    write(&t.local, "old.conf.atom-new", "mine\n");
    // An earlier conflict still open (the .atom-new is there) and the image did not change
    // the file again: still a conflict, its copy kept.
    write(&t.base, "ntp.conf", "server b\n");
    write(&t.new, "ntp.conf", "server b\n");
    write(&t.local, "ntp.conf", "server local\n");
    write(&t.local, "ntp.conf.atom-new", "server b\n");
    // Copied up but unchanged (a touch, an edit undone): the image's security fix arrives.
    write(&t.base, "sudo.conf", "Set disable_coredump true\n");
    write(
        &t.new,
        "sudo.conf",
        "Set disable_coredump true\nSet group_source static\n",
    );
    write(&t.local, "sudo.conf", "Set disable_coredump true\n");

    let r = run(&t, &Policy::default());
    let out = &t.out;
    assert_eq!(read(out, "hostname").as_deref(), Some("web-7\n"));
    assert_eq!(read(out, "app/local.conf").as_deref(), Some("x=1\n"));
    assert_eq!(read(out, "motd"), None);
    assert_eq!(read(out, "resolv.conf"), None, "pruned");
    assert!(r.follows_image.contains(&"resolv.conf".to_string()), "{r:?}");
    assert_eq!(read(out, "ssh/sshd_config").as_deref(), Some("Port 2222\n"));
    assert_eq!(
        read(out, "ssh/sshd_config.atom-new").as_deref(),
        Some("Port 22\nKexAlgorithms sntrup761x25519-sha512\n")
    );
    assert_eq!(Meta::of(&out.join("cron.d/job")).unwrap().unwrap().kind, Kind::Whiteout);
    assert_eq!(Meta::of(&out.join("issue")).unwrap().unwrap().kind, Kind::Whiteout);
    assert_eq!(read(out, "legacy.conf").as_deref(), Some("b\n"));
    assert_eq!(read(out, "old.conf.atom-new").as_deref(), Some("mine\n"));
    assert_eq!(read(out, "ntp.conf").as_deref(), Some("server local\n"));
    assert_eq!(read(out, "ntp.conf.atom-new").as_deref(), Some("server b\n"));
    assert_eq!(read(out, "sudo.conf"), None, "follows the image again");
    let conflicts: Vec<(&str, &str)> = r.conflicts.iter().map(|c| (c.path.as_str(), c.what.as_str())).collect();
    assert_eq!(
        conflicts,
        [
            ("cron.d/job", "deleted on this host, changed in the new image"),
            ("legacy.conf", "changed on this host, removed from the new image"),
            ("ntp.conf", "unresolved from an earlier update"),
            ("ssh/sshd_config", "changed on this host and in the new image"),
        ]
    );
    assert_eq!(
        r.conflicts[3].image_version.as_deref(),
        Some("ssh/sshd_config.atom-new")
    );
}

#[test]
fn account_files_merge_by_name() {
    let t = trees();
    write(&t.base, "passwd", "root:x:0:0::/root:/bin/sh\n");
    write(
        &t.new,
        "passwd",
        "root:x:0:0::/root:/bin/sh\n_chrony:x:101:101::/:/usr/sbin/nologin\n",
    );
    write(
        &t.local,
        "passwd",
        "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
    );
    write(&t.base, "shadow", "root:*:1::::::\n");
    write(&t.new, "shadow", "root:*:1::::::\n_chrony:!:1::::::\n");
    write(&t.local, "shadow", "root:$6$rotated:2::::::\nalice:$6$a:2::::::\n");
    fs::set_permissions(t.local.join("shadow"), fs::Permissions::from_mode(0o640)).unwrap();
    let r = run(&t, &Policy::default());
    assert_eq!(
        read(&t.out, "passwd").as_deref(),
        Some(
            "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n_chrony:x:101:101::/:/usr/sbin/nologin\n"
        )
    );
    assert_eq!(
        read(&t.out, "shadow").as_deref(),
        Some("root:$6$rotated:2::::::\nalice:$6$a:2::::::\n_chrony:!:1::::::\n"),
        "the rotated root password stays"
    );
    assert_eq!(
        fs::metadata(t.out.join("shadow")).unwrap().mode() & 0o777,
        0o640,
        "mode kept"
    );
    assert_eq!(r.merged.len(), 2, "{r:?}");
    assert!(r.conflicts.is_empty(), "{r:?}");
}

#[test]
fn type_changes_owners_modes_and_xattrs() {
    let t = trees();
    // A file here where the image now has a directory, and the other way round.
    write(&t.base, "a", "file\n");
    write(&t.new, "a/inner", "dir now\n");
    write(&t.local, "a", "mine\n");
    write(&t.base, "b/x", "1\n");
    write(&t.new, "b", "file now\n");
    write(&t.local, "b/x", "2\n");
    // A symlink changed here; the image changed the file it replaced.
    write(&t.base, "localtime", "UTC\n");
    write(&t.new, "localtime", "UTC2\n");
    symlink("/usr/share/zoneinfo/Europe/Berlin", t.local.join("localtime")).unwrap();
    // Same bytes, other owner and mode: not the same file, so it is kept.
    write(&t.base, "sudoers", "root ALL=(ALL) ALL\n");
    write(&t.new, "sudoers", "root ALL=(ALL) ALL\n");
    write(&t.local, "sudoers", "root ALL=(ALL) ALL\n");
    fs::set_permissions(t.local.join("sudoers"), fs::Permissions::from_mode(0o440)).unwrap();
    std::os::unix::fs::chown(t.local.join("sudoers"), None, Some(4)).unwrap();
    // An xattr (a security label) kept with the file.
    write(&t.local, "labelled", "x\n");
    xattr::set(t.local.join("labelled"), "user.atom-test", b"v").ok();
    xattr::set(t.local.join("labelled"), "trusted.overlay.origin", b"layer-private").unwrap();
    // An opaque directory (replaced whole on this host).
    write(&t.base, "opaque/one", "1\n");
    write(&t.new, "opaque/one", "2\n");
    write(&t.local, "opaque/mine", "m\n");
    xattr::set(t.local.join("opaque"), entry::OPAQUE, b"y").unwrap();

    let r = run(&t, &Policy::default());
    let out = &t.out;
    assert_eq!(read(out, "a").as_deref(), Some("mine\n"));
    assert_eq!(read(out, "b/x").as_deref(), Some("2\n"));
    assert_eq!(read(out, "b.atom-new").as_deref(), Some("file now\n"));
    assert_eq!(
        fs::read_link(out.join("localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/Europe/Berlin")
    );
    assert_eq!(read(out, "localtime.atom-new").as_deref(), Some("UTC2\n"));
    let m = fs::metadata(out.join("sudoers")).unwrap();
    assert_eq!((m.mode() & 0o777, m.gid()), (0o440, 4));
    assert!(
        xattr::get(out.join("labelled"), "trusted.overlay.origin")
            .unwrap()
            .is_none(),
        "layer-private xattr not copied"
    );
    if xattr::get(t.local.join("labelled"), "user.atom-test")
        .unwrap()
        .is_some()
    {
        assert_eq!(
            xattr::get(out.join("labelled"), "user.atom-test").unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }
    assert!(entry::is_opaque(&out.join("opaque")));
    assert_eq!(read(out, "opaque/mine").as_deref(), Some("m\n"));
    let paths: Vec<&str> = r.conflicts.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(paths, ["a", "b", "localtime", "opaque"], "{r:?}");
}

#[test]
fn policy_follows_the_image_or_keeps_the_host() {
    let t = trees();
    write(&t.base, "os-release", "VERSION=1\n");
    write(&t.new, "os-release", "VERSION=2\n");
    write(&t.local, "os-release", "VERSION=hacked\n");
    write(&t.base, "ssh/ssh_host_ed25519_key", "image\n");
    write(&t.new, "ssh/ssh_host_ed25519_key", "image2\n");
    write(&t.local, "ssh/ssh_host_ed25519_key", "host key\n");
    let policy = Policy::parse(b"follow_image = [\"os-release\"]\nnever_merge = [\"ssh\"]\n").unwrap();
    let r = run(&t, &policy);
    assert_eq!(read(&t.out, "os-release"), None);
    assert_eq!(read(&t.out, "ssh/ssh_host_ed25519_key").as_deref(), Some("host key\n"));
    assert!(read(&t.out, "ssh/ssh_host_ed25519_key.atom-new").is_none());
    assert!(r.conflicts.is_empty(), "{r:?}");
}

#[test]
fn a_directory_copied_up_unchanged_takes_the_images_new_mode() {
    let t = trees();
    write(&t.base, "private/key", "k\n");
    write(&t.new, "private/key", "k\n");
    write(&t.local, "private/local", "l\n");
    for root in [&t.base, &t.local] {
        fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(t.new.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    run(&t, &Policy::default());
    assert_eq!(fs::metadata(t.out.join("private")).unwrap().mode() & 0o777, 0o700);
    assert_eq!(read(&t.out, "private/local").as_deref(), Some("l\n"));
}

#[test]
fn empty_copied_up_directories_are_pruned() {
    let t = trees();
    write(&t.base, "d/f", "1\n");
    write(&t.new, "d/f", "2\n");
    write(&t.local, "d/f", "2\n");
    run(&t, &Policy::default());
    assert!(!t.out.join("d").exists(), "nothing left in d: it follows the image");
}

#[test]
fn a_merge_cut_halfway_leaves_the_old_layer() {
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("upper");
    write(&layer, "hostname", "old\n");
    // A cut merge: a half-written staging tree.
    write(&layer::staging(&layer), "hostname", "half");
    layer::recover(&layer).unwrap();
    assert!(!layer::staging(&layer).exists());
    assert_eq!(read(&layer, "hostname").as_deref(), Some("old\n"));
    // A complete one swaps in, and the old is gone.
    write(&layer::staging(&layer), "hostname", "new\n");
    layer::replace(&layer).unwrap();
    assert_eq!(read(&layer, "hostname").as_deref(), Some("new\n"));
    assert!(!layer::staging(&layer).exists());
    // The first merge of a slot: no layer yet.
    let fresh = dir.path().join("fresh");
    write(&layer::staging(&fresh), "a", "1\n");
    layer::replace(&fresh).unwrap();
    assert_eq!(read(&fresh, "a").as_deref(), Some("1\n"));
}

#[test]
fn hostile_layers_are_copied_not_followed() {
    use std::os::unix::ffi::OsStrExt;
    let t = trees();
    // A symlink pointing out of /etc, a FIFO, a name that is not UTF-8.
    symlink("/etc/shadow", t.local.join("leak")).unwrap();
    nix::unistd::mkfifo(&t.local.join("pipe"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"caf\xe9.conf");
    fs::write(t.local.join(odd), "x\n").unwrap();
    let r = run(&t, &Policy::default());
    assert_eq!(
        fs::read_link(t.out.join("leak")).unwrap(),
        Path::new("/etc/shadow"),
        "a link, not the file"
    );
    assert!(fs::symlink_metadata(t.out.join("pipe")).unwrap().file_type().is_fifo());
    assert_eq!(fs::read_to_string(t.out.join(odd)).unwrap(), "x\n");
    assert!(r.conflicts.is_empty(), "{r:?}");
}

//! The systemd units, installed by `atom-build install-units`, checked by
//! `systemd-analyze verify` against the host's systemd.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

fn copy_dir(src: &Path, dst: &Path) {
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", src.display()))
            .arg(dst)
            .status()
            .unwrap()
            .success()
    );
}

fn verify(root: &Path, units: &[&str]) -> (bool, String) {
    let mut c = Command::new("systemd-analyze");
    c.arg("verify").arg(format!("--root={}", root.display()));
    for u in units {
        c.arg(root.join("usr/lib/systemd/system").join(u));
    }
    let out = c.output().expect("systemd-analyze (package systemd) is needed");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn installed_units_verify() {
    let f = Fixture::new();
    let root = f.path("root");
    // The host's systemd units and tools, so dependencies like boot-complete.target and
    // the binaries the units run resolve inside the root.
    fs::create_dir_all(root.join("usr/lib/systemd/system")).unwrap();
    copy_dir(
        Path::new("/usr/lib/systemd/system"),
        &root.join("usr/lib/systemd/system"),
    );
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    for tool in ["systemctl", "kill"] {
        fs::copy(Path::new("/usr/bin").join(tool), root.join("usr/bin").join(tool)).unwrap();
    }
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();

    let out = ok(atom_build(&[&"install-units", &"--root", &root]));
    assert!(out.contains("installed 6 units"), "{out}");
    assert!(root.join("usr/bin/atom-update").exists());
    assert!(root.join("usr/lib/systemd/system-preset/80-atom.preset").exists());
    assert!(root.join("etc/atom/health.d").is_dir());

    let units = [
        "atom-update.service",
        "atom-update.timer",
        "atom-updated.service",
        "atom-health.service",
        "atom-mark-good.service",
        "atom-mark-bad.service",
    ];
    let (good, err) = verify(&root, &units);
    assert!(good, "systemd-analyze verify: {err}");

    // Everything enabled at once, the daemon too: no ordering cycle (systemd would break
    // one by dropping a start job, silently losing the daemon or the health check).
    let enable = Command::new("systemctl")
        .arg(format!("--root={}", root.display()))
        .args([
            "enable",
            "atom-health.service",
            "atom-mark-good.service",
            "atom-updated.service",
        ])
        .output()
        .unwrap();
    assert!(enable.status.success(), "{}", String::from_utf8_lossy(&enable.stderr));
    let (_, err) = verify(&root, &["multi-user.target"]);
    assert!(
        !err.contains("ordering cycle"),
        "systemd-analyze verify multi-user.target: {err}"
    );

    // The check can fail: a misspelt directive is reported.
    let unit = root.join("usr/lib/systemd/system/atom-update.service");
    let text = fs::read_to_string(&unit).unwrap().replace("ExecStart=", "ExecStrat=");
    fs::write(&unit, text).unwrap();
    let (good, err) = verify(&root, &["atom-update.service"]);
    assert!(!good || err.contains("ExecStrat"), "a broken unit passed verification");
}

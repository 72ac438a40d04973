//! The systemd units, installed by `atom-build install-units`, checked by
//! `systemd-analyze verify` and `systemd-analyze security` against the host's systemd.

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

/// Every service scores at most 3.0 in `systemd-analyze security` (lower is safer). The
/// sandbox itself is proven to work by tests/vm-systemd.sh, which boots these units.
#[test]
fn every_service_is_sandboxed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let mut seen = 0;
    let paths = std::fs::read_dir(&dir)
        .unwrap()
        .chain(std::fs::read_dir(dir.join("server")).unwrap())
        .map(|e| e.unwrap().path());
    for path in paths {
        if path.extension().is_none_or(|x| x != "service") {
            continue;
        }
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=30"])
            .arg(&path)
            .output()
            .expect("systemd-analyze (package systemd) is needed");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no score for {}:\n{text}", path.display()));
        println!("{}: {score}", path.display());
        assert!(
            score <= 3.0,
            "{} scores {score} (more than 3.0):\n{text}",
            path.display()
        );
        assert!(out.status.success(), "{}: {text}", path.display());
        seen += 1;
    }
    assert_eq!(seen, 6, "every service was scored");
}

/// The repository server's refresh timer and service (key roles) verify as an instance.
#[test]
fn refresh_units_verify() {
    let f = Fixture::new();
    let root = f.path("root");
    let units = root.join("usr/lib/systemd/system");
    fs::create_dir_all(&units).unwrap();
    copy_dir(Path::new("/usr/lib/systemd/system"), &units);
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::copy(BIN, root.join("usr/bin/atom-build")).unwrap();
    let server = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/server");
    for u in ["atom-refresh@.service", "atom-refresh@.timer"] {
        fs::copy(server.join(u), units.join(u)).unwrap();
    }
    fs::create_dir_all(root.join("srv/atom")).unwrap();
    let (good, err) = verify(&root, &["atom-refresh@srv-atom.timer", "atom-refresh@srv-atom.service"]);
    assert!(good, "systemd-analyze verify: {err}");
}

//! `atom-build build` on the busybox example recipe (included by a test recipe that adds
//! hooks and a repository): the stage cache reuses exactly the stages before a change,
//! `--locked` rebuilds the same bytes, a failing or hanging hook names its stage and
//! publishes nothing, bad recipes are refused naming the key. Root (mount namespaces,
//! chroot); the kernel stage is left out here (tests/vm.sh builds the full recipe).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use atom_build::build::tree;
use common::{BIN, fails_with, ok};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/busybox/recipe.toml");

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "these tests build OS trees (mount namespaces, chroot) and must run as root"
    );
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        require_root();
        let s = Setup {
            dir: tempfile::tempdir().unwrap(),
        };
        ok(common::atom_build(&[&"keygen", &"--out", &s.path("signer")]));
        s
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn hook(&self, name: &str, body: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, format!("#!/bin/sh\nset -eu\n{body}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// A recipe on top of the example: its own hooks, a repository, no kernel.
    fn recipe(&self, name: &str, extra: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(
            &p,
            format!(
                "include = [{EXAMPLE:?}]\n[publish]\nrepo = \"repo\"\nkey = \"signer.key\"\nzstd_level = 3\n{extra}\n"
            ),
        )
        .unwrap();
        p
    }

    fn build(&self, recipe: &Path, build_dir: &str, args: &[&str]) -> Output {
        let mut c = Command::new(BIN);
        c.arg("build")
            .arg(recipe)
            .arg("--build-dir")
            .arg(self.path(build_dir))
            .arg("--cache")
            .arg(self.path("cache"))
            .args(["--skip", "kernel", "--set", "atom.agent=/bin/true"])
            .arg("--set")
            .arg(format!("atom.keys=[{:?}]", self.path("signer.pub")))
            .args(args)
            .env("RUST_LOG", "warn");
        c.output().unwrap()
    }

    /// A build of a recipe that stands alone (not on the example): no --set.
    fn build_alone(&self, recipe: &Path, build_dir: &str) -> Output {
        Command::new(BIN)
            .arg("build")
            .arg(recipe)
            .arg("--build-dir")
            .arg(self.path(build_dir))
            .arg("--cache")
            .arg(self.path("cache"))
            .output()
            .unwrap()
    }

    fn image(&self, build_dir: &str, version: &str) -> PathBuf {
        self.path(&format!("{build_dir}/out/atom-sample-{version}.img"))
    }
}

/// Each stage's verdict from the build's stage lines ("[3/11] files     cached (0.0 s)").
fn verdicts(out: &Output) -> BTreeMap<String, String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with('['))
        .filter_map(|l| {
            let mut w = l.split_whitespace().skip(1);
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

fn built(out: Output) -> BTreeMap<String, String> {
    let v = verdicts(&out);
    ok(out);
    v
}

fn image_file(image: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_changed_hook_rebuilds_from_its_stage_and_reuses_every_earlier_one() {
    let s = Setup::new();
    s.hook("mark.sh", "echo one > \"$ATOM_ROOT/etc/mark\"");
    let r = s.recipe("r.toml", "[hooks.clean]\nafter = [\"mark.sh\"]\n");
    let first = built(s.build(&r, "b", &["--skip", "publish"]));
    for stage in ["bootstrap", "files", "scripts", "atom", "clean", "image"] {
        assert_eq!(first[stage], "built", "{stage}: {first:?}");
    }
    assert_eq!(first["kernel"], "skipped");
    assert_eq!(image_file(&s.image("b", "1.0.0"), "/etc/mark"), "one\n");
    assert!(image_file(&s.image("b", "1.0.0"), "/etc/motd").contains("1.0.0"));

    let again = built(s.build(&r, "b", &["--skip", "publish"]));
    for stage in [
        "bootstrap",
        "files",
        "configure",
        "scripts",
        "atom",
        "clean",
        "image",
        "outputs",
    ] {
        assert_eq!(again[stage], "cached", "{stage}: {again:?}");
    }

    s.hook("mark.sh", "echo two > \"$ATOM_ROOT/etc/mark\"");
    let out = s.build(&r, "b", &["--skip", "publish"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let changed = built(out);
    for stage in ["bootstrap", "packages", "files", "configure", "scripts", "atom"] {
        assert_eq!(changed[stage], "cached", "{stage}: {changed:?}");
    }
    for stage in ["clean", "image", "outputs"] {
        assert_eq!(changed[stage], "built", "{stage}: {changed:?}");
    }
    assert!(
        stderr.contains("hooks.clean.after[0]"),
        "the miss names the changed hook: {stderr}"
    );
    assert_eq!(image_file(&s.image("b", "1.0.0"), "/etc/mark"), "two\n");

    // A change in a stage whose predecessors keep no tree: they are replayed from the
    // nearest kept tree (packages), so their work is in the image.
    let atom = built(s.build(&r, "b", &["--skip", "publish", "--set", "atom.update={ tries = 3 }"]));
    for stage in ["files", "configure", "scripts"] {
        assert_eq!(atom[stage], "cached", "{stage}: {atom:?}");
    }
    assert_eq!(atom["atom"], "built", "{atom:?}");
    let img = s.image("b", "1.0.0");
    assert!(image_file(&img, "/etc/atom/update.toml").contains("tries = 3"));
    assert!(
        image_file(&img, "/etc/motd").contains("1.0.0"),
        "the scripts stage was replayed"
    );
    assert_eq!(image_file(&img, "/etc/mark"), "two\n");
    assert!(
        !image_file(&img, "/bin/busybox").is_empty(),
        "the files stage was replayed"
    );

    let lock = fs::read_to_string(s.path("b/out/build.lock.toml")).unwrap();
    assert!(lock.contains("\"hooks.clean.after[0]\""), "{lock}");
    assert!(lock.contains("\"atom.agent\""), "the lock records host files: {lock}");

    // --from forces a stage and those after it; --only runs one on the cached rest.
    let from = built(s.build(&r, "b", &["--from", "image", "--skip", "publish"]));
    assert_eq!((from["clean"].as_str(), from["image"].as_str()), ("cached", "built"));
    let only = built(s.build(&r, "b", &["--only", "files"]));
    assert_eq!(only["files"], "built");
    assert!(!only.contains_key("image"), "{only:?}");
    let fresh = s.build(
        &r,
        "other",
        &["--only", "files", "--set", "packages.no_recommends=false"],
    );
    fails_with(fresh, 1, "not in the cache");
}

#[test]
fn a_locked_rebuild_makes_the_same_image_bytes_and_refuses_anything_else() {
    let s = Setup::new();
    let r = s.recipe("r.toml", "");
    ok(s.build(&r, "b1", &[]));
    let lock = s.path("b1/out/build.lock.toml");
    assert!(
        s.path("repo/builds/stable/1.0.0/build.lock.toml").is_file(),
        "the lock is published beside the image"
    );
    // The same bytes without the cache, on the (now published) repository: the lock says
    // there was no base image, so none is used.
    ok(s.build(
        &r,
        "b2",
        &["--locked", lock.to_str().unwrap(), "--no-cache", "--skip", "publish"],
    ));
    assert_eq!(
        fs::read(s.image("b1", "1.0.0")).unwrap(),
        fs::read(s.image("b2", "1.0.0")).unwrap(),
        "a locked rebuild reproduces the image"
    );
    let other = s.build(
        &r,
        "b3",
        &["--locked", lock.to_str().unwrap(), "--set", "image.size=\"80M\""],
    );
    fails_with(other, 1, "the recipe is not the one locked");
    // A script changed behind the lock's back.
    let copy = s.path("example");
    fs::create_dir_all(&copy).unwrap();
    let example_dir = Path::new(EXAMPLE).parent().unwrap();
    tree::copy(example_dir, &copy).unwrap();
    let moved = s.path("moved.toml");
    fs::write(
        &moved,
        "include = [\"example/recipe.toml\"]\n[publish]\nrepo = \"repo\"\nkey = \"signer.key\"\nzstd_level = 3\n",
    )
    .unwrap();
    ok(s.build(&moved, "m1", &["--skip", "publish"]));
    let mlock = s.path("m1/out/build.lock.toml");
    fs::write(
        copy.join("scripts/10-busybox.sh"),
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n",
    )
    .unwrap();
    let out = s.build(
        &moved,
        "m2",
        &["--locked", mlock.to_str().unwrap(), "--skip", "publish"],
    );
    fails_with(out, 1, "scripts[0] is not the locked one");
}

#[test]
fn a_failing_or_hanging_hook_names_its_stage_publishes_nothing_and_keeps_the_cache() {
    let s = Setup::new();
    let r1 = s.recipe("r1.toml", "");
    ok(s.build(&r1, "b", &[]));
    let repo_before = tree::digest(&s.path("repo")).unwrap();

    s.hook("boom.sh", "echo 'the disk quota check says no' >&2; exit 3");
    let r2 = s.recipe("r2.toml", "[hooks.image]\nbefore = [\"boom.sh\"]\n");
    let out = s.build(&r2, "b", &["--set", "os.version=2.0.0"]);
    let stderr = fails_with(out, 1, "stage image failed");
    assert!(
        stderr.contains("the disk quota check says no"),
        "the log's last lines are shown: {stderr}"
    );
    assert!(stderr.contains("boom.sh"), "{stderr}");
    assert_eq!(
        tree::digest(&s.path("repo")).unwrap(),
        repo_before,
        "nothing was published"
    );
    assert!(
        !s.path("b/tree").exists(),
        "the failed tree is removed without --keep-failed"
    );

    s.hook("hang.sh", "sleep 60");
    let r3 = s.recipe(
        "r3.toml",
        "[[hooks.outputs.after]]\nrun = \"hang.sh\"\ntimeout = \"1s\"\n",
    );
    let out = s.build(&r3, "b", &["--set", "os.version=2.0.0", "--keep-failed"]);
    fails_with(out, 1, "did not finish within 1s");
    assert!(s.path("b/tree/etc/motd").is_file(), "--keep-failed keeps the tree");
    assert_eq!(
        tree::digest(&s.path("repo")).unwrap(),
        repo_before,
        "nothing was published"
    );

    // The cache is intact: the good 2.0.0 reuses everything before the version matters.
    let out = s.build(&r1, "b", &["--set", "os.version=2.0.0"]);
    let v = built(out);
    assert_eq!(v["files"], "cached", "{v:?}");
    assert_eq!(v["publish"], "built", "{v:?}");
    // Layout-stable against the channel's current image, found in the repository.
    let lock = fs::read_to_string(s.path("b/out/build.lock.toml")).unwrap();
    let v1_lock = fs::read_to_string(s.path("repo/builds/stable/1.0.0/build.lock.toml")).unwrap();
    let v1_image = v1_lock
        .lines()
        .find(|l| l.starts_with("image = "))
        .unwrap()
        .trim_start_matches("image = ");
    assert!(lock.contains(&format!("base_image = {v1_image}")), "{lock}");

    let out = s.build(&r1, "b", &["--set", "os.version=2.0.0"]);
    fails_with(out, 1, "must be newer (nothing was built)");
}

#[test]
fn bad_recipes_are_refused_with_the_key_named() {
    let s = Setup::new();
    let typo = s.recipe("typo.toml", "[packages]\ninstal = [\"curl\"]\n");
    fails_with(s.build(&typo, "b", &[]), 1, "unknown field `instal`");
    let hook_typo = s.recipe(
        "hook-typo.toml",
        "[[hooks.files.after]]\nrun = \"x.sh\"\nchrot = true\n",
    );
    fails_with(s.build(&hook_typo, "b", &[]), 1, "unknown field `chrot`");
    let no_root = s.path("not-a-root");
    fs::create_dir_all(no_root.join("docs")).unwrap();
    let r = s.path("tree.toml");
    fs::write(
        &r,
        format!(
            "[os]\nversion = \"1.0.0\"\n[base]\ntree = {:?}\n[image]\nsize = \"32M\"\n",
            no_root
        ),
    )
    .unwrap();
    let out = s.build_alone(&r, "b");
    fails_with(out, 1, "is not a root tree");
    let missing = s.recipe("missing.toml", "[hooks.files]\nafter = [\"nowhere.sh\"]\n");
    fails_with(s.build(&missing, "b", &[]), 1, "cannot read hook");
    let stage = s.recipe("stage.toml", "");
    fails_with(s.build(&stage, "b", &["--from", "compile"]), 1, "no such stage");
    fails_with(s.build(&stage, "b", &["--set", "nonsense"]), 1, "give KEY=VALUE");

    // One build at a time per build directory.
    fs::create_dir_all(s.path("busy")).unwrap();
    let f = fs::File::create(s.path("busy/.lock")).unwrap();
    let _held = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
    fails_with(s.build(&stage, "busy", &[]), 1, "another build is running");
}

#[test]
fn links_in_the_tree_never_lead_a_build_to_the_host() {
    let s = Setup::new();
    // The host directory an absolute link in the tree names.
    let victim = s.path("victim");
    fs::create_dir_all(victim.join("keep")).unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o755)).unwrap();
    let base = s.path("base");
    for d in ["etc", "usr/bin", "var", "run"] {
        fs::create_dir_all(base.join(d)).unwrap();
    }
    std::os::unix::fs::symlink(&victim, base.join("var/lock")).unwrap();
    std::os::unix::fs::symlink(victim.join("hostname"), base.join("etc/hostname")).unwrap();
    fs::write(victim.join("hostname"), "host\n").unwrap();
    let r = s.path("links.toml");
    fs::write(
        &r,
        format!(
            "[os]\nversion = \"1.0.0\"\n[base]\ntree = {base:?}\n[[directories]]\npath = \"/var/lock\"\nmode = \"0700\"\nowner = \"4242:4242\"\n\
             [configure]\nhostname = \"image\"\n[clean]\ncaches = false\npaths = [\"/var/lock/keep\"]\n[image]\nsize = \"32M\"\n"
        ),
    )
    .unwrap();
    let out = s.build_alone(&r, "b");
    ok(out);
    let m = fs::metadata(&victim).unwrap();
    assert_eq!(
        m.permissions().mode() & 0o7777,
        0o755,
        "the host directory kept its mode"
    );
    assert_ne!(std::os::unix::fs::MetadataExt::uid(&m), 4242, "and its owner");
    assert!(victim.join("keep").is_dir(), "clean.paths removed nothing on the host");
    assert_eq!(fs::read_to_string(victim.join("hostname")).unwrap(), "host\n");
    // Inside the image the link means what it means on a booted host.
    let img = s.path("b/out/atom-os-1.0.0.img");
    assert_eq!(image_file(&img, &format!("{}/hostname", victim.display())), "image\n");
}

#[test]
fn a_source_file_with_another_mode_or_time_is_not_taken_from_the_cache() {
    let s = Setup::new();
    let f = s.path("tool");
    fs::write(&f, "#!/bin/sh\n").unwrap();
    let r = s.recipe("r.toml", "[[files]]\nsource = \"tool\"\ntarget = \"/usr/bin/tool\"\n");
    ok(s.build(&r, "b", &["--skip", "publish"]));
    fs::set_permissions(&f, fs::Permissions::from_mode(0o755)).unwrap();
    let v = built(s.build(&r, "b", &["--skip", "publish"]));
    assert_eq!(v["files"], "built", "a mode change is an input: {v:?}");
    let m = Command::new("debugfs")
        .args(["-R", "stat /usr/bin/tool"])
        .arg(s.image("b", "1.0.0"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&m.stdout).contains("Mode:  0755"),
        "{}",
        String::from_utf8_lossy(&m.stdout)
    );
    filetime::set_file_mtime(&f, filetime::FileTime::from_unix_time(1_500_000_000, 0)).unwrap();
    let v = built(s.build(&r, "b", &["--skip", "publish"]));
    assert_eq!(v["files"], "built", "a time change is an input (cp -a keeps it): {v:?}");
}

#[test]
fn a_full_disk_fails_the_stage_by_name_and_keeps_the_cache() {
    let s = Setup::new();
    let r = s.recipe("r.toml", "");
    // The cache is warm; the build directory then lives on a 6 MiB tmpfs.
    ok(s.build(&r, "warm", &["--skip", "publish"]));
    let small = s.path("small");
    fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a tmpfs (root)");
    let out = s.build(
        &r,
        "small/b",
        &["--skip", "publish", "--set", "image.size=\"64M\"", "--no-cache"],
    );
    let _ = Command::new("umount").arg(&small).status();
    let stderr = fails_with(out, 1, "failed");
    assert!(stderr.contains("stage "), "the error names the stage: {stderr}");
    assert!(!s.path("repo/channels").exists(), "nothing was published");
    // The cache is still whole: the same build elsewhere takes every stage from it.
    let v = built(s.build(&r, "again", &["--skip", "publish"]));
    assert_eq!(v["clean"], "cached", "{v:?}");
    assert_eq!(v["image"], "cached", "{v:?}");
}

//! `atom-build build RECIPE`: a recipe through the fixed stages (`recipe::STAGES`) to a
//! signed, published image. Each stage's result is cached under a key of everything it
//! depends on; a rerun restarts at the first stage whose key changed. Every build writes
//! `build.lock.toml`, and `--locked` rebuilds exactly that.
//!
//! The build directory holds `tree/` (the root being built), `logs/NN-STAGE.log`, `work/`
//! (scratch) and `out/` (image, outputs, lock, package list). The whole build runs in its
//! own mount namespace; nothing outside the build directory and the cache changes on the
//! build host (except the repository, by the publish stage).

pub mod cache;
pub mod chroot;
pub mod hooks;
pub mod lock;
pub mod progress;
pub mod rootpath;
pub mod stages;
pub mod tree;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use nix::fcntl::{Flock, FlockArg};

use self::cache::{Cache, EntryMeta, Inputs};
use self::lock::Lock;
use self::progress::{Progress, StageLog};
use self::stages::{BaseImage, Kind};
use crate::cli::BuildArgs;
use crate::recipe::{self, Loaded, STAGES};

/// Limit of one command a stage runs (mmdebstrap, apt, update-initramfs).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3 * 3600);
/// Tree stages whose tree is kept in the cache: the slow ones (network, initramfs) and the
/// last (what image and outputs start from). The others are cheap: on a hit their key is
/// reused and, when a later stage needs the tree, they are replayed on the nearest kept
/// tree. Keeping every stage's tree took 7 GB for three Debian versions.
const KEPT_TREES: [&str; 4] = ["bootstrap", "packages", "kernel", "clean"];
/// Inputs that are files of the build host (recorded in the lock, checked by --locked).
const HOST_FILE_INPUTS: [&str; 7] = [
    "files[",
    "atom.agent",
    "atom.bootsel",
    "atom.keys[",
    "kernel.",
    "outputs.disk.",
    "base.",
];
/// Lines of a failed stage's log shown with the error.
const TAIL_LINES: usize = 20;

pub fn run(args: &BuildArgs) -> Result<()> {
    let loaded = recipe::load(&args.recipe, &args.set)?;
    let selection = Selection::new(args)?;
    let locked = args.locked.as_deref().map(Lock::read).transpose()?;
    let r = &loaded.recipe;
    let epoch = match (&locked, r.build.source_date_epoch) {
        (Some(l), _) => l.source_date_epoch,
        (None, Some(t)) => t,
        (None, None) => crate::image::source_date_epoch()?,
    };
    chroot::private_mount_namespace()?;
    let dir = BuildDir::open(&args.build_dir)?;
    let cache = Cache::open(&args.cache)?;
    let base_image = stages::resolve_base(r, locked.as_ref())?;
    let plan = plan(&loaded, &selection, epoch, &base_image, locked.as_ref())?;
    let hooks: BTreeMap<String, String> = plan
        .iter()
        .flat_map(|s| s.inputs.iter())
        .filter(|(k, _)| k.starts_with("hooks.") || k.starts_with("scripts["))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let files: BTreeMap<String, String> = plan
        .iter()
        .flat_map(|s| s.inputs.iter())
        .filter(|(k, _)| HOST_FILE_INPUTS.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let base_source = stages::base_source_digest(r)?;
    if let Some(l) = &locked {
        l.check_inputs(&loaded.digest, &hooks, &files, base_source.as_deref())?;
    }
    if selection.will_run("publish") && r.publish.is_some() {
        stages::check_version_grows(r)?;
    }
    let recipe_dir = args
        .recipe
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .canonicalize()?;
    let mut run = Runner {
        loaded: &loaded,
        args,
        dir: &dir,
        cache: &cache,
        epoch,
        base_image: &base_image,
        locked: locked.as_ref(),
        recipe_dir,
        progress: Progress::new(args.quiet, STAGES.len()).with_events(args.events.as_deref())?,
        live: false,
        pending: None,
        replay: Vec::new(),
        last_tree_entry: None,
        // A lock of a build that ran one stage would be a partial record.
        lock_written: selection.only.is_some(),
    };
    run.execute(
        &plan,
        &selection,
        &Recorded {
            hooks,
            files,
            base_source,
        },
    )
}

/// What a build of a recipe would run, without running it: each stage's cache key and
/// whether the cache holds it. The build service takes an order's digest (the last key,
/// which covers every input) and its ETA from this.
pub struct Preview {
    pub loaded: Loaded,
    /// (stage, key, in the cache) in stage order.
    pub stages: Vec<(&'static str, String, bool)>,
}

impl Preview {
    /// The key of the last stage: equal for two builds only when every input is.
    pub fn digest(&self) -> &str {
        self.stages.last().map(|s| s.1.as_str()).unwrap_or_default()
    }
}

pub fn preview(recipe: &Path, sets: &[String], skip: &[String], cache: &Path) -> Result<Preview> {
    for s in skip {
        stage_index(s, "--skip")?;
    }
    let loaded = recipe::load(recipe, sets)?;
    let selection = Selection {
        skip: skip.to_vec(),
        only: None,
        from: None,
        no_cache: false,
    };
    let epoch = match loaded.recipe.build.source_date_epoch {
        Some(t) => t,
        None => crate::image::source_date_epoch()?,
    };
    let base_image = stages::resolve_base(&loaded.recipe, None)?;
    let planned = plan(&loaded, &selection, epoch, &base_image, None)?;
    let cache = Cache::open(cache)?;
    let stages = planned
        .into_iter()
        .map(|p| {
            let cached = cache.lookup(&p.key).is_some();
            (p.name, p.key, cached)
        })
        .collect();
    Ok(Preview { loaded, stages })
}

/// What the lock records besides the build's own results.
struct Recorded {
    hooks: BTreeMap<String, String>,
    files: BTreeMap<String, String>,
    base_source: Option<String>,
}

struct Planned {
    index: usize,
    name: &'static str,
    inputs: Inputs,
    key: String,
    skipped: bool,
}

fn plan(
    loaded: &Loaded,
    selection: &Selection,
    epoch: i64,
    base_image: &BaseImage,
    locked: Option<&Lock>,
) -> Result<Vec<Planned>> {
    let p = stages::Plan {
        recipe: &loaded.recipe,
        epoch,
        base_image,
        locked,
    };
    let mut out = Vec::new();
    let mut previous = String::new();
    for (index, name) in STAGES.iter().enumerate() {
        let skipped = selection.skip.iter().any(|s| s == name);
        let inputs = if skipped {
            Inputs::from([("skipped".to_string(), "yes".to_string())])
        } else {
            stages::inputs(name, &p).with_context(|| format!("stage {name}"))?
        };
        let key = cache::key(name, &inputs, &previous);
        previous = key.clone();
        out.push(Planned {
            index,
            name,
            inputs,
            key,
            skipped,
        });
    }
    Ok(out)
}

/// `--skip`, `--only`, `--from`, `--no-cache`.
struct Selection {
    skip: Vec<String>,
    only: Option<usize>,
    from: Option<usize>,
    no_cache: bool,
}

fn stage_index(name: &str, flag: &str) -> Result<usize> {
    STAGES
        .iter()
        .position(|s| *s == name)
        .with_context(|| format!("{flag} {name}: no such stage (stages: {})", STAGES.join(", ")))
}

impl Selection {
    fn new(args: &BuildArgs) -> Result<Selection> {
        for s in &args.skip {
            stage_index(s, "--skip")?;
        }
        let only = args.only.as_deref().map(|s| stage_index(s, "--only")).transpose()?;
        let from = args.from.as_deref().map(|s| stage_index(s, "--from")).transpose()?;
        if let Some(i) = only.or(from)
            && args.skip.iter().any(|s| s == STAGES[i])
        {
            bail!("--skip {} contradicts --only/--from {}", STAGES[i], STAGES[i]);
        }
        Ok(Selection {
            skip: args.skip.clone(),
            only,
            from,
            no_cache: args.no_cache,
        })
    }

    fn will_run(&self, stage: &str) -> bool {
        let i = stage_index(stage, "").expect("a known stage");
        !self.skip.iter().any(|s| s == stage) && self.only.is_none_or(|o| o == i)
    }

    fn forced(&self, index: usize) -> bool {
        self.no_cache || self.only == Some(index) || self.from.is_some_and(|f| index >= f)
    }
}

/// The build directory, locked for this build.
struct BuildDir {
    root: PathBuf,
    tree: PathBuf,
    out: PathBuf,
    logs: PathBuf,
    work: PathBuf,
    _lock: Flock<fs::File>,
}

impl BuildDir {
    fn open(root: &Path) -> Result<BuildDir> {
        fs::create_dir_all(root).with_context(|| format!("cannot create the build directory {}", root.display()))?;
        let root = root.canonicalize()?;
        let file = fs::File::create(root.join(".lock"))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| {
            anyhow::anyhow!(
                "another build is running in {} (give each build its own --build-dir)",
                root.display()
            )
        })?;
        let d = BuildDir {
            tree: root.join("tree"),
            out: root.join("out"),
            logs: root.join("logs"),
            work: root.join("work"),
            root,
            _lock: lock,
        };
        // Nothing of an earlier build may pass for this one's (a stale image published, a
        // tarball listed).
        tree::remove(&d.work)?;
        tree::remove(&d.logs)?;
        tree::remove(&d.out)?;
        for p in [&d.out, &d.logs, &d.work] {
            fs::create_dir_all(p)?;
        }
        Ok(d)
    }
}

struct Runner<'a> {
    loaded: &'a Loaded,
    args: &'a BuildArgs,
    dir: &'a BuildDir,
    cache: &'a Cache,
    epoch: i64,
    base_image: &'a BaseImage,
    locked: Option<&'a Lock>,
    recipe_dir: PathBuf,
    progress: Progress,
    /// `dir.tree` holds the result of the last tree stage processed.
    live: bool,
    /// Else this cache entry's `tree/` does.
    pending: Option<PathBuf>,
    /// Cached stages without a kept tree since then: replayed before the tree is used.
    replay: Vec<(usize, &'static str)>,
    last_tree_entry: Option<PathBuf>,
    lock_written: bool,
}

impl Runner<'_> {
    fn execute(&mut self, plan: &[Planned], selection: &Selection, recorded: &Recorded) -> Result<()> {
        let r = &self.loaded.recipe;
        let recipe_name = r.os.name.clone();
        for s in plan {
            if selection.only.is_some_and(|o| s.index > o) {
                break;
            }
            if s.name == "publish" {
                self.write_lock(plan, recorded)?;
            }
            if s.skipped {
                self.progress.restart_clock();
                self.progress.done(s.index, s.name, "skipped (--skip)");
                continue;
            }
            if s.name == "publish" && r.publish.is_none() {
                self.progress.restart_clock();
                self.progress
                    .done(s.index, s.name, "nothing to do (the recipe has no [publish])");
                continue;
            }
            let kind = stages::kind(s.name);
            let forced = selection.forced(s.index);
            if kind != Kind::Effect
                && !forced
                && let Some(hit) = self.cache.lookup(&s.key)
            {
                self.progress.restart_clock();
                self.take_hit(s, kind, &hit.dir)?;
                self.progress.done(s.index, s.name, "cached");
                continue;
            }
            if selection.only.is_some_and(|o| s.index < o) {
                bail!(
                    "--only {}: the result of stage {} is not in the cache; build once without --only",
                    STAGES[selection.only.expect("checked")],
                    s.name
                );
            }
            let why = if forced {
                "forced".to_string()
            } else if kind == Kind::Effect {
                "always runs".to_string()
            } else {
                self.cache
                    .explain_miss(&recipe_name, s.name, &s.inputs, previous_key(plan, s.index))
            };
            self.progress.stage(s.index, s.name, &why);
            let made = match self.run_stage(s) {
                Ok(made) => made,
                Err(e) => {
                    self.progress.failed(s.index, s.name);
                    return Err(e);
                }
            };
            match kind {
                Kind::Tree => {
                    let packages = lock::packages_tsv(&lock::dpkg_packages(&self.dir.tree)?);
                    let tree = &self.dir.tree;
                    let keep = KEPT_TREES.contains(&s.name);
                    let entry = self.store(s, &recipe_name, previous_key(plan, s.index), |d| {
                        if keep {
                            tree::copy(tree, &d.join("tree"))?;
                        }
                        fs::write(d.join("packages.tsv"), &packages)?;
                        Ok(())
                    })?;
                    self.last_tree_entry = Some(entry);
                }
                Kind::Artifacts => {
                    self.store(s, &recipe_name, previous_key(plan, s.index), |d| {
                        let dst = d.join("artifacts");
                        fs::create_dir_all(&dst)?;
                        for f in &made {
                            copy_file(f, &dst.join(f.file_name().expect("a file")))?;
                        }
                        Ok(())
                    })?;
                }
                Kind::Effect => {}
            }
            self.progress.done(s.index, s.name, &format!("built ({why})"));
        }
        self.write_lock(plan, recorded)?;
        self.summary();
        Ok(())
    }

    fn store(
        &self,
        s: &Planned,
        recipe: &str,
        previous: &str,
        fill: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        self.cache.evict(&s.key)?;
        let meta = EntryMeta {
            stage: s.name.to_string(),
            recipe: recipe.to_string(),
            key: s.key.clone(),
            previous: previous.to_string(),
            created: jiff::Timestamp::now(),
            inputs: s.inputs.clone(),
        };
        self.cache
            .store(&meta, fill)
            .with_context(|| format!("stage {}: cannot store its result in the cache", s.name))
    }

    fn take_hit(&mut self, s: &Planned, kind: Kind, entry: &Path) -> Result<()> {
        match kind {
            Kind::Tree => {
                self.last_tree_entry = Some(entry.to_path_buf());
                if entry.join("tree").is_dir() {
                    self.pending = Some(entry.to_path_buf());
                    self.replay.clear();
                    self.live = false;
                } else {
                    self.replay.push((s.index, s.name));
                }
            }
            Kind::Artifacts => {
                for f in fs::read_dir(entry.join("artifacts"))? {
                    let f = f?.path();
                    copy_file(&f, &self.dir.out.join(f.file_name().expect("a file")))?;
                }
            }
            Kind::Effect => {}
        }
        Ok(())
    }

    /// The tree as the stage before left it, in `dir.tree`.
    fn materialize(&mut self, stage: &str) -> Result<()> {
        if !self.live {
            tree::remove(&self.dir.tree)?;
            match self.pending.take() {
                Some(entry) if stage != "bootstrap" => {
                    self.progress.step("restoring the tree from the cache");
                    tree::copy(&entry.join("tree"), &self.dir.tree)?;
                }
                _ => fs::create_dir_all(&self.dir.tree)?,
            }
            self.live = true;
        }
        for (index, name) in std::mem::take(&mut self.replay) {
            self.progress
                .step(&format!("replaying the cached stage {name} (its tree is not kept)"));
            self.run_in_tree(index, name)?;
        }
        Ok(())
    }

    fn run_stage(&mut self, s: &Planned) -> Result<Vec<PathBuf>> {
        self.materialize(s.name)?;
        self.run_in_tree(s.index, s.name)
    }

    fn run_in_tree(&mut self, index: usize, name: &str) -> Result<Vec<PathBuf>> {
        let log = StageLog::create(&self.dir.logs, index, name)?;
        let r = &self.loaded.recipe;
        let cx = stages::Context {
            recipe: r,
            recipe_digest: &self.loaded.digest,
            tree: &self.dir.tree,
            out_dir: &self.dir.out,
            work_dir: &self.dir.work,
            build_dir: &self.dir.root,
            recipe_dir: &self.recipe_dir,
            epoch: self.epoch,
            log: &log,
            progress: &self.progress,
            locked: self.locked,
            base_image: self.base_image,
            command_timeout: COMMAND_TIMEOUT,
        };
        let result = run_with_hooks(name, &cx);
        match result {
            Ok(made) => Ok(made),
            Err(e) => {
                self.progress.clear();
                let tail = log.tail(TAIL_LINES);
                if !tail.is_empty() {
                    eprintln!("--- the last lines of {} ---", log.path.display());
                    for l in &tail {
                        eprintln!("  {l}");
                    }
                    eprintln!("---");
                }
                if self.args.keep_failed {
                    eprintln!(
                        "the tree as stage {} left it is kept in {}",
                        name,
                        self.dir.tree.display()
                    );
                } else {
                    tree::remove(&self.dir.tree)?;
                }
                self.live = false;
                Err(e.context(format!("stage {} failed (its log: {})", name, log.path.display())))
            }
        }
    }

    fn write_lock(&mut self, plan: &[Planned], recorded: &Recorded) -> Result<()> {
        if self.lock_written {
            return Ok(());
        }
        let r = &self.loaded.recipe;
        let packages = match &self.last_tree_entry {
            Some(e) => lock::parse_tsv(&fs::read_to_string(e.join("packages.tsv")).unwrap_or_default()),
            None => Vec::new(),
        };
        let image = self.dir.out.join(format!("{}.img", stages::stem(r)));
        let image = if image.is_file() {
            Some(atom_dist::Digest::of_file(&image)?.0.to_string())
        } else {
            None
        };
        let l = Lock {
            format: 1,
            name: r.os.name.clone(),
            version: r.os.version.clone(),
            board: r.os.board.clone(),
            recipe_digest: self.loaded.digest.clone(),
            source_date_epoch: self.epoch,
            suite: r.base.debian.as_ref().map(|d| d.suite.clone()),
            mirrors: r.base.debian.as_ref().map(|d| d.mirrors.clone()).unwrap_or_default(),
            base_source: recorded.base_source.clone(),
            base_image: self.base_image.digest().map(|d| d.to_string()),
            hooks: recorded.hooks.clone(),
            files: recorded.files.clone(),
            stages: plan.iter().map(|s| (s.name.to_string(), s.key.clone())).collect(),
            image,
            packages: packages.clone(),
        };
        if let Some(locked) = self.locked
            && locked.packages != l.packages
        {
            let have: BTreeMap<&str, &str> = l
                .packages
                .iter()
                .map(|p| (p.name.as_str(), p.version.as_str()))
                .collect();
            let differ: Vec<String> = locked
                .packages
                .iter()
                .filter(|w| have.get(w.name.as_str()) != Some(&w.version.as_str()))
                .map(|w| {
                    format!(
                        "{} {} (built: {})",
                        w.name,
                        w.version,
                        have.get(w.name.as_str()).unwrap_or(&"none")
                    )
                })
                .collect();
            bail!(
                "--locked: the built tree's packages are not the locked ones: {}",
                differ.join(", ")
            );
        }
        if let Some(locked) = self.locked
            && let (Some(want), Some(got)) = (&locked.image, &l.image)
            && want != got
        {
            bail!(
                "--locked: the rebuilt image {got} is not the locked {want}: this machine does not reproduce \
                 the build (nothing was published)"
            );
        }
        l.write(&self.dir.out.join(lock::FILE_NAME))?;
        if !packages.is_empty() {
            fs::write(
                self.dir.out.join(format!("{}.packages.tsv", stages::stem(r))),
                lock::packages_tsv(&packages),
            )?;
        }
        self.lock_written = true;
        Ok(())
    }

    fn summary(&self) {
        if self.args.quiet {
            return;
        }
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir.out)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        println!(
            "built {} {} in {}:",
            self.loaded.recipe.os.name,
            self.loaded.recipe.os.version,
            self.dir.out.display()
        );
        for f in files {
            let size = fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
            println!(
                "  {:>12}  {}",
                size,
                f.file_name().unwrap_or_default().to_string_lossy()
            );
        }
    }
}

fn previous_key(plan: &[Planned], index: usize) -> &str {
    if index == 0 { "" } else { &plan[index - 1].key }
}

fn run_with_hooks(stage: &str, cx: &stages::Context<'_>) -> Result<Vec<PathBuf>> {
    let env = hook_env(cx);
    let default_chroot = stages::hooks_in_tree_by_default(stage);
    let hooks = cx.recipe.hooks.get(stage);
    for h in hooks.map(|h| h.before.as_slice()).unwrap_or_default() {
        cx.progress.step(&format!("hook before: {}", h.path().display()));
        hooks::run(h, default_chroot, "before", stage, &env, cx.log)?;
    }
    let made = stages::run(stage, cx)?;
    for h in hooks.map(|h| h.after.as_slice()).unwrap_or_default() {
        cx.progress.step(&format!("hook after: {}", h.path().display()));
        hooks::run(h, default_chroot, "after", stage, &env, cx.log)?;
    }
    Ok(made)
}

pub(crate) fn hook_env(cx: &stages::Context<'_>) -> hooks::HookEnv {
    let r = cx.recipe;
    let timeout = humantime::parse_duration(&r.build.hook_timeout).unwrap_or(Duration::from_secs(600));
    let vars = [
        ("ATOM_NAME", r.os.name.clone()),
        ("ATOM_VERSION", r.os.version.to_string()),
        ("ATOM_BOARD", r.os.board.clone()),
        ("ATOM_CHANNEL", r.os.channel.clone()),
        ("ATOM_BUILD_DIR", cx.build_dir.display().to_string()),
        ("ATOM_OUTPUT_DIR", cx.out_dir.display().to_string()),
        ("ATOM_RECIPE_DIR", cx.recipe_dir.display().to_string()),
        ("SOURCE_DATE_EPOCH", cx.epoch.to_string()),
    ];
    hooks::HookEnv {
        vars: vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        tree: cx.tree.to_path_buf(),
        build_dir: cx.build_dir.to_path_buf(),
        default_timeout: timeout,
    }
}

/// A copy that keeps holes and shares blocks where the filesystem can.
fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    let _ = fs::remove_file(dst);
    crate::cmd::run(
        Command::new("cp")
            .args(["--reflink=auto", "--sparse=always", "--"])
            .arg(src)
            .arg(dst),
    )
    .with_context(|| format!("cannot copy {} to {}", src.display(), dst.display()))?;
    Ok(())
}

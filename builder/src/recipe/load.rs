//! Assembling a recipe: `include` files first (in order, recursively), then the recipe,
//! then its drop-ins (`NAME.d/*.toml` beside `NAME.toml`, in name order), then `--set`.
//! Tables merge key by key, arrays are appended, other values replaced; `--set` replaces
//! (arrays too). Relative paths are taken relative to the file that names them (for
//! `--set`, to the current directory), so a shared base can live anywhere.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use toml::{Table, Value};

use super::Recipe;

const MAX_INCLUDE_DEPTH: usize = 8;
const MAX_RECIPE_BYTES: u64 = 1 << 20;

/// Keys whose values are paths on the build host. `*` is any table key, `[]` every array
/// element; a hook may be a string or a table with `run`.
const PATH_KEYS: &[&str] = &[
    "base.tarball",
    "base.tree",
    "files.[].source",
    "scripts.[]",
    "hooks.*.before.[]",
    "hooks.*.after.[]",
    "atom.agent",
    "atom.bootsel",
    "atom.keys.[]",
    "atom.root_keys.[]",
    "kernel.from",
    "kernel.initramfs_config",
    "kernel.bootsel",
    "kernel.shell",
    "image.base",
    "outputs.disk.kernel",
    "outputs.disk.initramfs",
    "outputs.disk.bootloader",
    "publish.repo",
    "publish.key",
    "publish.passphrase_file",
    "publish.timestamp_key",
];

/// Values of path keys that are not paths.
const NOT_PATHS: &[&str] = &["auto", "none"];

pub struct Loaded {
    pub recipe: Recipe,
    /// The merged recipe as one TOML table (what the digest covers).
    pub merged: Table,
    /// blake3 of the merged recipe's canonical TOML.
    pub digest: String,
    /// Every file read, in merge order.
    pub sources: Vec<PathBuf>,
}

pub fn load(path: &Path, sets: &[String]) -> Result<Loaded> {
    let mut merged = Table::new();
    let mut sources = Vec::new();
    let mut seen = BTreeSet::new();
    merge_file(path, &mut merged, &mut sources, &mut seen, 0)?;
    let stem = path.file_stem().context("the recipe path names no file")?;
    let dropins = path.with_file_name(format!("{}.d", stem.to_string_lossy()));
    if dropins.is_dir() {
        let mut files: Vec<PathBuf> = fs::read_dir(&dropins)
            .with_context(|| format!("cannot read {}", dropins.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for f in files {
            merge_file(&f, &mut merged, &mut sources, &mut seen, 0)?;
        }
    }
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    for s in sets {
        apply_set(&mut merged, s, &cwd)?;
    }
    hooks_as_tables(&mut merged);
    let canonical = toml::to_string(&merged).context("cannot serialize the merged recipe")?;
    let digest = blake3::hash(canonical.as_bytes()).to_hex().to_string();
    let mut recipe: Recipe = serde_path_to_error::deserialize(Value::Table(merged.clone())).map_err(|e| {
        let at = e.path().to_string();
        // toml's messages carry a "in `table`" line of their own; one line is enough.
        let inner = e.into_inner().to_string();
        let inner = inner.lines().next().unwrap_or_default().to_string();
        if at == "." {
            anyhow::anyhow!("recipe {}: {inner}", path.display())
        } else {
            anyhow::anyhow!("recipe {}: {at}: {inner}", path.display())
        }
    })?;
    recipe.normalize();
    recipe.check().with_context(|| format!("recipe {}", path.display()))?;
    Ok(Loaded {
        recipe,
        merged,
        digest,
        sources,
    })
}

fn merge_file(
    path: &Path,
    into: &mut Table,
    sources: &mut Vec<PathBuf>,
    seen: &mut BTreeSet<PathBuf>,
    depth: usize,
) -> Result<()> {
    if depth > MAX_INCLUDE_DEPTH {
        bail!("{}: includes nest deeper than {MAX_INCLUDE_DEPTH}", path.display());
    }
    let real = fs::canonicalize(path).with_context(|| format!("cannot read recipe {}", path.display()))?;
    if !seen.insert(real.clone()) {
        bail!("{}: included twice (an include loop?)", path.display());
    }
    let meta = fs::metadata(&real)?;
    if meta.len() > MAX_RECIPE_BYTES {
        bail!(
            "{}: larger than {} KiB, not a recipe",
            path.display(),
            MAX_RECIPE_BYTES >> 10
        );
    }
    let text = fs::read_to_string(&real).with_context(|| format!("cannot read recipe {}", path.display()))?;
    let mut table: Table = toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let dir = real.parent().expect("a file has a directory").to_path_buf();
    resolve_paths(&mut table, &dir);
    if let Some(includes) = table.get("include") {
        let list = includes
            .as_array()
            .with_context(|| format!("{}: include must be a list of files", path.display()))?;
        for inc in list {
            let inc = inc
                .as_str()
                .with_context(|| format!("{}: include must be a list of files", path.display()))?;
            merge_file(&dir.join(inc), into, sources, seen, depth + 1)
                .with_context(|| format!("included from {}", path.display()))?;
        }
    }
    sources.push(real);
    merge(into, table);
    Ok(())
}

/// Tables merge, arrays append, the rest is replaced.
fn merge(into: &mut Table, from: Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Table(a)), Value::Table(b)) => merge(a, b),
            (Some(Value::Array(a)), Value::Array(b)) => a.extend(b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

fn resolve_paths(table: &mut Table, dir: &Path) {
    let mut whole = Value::Table(std::mem::take(table));
    for pattern in PATH_KEYS {
        let parts: Vec<&str> = pattern.split('.').collect();
        walk(&mut whole, &parts, dir);
    }
    if let Value::Table(t) = whole {
        *table = t;
    }
}

fn walk(value: &mut Value, parts: &[&str], dir: &Path) {
    let Some((first, rest)) = parts.split_first() else {
        resolve_value(value, dir);
        return;
    };
    match (*first, value) {
        ("[]", Value::Array(items)) => items.iter_mut().for_each(|v| walk(v, rest, dir)),
        ("*", Value::Table(t)) => t.iter_mut().for_each(|(_, v)| walk(v, rest, dir)),
        (key, Value::Table(t)) => {
            if let Some(v) = t.get_mut(key) {
                walk(v, rest, dir);
            }
        }
        _ => {}
    }
}

fn resolve_value(value: &mut Value, dir: &Path) {
    match value {
        Value::String(s)
            if !NOT_PATHS.contains(&s.as_str()) && !s.starts_with("pkcs11:") && Path::new(s.as_str()).is_relative() =>
        {
            *s = dir.join(&*s).to_string_lossy().into_owned();
        }
        Value::Table(t) => {
            if let Some(run) = t.get_mut("run") {
                resolve_value(run, dir);
            }
        }
        _ => {}
    }
}

/// `KEY=VALUE`: VALUE as TOML (`["a", "b"]`, `true`, `"x"`), else as a plain string.
fn apply_set(into: &mut Table, set: &str, cwd: &Path) -> Result<()> {
    let (key, raw) = set
        .split_once('=')
        .with_context(|| format!("--set {set:?}: give KEY=VALUE, e.g. os.version=1.2.0"))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set {set:?}: {key:?} is not a dotted key");
    }
    let value = match toml::from_str::<Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed"),
        Err(_) => Value::String(raw.to_string()),
    };
    // Nest the value under its key, resolve paths as if it came from a file here.
    let mut nested = value;
    for p in parts.iter().rev() {
        let mut t = Table::new();
        t.insert((*p).to_string(), nested);
        nested = Value::Table(t);
    }
    let Value::Table(mut nested) = nested else {
        unreachable!("built as a table")
    };
    resolve_paths(&mut nested, cwd);
    replace(into, nested);
    Ok(())
}

/// A hook given as a plain path becomes `{ run = PATH }`, so one table type with its
/// own field names (and errors naming them) describes every hook.
fn hooks_as_tables(recipe: &mut Table) {
    let to_table = |v: &mut Value| {
        if let Value::String(s) = v {
            let mut t = Table::new();
            t.insert("run".into(), Value::String(std::mem::take(s)));
            *v = Value::Table(t);
        }
    };
    if let Some(Value::Array(list)) = recipe.get_mut("scripts") {
        list.iter_mut().for_each(to_table);
    }
    if let Some(Value::Table(stages)) = recipe.get_mut("hooks") {
        for (_, hooks) in stages.iter_mut() {
            if let Value::Table(h) = hooks {
                for when in ["before", "after"] {
                    if let Some(Value::Array(list)) = h.get_mut(when) {
                        list.iter_mut().for_each(to_table);
                    }
                }
            }
        }
    }
}

/// Like `merge`, but arrays are replaced too.
fn replace(into: &mut Table, from: Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Table(a)), Value::Table(b)) => replace(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

impl Loaded {
    /// The recipe as `Deserialize` sees it, for a stage's cache key.
    pub fn section(&self, key: &str) -> Value {
        self.merged.get(key).cloned().unwrap_or(Value::Table(Table::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[os]\nversion = \"1.0.0\"\n[base]\nempty = true\n[image]\nsize = \"32M\"\n";

    #[test]
    fn unknown_keys_are_named_with_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.toml");
        fs::write(&p, format!("{MINIMAL}[kernel]\nfrom = \"k\"\npakage = \"x\"\n")).unwrap();
        let e = format!("{:#}", load(&p, &[]).err().unwrap());
        assert!(e.contains("kernel") && e.contains("unknown field `pakage`"), "{e}");
    }

    #[test]
    fn includes_dropins_and_sets_merge_in_order_with_paths_from_their_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("shared")).unwrap();
        fs::write(
            dir.path().join("shared/base.toml"),
            format!("{MINIMAL}[[files]]\nsource = \"motd\"\ntarget = \"/etc/motd\"\n"),
        )
        .unwrap();
        fs::create_dir_all(dir.path().join("web.d")).unwrap();
        fs::write(
            dir.path().join("web.toml"),
            "include = [\"shared/base.toml\"]\n[[files]]\nsource = \"index.html\"\ntarget = \"/srv/index.html\"\n",
        )
        .unwrap();
        fs::write(dir.path().join("web.d/10-big.toml"), "[image]\nsize = \"64M\"\n").unwrap();
        let sets = vec!["os.version=2.1.0".to_string(), "os.channel=\"beta\"".to_string()];
        let l = load(&dir.path().join("web.toml"), &sets).unwrap();
        let real = fs::canonicalize(dir.path()).unwrap();
        assert_eq!(l.recipe.files.len(), 2);
        assert_eq!(l.recipe.files[0].source, real.join("shared/motd"));
        assert_eq!(l.recipe.files[1].source, real.join("index.html"));
        assert_eq!(l.recipe.image.size, "64M");
        assert_eq!(l.recipe.os.version.to_string(), "2.1.0");
        assert_eq!(l.recipe.os.channel, "beta");
        assert_eq!(l.sources.len(), 3);
        let again = load(&dir.path().join("web.toml"), &sets).unwrap();
        assert_eq!(l.digest, again.digest);
        let other = load(&dir.path().join("web.toml"), &["os.version=2.1.1".into()]).unwrap();
        assert_ne!(l.digest, other.digest);
    }

    #[test]
    fn include_loops_and_two_bases_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.toml"), "include = [\"b.toml\"]\n").unwrap();
        fs::write(dir.path().join("b.toml"), "include = [\"a.toml\"]\n").unwrap();
        let e = format!("{:#}", load(&dir.path().join("a.toml"), &[]).err().unwrap());
        assert!(e.contains("included twice"), "{e}");
        let p = dir.path().join("two.toml");
        fs::write(
            &p,
            "[os]\nversion = \"1.0.0\"\n[base]\nempty = true\ntree = \"/\"\n[image]\nsize = \"32M\"\n",
        )
        .unwrap();
        let e = format!("{:#}", load(&p, &[]).err().unwrap());
        assert!(e.contains("only one of"), "{e}");
        let p = dir.path().join("hook.toml");
        fs::write(&p, format!("{MINIMAL}[hooks.compile]\nafter = [\"x\"]\n")).unwrap();
        let e = format!("{:#}", load(&p, &[]).err().unwrap());
        assert!(e.contains("hooks.compile: no such stage"), "{e}");
    }
}

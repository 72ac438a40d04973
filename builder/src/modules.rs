//! Kernel modules for the initramfs: names resolved to files and put in load order using
//! the kernel's own `modules.dep` (written by `depmod`), so bootsel can load them one by
//! one with `finit_module` and no modprobe.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// What `depmod` recorded for one kernel.
pub struct ModulesDep {
    /// Module name (as modprobe spells it, `-` folded to `_`) → path relative to the
    /// modules directory.
    paths: HashMap<String, String>,
    /// Path → paths it needs loaded first.
    deps: HashMap<String, Vec<String>>,
    builtin: HashSet<String>,
}

/// `kernel/fs/ext4/ext4.ko` → `ext4`; `crc32c-intel.ko.xz` → `crc32c_intel`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

impl ModulesDep {
    pub fn load(modules_dir: &Path) -> Result<Self> {
        let dep_path = modules_dir.join("modules.dep");
        let text = fs::read_to_string(&dep_path).with_context(|| {
            format!(
                "cannot read {} (run `depmod -b ROOT VERSION` for an unpacked kernel)",
                dep_path.display()
            )
        })?;
        let mut m = Self::parse(&text).with_context(|| format!("in {}", dep_path.display()))?;
        let builtin_path = modules_dir.join("modules.builtin");
        if let Ok(text) = fs::read_to_string(&builtin_path) {
            m.builtin = text.lines().map(module_name).collect();
        }
        Ok(m)
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut paths = HashMap::new();
        let mut deps = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some((module, needs)) = line.split_once(':') else {
                bail!("line {}: expected `module.ko: dependencies`", n + 1);
            };
            let module = module.trim().to_owned();
            paths.insert(module_name(&module), module.clone());
            deps.insert(module, needs.split_whitespace().map(str::to_owned).collect());
        }
        Ok(ModulesDep {
            paths,
            deps,
            builtin: HashSet::new(),
        })
    }

    /// The files to load for `wanted`, every dependency before the modules that need it,
    /// each once, in a stable order. Built-in names are skipped (nothing to load).
    /// Whether `name` is a module here or built into the kernel.
    pub fn knows(&self, name: &str) -> bool {
        let key = name.replace('-', "_");
        self.builtin.contains(&key) || self.paths.contains_key(&key)
    }

    pub fn resolve(&self, wanted: &[String]) -> Result<Vec<String>> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        for name in wanted {
            let key = name.replace('-', "_");
            if self.builtin.contains(&key) {
                tracing::info!(module = %name, "built into the kernel; nothing to load");
                continue;
            }
            let Some(path) = self.paths.get(&key) else {
                bail!("kernel module {name:?} is neither in modules.dep nor built in");
            };
            self.visit(path, &mut Vec::new(), &mut done, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        path: &str,
        stack: &mut Vec<String>,
        done: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains(path) {
            return Ok(());
        }
        if stack.iter().any(|p| p == path) {
            bail!("modules.dep has a dependency cycle: {} -> {path}", stack.join(" -> "));
        }
        stack.push(path.to_owned());
        for dep in self.deps.get(path).into_iter().flatten() {
            if !self.deps.contains_key(dep) {
                bail!("modules.dep: {path} needs {dep}, which has no entry of its own");
            }
            self.visit(dep, stack, done, order)?;
        }
        stack.pop();
        done.insert(path.to_owned());
        order.push(path.to_owned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/lib/crc16.ko:
kernel/drivers/block/virtio_blk.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/a.ko: kernel/b.ko
kernel/b.ko: kernel/a.ko
kernel/c.ko: kernel/missing.ko
";

    fn names(v: &[String]) -> Vec<String> {
        v.iter().map(|p| module_name(p)).collect()
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let m = ModulesDep::parse(DEP).unwrap();
        let order = m
            .resolve(&["jbd2".into(), "ext4".into(), "virtio_blk".into(), "crc32c-intel".into()])
            .unwrap();
        assert_eq!(
            names(&order),
            ["jbd2", "crc16", "mbcache", "ext4", "virtio_blk", "crc32c_intel"]
        );
        assert_eq!(order[3], "kernel/fs/ext4/ext4.ko");
    }

    #[test]
    fn builtins_are_skipped_and_unknowns_named() {
        let mut m = ModulesDep::parse(DEP).unwrap();
        m.builtin.insert("virtio_pci".into());
        assert!(m.resolve(&["virtio-pci".into()]).unwrap().is_empty());
        let e = m.resolve(&["nosuch".into()]).unwrap_err().to_string();
        assert!(e.contains("nosuch"), "{e}");
    }

    #[test]
    fn cycles_and_dangling_dependencies_are_errors() {
        let m = ModulesDep::parse(DEP).unwrap();
        assert!(m.resolve(&["a".into()]).unwrap_err().to_string().contains("cycle"));
        assert!(m.resolve(&["c".into()]).unwrap_err().to_string().contains("missing"));
        assert!(ModulesDep::parse("no colon here\n").is_err());
    }
}

//! atom: the agent, its units and presets, the keys hosts trust and `update.toml`, as
//! `atom-build install-units` puts them (and with `atom.bootsel`, the initramfs-tools
//! hook for a distribution initramfs).

use std::fs;
use std::os::unix::fs::PermissionsExt;

use anyhow::{Context as _, Result, bail};

use std::process::Command;

use super::{Context, Plan, host_path, options};
use crate::build::cache::Inputs;
use crate::build::hooks::run_logged;
use crate::install;

pub fn inputs(p: &Plan<'_>) -> Result<Inputs> {
    let mut i = Inputs::new();
    let Some(a) = &p.recipe.atom else { return Ok(i) };
    i.insert("atom".into(), options(a)?);
    i.insert("os.channel".into(), p.recipe.os.channel.clone());
    i.insert("os.board".into(), p.recipe.os.board.clone());
    i.insert("atom.agent".into(), host_path(&a.agent)?);
    if let Some(b) = &a.bootsel {
        i.insert("atom.bootsel".into(), host_path(b)?);
    }
    for (n, k) in a.keys.iter().chain(&a.root_keys).enumerate() {
        i.insert(format!("atom.keys[{n}]"), host_path(k)?);
    }
    Ok(i)
}

pub fn run(cx: &Context<'_>) -> Result<()> {
    let Some(a) = &cx.recipe.atom else {
        cx.log.note("no [atom] section: the image carries no agent");
        return Ok(());
    };
    if a.repositories.is_empty() {
        bail!("atom.repositories: name at least one mirror hosts update from");
    }
    crate::build::rootpath::check_inside(
        cx.tree,
        &[
            "usr",
            "usr/lib",
            "usr/bin",
            "usr/share",
            "etc",
            "etc/atom",
            "etc/initramfs-tools",
            "var",
            "var/lib",
        ],
    )?;
    // install-units takes the agent from a directory, under its installed name.
    let bin = tempfile::tempdir_in(cx.work_dir)?;
    fs::copy(&a.agent, bin.path().join("atom-update"))
        .with_context(|| format!("atom.agent: cannot read {}", a.agent.display()))?;
    install::install_into(cx.tree, bin.path(), a.bootsel.as_deref())?;
    let keys = cx.tree.join("etc/atom/keys");
    for k in &a.keys {
        copy_key(k, &keys)?;
    }
    if !a.root_keys.is_empty() {
        let root = keys.join("root");
        fs::create_dir_all(&root)?;
        for k in &a.root_keys {
            copy_key(k, &root)?;
        }
    }
    let mut config = toml::Table::new();
    config.insert(
        "repositories".into(),
        toml::Value::Array(a.repositories.iter().cloned().map(toml::Value::String).collect()),
    );
    config.insert("channel".into(), cx.recipe.os.channel.clone().into());
    config.insert("board".into(), cx.recipe.os.board.clone().into());
    for (k, v) in &a.update {
        if config.contains_key(k) {
            bail!("atom.update.{k}: set it as atom.repositories / os.channel / os.board");
        }
        config.insert(k.clone(), v.clone());
    }
    let path = cx.tree.join("etc/atom/update.toml");
    fs::write(&path, toml::to_string(&config)?).context("cannot write /etc/atom/update.toml")?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
    if has_systemd(cx.tree) {
        let mut units = vec!["atom-health.service", "atom-mark-good.service"];
        if a.timer {
            units.push("atom-update.timer");
        }
        cx.progress.step(&format!("systemctl enable {}", units.join(" ")));
        let mut cmd = Command::new("systemctl");
        cmd.arg(format!("--root={}", cx.tree.display()))
            .arg("enable")
            .args(&units);
        run_logged(&mut cmd, cx.log, cx.command_timeout).context("cannot enable the Atom units")?;
    }
    Ok(())
}

fn has_systemd(tree: &std::path::Path) -> bool {
    ["usr/lib/systemd/systemd", "lib/systemd/systemd"]
        .iter()
        .any(|p| tree.join(p).is_file())
}

fn copy_key(key: &std::path::Path, dir: &std::path::Path) -> Result<()> {
    let name = key.file_name().context("a key path names no file")?;
    if !name.to_string_lossy().ends_with(".pub") {
        bail!("{}: hosts get public keys only (a .pub file)", key.display());
    }
    fs::copy(key, dir.join(name)).with_context(|| format!("cannot copy key {}", key.display()))?;
    Ok(())
}

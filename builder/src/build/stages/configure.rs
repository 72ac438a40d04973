//! configure: groups and users (written into the tree's passwd, group, shadow and
//! gshadow, so no tool of the tree is needed), ssh keys, units enabled, disabled or
//! masked (`systemctl --root`), locale, time zone and the hostname policy.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use super::{Context, Plan, options};
use crate::build::cache::Inputs;
use crate::build::hooks::run_logged;
use crate::build::rootpath;
use crate::recipe::{Group, User};

pub fn inputs(p: &Plan<'_>) -> Result<Inputs> {
    let r = p.recipe;
    let mut i = Inputs::new();
    i.insert("groups".into(), options(&r.groups)?);
    i.insert("users".into(), options(&r.users)?);
    i.insert("units".into(), options(&r.units)?);
    i.insert("configure".into(), options(&r.configure)?);
    Ok(i)
}

pub fn run(cx: &Context<'_>) -> Result<()> {
    let r = cx.recipe;
    if !r.groups.is_empty() || !r.users.is_empty() {
        rootpath::create_dirs(cx.tree, "/etc")?;
        let mut db = Accounts::read(cx.tree)?;
        for g in &r.groups {
            db.add_group(g)?;
        }
        for u in &r.users {
            db.add_user(u)?;
        }
        db.write(cx.tree)?;
        for u in &r.users {
            home(cx.tree, &db, u)?;
        }
    }
    for (verb, list) in [
        ("enable", &r.units.enable),
        ("disable", &r.units.disable),
        ("mask", &r.units.mask),
    ] {
        if list.is_empty() {
            continue;
        }
        cx.progress.step(&format!("systemctl {verb} {}", list.join(" ")));
        let mut cmd = Command::new("systemctl");
        cmd.arg(format!("--root={}", cx.tree.display())).arg(verb).args(list);
        run_logged(&mut cmd, cx.log, cx.command_timeout).with_context(|| format!("units.{verb}"))?;
    }
    let c = &r.configure;
    match &c.hostname {
        Some(h) => {
            if h.is_empty() || h.len() > 64 || !h.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '.')
            {
                bail!("configure.hostname {h:?} is not a host name");
            }
            rootpath::create_dirs(cx.tree, "/etc")?;
            fs::write(at(cx.tree, "/etc/hostname")?, format!("{h}\n"))?;
        }
        None => {
            // Each host names itself (kept across updates by the /etc merge).
            let _ = fs::remove_file(rootpath::resolve(cx.tree, "/etc/hostname", false)?);
        }
    }
    if let Some(lang) = &c.locale {
        rootpath::create_dirs(cx.tree, "/etc/default")?;
        fs::write(at(cx.tree, "/etc/default/locale")?, format!("LANG={lang}\n"))?;
        fs::write(at(cx.tree, "/etc/locale.conf")?, format!("LANG={lang}\n"))?;
    }
    if let Some(zone) = &c.timezone {
        let file = format!("/usr/share/zoneinfo/{zone}");
        if zone.starts_with('/') || zone.contains("..") || !at(cx.tree, &file)?.is_file() {
            bail!("configure.timezone {zone:?}: the tree has no {file} (install tzdata)");
        }
        let link = rootpath::resolve(cx.tree, "/etc/localtime", false)?;
        let _ = fs::remove_file(&link);
        symlink(&file, &link)?;
        fs::write(at(cx.tree, "/etc/timezone")?, format!("{zone}\n"))?;
    }
    Ok(())
}

/// The tree's account files as lines, changed in memory and written back together.
struct Accounts {
    passwd: Vec<String>,
    group: Vec<String>,
    shadow: Vec<String>,
    gshadow: Vec<String>,
}

fn at(tree: &Path, image_path: &str) -> Result<std::path::PathBuf> {
    rootpath::resolve(tree, image_path, true)
}

fn lines(tree: &Path, name: &str) -> Result<Vec<String>> {
    match fs::read_to_string(at(tree, &format!("/etc/{name}"))?) {
        Ok(t) => Ok(t.lines().map(str::to_string).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read /etc/{name}")),
    }
}

fn field(line: &str, n: usize) -> Option<&str> {
    line.split(':').nth(n)
}

impl Accounts {
    fn read(tree: &Path) -> Result<Accounts> {
        Ok(Accounts {
            passwd: lines(tree, "passwd")?,
            group: lines(tree, "group")?,
            shadow: lines(tree, "shadow")?,
            gshadow: lines(tree, "gshadow")?,
        })
    }

    fn write(&self, tree: &Path) -> Result<()> {
        for (name, list, mode) in [
            ("passwd", &self.passwd, 0o644),
            ("group", &self.group, 0o644),
            ("shadow", &self.shadow, 0o640),
            ("gshadow", &self.gshadow, 0o640),
        ] {
            let path = at(tree, &format!("/etc/{name}"))?;
            let mut text = list.join("\n");
            text.push('\n');
            fs::write(&path, text).with_context(|| format!("cannot write /etc/{name}"))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }

    fn find<'a>(list: &'a [String], name: &str) -> Option<&'a String> {
        list.iter().find(|l| field(l, 0) == Some(name))
    }

    fn gid_of(&self, name: &str) -> Option<u32> {
        Self::find(&self.group, name).and_then(|l| field(l, 2)?.parse().ok())
    }

    /// The first free id of the range (system: 100-999 as Debian's adduser; else 1000+).
    fn free_id(used: impl Iterator<Item = u32> + Clone, system: bool) -> Result<u32> {
        let (lo, hi) = if system { (100, 999) } else { (1000, 59999) };
        (lo..=hi)
            .find(|id| !used.clone().any(|u| u == *id))
            .context("no free id left in the range")
    }

    fn add_group(&mut self, g: &Group) -> Result<u32> {
        if let Some(gid) = self.gid_of(&g.name) {
            return Ok(gid);
        }
        let used: Vec<u32> = self.group.iter().filter_map(|l| field(l, 2)?.parse().ok()).collect();
        let gid = match g.gid {
            Some(id) if used.contains(&id) => bail!("groups: gid {id} of {} is taken", g.name),
            Some(id) => id,
            None => Self::free_id(used.iter().copied(), g.system)?,
        };
        check_name(&g.name)?;
        self.group.push(format!("{}:x:{gid}:", g.name));
        self.gshadow.push(format!("{}:!::", g.name));
        Ok(gid)
    }

    fn add_user(&mut self, u: &User) -> Result<()> {
        check_name(&u.name)?;
        if Self::find(&self.passwd, &u.name).is_some() {
            bail!("users: {} exists in the tree already", u.name);
        }
        let gid = match &u.group {
            Some(g) => self
                .gid_of(g)
                .with_context(|| format!("users: {}: no group {g}", u.name))?,
            None => self.add_group(&Group {
                name: u.name.clone(),
                gid: u.uid,
                system: u.system,
            })?,
        };
        let used: Vec<u32> = self.passwd.iter().filter_map(|l| field(l, 2)?.parse().ok()).collect();
        let uid = match u.uid {
            Some(id) if used.contains(&id) => bail!("users: uid {id} of {} is taken", u.name),
            Some(id) => id,
            None => Self::free_id(used.iter().copied(), u.system)?,
        };
        let home = u.home.clone().unwrap_or_else(|| {
            if u.system {
                "/nonexistent".into()
            } else {
                format!("/home/{}", u.name)
            }
        });
        let shell = u.shell.clone().unwrap_or_else(|| {
            if u.system {
                "/usr/sbin/nologin".into()
            } else {
                "/bin/sh".into()
            }
        });
        self.passwd.push(format!("{}:x:{uid}:{gid}::{home}:{shell}", u.name));
        // A locked password: people log in with their ssh keys.
        self.shadow.push(format!("{}:!:::::::", u.name));
        for g in &u.groups {
            let i = self
                .group
                .iter()
                .position(|l| field(l, 0) == Some(g.as_str()))
                .with_context(|| format!("users: {}: no group {g}", u.name))?;
            let line = &mut self.group[i];
            if !line.ends_with(':') {
                line.push(',');
            }
            line.push_str(&u.name);
        }
        Ok(())
    }

    fn ids(&self, name: &str) -> Option<(u32, u32, String)> {
        let l = Self::find(&self.passwd, name)?;
        Some((
            field(l, 2)?.parse().ok()?,
            field(l, 3)?.parse().ok()?,
            field(l, 5)?.to_string(),
        ))
    }
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !ok {
        bail!("{name:?} is not a user or group name");
    }
    Ok(())
}

fn home(tree: &Path, db: &Accounts, u: &User) -> Result<()> {
    let (uid, gid, home) = db.ids(&u.name).expect("just added");
    if home == "/nonexistent" && u.authorized_keys.is_empty() {
        return Ok(());
    }
    let dir = rootpath::create_dirs(tree, &home)?;
    nix::unistd::chown(&dir, Some(uid.into()), Some(gid.into()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o750))?;
    if !u.authorized_keys.is_empty() {
        let ssh = rootpath::create_dirs(tree, &format!("{home}/.ssh"))?;
        let keys = at(tree, &format!("{home}/.ssh/authorized_keys"))?;
        fs::write(&keys, u.authorized_keys.join("\n") + "\n")?;
        for (p, mode) in [(&ssh, 0o700), (&keys, 0o600)] {
            nix::unistd::chown(p, Some(uid.into()), Some(gid.into()))?;
            fs::set_permissions(p, fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

//! scripts: the recipe's own programs, run in order inside the tree (chroot) unless a
//! script says `chroot = false`; the place for what no other stage does.

use anyhow::Result;

use super::{Context, Plan};
use crate::build::cache::Inputs;
use crate::build::hooks;

pub fn inputs(p: &Plan<'_>) -> Result<Inputs> {
    let mut i = Inputs::new();
    for (n, s) in p.recipe.scripts.iter().enumerate() {
        i.insert(format!("scripts[{n}]"), hooks::digest(s, true)?);
    }
    Ok(i)
}

pub fn run(cx: &Context<'_>) -> Result<()> {
    let env = super::super::hook_env(cx);
    for s in &cx.recipe.scripts {
        cx.progress.step(&format!("script {}", s.path().display()));
        hooks::run(s, true, "script", "scripts", &env, cx.log)?;
    }
    Ok(())
}

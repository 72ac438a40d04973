//! `atom-build token add|list|revoke`: the admin side of API tokens, on the service's
//! database directly (run it where the service's data or PostgreSQL is reachable).

use anyhow::{Context, Result, bail};

use super::auth;
use super::db::Db;
use super::model::SCOPES;
use crate::cli::{TokenAction, TokenArgs};

pub fn run(args: &TokenArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let url = match &args.database {
            Some(url) => url.clone(),
            None => {
                // Before the service's first start its data directory may not exist yet.
                std::fs::create_dir_all(&args.data)
                    .with_context(|| format!("cannot create the data directory {}", args.data.display()))?;
                super::default_database(&args.data)
            }
        };
        let db = Db::open(&url).await?;
        match &args.action {
            TokenAction::Add { name, scope, max_queued } => {
                for s in scope {
                    if !SCOPES.contains(&s.as_str()) {
                        bail!("--scope {s}: not a scope (scopes: {})", SCOPES.join(", "));
                    }
                }
                if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
                    bail!("a token's name is 1 to 64 printable characters");
                }
                let (row, text) = auth::new_token(name, scope.clone(), i64::from(*max_queued));
                db.add_token(&row).await?;
                // The secret, alone on stdout (for `TOKEN=$(atom-build token add …)`).
                println!("{text}");
                eprintln!(
                    "token {name:?} created (scopes: {}; at most {max_queued} open orders); its secret is shown only now",
                    if scope.is_empty() { "templates only".to_string() } else { scope.join(", ") }
                );
            }
            TokenAction::List => {
                println!("{:<24} {:<18} {:<20} {:>10} state", "name", "id", "scopes", "max-open");
                for t in db.tokens().await? {
                    println!(
                        "{:<24} {:<18} {:<20} {:>10} {}",
                        t.name,
                        t.id,
                        if t.scopes.is_empty() { "-".to_string() } else { t.scopes.join(",") },
                        t.max_queued,
                        if t.revoked { "revoked" } else { "active" }
                    );
                }
            }
            TokenAction::Revoke { name } => {
                if !db.revoke_token(name).await? {
                    bail!("no active token named {name:?}");
                }
                eprintln!("token {name:?} revoked: its requests are refused from now on");
            }
        }
        Ok(())
    })
}

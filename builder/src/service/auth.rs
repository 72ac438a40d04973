//! API tokens: `atb_<id>_<secret>`. The database keeps the id and a blake3 hash of the
//! secret, never the secret; a request names its token by id and proves it by the secret.

use super::db::{self, Db};
use super::model::TokenRow;

pub const PREFIX: &str = "atb_";

pub fn hash_secret(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

/// A new token's row and the text to hand to its user (shown once).
pub fn new_token(name: &str, scopes: Vec<String>, max_queued: i64) -> (TokenRow, String) {
    let id = db::random_id(8);
    let secret = db::random_id(24);
    let row = TokenRow {
        id: id.clone(),
        name: name.to_string(),
        secret_hash: hash_secret(&secret),
        scopes,
        max_queued,
        created: db::now(),
        revoked: false,
    };
    (row, format!("{PREFIX}{id}_{secret}"))
}

/// The token a bearer string names, if it is valid and not revoked.
pub async fn check(db: &Db, bearer: &str) -> anyhow::Result<Option<TokenRow>> {
    let Some((id, secret)) = bearer.strip_prefix(PREFIX).and_then(|t| t.split_once('_')) else {
        return Ok(None);
    };
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let Some(row) = db.token(id).await? else {
        return Ok(None);
    };
    // blake3::Hash compares in constant time.
    let given = blake3::hash(secret.as_bytes());
    let stored = blake3::Hash::from_hex(&row.secret_hash).ok();
    Ok((stored == Some(given) && !row.revoked).then_some(row))
}

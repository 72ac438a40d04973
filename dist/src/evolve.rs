//! How signed documents evolve without a new format number: fields a reader does not know
//! are optional and ignored, unless the document lists them in its `critical` array, in
//! which case a reader that does not know one refuses the whole document.
//!
//! Used by manifests, `keys.toml` and timestamps alike, so one rule covers every document
//! a host verifies.

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;

/// Most fields a document may mark critical.
const MAX_CRITICAL: usize = 32;
const MAX_NAME: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EvolveError {
    #[error("{0}")]
    Syntax(String),
    #[error("{0}")]
    Invalid(String),
    /// Fields the document marks critical that this build does not know.
    #[error("{0:?}")]
    UnknownCritical(Vec<String>),
}

/// Deserializes `text`, collecting the (dotted, index-free) paths of fields `T` does not have.
pub fn parse_tolerant<T: DeserializeOwned>(text: &str) -> Result<(T, BTreeSet<String>), EvolveError> {
    let syntax = |e: toml::de::Error| EvolveError::Syntax(crate::parse_error::describe(text, &e));
    let mut ignored = BTreeSet::new();
    let doc = serde_ignored::deserialize(toml::Deserializer::parse(text).map_err(syntax)?, |path| {
        ignored.insert(field_name(&path.to_string()));
    })
    .map_err(syntax)?;
    Ok((doc, ignored))
}

/// Critical fields must be known here, whether present in the document or not: the
/// publisher marks a field critical because reading the document without it would be wrong.
pub fn check_critical(critical: &[String], known: &[&str]) -> Result<(), EvolveError> {
    if critical.len() > MAX_CRITICAL {
        return Err(EvolveError::Invalid(format!(
            "{} critical fields listed; at most {MAX_CRITICAL}",
            critical.len()
        )));
    }
    let mut unknown = Vec::new();
    for name in critical {
        let plain = !name.is_empty()
            && name.len() <= MAX_NAME
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !plain {
            return Err(EvolveError::Invalid(format!(
                "critical field name {name:?} is not a dotted name of [A-Za-z0-9_-]"
            )));
        }
        if !known.contains(&name.as_str()) {
            unknown.push(name.clone());
        }
    }
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(EvolveError::UnknownCritical(unknown))
    }
}

pub fn log_ignored(kind: &str, ignored: &BTreeSet<String>) {
    for field in ignored {
        tracing::debug!(kind, field, "ignoring an optional field this build does not know");
    }
}

/// `deltas.3.foo` → `deltas.foo`: critical names do not depend on an entry's position.
pub fn field_name(path: &str) -> String {
    path.split('.')
        .filter(|c| !c.bytes().all(|b| b.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join(".")
}

/// Every dotted field path of a serialized document (for tests: the known lists are
/// complete).
pub fn paths_of(text: &str) -> Vec<String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        let tables: Vec<&toml::Table> = match v {
            toml::Value::Table(t) => vec![t],
            toml::Value::Array(a) => a.iter().filter_map(|x| x.as_table()).collect(),
            _ => vec![],
        };
        for t in tables {
            for (k, v) in t {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.push(path.clone());
                walk(&path, v, out);
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(t) = toml::from_str::<toml::Table>(text) {
        walk("", &toml::Value::Table(t), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_limits() {
        assert_eq!(field_name("deltas.12.chunked"), "deltas.chunked");
        assert!(check_critical(&["a.b".into()], &["a.b"]).is_ok());
        assert_eq!(
            check_critical(&["A.b".into()], &["a.b"]),
            Err(EvolveError::UnknownCritical(vec!["A.b".into()]))
        );
        assert!(matches!(
            check_critical(&["a b".into()], &[]),
            Err(EvolveError::Invalid(_))
        ));
        let many: Vec<String> = (0..33).map(|i| format!("f{i}")).collect();
        assert!(matches!(check_critical(&many, &[]), Err(EvolveError::Invalid(_))));
        assert_eq!(paths_of("a = 1\n[[t]]\nb = 2\n"), ["a", "t", "t.b"]);
    }
}

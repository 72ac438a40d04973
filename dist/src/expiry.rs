//! When the signed documents of a repository expire: for `atom-build verify`'s warnings and
//! atom-dist's `atom_channel_expires_timestamp_seconds`, so an alert fires days ahead
//! instead of the fleet finding out by refusing the channel.
//!
//! Read without verifying signatures: this is the publisher's or the server's own tree, and
//! the numbers are for alerts, not for trust.

use jiff::{SignedDuration, Timestamp};

use crate::manifest::Manifest;
use crate::repo::{RepoError, Repository};
use crate::roles::KeysDoc;
use crate::timestamp::TimestampDoc;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expiry {
    /// The channel, or `None` for keys.toml and the keys it names.
    pub channel: Option<String>,
    /// `manifest`, `timestamp`, `keys`, or `release-key`/`freshness-key`.
    pub document: &'static str,
    /// The key id, for key entries.
    pub key: Option<String>,
    pub created: Timestamp,
    pub expires: Timestamp,
}

impl Expiry {
    pub fn describe(&self) -> String {
        let mut s = match &self.channel {
            Some(c) => format!("channel {c}: {}", self.document),
            None => self.document.to_owned(),
        };
        if let Some(k) = &self.key {
            s.push(' ');
            s.push_str(k);
        }
        s
    }

    /// Whether `now` is close enough to the expiry to warn: within a tenth of the lifetime
    /// but at least `at_least`, and never more than a third of the lifetime (a 7-day
    /// timestamp renewed daily is not worth a warning; one not renewed for 5 days is).
    pub fn due(&self, now: Timestamp, at_least: SignedDuration) -> bool {
        let lifetime = self.expires.duration_since(self.created);
        let threshold = (lifetime / 10).max(at_least).min(lifetime / 3);
        self.expires.duration_since(now) < threshold
    }
}

/// Every expiry in the repository: each channel's current manifest and timestamp, keys.toml
/// and each key it names. Unreadable documents are skipped (verify reports them).
pub fn of_repository(repo: &Repository) -> Result<Vec<Expiry>, RepoError> {
    let mut out = Vec::new();
    if let Some(keys) = repo.keys()?
        && let Ok(doc) = KeysDoc::parse(&keys.manifest)
    {
        out.push(Expiry {
            channel: None,
            document: "keys",
            key: None,
            created: doc.created,
            expires: doc.expires,
        });
        for (document, list) in [("release-key", &doc.release), ("freshness-key", &doc.freshness)] {
            for k in list {
                out.push(Expiry {
                    channel: None,
                    document,
                    key: Some(k.key_id.to_string()),
                    created: doc.created,
                    expires: k.expires,
                });
            }
        }
    }
    for channel in repo.channels()? {
        if let Some(m) = repo.current(&channel)?
            && let Ok(m) = Manifest::parse(&m.manifest)
        {
            out.push(Expiry {
                channel: Some(channel.clone()),
                document: "manifest",
                key: None,
                created: m.created,
                expires: m.expires,
            });
        }
        if let Some(t) = repo.timestamp(&channel)?
            && let Ok(t) = TimestampDoc::parse(&t.manifest)
        {
            out.push(Expiry {
                channel: Some(channel.clone()),
                document: "timestamp",
                key: None,
                created: t.created,
                expires: t.expires,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(created: &str, expires: &str) -> Expiry {
        Expiry {
            channel: Some("stable".into()),
            document: "manifest",
            key: None,
            created: created.parse().unwrap(),
            expires: expires.parse().unwrap(),
        }
    }

    #[test]
    fn warnings_come_ahead_by_the_lifetime() {
        let week = SignedDuration::from_hours(7 * 24);
        let ts = e("2026-12-01T00:00:00Z", "2026-12-08T00:00:00Z");
        assert!(
            !ts.due("2026-12-02T00:00:00Z".parse().unwrap(), week),
            "renewed daily: quiet"
        );
        assert!(
            ts.due("2026-12-06T00:00:00Z".parse().unwrap(), week),
            "5 days without refresh"
        );
        let month = e("2026-12-01T00:00:00Z", "2026-12-31T00:00:00Z");
        assert!(!month.due("2026-12-20T00:00:00Z".parse().unwrap(), week));
        assert!(month.due("2026-12-25T00:00:00Z".parse().unwrap(), week));
        let year = e("2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z");
        assert!(
            year.due("2026-12-01T00:00:00Z".parse().unwrap(), week),
            "a month ahead for a year"
        );
        assert!(!year.due("2026-11-01T00:00:00Z".parse().unwrap(), week));
    }
}

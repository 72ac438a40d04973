//! Line-based account files (`passwd`, `group`, `shadow`, `gshadow`, `subuid`, `subgid`),
//! merged by entry name: the host's entries stay as the host has them (a rotated password,
//! a local user), entries the new image adds arrive (a new system user), and entries the
//! host deleted stay deleted.

use std::collections::HashSet;

pub const FILES: &[&str] = &["passwd", "group", "shadow", "gshadow", "subuid", "subgid"];
/// Account files are kilobytes; anything this large is not merged line by line.
pub const MAX_BYTES: u64 = 4 << 20;

fn name(line: &[u8]) -> Option<&[u8]> {
    let n = line.split(|&b| b == b':').next()?;
    (!n.is_empty() && !line.starts_with(b"#")).then_some(n)
}

/// The numeric id of a passwd or group entry (third field), which must stay unique.
fn id<'a>(file: &str, line: &'a [u8]) -> Option<&'a [u8]> {
    matches!(file, "passwd" | "group").then(|| line.split(|&b| b == b':').nth(2))?
}

fn lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(|&b| b == b'\n').filter(|l| !l.is_empty())
}

pub struct Merged {
    pub text: Vec<u8>,
    /// Names that arrived from the image.
    pub added: Vec<String>,
    /// (name, id) of image entries not added because the host uses their id.
    pub collisions: Vec<(String, String)>,
}

/// The host's file (bytes as they are) with the entries the image added since `base`
/// appended, in the image's order; `file` is the file's name (for the id check).
pub fn merge(base: &[u8], local: &[u8], new: &[u8], file: &str) -> Merged {
    let in_base: HashSet<&[u8]> = lines(base).filter_map(name).collect();
    let in_local: HashSet<&[u8]> = lines(local).filter_map(name).collect();
    let mut ids: HashSet<&[u8]> = lines(local).filter_map(|l| id(file, l)).collect();
    let mut text = local.to_vec();
    if !text.is_empty() && !text.ends_with(b"\n") {
        text.push(b'\n');
    }
    let (mut added, mut collisions) = (Vec::new(), Vec::new());
    for line in lines(new) {
        let Some(n) = name(line) else { continue };
        // In base but not local: the host removed it, and it stays removed.
        if in_local.contains(n) || in_base.contains(n) {
            continue;
        }
        let shown = String::from_utf8_lossy(n).into_owned();
        if let Some(i) = id(file, line) {
            if ids.contains(i) {
                collisions.push((shown, String::from_utf8_lossy(i).into_owned()));
                continue;
            }
            ids.insert(i);
        }
        text.extend_from_slice(line);
        text.push(b'\n');
        added.push(shown);
    }
    Merged {
        text,
        added,
        collisions,
    }
}

/// Account files whose entries carry secrets the host changes on its own (passwords).
pub const PASSWORD_FILES: &[&str] = &["shadow", "gshadow"];

/// For a slot the host returns to (a rollback or fallback): its entries replaced by the
/// other slot's where both have the entry and they differ, so a password rotated after
/// an update is not undone by going back. Returns the new text and the names carried.
pub fn carry_back(mine: &[u8], theirs: &[u8]) -> (Vec<u8>, Vec<String>) {
    let theirs: std::collections::HashMap<&[u8], &[u8]> = lines(theirs).filter_map(|l| Some((name(l)?, l))).collect();
    let mut out = Vec::with_capacity(mine.len());
    let mut carried = Vec::new();
    for line in mine.split(|&b| b == b'\n') {
        let replacement = name(line).and_then(|n| theirs.get(n).filter(|t| **t != line).map(|t| (n, *t)));
        match replacement {
            Some((n, t)) => {
                out.extend_from_slice(t);
                carried.push(String::from_utf8_lossy(n).into_owned());
            }
            None => out.extend_from_slice(line),
        }
        out.push(b'\n');
    }
    out.pop();
    (out, carried)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_system_users_arrive_local_ones_and_deletions_stay() {
        let base = "root:x:0:0::/root:/bin/sh\nold:x:5:5::/:/bin/false\ngone:x:6:6::/:/bin/false\n";
        let local = "root:x:0:0::/root:/bin/bash\nold:x:5:5::/:/bin/false\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        let new = "root:x:0:0::/root:/bin/sh\nold:x:5:5::/:/bin/false\ngone:x:6:6::/:/bin/false\n\
                   systemd-network:x:998:998::/:/usr/sbin/nologin\n";
        let m = merge(base.as_bytes(), local.as_bytes(), new.as_bytes(), "passwd");
        assert_eq!(m.added, ["systemd-network"]);
        let merged = String::from_utf8(m.text).unwrap();
        assert_eq!(
            merged,
            "root:x:0:0::/root:/bin/bash\nold:x:5:5::/:/bin/false\nalice:x:1000:1000::/home/alice:/bin/sh\n\
             systemd-network:x:998:998::/:/usr/sbin/nologin\n"
        );
        assert!(!merged.contains("gone:"), "deleted by the host: stays deleted");
        let m = merge(b"", b"no-newline:x", b"b:x\n# comment\n\n", "shadow");
        assert_eq!(m.text, b"no-newline:x\nb:x\n");
    }

    #[test]
    fn a_returning_slot_gets_the_passwords_rotated_since() {
        let mine = b"root:$6$old:1::::::\nbob:$6$b:1::::::\n";
        let theirs = b"root:$6$rotated:2::::::\nbob:$6$b:1::::::\nnewsvc:!:1::::::\n";
        let (text, carried) = carry_back(mine, theirs);
        assert_eq!(text, b"root:$6$rotated:2::::::\nbob:$6$b:1::::::\n");
        assert_eq!(carried, ["root"], "only entries both have; nobody added");
    }

    #[test]
    fn ids_stay_unique_and_bytes_stay_as_they_are() {
        let local = b"root:x:0:0::/root:/bin/sh\nalice:x:999:999:J\xf6rg:/home/a:/bin/sh\n";
        let new = b"root:x:0:0::/root:/bin/sh\nsystemd-network:x:999:999::/:/usr/sbin/nologin\nsvc:x:998:998::/:/x\n";
        let m = merge(b"root:x:0:0::/root:/bin/sh\n", local, new, "passwd");
        assert_eq!(m.added, ["svc"]);
        assert_eq!(m.collisions, [("systemd-network".to_string(), "999".to_string())]);
        assert!(m.text.starts_with(local), "the host's Latin-1 bytes untouched");
    }
}

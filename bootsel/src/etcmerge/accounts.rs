//! Line-based account files (`passwd`, `group`, `shadow`, `gshadow`, `subuid`, `subgid`),
//! merged by entry name: the host's entries stay as the host has them (a rotated password,
//! a local user), entries the new image adds arrive (a new system user), and entries the
//! host deleted stay deleted.

use std::collections::HashSet;

pub const FILES: &[&str] = &["passwd", "group", "shadow", "gshadow", "subuid", "subgid"];

fn name(line: &str) -> Option<&str> {
    let n = line.split(':').next()?;
    (!n.is_empty() && !line.starts_with('#')).then_some(n)
}

fn names(text: &str) -> HashSet<&str> {
    text.lines().filter_map(name).collect()
}

/// The host's file with the entries the image added since `base` appended, in the image's
/// order. Returns the merged text and the names added.
pub fn merge(base: &str, local: &str, new: &str) -> (String, Vec<String>) {
    let (in_base, in_local) = (names(base), names(local));
    let mut out = local.to_owned();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let mut added = Vec::new();
    for line in new.lines() {
        let Some(n) = name(line) else { continue };
        // In base but not local: the host removed it, and it stays removed.
        if in_local.contains(n) || in_base.contains(n) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        added.push(n.to_owned());
    }
    (out, added)
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
        let (merged, added) = merge(base, local, new);
        assert_eq!(added, ["systemd-network"]);
        assert_eq!(
            merged,
            "root:x:0:0::/root:/bin/bash\nold:x:5:5::/:/bin/false\nalice:x:1000:1000::/home/alice:/bin/sh\n\
             systemd-network:x:998:998::/:/usr/sbin/nologin\n"
        );
        assert!(!merged.contains("gone:"), "deleted by the host: stays deleted");
        let (merged, _) = merge("", "no-newline:x", "b:x\n# comment\n\n");
        assert_eq!(merged, "no-newline:x\nb:x\n");
    }
}

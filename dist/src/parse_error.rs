//! Parse errors of files that came from outside, described without their contents.
//!
//! toml's own message quotes the offending line, and serde's quotes the offending value:
//! for a "signature" that is really a link to a secret, that puts the secret in the error,
//! the journal and the state file. The position and the kind of problem are enough.

/// "line L, column C: message", with every quoted value in the message elided.
pub fn describe(text: &str, e: &toml::de::Error) -> String {
    let message = elide_quoted(e.message());
    match e.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

fn elide_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        match (c, quoted) {
            ('"', false) => {
                out.push_str("\"…\"");
                quoted = true;
            }
            ('"', true) => quoted = false,
            (_, true) => {}
            ('\n', false) => out.push(' '),
            (c, false) => out.push(c),
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct T {
        n: u32,
    }

    #[test]
    fn positions_without_contents() {
        let text = "root:$y$j9T$secret:19000:0:99999:7:::\n";
        let e = toml::from_str::<T>(text).unwrap_err();
        let d = super::describe(text, &e);
        assert!(d.starts_with("line 1, column "), "{d}");
        assert!(!d.contains("secret") && !d.contains("root"), "{d}");
        let text = "n = \"hunter2\"\n";
        let d = super::describe(text, &toml::from_str::<T>(text).unwrap_err());
        assert!(!d.contains("hunter2") && d.contains("line 1"), "{d}");
    }
}

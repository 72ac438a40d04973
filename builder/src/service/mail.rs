//! E-mail notices through the SMTP relay `serve --smtp` names: a plain-text mail saying
//! how the order's build ended (for a failure its error and the log's last 30 lines), the
//! artifacts with their links and SHA-256, and the order's JSON attached.

use std::time::Duration;

use anyhow::{Context, Result};
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::Value;

pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// The relay's URL without its password, for logs and errors.
    pub relay: String,
}

impl Mailer {
    /// `url`: smtp://[USER:PASSWORD@]HOST[:PORT] (STARTTLS when the relay offers it, and
    /// required when the URL carries a password; `?tls=required` insists, `?tls=none`
    /// never tries) or smtps://… (TLS from the start, port 465).
    pub fn new(url: &str, from: Option<&str>) -> Result<Mailer> {
        let relay = shown_url(url);
        let url = with_tls_default(url);
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&url)
            .with_context(|| format!("--smtp {relay}: not an SMTP relay's URL"))?
            .timeout(Some(Duration::from_secs(30)))
            .build();
        let from = match from {
            Some(f) => f.to_string(),
            None => {
                let host = nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .unwrap_or_else(|| "localhost".into());
                format!("atom-build <atom-build@{host}>")
            }
        };
        let from = from
            .parse::<Mailbox>()
            .with_context(|| format!("--mail-from {from:?}: not an e-mail address"))?;
        Ok(Mailer { transport, from, relay })
    }

    /// Sends the notice of `order` (its JSON as the API shows it) to `to`.
    pub async fn send(&self, to: &str, order: &Value, public_url: &str) -> Result<()> {
        let to: Mailbox = to.parse().with_context(|| format!("{to:?} is not an e-mail address"))?;
        let (subject, text) = compose(order, public_url);
        let json = serde_json::to_string_pretty(order)?;
        let message =
            Message::builder()
                .from(self.from.clone())
                .to(to.clone())
                .subject(subject)
                .multipart(MultiPart::mixed().singlepart(SinglePart::plain(text)).singlepart(
                    Attachment::new("order.json".into()).body(json, ContentType::parse("application/json")?),
                ))
                .context("cannot compose the mail")?;
        self.transport
            .send(message)
            .await
            .with_context(|| format!("{} did not take the mail to {to}", self.relay))?;
        Ok(())
    }
}

/// lettre's `smtp://` without `tls=` never encrypts: STARTTLS when offered is the default
/// here, and required once a password would cross the wire.
fn with_tls_default(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.scheme() == "smtp" && !u.query_pairs().any(|(k, _)| k == "tls") => {
            let mode = if u.password().is_some() {
                "required"
            } else {
                "opportunistic"
            };
            u.query_pairs_mut().append_pair("tls", mode);
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// The URL with its password replaced, as logs may show it.
fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("(hidden)"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(an unreadable URL)".into(),
    }
}

/// The subject and text of an order's mail.
pub fn compose(order: &Value, public_url: &str) -> (String, String) {
    let str_of = |p: &str| order.pointer(p).and_then(Value::as_str).unwrap_or("");
    let id = str_of("/id");
    let state = str_of("/state");
    let what = match (str_of("/request/template"), order.pointer("/request/recipe")) {
        ("", Some(_)) => "a recipe".to_string(),
        ("", None) => "an order".to_string(),
        (t, _) => format!("template {t}"),
    };
    let subject = format!("atom-build: order {id} {state} ({what})");
    let mut text = format!("Order {id} ({what}) {state}.\n\n");
    text += &format!("Order:    {public_url}/v1/orders/{id}\n");
    text += &format!("Web page: {public_url}/#order={id}\n");
    if let Some(set) = order.pointer("/request/set").and_then(Value::as_array) {
        let set: Vec<&str> = set.iter().filter_map(Value::as_str).collect();
        text += &format!("Set:      {}\n", set.join(", "));
    }
    text += &format!(
        "Build:    {} (attempt {}), started {}, ended {}\n",
        str_of("/build/id"),
        order.pointer("/build/attempts").and_then(Value::as_i64).unwrap_or(0),
        or_dash(str_of("/build/started")),
        or_dash(str_of("/build/finished")),
    );
    let error = str_of("/build/error");
    if !error.is_empty() && state != "succeeded" {
        text += &format!("Error:    {error}\n");
    }
    if let Some(arts) = order
        .pointer("/artifacts")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
    {
        text += "\nArtifacts";
        if let Some(t) = order.pointer("/expires_at").and_then(Value::as_str) {
            text += &format!(" (removed after {t} unless the order is pinned)");
        }
        text += ":\n";
        for a in arts {
            let s = |k: &str| a.get(k).and_then(Value::as_str).unwrap_or("");
            let size = a.get("size").and_then(Value::as_u64).unwrap_or(0);
            text += &format!(
                "  {}  {size} bytes  sha256 {}\n    {public_url}{}\n",
                s("name"),
                s("sha256"),
                s("url")
            );
        }
    }
    let tail = str_of("/build/log_tail");
    if state != "succeeded" && !tail.is_empty() {
        text += "\nThe build log's last lines:\n";
        for line in tail.lines() {
            text += &format!("  {line}\n");
        }
    }
    text += "\nThe order as the API shows it is attached (order.json).\n";
    (subject, text)
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn smtp_urls_encrypt_when_they_can_and_must_with_a_password() {
        use super::with_tls_default as t;
        assert_eq!(t("smtp://relay.test"), "smtp://relay.test?tls=opportunistic");
        assert_eq!(t("smtp://u:p@relay.test:587"), "smtp://u:p@relay.test:587?tls=required");
        assert_eq!(t("smtp://relay.test?tls=none"), "smtp://relay.test?tls=none");
        assert_eq!(t("smtps://u:p@relay.test"), "smtps://u:p@relay.test");
    }

    #[test]
    fn a_failure_s_mail_carries_its_error_and_log_tail() {
        let order = json!({
            "id": "o1", "state": "failed", "request": { "template": "base", "set": ["os.version=\"2\""] },
            "build": { "id": "b1", "attempts": 1, "error": "hook failed", "log_tail": "one\ntwo" },
            "artifacts": [],
        });
        let (subject, text) = super::compose(&order, "http://svc");
        assert_eq!(subject, "atom-build: order o1 failed (template base)");
        assert!(text.contains("Error:    hook failed\n"), "{text}");
        assert!(text.contains("  one\n  two\n"), "{text}");
        assert!(text.contains("http://svc/v1/orders/o1"), "{text}");
    }

    #[test]
    fn a_relay_s_password_is_never_shown() {
        assert_eq!(
            super::shown_url("smtp://u:secret@relay:25"),
            "smtp://u:(hidden)@relay:25"
        );
        assert_eq!(super::shown_url("smtp://relay"), "smtp://relay");
    }
}

//! Notices when an order's build ends: the order's JSON (as `GET /v1/orders/ID` shows
//! it, with the error and the log's last 30 lines of a failure) POSTed to the order's
//! webhook, signed with HMAC-SHA256 (`X-Atom-Signature: sha256=HEX`), and a mail to each
//! of its addresses (`mail`), each retried with backoff. Notices are rows in the queue's
//! database: a restart loses none, and of several instances one sends each.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hmac::{KeyInit, Mac};
use tokio::sync::watch;

use super::App;
use super::db::{self, now};
use super::model::{NoticeRow, OrderRequest};

/// Tries of a notice before it is given up (the last over 2 hours after the first).
const MAX_TRIES: i64 = 14;

pub async fn notifier(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("no notices: cannot make an HTTP client: {e}");
            return;
        }
    };
    loop {
        if let Err(e) = round(&app, &http).await {
            tracing::warn!("cannot send notices: {e:#}");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The wait before try `n + 1` after `n` failed: 1 s, 2 s, 4 s, … at most 4096 s.
fn backoff(tries: i64) -> i64 {
    1i64 << (tries - 1).clamp(0, 12) as u32
}

pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2_11::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn round(app: &App, http: &reqwest::Client) -> Result<()> {
    for (order_id, spec) in app.db.unnotified().await? {
        // One order that cannot be notified holds up no other.
        if let Err(e) = queue_one(app, &order_id, &spec).await {
            tracing::warn!(order = %order_id, "cannot queue the order's notice: {e:#}");
        }
    }
    // An instance without a relay leaves e-mail to one that has it (a shared queue).
    for n in app.db.due_notices(app.mailer.is_some()).await? {
        if let Err(e) = try_one(app, http, &n).await {
            tracing::warn!(order = %n.order_id, "cannot send the order's notice: {e:#}");
        }
    }
    Ok(())
}

async fn queue_one(app: &App, order_id: &str, spec: &str) -> Result<()> {
    let req: OrderRequest = serde_json::from_str(spec).unwrap_or_default();
    let mut notices = Vec::new();
    if let (Some(n), Some(order)) = (&req.notify, app.db.order(order_id).await?) {
        let body = super::api::order_json(app, &order)
            .await
            .map_err(|e| anyhow::anyhow!("the JSON of order {order_id}: {e:?}"))?
            .to_string();
        let row = |kind: &str, target: &str, secret: &str| NoticeRow {
            id: db::random_id(8),
            order_id: order_id.to_string(),
            kind: kind.into(),
            target: target.into(),
            secret: secret.into(),
            body: body.clone(),
            attempts: 0,
        };
        if let (Some(url), Some(secret)) = (&n.webhook, &n.secret) {
            notices.push(row("webhook", url, secret));
        }
        for address in &n.email {
            notices.push(row("email", address, ""));
        }
    }
    app.db.queue_notices(order_id, &notices).await?;
    Ok(())
}

async fn try_one(app: &App, http: &reqwest::Client, n: &NoticeRow) -> Result<()> {
    if !app.db.take_notice(n, now() + 60).await? {
        return Ok(());
    }
    let tries = n.attempts + 1;
    // Within the put-off above, so no other instance takes the notice while it is sent.
    let sent = match tokio::time::timeout(SEND_LIMIT, async {
        match n.kind.as_str() {
            "email" => mail(app, n).await,
            _ => send(http, n).await,
        }
    })
    .await
    {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("no answer within {} s", SEND_LIMIT.as_secs())),
    };
    match sent {
        Ok(()) => {
            tracing::info!(order = %n.order_id, target = %n.target, tries, "notice sent");
            app.db.notice_tried(&n.id, None, None).await
        }
        Err(e) => {
            let error = format!("{e:#}");
            let retry = (tries < MAX_TRIES).then(|| now() + backoff(tries));
            tracing::warn!(order = %n.order_id, target = %n.target, tries, gave_up = retry.is_none(), "notice not delivered: {error}");
            app.db.notice_tried(&n.id, Some(&error), retry).await
        }
    }
}

/// One notice's whole send (an SMTP session is several round trips, each with its own
/// timeout).
const SEND_LIMIT: Duration = Duration::from_secs(45);

async fn mail(app: &App, n: &NoticeRow) -> Result<()> {
    let Some(mailer) = &app.mailer else {
        bail!("this instance sends no e-mail (it was started without --smtp)");
    };
    let mut order: serde_json::Value = serde_json::from_str(&n.body).context("the notice's order JSON")?;
    // Each recipient sees neither the others nor the webhook (often a capability URL).
    if let Some(request) = order.get_mut("request").and_then(|r| r.as_object_mut()) {
        request.remove("notify");
    }
    mailer.send(&n.target, &order, &app.public_url).await
}

async fn send(http: &reqwest::Client, n: &NoticeRow) -> Result<()> {
    let r = http
        .post(&n.target)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("x-atom-event", "order.ended")
        .header("x-atom-signature", signature(&n.secret, n.body.as_bytes()))
        .body(n.body.clone())
        .send()
        .await
        .with_context(|| format!("cannot reach {}", n.target))?;
    if !r.status().is_success() {
        bail!("{} answered {}", n.target, r.status());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_is_rfc_4231_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            super::signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        assert_eq!(super::backoff(1), 1);
        assert_eq!(super::backoff(2), 2);
        assert_eq!(super::backoff(13), 4096);
        assert_eq!(super::backoff(40), 4096);
    }
}

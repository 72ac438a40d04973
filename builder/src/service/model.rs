//! What the service stores and shows: tokens, orders (a user's request), builds (one run
//! of a recipe, shared by every order with the same digest) and their artifacts.

use serde::{Deserialize, Serialize};

use crate::build::progress::StageEvent;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Finished, and no order refers to it any more: its files are gone.
    Removed,
    /// Finished longer ago than the service keeps files (and not pinned): files gone.
    Expired,
}

impl BuildState {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Queued => "queued",
            BuildState::Running => "running",
            BuildState::Succeeded => "succeeded",
            BuildState::Failed => "failed",
            BuildState::Cancelled => "cancelled",
            BuildState::Removed => "removed",
            BuildState::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<BuildState> {
        Some(match s {
            "queued" => BuildState::Queued,
            "running" => BuildState::Running,
            "succeeded" => BuildState::Succeeded,
            "failed" => BuildState::Failed,
            "cancelled" => BuildState::Cancelled,
            "removed" => BuildState::Removed,
            "expired" => BuildState::Expired,
            _ => return None,
        })
    }

    pub fn is_open(self) -> bool {
        matches!(self, BuildState::Queued | BuildState::Running)
    }
}

/// Scopes a token can carry beyond ordering builds of the service's templates:
/// - `recipe`: orders may carry a whole recipe (its hooks run on the build host, so only
///   for trusted callers)
/// - `publish`: orders may publish into the recipe's repository with the service's key
/// - `worker`: a remote worker (`atom-build worker`) leases builds, reports, uploads
pub const SCOPES: [&str; 4] = ["recipe", "publish", "worker", "email"];

#[derive(Clone, Debug)]
pub struct TokenRow {
    pub id: String,
    pub name: String,
    pub secret_hash: String,
    pub scopes: Vec<String>,
    pub max_queued: i64,
    pub created: i64,
    pub revoked: bool,
}

impl TokenRow {
    pub fn may(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// What an order asks for (the JSON body of `POST /v1/orders`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    /// A template of the service (`--templates DIR/NAME.toml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// A whole recipe as TOML text (tokens with the `recipe` scope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<String>,
    /// Recipe keys to override, as `atom-build build --set KEY=VALUE` takes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<String>,
    /// Disk formats (raw, raw.zst, qcow2, vmdk, vhd) and tar.zst for the root tree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub formats: Vec<String>,
    /// Publish into the recipe's repository (tokens with the `publish` scope).
    #[serde(default)]
    pub publish: bool,
    /// Whom to tell when the build has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
}

/// An order's notices when its build ends (succeeded, failed or cancelled): a webhook,
/// e-mail, or both.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    /// POSTed the order's JSON (as `GET /v1/orders/ID` shows it), retried with backoff
    /// until it answers 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// The HMAC-SHA256 key of the `X-Atom-Signature: sha256=HEX` header over the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Addresses sent a mail through the service's SMTP relay (`serve --smtp`): one
    /// address or a list.
    #[serde(default, deserialize_with = "one_or_many", skip_serializing_if = "Vec::is_empty")]
    pub email: Vec<String>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// What a build runs: the recipe (a template's name or the text of one) and the
/// arguments for `atom-build build`. Its digest decides which orders share a build.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BuildSpec {
    pub template: Option<String>,
    pub recipe: Option<String>,
    pub set: Vec<String>,
    pub skip: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct OrderRow {
    pub id: String,
    pub token_id: String,
    pub build_id: String,
    /// active, cancelled or deleted.
    pub state: String,
    pub created: i64,
    pub spec: String,
    pub predicted_ready: Option<i64>,
    /// Keeps the build's files past the expiry.
    pub pinned: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Artifact {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Clone, Debug)]
pub struct BuildRow {
    pub id: String,
    pub digest: String,
    pub recipe_name: String,
    pub spec: String,
    pub state: BuildState,
    pub stage: Option<String>,
    pub stage_index: i64,
    pub created: i64,
    pub started: Option<i64>,
    pub finished: Option<i64>,
    pub worker: Option<String>,
    pub lease_until: Option<i64>,
    pub attempts: i64,
    pub error: Option<String>,
    pub log_tail: Option<String>,
    pub artifacts: Vec<Artifact>,
    pub instance: Option<String>,
    pub predicted_seconds: Option<f64>,
    /// Only the service's own workers may run it (it publishes with the service's key).
    pub local_only: bool,
}

impl BuildRow {
    /// A build just ordered: queued, never run.
    pub fn queued(
        id: String,
        digest: String,
        recipe_name: String,
        spec: String,
        created: i64,
        predicted: f64,
    ) -> BuildRow {
        BuildRow {
            id,
            digest,
            recipe_name,
            spec,
            state: BuildState::Queued,
            stage: None,
            stage_index: 0,
            created,
            started: None,
            finished: None,
            worker: None,
            lease_until: None,
            attempts: 0,
            error: None,
            log_tail: None,
            artifacts: Vec::new(),
            instance: None,
            predicted_seconds: Some(predicted),
            local_only: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct StageMean {
    pub stage: String,
    pub verdict: String,
    pub seconds: f64,
    pub samples: i64,
    pub own_recipe: bool,
}

// What remote workers and the service say to each other (`/v1/worker/…`).

/// `POST /v1/worker/lease`: a worker asks for a build.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// The worker's name (letters, digits, `.`, `_`, `-`); the queue calls it
    /// `remote:TOKEN:NAME`.
    pub worker: String,
}

/// The answer: a build to run until the lease ends (renewed by heartbeats).
#[derive(Debug, Serialize, Deserialize)]
pub struct Lease {
    pub build: String,
    pub attempt: i64,
    /// The last stage's key: the worker checks its own recipe comes to the same.
    pub digest: String,
    pub recipe_name: String,
    pub spec: BuildSpec,
    pub lease_seconds: u64,
}

/// `POST /v1/worker/builds/ID/heartbeat`: renews the lease, with the stage events and
/// the log bytes since the last one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub worker: String,
    pub attempt: i64,
    #[serde(default)]
    pub events: Vec<StageEvent>,
    /// Where `log` starts in the attempt's log.
    #[serde(default)]
    pub log_offset: u64,
    #[serde(default)]
    pub log: String,
}

/// `POST /v1/worker/builds/ID/finish`: how the build ended. Artifacts were uploaded
/// before; the service checks they are these.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finish {
    pub worker: String,
    /// "succeeded" or "failed".
    pub state: String,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub log_tail: Option<String>,
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
}

/// `POST /v1/worker/builds/ID/give-back`: the worker stops; the build is queued again.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GiveBack {
    pub worker: String,
    pub reason: String,
}

/// A notice waiting to be sent, or being retried.
#[derive(Clone, Debug)]
pub struct NoticeRow {
    pub id: String,
    pub order_id: String,
    /// "webhook".
    pub kind: String,
    pub target: String,
    pub secret: String,
    /// What is sent: the order's JSON when its build ended.
    pub body: String,
    pub attempts: i64,
}

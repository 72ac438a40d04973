//! The service's tables, in SQL that SQLite (3.35 or later) and PostgreSQL both take:
//! text ids made by the service (no autoincrement, whose syntax differs), times as Unix
//! seconds in BIGINT, flags as 0/1, lists and specs as JSON text.

/// Each step moves the schema one version on; a database records the last it ran. Steps
/// are only ever appended.
pub const MIGRATIONS: &[&[&str]] = &[
    // 1: the queue.
    &[
        "CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        secret_hash TEXT NOT NULL,
        scopes TEXT NOT NULL,
        max_queued BIGINT NOT NULL,
        created BIGINT NOT NULL,
        revoked BIGINT NOT NULL DEFAULT 0
    )",
        "CREATE TABLE builds (
        id TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        recipe_name TEXT NOT NULL,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        stage TEXT,
        stage_index BIGINT NOT NULL DEFAULT 0,
        created BIGINT NOT NULL,
        started BIGINT,
        finished BIGINT,
        worker TEXT,
        lease_until BIGINT,
        attempts BIGINT NOT NULL DEFAULT 0,
        error TEXT,
        log_tail TEXT,
        artifacts TEXT,
        instance TEXT,
        predicted_seconds DOUBLE PRECISION
    )",
        "CREATE INDEX builds_state ON builds (state, created)",
        "CREATE INDEX builds_digest ON builds (digest)",
        "CREATE TABLE orders (
        id TEXT PRIMARY KEY,
        token_id TEXT NOT NULL,
        build_id TEXT NOT NULL,
        state TEXT NOT NULL,
        created BIGINT NOT NULL,
        spec TEXT NOT NULL,
        predicted_ready BIGINT
    )",
        "CREATE INDEX orders_token ON orders (token_id, created)",
        "CREATE INDEX orders_build ON orders (build_id)",
        "CREATE TABLE stage_times (
        build_id TEXT NOT NULL,
        recipe_name TEXT NOT NULL,
        stage TEXT NOT NULL,
        verdict TEXT NOT NULL,
        seconds DOUBLE PRECISION NOT NULL,
        finished BIGINT NOT NULL
    )",
        "CREATE INDEX stage_times_recipe ON stage_times (recipe_name, stage, finished)",
        "CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        instance TEXT NOT NULL,
        seen BIGINT NOT NULL,
        build_id TEXT
    )",
        "CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        seen BIGINT NOT NULL
    )",
    ],
    // 2: pinned orders keep their build's files past the expiry.
    &["ALTER TABLE orders ADD COLUMN pinned BIGINT NOT NULL DEFAULT 0"],
    // 3: remote workers (builds that publish stay on the service's own workers, which
    // hold its signing key) and notices when an order's build ends.
    &[
        "ALTER TABLE builds ADD COLUMN local_only BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE orders ADD COLUMN notified BIGINT NOT NULL DEFAULT 0",
        "CREATE TABLE notices (
        id TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        secret TEXT NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts BIGINT NOT NULL DEFAULT 0,
        next_try BIGINT NOT NULL,
        last_error TEXT,
        created BIGINT NOT NULL,
        sent BIGINT
    )",
        "CREATE INDEX notices_due ON notices (state, next_try)",
    ],
];

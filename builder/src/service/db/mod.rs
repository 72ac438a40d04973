//! The one query layer of the build service: the same SQL on SQLite (the embedded
//! default) and PostgreSQL (several service instances sharing one queue), through sqlx's
//! `Any` driver. Every state change is one statement guarded by the state it expects, so
//! two instances (or a worker and a cancel) racing on a build never both win.

mod schema;

use anyhow::{Context, Result, bail};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Row};

use super::model::{Artifact, BuildRow, BuildState, NoticeRow, OrderRow, StageMean, TokenRow};
use crate::build::progress::StageEvent;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    pub backend: Backend,
}

pub fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// A random id of 16 bytes, as hex.
pub fn random_id(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    hex::encode(b)
}

const BUILD_COLUMNS: &str = "id, digest, recipe_name, spec, state, stage, stage_index, created, started, finished, \
     worker, lease_until, attempts, error, log_tail, artifacts, instance, predicted_seconds, local_only";

const ORDER_COLUMNS: &str = "id, token_id, build_id, state, created, spec, predicted_ready, pinned";

/// The first column of each row, as text (ids).
fn first_column(rows: &[AnyRow]) -> Result<Vec<String>> {
    Ok(rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?)
}

impl Db {
    /// `SELECT COUNT(*) …` with one text parameter.
    async fn count(&self, sql: &'static str, param: &str) -> Result<i64> {
        Ok(sqlx::query(sql).bind(param).fetch_one(&self.pool).await?.try_get(0)?)
    }

    /// `SELECT id …` with one text parameter.
    async fn ids(&self, sql: &'static str, param: &str) -> Result<Vec<String>> {
        first_column(&sqlx::query(sql).bind(param).fetch_all(&self.pool).await?)
    }

    /// `sqlite:PATH` (created if missing) or `postgres://…`; brings the schema up to date.
    pub async fn open(url: &str) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            bail!("--database {url:?}: give sqlite:PATH or postgres://USER@HOST/DB");
        };
        let url = match backend {
            Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_string(),
        };
        // SQLite has one writer at a time: a few connections are plenty.
        let max = if backend == Backend::Sqlite { 4 } else { 8 };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(std::time::Duration::from_secs(30))
            .connect(&url)
            .await
            .with_context(|| format!("cannot open the database {}", redact(&url)))?;
        let db = Db { pool, backend };
        if backend == Backend::Sqlite {
            // Readers do not wait for the writer; the file survives a crash mid-write.
            sqlx::query("PRAGMA journal_mode = WAL").fetch_all(&db.pool).await?;
        }
        db.migrate()
            .await
            .context("cannot bring the database schema up to date")?;
        Ok(db)
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            // Two instances starting at once: one migrates, the other waits and sees it done.
            sqlx::query("SELECT pg_advisory_xact_lock(4242001)")
                .fetch_all(&mut *tx)
                .await?;
        }
        sqlx::query("CREATE TABLE IF NOT EXISTS atom_schema (version BIGINT NOT NULL)")
            .execute(&mut *tx)
            .await?;
        let version: Option<i64> = sqlx::query("SELECT version FROM atom_schema")
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
        let have = version.unwrap_or(0) as usize;
        if have > schema::MIGRATIONS.len() {
            bail!(
                "the database has schema version {have}, newer than this atom-build knows ({}): upgrade atom-build",
                schema::MIGRATIONS.len()
            );
        }
        for step in &schema::MIGRATIONS[have..] {
            for sql in *step {
                sqlx::query(*sql).execute(&mut *tx).await?;
            }
        }
        if version.is_none() {
            sqlx::query("INSERT INTO atom_schema (version) VALUES ($1)")
                .bind(schema::MIGRATIONS.len() as i64)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query("UPDATE atom_schema SET version = $1")
                .bind(schema::MIGRATIONS.len() as i64)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    // Tokens.

    pub async fn add_token(&self, t: &TokenRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (id, name, secret_hash, scopes, max_queued, created, revoked) VALUES ($1, $2, $3, $4, $5, $6, 0)",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.secret_hash)
        .bind(t.scopes.join(","))
        .bind(t.max_queued)
        .bind(t.created)
        .execute(&self.pool)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(d) if d.is_unique_violation() => anyhow::anyhow!("a token named {:?} exists", t.name),
            e => e.into(),
        })?;
        Ok(())
    }

    pub async fn token(&self, id: &str) -> Result<Option<TokenRow>> {
        let row =
            sqlx::query("SELECT id, name, secret_hash, scopes, max_queued, created, revoked FROM tokens WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| token_from(&r)).transpose()
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRow>> {
        let rows =
            sqlx::query("SELECT id, name, secret_hash, scopes, max_queued, created, revoked FROM tokens ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(token_from).collect()
    }

    pub async fn revoke_token(&self, name: &str) -> Result<bool> {
        let r = sqlx::query("UPDATE tokens SET revoked = 1 WHERE name = $1 AND revoked = 0")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    // Orders and builds.

    /// The build an order with this digest can share: queued, running or finished (and
    /// still holding its artifacts).
    pub async fn reusable_build(&self, digest: &str) -> Result<Option<BuildRow>> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE digest = $1 AND state IN ('queued', 'running', 'succeeded') \
             ORDER BY created DESC LIMIT 1"
        );
        let row = sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(digest)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| build_from(&r)).transpose()
    }

    pub async fn queued_orders_of(&self, token_id: &str) -> Result<i64> {
        self.count(
            "SELECT COUNT(*) FROM orders o JOIN builds b ON b.id = o.build_id \
             WHERE o.token_id = $1 AND o.state = 'active' AND b.state IN ('queued', 'running')",
            token_id,
        )
        .await
    }

    /// Inserts the build (unless `reuse`) and the order in one transaction.
    pub async fn insert_order(&self, order: &OrderRow, build: Option<&BuildRow>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        if let Some(b) = build {
            sqlx::query(
                "INSERT INTO builds (id, digest, recipe_name, spec, state, stage_index, created, attempts, predicted_seconds, local_only) \
                 VALUES ($1, $2, $3, $4, 'queued', 0, $5, 0, $6, $7)",
            )
            .bind(&b.id)
            .bind(&b.digest)
            .bind(&b.recipe_name)
            .bind(&b.spec)
            .bind(b.created)
            .bind(b.predicted_seconds)
            .bind(i64::from(b.local_only))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO orders (id, token_id, build_id, state, created, spec, predicted_ready) \
             VALUES ($1, $2, $3, 'active', $4, $5, $6)",
        )
        .bind(&order.id)
        .bind(&order.token_id)
        .bind(&order.build_id)
        .bind(order.created)
        .bind(&order.spec)
        .bind(order.predicted_ready)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn order(&self, id: &str) -> Result<Option<OrderRow>> {
        let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1 AND state <> 'deleted'");
        let row = sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| order_from(&r)).transpose()
    }

    pub async fn orders_of(&self, token_id: &str) -> Result<Vec<OrderRow>> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE token_id = $1 AND state <> 'deleted' ORDER BY created DESC, id"
        );
        let rows = sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(token_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(order_from).collect()
    }

    pub async fn set_order_state(&self, id: &str, from: &str, to: &str) -> Result<bool> {
        let r = sqlx::query("UPDATE orders SET state = $1 WHERE id = $2 AND state = $3")
            .bind(to)
            .bind(id)
            .bind(from)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Orders still waiting for a build (neither cancelled nor deleted).
    pub async fn active_orders_of_build(&self, build_id: &str) -> Result<i64> {
        self.count(
            "SELECT COUNT(*) FROM orders WHERE build_id = $1 AND state = 'active'",
            build_id,
        )
        .await
    }

    /// Orders that still refer to a build at all (its artifacts must stay).
    pub async fn orders_of_build(&self, build_id: &str) -> Result<i64> {
        self.count(
            "SELECT COUNT(*) FROM orders WHERE build_id = $1 AND state <> 'deleted'",
            build_id,
        )
        .await
    }

    pub async fn build(&self, id: &str) -> Result<Option<BuildRow>> {
        let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = $1");
        let row = sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| build_from(&r)).transpose()
    }

    /// Queued builds in queue order, then running ones (for positions and ETAs).
    pub async fn open_builds(&self) -> Result<Vec<BuildRow>> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE state IN ('queued', 'running') \
             ORDER BY CASE WHEN state = 'running' THEN 0 ELSE 1 END, created, id"
        );
        let rows = sqlx::query(AssertSqlSafe(sql.as_str())).fetch_all(&self.pool).await?;
        rows.iter().map(build_from).collect()
    }

    /// Moves a queued or running build to cancelled; a worker running it sees that at
    /// its next heartbeat and stops the build.
    pub async fn cancel_build(&self, id: &str, reason: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE builds SET state = 'cancelled', error = $1, finished = $2, lease_until = NULL \
             WHERE id = $3 AND state IN ('queued', 'running')",
        )
        .bind(reason)
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// A finished build nobody refers to any more: its files are gone.
    pub async fn mark_removed(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE builds SET state = 'removed', artifacts = NULL WHERE id = $1 AND state NOT IN ('queued', 'running')")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_pinned(&self, order_id: &str, pinned: bool) -> Result<()> {
        sqlx::query("UPDATE orders SET pinned = $1 WHERE id = $2")
            .bind(i64::from(pinned))
            .bind(order_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Finished builds of this instance (or builds that never ran anywhere) that ended
    /// before `before` and that no live order has pinned.
    pub async fn expiring(&self, instance: &str, before: i64) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT id FROM builds b WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished < $1 \
             AND (instance = $2 OR instance IS NULL) \
             AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.build_id = b.id AND o.pinned = 1 AND o.state <> 'deleted')",
        )
        .bind(before)
        .bind(instance)
        .fetch_all(&self.pool)
        .await?;
        first_column(&rows)
    }

    /// Marks a finished build expired (its files are removed next); false if it changed
    /// meanwhile (pinned, or gone).
    pub async fn expire(&self, id: &str, before: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE builds SET state = 'expired', artifacts = NULL WHERE id = $1 \
             AND state IN ('succeeded', 'failed', 'cancelled') AND finished < $2 \
             AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.build_id = $1 AND o.pinned = 1 AND o.state <> 'deleted')",
        )
        .bind(id)
        .bind(before)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Builds of this instance whose files should be gone (removed or expired).
    pub async fn gone_here(&self, instance: &str) -> Result<Vec<String>> {
        self.ids(
            "SELECT id FROM builds WHERE state IN ('removed', 'expired') AND instance = $1",
            instance,
        )
        .await
    }

    // Workers.

    /// Takes the oldest queued build for `worker` with a lease until `lease_until`. The
    /// update re-checks the state: of two workers choosing the same row, one gets it and
    /// the other gets nothing (and asks again).
    pub async fn claim(&self, worker: &str, instance: &str, lease_until: i64) -> Result<Option<BuildRow>> {
        // A remote worker takes no build that must stay here (one that publishes).
        let only = if is_remote(worker) { "AND local_only = 0" } else { "" };
        let sql = format!(
            "UPDATE builds SET state = 'running', worker = $1, instance = $2, lease_until = $3, \
             started = $4, attempts = attempts + 1, stage = NULL, stage_index = 0 \
             WHERE id = (SELECT id FROM builds WHERE state = 'queued' {only} ORDER BY created, id LIMIT 1) \
             AND state = 'queued' RETURNING {BUILD_COLUMNS}"
        );
        for _ in 0..5 {
            let row = sqlx::query(AssertSqlSafe(sql.as_str()))
                .bind(worker)
                .bind(instance)
                .bind(lease_until)
                .bind(now())
                .fetch_optional(&self.pool)
                .await?;
            if let Some(r) = row {
                return Ok(Some(build_from(&r)?));
            }
            let count = format!("SELECT COUNT(*) FROM builds WHERE state = 'queued' {only}");
            let queued: i64 = sqlx::query(AssertSqlSafe(count.as_str()))
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?;
            if queued == 0 {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// Extends the lease; false when the build is no longer this worker's to run
    /// (cancelled, or its lease ran out and it went back to the queue).
    pub async fn heartbeat(&self, build_id: &str, worker: &str, lease_until: i64) -> Result<bool> {
        let r = sqlx::query("UPDATE builds SET lease_until = $1 WHERE id = $2 AND worker = $3 AND state = 'running'")
            .bind(lease_until)
            .bind(build_id)
            .bind(worker)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn worker_seen(&self, worker: &str, instance: &str, build_id: Option<&str>) -> Result<()> {
        sqlx::query(
            "INSERT INTO workers (id, instance, seen, build_id) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET instance = excluded.instance, seen = excluded.seen, build_id = excluded.build_id",
        )
        .bind(worker)
        .bind(instance)
        .bind(now())
        .bind(build_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn instance_seen(&self, instance: &str, url: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO instances (id, url, seen) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET url = excluded.url, seen = excluded.seen",
        )
        .bind(instance)
        .bind(url)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The address another instance serves its builds' files at.
    pub async fn instance_url(&self, instance: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT url FROM instances WHERE id = $1")
            .bind(instance)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Gives a build this worker holds back to the queue (the service is stopping).
    pub async fn requeue(&self, build_id: &str, worker: &str, reason: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE builds SET state = 'queued', worker = NULL, lease_until = NULL, stage = NULL, stage_index = 0, \
             error = $1 WHERE id = $2 AND worker = $3 AND state = 'running'",
        )
        .bind(reason)
        .bind(build_id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Running builds of an instance (to stop what a crashed run of it left).
    pub async fn running_on(&self, instance: &str) -> Result<Vec<String>> {
        self.ids(
            "SELECT id FROM builds WHERE state = 'running' AND instance = $1 AND worker NOT LIKE 'remote:%'",
            instance,
        )
        .await
    }

    /// Workers heard from since `since`.
    pub async fn live_workers(&self, since: i64) -> Result<i64> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM workers WHERE seen >= $1")
            .bind(since)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        Ok(n)
    }

    pub async fn progress(&self, build_id: &str, worker: &str, stage: &str, index: i64) -> Result<()> {
        sqlx::query(
            "UPDATE builds SET stage = $1, stage_index = $2 WHERE id = $3 AND worker = $4 AND state = 'running'",
        )
        .bind(stage)
        .bind(index)
        .bind(build_id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn record_stage(
        &self,
        build_id: &str,
        recipe: &str,
        stage: &str,
        verdict: &str,
        seconds: f64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO stage_times (build_id, recipe_name, stage, verdict, seconds, finished) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(build_id)
        .bind(recipe)
        .bind(stage)
        .bind(verdict)
        .bind(seconds)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// What a build's child reported (`atom-build build --events`): its current stage,
    /// and the durations of the stages it finished.
    pub async fn stage_events(&self, b: &BuildRow, worker: &str, events: &[StageEvent]) -> Result<()> {
        for e in events {
            self.progress(&b.id, worker, &e.stage, e.index as i64 + 1).await?;
            if e.event != "start" {
                self.record_stage(&b.id, &b.recipe_name, &e.stage, &e.event, e.seconds)
                    .await?;
            }
        }
        Ok(())
    }

    // Notices.

    /// Orders whose build has ended (or that were cancelled) and whose notice is not yet
    /// queued: (order id, the order's request).
    pub async fn unnotified(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT o.id, o.spec FROM orders o JOIN builds b ON b.id = o.build_id \
             WHERE o.notified = 0 AND o.state IN ('active', 'cancelled') \
             AND (b.state IN ('succeeded', 'failed', 'cancelled') OR o.state = 'cancelled') \
             ORDER BY o.created LIMIT 100",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
    }

    /// Marks the order notified and queues its notices, in one transaction (of two
    /// instances, one does it). False: another instance did.
    pub async fn queue_notices(&self, order_id: &str, notices: &[NoticeRow]) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query("UPDATE orders SET notified = 1 WHERE id = $1 AND notified = 0")
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() != 1 {
            return Ok(false);
        }
        for n in notices {
            sqlx::query(
                "INSERT INTO notices (id, order_id, kind, target, secret, body, state, attempts, next_try, created) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7)",
            )
            .bind(&n.id)
            .bind(&n.order_id)
            .bind(&n.kind)
            .bind(&n.target)
            .bind(&n.secret)
            .bind(&n.body)
            .bind(now())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Notices due for a try; e-mail ones only for an instance that can send them.
    pub async fn due_notices(&self, email: bool) -> Result<Vec<NoticeRow>> {
        let rows = sqlx::query(
            "SELECT id, order_id, kind, target, secret, body, attempts FROM notices \
             WHERE state = 'pending' AND next_try <= $1 AND (kind <> 'email' OR $2) \
             ORDER BY next_try LIMIT 20",
        )
        .bind(now())
        .bind(email)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(NoticeRow {
                    id: r.try_get(0)?,
                    order_id: r.try_get(1)?,
                    kind: r.try_get(2)?,
                    target: r.try_get(3)?,
                    secret: r.try_get(4)?,
                    body: r.try_get(5)?,
                    attempts: r.try_get(6)?,
                })
            })
            .collect()
    }

    /// Takes a due notice for one try (the next try is put off meanwhile, so another
    /// instance leaves it). False: another instance took it.
    pub async fn take_notice(&self, n: &NoticeRow, put_off_until: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE notices SET attempts = attempts + 1, next_try = $1 \
             WHERE id = $2 AND attempts = $3 AND state = 'pending'",
        )
        .bind(put_off_until)
        .bind(&n.id)
        .bind(n.attempts)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The end of a try: sent, another try at `retry_at`, or (None) given up.
    pub async fn notice_tried(&self, id: &str, error: Option<&str>, retry_at: Option<i64>) -> Result<()> {
        let (state, next) = match (error, retry_at) {
            (None, _) => ("sent", now()),
            (Some(_), Some(t)) => ("pending", t),
            (Some(_), None) => ("failed", now()),
        };
        sqlx::query(
            "UPDATE notices SET state = $1, next_try = $2, last_error = $3, \
             sent = CASE WHEN $1 = 'sent' THEN $2 ELSE sent END WHERE id = $4",
        )
        .bind(state)
        .bind(next)
        .bind(error)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Mean durations of each stage by verdict: of this recipe's recent builds, and of all
    /// recipes (the fallback for a recipe never built).
    pub async fn stage_means(&self, recipe: &str) -> Result<Vec<StageMean>> {
        let since = now() - 90 * 86400;
        let rows = sqlx::query(
            "SELECT stage, verdict, AVG(seconds), COUNT(*), \
             CASE WHEN recipe_name = $1 THEN 1 ELSE 0 END AS own \
             FROM stage_times WHERE finished >= $2 GROUP BY stage, verdict, CASE WHEN recipe_name = $1 THEN 1 ELSE 0 END",
        )
        .bind(recipe)
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StageMean {
                    stage: r.try_get(0)?,
                    verdict: r.try_get(1)?,
                    seconds: r.try_get(2)?,
                    samples: r.try_get(3)?,
                    own_recipe: r.try_get::<i64, _>(4)? == 1,
                })
            })
            .collect()
    }

    /// The end of a build this worker ran: succeeded or failed, with what it left.
    pub async fn finish(
        &self,
        build_id: &str,
        worker: &str,
        state: BuildState,
        error: Option<&str>,
        log_tail: Option<&str>,
        artifacts: &[Artifact],
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE builds SET state = $1, error = $2, log_tail = $3, artifacts = $4, finished = $5, lease_until = NULL \
             WHERE id = $6 AND worker = $7 AND state = 'running'",
        )
        .bind(state.as_str())
        .bind(error)
        .bind(log_tail)
        .bind(serde_json::to_string(artifacts)?)
        .bind(now())
        .bind(build_id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Builds whose worker stopped renewing its lease go back to the queue, or fail once
    /// they have had `max_attempts`: nothing stays "running" without a live worker.
    /// Returns (requeued, failed) build ids.
    pub async fn reap(&self, max_attempts: i64) -> Result<(Vec<String>, Vec<String>)> {
        let t = now();
        let failed = sqlx::query(
            "UPDATE builds SET state = 'failed', finished = $1, lease_until = NULL, \
             error = 'its worker stopped (no heartbeat within the lease) on the last allowed attempt' \
             WHERE state = 'running' AND lease_until < $1 AND attempts >= $2 RETURNING id",
        )
        .bind(t)
        .bind(max_attempts)
        .fetch_all(&self.pool)
        .await?;
        let requeued = sqlx::query(
            "UPDATE builds SET state = 'queued', worker = NULL, lease_until = NULL, stage = NULL, stage_index = 0, \
             error = 'its worker stopped (no heartbeat within the lease); queued again' \
             WHERE state = 'running' AND lease_until < $1 AND attempts < $2 RETURNING id",
        )
        .bind(t)
        .bind(max_attempts)
        .fetch_all(&self.pool)
        .await?;
        Ok((first_column(&requeued)?, first_column(&failed)?))
    }

    /// At start: builds this instance's workers were running when it stopped have no
    /// worker now; their leases end at once so `reap` settles them.
    pub async fn release_instance(&self, instance: &str) -> Result<u64> {
        // Remote workers go on building through a restart: their leases stand.
        let r = sqlx::query(
            "UPDATE builds SET lease_until = 0 WHERE state = 'running' AND instance = $1 AND worker NOT LIKE 'remote:%'",
        )
            .bind(instance)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}

/// Workers on other machines are named `remote:TOKEN:NAME` in the queue.
pub const REMOTE_PREFIX: &str = "remote:";

pub fn is_remote(worker: &str) -> bool {
    worker.starts_with(REMOTE_PREFIX)
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn token_from(r: &AnyRow) -> Result<TokenRow> {
    let scopes: String = r.try_get("scopes")?;
    Ok(TokenRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        secret_hash: r.try_get("secret_hash")?,
        scopes: scopes
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        max_queued: r.try_get("max_queued")?,
        created: r.try_get("created")?,
        revoked: r.try_get::<i64, _>("revoked")? != 0,
    })
}

fn order_from(r: &AnyRow) -> Result<OrderRow> {
    Ok(OrderRow {
        id: r.try_get("id")?,
        token_id: r.try_get("token_id")?,
        build_id: r.try_get("build_id")?,
        state: r.try_get("state")?,
        created: r.try_get("created")?,
        spec: r.try_get("spec")?,
        predicted_ready: r.try_get("predicted_ready")?,
        pinned: r.try_get::<i64, _>("pinned")? != 0,
    })
}

fn build_from(r: &AnyRow) -> Result<BuildRow> {
    let state: String = r.try_get("state")?;
    let artifacts: Option<String> = r.try_get("artifacts")?;
    Ok(BuildRow {
        id: r.try_get("id")?,
        digest: r.try_get("digest")?,
        recipe_name: r.try_get("recipe_name")?,
        spec: r.try_get("spec")?,
        state: BuildState::parse(&state).with_context(|| format!("unknown build state {state:?} in the database"))?,
        stage: r.try_get("stage")?,
        stage_index: r.try_get("stage_index")?,
        created: r.try_get("created")?,
        started: r.try_get("started")?,
        finished: r.try_get("finished")?,
        worker: r.try_get("worker")?,
        lease_until: r.try_get("lease_until")?,
        attempts: r.try_get("attempts")?,
        error: r.try_get("error")?,
        log_tail: r.try_get("log_tail")?,
        artifacts: match artifacts {
            Some(a) => serde_json::from_str(&a).context("artifacts column")?,
            None => Vec::new(),
        },
        instance: r.try_get("instance")?,
        predicted_seconds: r.try_get("predicted_seconds")?,
        local_only: r.try_get::<i64, _>("local_only")? != 0,
    })
}

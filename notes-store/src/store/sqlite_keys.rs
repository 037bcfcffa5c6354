//! `ClientKeyStore` and `RewrapStore` on SQLite (see `keys.rs`). Write transactions start with
//! `BEGIN IMMEDIATE`, like every other write of `sqlite.rs`, so a state check and the change
//! that depends on it cannot interleave with another writer.

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{Connection, QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use super::keys::{
    count_from_db, hold_from_columns, ClientKeyRecord, ClientKeyStore, ClientState, ErasureRecord,
    KeyUsage, RewrapRow, RewrapStore, RewrapUpdate,
};
use super::sqlite::{id_text, map_err, parse_id, SqliteStore};
use super::{revision_from_db, StoreError};

const CLIENT_COLUMNS: &str = "site_id, client_id, kms_key_id, state, created_at_ms, \
     erasure_reason, erased_at_ms, legal_hold, legal_hold_reason, legal_hold_at_ms, \
     notes_erased, revisions_erased, receipt, receipt_signature, receipt_fingerprint";

fn client_from_row(row: &SqliteRow) -> Result<ClientKeyRecord, StoreError> {
    let state = ClientState::parse(&row.try_get::<String, _>("state").map_err(map_err)?)?;
    let erasure = if state == ClientState::Erased {
        Some(ErasureRecord {
            erased_at_ms: row
                .try_get::<Option<i64>, _>("erased_at_ms")
                .map_err(map_err)?
                .unwrap_or(0),
            reason: row
                .try_get::<Option<String>, _>("erasure_reason")
                .map_err(map_err)?
                .unwrap_or_default(),
            notes_erased: count_from_db(
                row.try_get::<Option<i64>, _>("notes_erased")
                    .map_err(map_err)?
                    .unwrap_or(0),
            )?,
            revisions_erased: count_from_db(
                row.try_get::<Option<i64>, _>("revisions_erased")
                    .map_err(map_err)?
                    .unwrap_or(0),
            )?,
            receipt: row
                .try_get::<Option<Vec<u8>>, _>("receipt")
                .map_err(map_err)?
                .unwrap_or_default(),
            receipt_signature: row
                .try_get::<Option<Vec<u8>>, _>("receipt_signature")
                .map_err(map_err)?
                .unwrap_or_default(),
            receipt_fingerprint: row
                .try_get::<Option<String>, _>("receipt_fingerprint")
                .map_err(map_err)?
                .unwrap_or_default(),
        })
    } else {
        None
    };
    Ok(ClientKeyRecord {
        site_id: row.try_get("site_id").map_err(map_err)?,
        client_id: row.try_get("client_id").map_err(map_err)?,
        kms_key_id: row.try_get("kms_key_id").map_err(map_err)?,
        state,
        created_at_ms: row.try_get("created_at_ms").map_err(map_err)?,
        legal_hold: hold_from_columns(
            row.try_get("legal_hold").map_err(map_err)?,
            row.try_get("legal_hold_reason").map_err(map_err)?,
            row.try_get("legal_hold_at_ms").map_err(map_err)?,
        ),
        erasure_reason: row.try_get("erasure_reason").map_err(map_err)?,
        erasure,
    })
}

async fn select_client(
    conn: &mut SqliteConnection,
    site: &str,
    client: &str,
) -> Result<Option<ClientKeyRecord>, StoreError> {
    let sql =
        format!("SELECT {CLIENT_COLUMNS} FROM client_keys WHERE site_id = ?1 AND client_id = ?2");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(site)
        .bind(client)
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_err)?
        .map(|row| client_from_row(&row))
        .transpose()
}

/// Inserts an ACTIVE row without a key unless one exists.
async fn ensure_row(
    conn: &mut SqliteConnection,
    site: &str,
    client: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO client_keys (site_id, client_id, state, created_at_ms) \
         VALUES (?1, ?2, 'ACTIVE', ?3) ON CONFLICT (site_id, client_id) DO NOTHING",
    )
    .bind(site)
    .bind(client)
    .bind(now_ms)
    .execute(&mut *conn)
    .await
    .map(|_| ())
    .map_err(map_err)
}

/// The row, which must exist (it was just ensured inside the same transaction).
async fn existing(
    conn: &mut SqliteConnection,
    site: &str,
    client: &str,
) -> Result<ClientKeyRecord, StoreError> {
    select_client(conn, site, client)
        .await?
        .ok_or_else(|| StoreError::Internal("client row vanished inside its transaction".into()))
}

/// Runs `body` in a `BEGIN IMMEDIATE` transaction on a pooled connection; a failed
/// transaction's connection is closed rather than reused.
macro_rules! immediate {
    ($store:expr, |$conn:ident| $body:expr) => {{
        let mut pooled = $store.pool.acquire().await.map_err(map_err)?;
        let result = async {
            let mut tx = pooled
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(map_err)?;
            let $conn: &mut SqliteConnection = &mut tx;
            let value = $body.await?;
            tx.commit().await.map_err(map_err)?;
            Ok::<_, StoreError>(value)
        }
        .await;
        if result.is_err() {
            pooled.close_on_drop();
        }
        result
    }};
}

#[async_trait]
impl ClientKeyStore for SqliteStore {
    async fn client_key(
        &self,
        site: &str,
        client: &str,
    ) -> Result<Option<ClientKeyRecord>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        select_client(&mut conn, site, client).await
    }

    async fn record_client_key(
        &self,
        site: &str,
        client: &str,
        kms_key_id: &str,
        now_ms: i64,
    ) -> Result<ClientKeyRecord, StoreError> {
        immediate!(self, |conn| async move {
            ensure_row(conn, site, client, now_ms).await?;
            sqlx::query(
                "UPDATE client_keys SET kms_key_id = ?3 \
                 WHERE site_id = ?1 AND client_id = ?2 AND kms_key_id IS NULL",
            )
            .bind(site)
            .bind(client)
            .bind(kms_key_id)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
            existing(conn, site, client).await
        })
    }

    async fn set_legal_hold(
        &self,
        site: &str,
        client: &str,
        hold: Option<&str>,
        now_ms: i64,
    ) -> Result<ClientKeyRecord, StoreError> {
        immediate!(self, |conn| async move {
            ensure_row(conn, site, client, now_ms).await?;
            let row = existing(conn, site, client).await?;
            if row.state != ClientState::Active {
                return Err(StoreError::ClientNotActive(row.state.as_str()));
            }
            sqlx::query(
                "UPDATE client_keys SET legal_hold = ?3, legal_hold_reason = ?4, \
                 legal_hold_at_ms = ?5 WHERE site_id = ?1 AND client_id = ?2",
            )
            .bind(site)
            .bind(client)
            .bind(i64::from(hold.is_some()))
            .bind(hold)
            .bind(hold.map(|_| now_ms))
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
            existing(conn, site, client).await
        })
    }

    async fn begin_erasure(
        &self,
        site: &str,
        client: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<ClientKeyRecord, StoreError> {
        immediate!(self, |conn| async move {
            ensure_row(conn, site, client, now_ms).await?;
            let row = existing(conn, site, client).await?;
            if row.state != ClientState::Active {
                return Ok(row);
            }
            if let Some(hold) = &row.legal_hold {
                return Err(StoreError::LegalHold(hold.reason.clone()));
            }
            sqlx::query(
                "UPDATE client_keys SET state = 'ERASING', erasure_started_ms = ?3, \
                 erasure_reason = ?4 WHERE site_id = ?1 AND client_id = ?2 AND state = 'ACTIVE'",
            )
            .bind(site)
            .bind(client)
            .bind(now_ms)
            .bind(reason)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
            existing(conn, site, client).await
        })
    }

    async fn finish_erasure(
        &self,
        site: &str,
        client: &str,
        erasure: &ErasureRecord,
    ) -> Result<ClientKeyRecord, StoreError> {
        immediate!(self, |conn| async move {
            let row = select_client(conn, site, client)
                .await?
                .ok_or_else(|| StoreError::Internal("finish_erasure: no client row".into()))?;
            match row.state {
                ClientState::Erased => return Ok(row),
                ClientState::Active => {
                    return Err(StoreError::Internal(
                        "finish_erasure: erasure not begun".into(),
                    ))
                }
                ClientState::Erasing => {}
            }
            let (notes, revisions) = count_in(conn, site, client).await?;
            sqlx::query(
                "DELETE FROM note_revisions WHERE note_id IN \
                 (SELECT note_id FROM notes WHERE site_id = ?1 AND client_id = ?2)",
            )
            .bind(site)
            .bind(client)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
            sqlx::query("DELETE FROM notes WHERE site_id = ?1 AND client_id = ?2")
                .bind(site)
                .bind(client)
                .execute(&mut *conn)
                .await
                .map_err(map_err)?;
            sqlx::query(
                "UPDATE client_keys SET state = 'ERASED', erased_at_ms = ?3, \
                 notes_erased = ?4, revisions_erased = ?5, receipt = ?6, \
                 receipt_signature = ?7, receipt_fingerprint = ?8 \
                 WHERE site_id = ?1 AND client_id = ?2",
            )
            .bind(site)
            .bind(client)
            .bind(erasure.erased_at_ms)
            .bind(i64::try_from(notes).unwrap_or(i64::MAX))
            .bind(i64::try_from(revisions).unwrap_or(i64::MAX))
            .bind(erasure.receipt.as_slice())
            .bind(erasure.receipt_signature.as_slice())
            .bind(&erasure.receipt_fingerprint)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
            existing(conn, site, client).await
        })
    }

    async fn count_client_notes(&self, site: &str, client: &str) -> Result<(u64, u64), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        count_in(&mut conn, site, client).await
    }
}

async fn count_in(
    conn: &mut SqliteConnection,
    site: &str,
    client: &str,
) -> Result<(u64, u64), StoreError> {
    let (notes, revisions): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM notes WHERE site_id = ?1 AND client_id = ?2), \
         (SELECT count(*) FROM note_revisions r JOIN notes n ON n.note_id = r.note_id \
          WHERE n.site_id = ?1 AND n.client_id = ?2)",
    )
    .bind(site)
    .bind(client)
    .fetch_one(&mut *conn)
    .await
    .map_err(map_err)?;
    Ok((count_from_db(notes)?, count_from_db(revisions)?))
}

/// A client's state (?1 site, ?2 client); also used by `sqlite_inserter`.
pub(super) const CLIENT_STATE_SQL: &str =
    "SELECT state FROM client_keys WHERE site_id = ?1 AND client_id = ?2";

/// Refuses a write for a client whose erasure has begun. Call inside the write transaction.
pub(super) async fn check_client_writable(
    conn: &mut SqliteConnection,
    site: &str,
    client: &str,
) -> Result<(), StoreError> {
    let state: Option<String> = sqlx::query_scalar(CLIENT_STATE_SQL)
        .bind(site)
        .bind(client)
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_err)?;
    ClientState::check_writable(state.as_deref())
}

/// One statement per shape of a re-wrap page: an `(?3 IS NULL OR ...)` condition keeps SQLite
/// from using the index for the range, and every page would scan from the start.
macro_rules! rewrap_select {
    ($tail:literal) => {
        concat!(
            "SELECT r.note_id, r.revision, n.site_id, n.client_id, r.kms_key_id, \
             r.kms_key_version, r.wrapped_key FROM note_revisions r \
             JOIN notes n ON n.note_id = r.note_id \
             WHERE r.kms_key_id = ?1 AND r.kms_key_version = ?2",
            $tail,
            " ORDER BY r.note_id, r.revision"
        )
    };
}
const REWRAP_PAGE_FIRST: &str = concat!(rewrap_select!(""), " LIMIT ?3");
const REWRAP_PAGE_AFTER: &str = concat!(
    rewrap_select!(" AND (r.note_id, r.revision) > (?3, ?4)"),
    " LIMIT ?5"
);

/// Rows per re-wrap UPDATE: six parameters each, far below SQLite's limit of 32,766.
const REWRAP_ROWS_PER_STATEMENT: usize = 250;

/// One UPDATE for many re-wrapped keys, each applied only if its row still holds the old
/// blob. One statement per chunk instead of one per row: the per-statement round trip to
/// sqlx's SQLite worker thread cost more than the update itself. The unary `+` on v's columns
/// keeps SQLite from indexing v and scanning the whole table against it (its choice for a
/// few hundred rows): v is walked and each row found by primary key
/// (`rewrap_statements_use_their_indexes`).
fn rewrap_statement(chunk: &[RewrapUpdate]) -> QueryBuilder<Sqlite> {
    let mut q = QueryBuilder::<Sqlite>::new(
        "WITH v (note_id, revision, new_key, key_id, key_version, old_key) AS (",
    );
    q.push_values(chunk, |mut row, u| {
        row.push_bind(id_text(u.note_id))
            .push_bind(i64::from(u.revision))
            .push_bind(u.new_wrapped_key.as_slice())
            .push_bind(u.kms_key_id.as_str())
            .push_bind(i64::from(u.kms_key_version))
            .push_bind(u.old_wrapped_key.as_slice());
    });
    q.push(
        ") UPDATE note_revisions SET wrapped_key = v.new_key, kms_key_id = v.key_id, \
         kms_key_version = v.key_version FROM v \
         WHERE note_revisions.note_id = +v.note_id AND note_revisions.revision = +v.revision \
         AND note_revisions.wrapped_key = +v.old_key",
    );
    q
}

#[async_trait]
impl RewrapStore for SqliteStore {
    async fn rewrap_page(
        &self,
        kms_key_id: &str,
        kms_key_version: u32,
        after: Option<(Uuid, u32)>,
        limit: u32,
    ) -> Result<Vec<RewrapRow>, StoreError> {
        let query = sqlx::query(if after.is_some() {
            REWRAP_PAGE_AFTER
        } else {
            REWRAP_PAGE_FIRST
        })
        .bind(kms_key_id.to_owned())
        .bind(i64::from(kms_key_version));
        let query = match after {
            None => query.bind(i64::from(limit)),
            Some((id, rev)) => query
                .bind(id_text(id))
                .bind(i64::from(rev))
                .bind(i64::from(limit)),
        };
        let rows = query.fetch_all(&self.pool).await.map_err(map_err)?;
        rows.iter()
            .map(|row| {
                let note_id: String = row.try_get("note_id").map_err(map_err)?;
                Ok(RewrapRow {
                    note_id: parse_id(&note_id)?,
                    revision: revision_from_db(row.try_get("revision").map_err(map_err)?)?,
                    site_id: row.try_get("site_id").map_err(map_err)?,
                    client_id: row.try_get("client_id").map_err(map_err)?,
                    kms_key_id: row.try_get("kms_key_id").map_err(map_err)?,
                    kms_key_version: revision_from_db(
                        row.try_get("kms_key_version").map_err(map_err)?,
                    )?,
                    wrapped_key: row.try_get("wrapped_key").map_err(map_err)?,
                })
            })
            .collect()
    }

    async fn apply_rewraps(&self, updates: &[RewrapUpdate]) -> Result<u64, StoreError> {
        if updates.is_empty() {
            return Ok(0);
        }
        immediate!(self, |conn| async move {
            let mut applied = 0;
            for chunk in updates.chunks(REWRAP_ROWS_PER_STATEMENT) {
                applied += rewrap_statement(chunk)
                    .build()
                    .persistent(chunk.len() == REWRAP_ROWS_PER_STATEMENT)
                    .execute(&mut *conn)
                    .await
                    .map_err(map_err)?
                    .rows_affected();
            }
            Ok::<_, StoreError>(applied)
        })
    }

    async fn key_usage(&self) -> Result<Vec<KeyUsage>, StoreError> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT kms_key_id, kms_key_version, count(*) FROM note_revisions \
             GROUP BY kms_key_id, kms_key_version ORDER BY kms_key_id, kms_key_version",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.into_iter()
            .map(|(kms_key_id, version, n)| {
                Ok(KeyUsage {
                    kms_key_id,
                    kms_key_version: revision_from_db(version)?,
                    revisions: count_from_db(n)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NoteStore;

    /// The steps of an `EXPLAIN QUERY PLAN` query.
    async fn plan_of(
        store: &SqliteStore,
        explain: sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments>,
    ) -> Vec<String> {
        explain
            .fetch_all(&store.pool)
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<String, _>("detail"))
            .collect()
    }

    /// The multi-row re-wrap UPDATE must find each row by primary key: a plan that scans
    /// note_revisions would make every batch of a 1,000,000-note campaign read the table.
    /// Asked with a full chunk over a table of 20,000 revisions, the shape SQLite's planner
    /// turned into a scan before the unary `+` (seen in a 100,000-note re-wrap benchmark).
    #[tokio::test]
    async fn rewrap_statements_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("notes.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        let update = RewrapUpdate {
            note_id: Uuid::new_v4(),
            revision: 1,
            old_wrapped_key: vec![1; 80],
            new_wrapped_key: vec![2; 80],
            kms_key_id: "k".into(),
            kms_key_version: 2,
        };
        sqlx::raw_sql(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) \
             INSERT INTO notes SELECT printf('%08x-0000-4000-8000-000000000000', i), 's', 'c', \
             'a', '2024-01-01', 1, 0, 0 FROM n; \
             INSERT INTO note_revisions SELECT note_id, 1, 'a', 0, 'k', 1, 1, randomblob(100), \
             randomblob(12), randomblob(100), NULL, NULL FROM notes;",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        let chunk = vec![update; REWRAP_ROWS_PER_STATEMENT];
        let statement = rewrap_statement(&chunk);
        let explain = format!("EXPLAIN QUERY PLAN {}", statement.sql().as_str());
        let mut query = sqlx::query(sqlx::AssertSqlSafe(explain));
        for _ in 0..REWRAP_ROWS_PER_STATEMENT {
            query = query
                .bind("id")
                .bind(1i64)
                .bind(vec![2u8])
                .bind("k")
                .bind(2i64)
                .bind(vec![1u8]);
        }
        let plan = plan_of(&store, query).await;
        assert!(
            plan.iter()
                .any(|step| step.starts_with("SEARCH note_revisions USING")
                    && step.contains("(note_id=? AND revision=?)")),
            "plan: {plan:?}"
        );
        assert!(
            !plan
                .iter()
                .any(|step| step.starts_with("SCAN note_revisions")),
            "plan: {plan:?}"
        );

        // A page walks the (key, version) range of the index in its order: no scan, no sort.
        let page = sqlx::query(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {REWRAP_PAGE_AFTER}"
        )))
        .bind("k")
        .bind(1i64)
        .bind("id")
        .bind(1i64)
        .bind(1000i64);
        let plan = plan_of(&store, page).await;
        assert!(
            plan.iter().any(|step| step.starts_with("SEARCH r USING")
                && step.contains(
                    "INDEX note_revisions_by_key_version (kms_key_id=? AND kms_key_version=?"
                )),
            "plan: {plan:?}"
        );
        assert!(
            !plan.iter().any(|step| step.contains("TEMP B-TREE")),
            "plan: {plan:?}"
        );
    }
}

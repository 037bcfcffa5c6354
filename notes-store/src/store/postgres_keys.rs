//! `ClientKeyStore` and `RewrapStore` on PostgreSQL (see `keys.rs`). State changes lock the
//! client's row (`FOR UPDATE`); note writes take a shared lock on it (`FOR SHARE`,
//! `check_client_writable`), so an erasure that begins waits for in-flight writes of that
//! client and every later write sees ERASING.

use async_trait::async_trait;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::Row;
use uuid::Uuid;

use super::keys::{
    count_from_db, hold_from_columns, ClientKeyRecord, ClientKeyStore, ClientState, ErasureRecord,
    KeyUsage, RewrapRow, RewrapStore, RewrapUpdate,
};
use super::postgres::{map_err, PostgresStore};
use super::{revision_from_db, StoreError};

const CLIENT_COLUMNS: &str = "site_id, client_id, kms_key_id, state, created_at_ms, \
     erasure_reason, erased_at_ms, legal_hold, legal_hold_reason, legal_hold_at_ms, \
     notes_erased, revisions_erased, receipt, receipt_signature, receipt_fingerprint";

fn opt<T>(row: &PgRow, column: &str) -> Result<Option<T>, StoreError>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get::<Option<T>, _>(column).map_err(map_err)
}

fn client_from_row(row: &PgRow) -> Result<ClientKeyRecord, StoreError> {
    let state = ClientState::parse(&row.try_get::<String, _>("state").map_err(map_err)?)?;
    let erasure = if state == ClientState::Erased {
        Some(ErasureRecord {
            erased_at_ms: opt::<i64>(row, "erased_at_ms")?.unwrap_or(0),
            reason: opt::<String>(row, "erasure_reason")?.unwrap_or_default(),
            notes_erased: count_from_db(opt::<i64>(row, "notes_erased")?.unwrap_or(0))?,
            revisions_erased: count_from_db(opt::<i64>(row, "revisions_erased")?.unwrap_or(0))?,
            receipt: opt::<Vec<u8>>(row, "receipt")?.unwrap_or_default(),
            receipt_signature: opt::<Vec<u8>>(row, "receipt_signature")?.unwrap_or_default(),
            receipt_fingerprint: opt::<String>(row, "receipt_fingerprint")?.unwrap_or_default(),
        })
    } else {
        None
    };
    Ok(ClientKeyRecord {
        site_id: row.try_get("site_id").map_err(map_err)?,
        client_id: row.try_get("client_id").map_err(map_err)?,
        kms_key_id: opt(row, "kms_key_id")?,
        state,
        created_at_ms: row.try_get("created_at_ms").map_err(map_err)?,
        legal_hold: hold_from_columns(
            row.try_get("legal_hold").map_err(map_err)?,
            opt(row, "legal_hold_reason")?,
            opt(row, "legal_hold_at_ms")?,
        ),
        erasure_reason: opt(row, "erasure_reason")?,
        erasure,
    })
}

async fn select_client(
    conn: &mut PgConnection,
    site: &str,
    client: &str,
    lock: &str,
) -> Result<Option<ClientKeyRecord>, StoreError> {
    let sql = format!(
        "SELECT {CLIENT_COLUMNS} FROM client_keys WHERE site_id = $1 AND client_id = $2 {lock}"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(site)
        .bind(client)
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_err)?
        .map(|row| client_from_row(&row))
        .transpose()
}

/// Inserts an ACTIVE row without a key unless one exists, then locks and returns the row.
async fn ensure_locked(
    conn: &mut PgConnection,
    site: &str,
    client: &str,
    now_ms: i64,
) -> Result<ClientKeyRecord, StoreError> {
    sqlx::query(
        "INSERT INTO client_keys (site_id, client_id, state, created_at_ms) \
         VALUES ($1, $2, 'ACTIVE', $3) ON CONFLICT (site_id, client_id) DO NOTHING",
    )
    .bind(site)
    .bind(client)
    .bind(now_ms)
    .execute(&mut *conn)
    .await
    .map_err(map_err)?;
    existing(conn, site, client, "FOR UPDATE").await
}

async fn existing(
    conn: &mut PgConnection,
    site: &str,
    client: &str,
    lock: &str,
) -> Result<ClientKeyRecord, StoreError> {
    select_client(conn, site, client, lock)
        .await?
        .ok_or_else(|| StoreError::Internal("client row vanished inside its transaction".into()))
}

#[async_trait]
impl ClientKeyStore for PostgresStore {
    async fn client_key(
        &self,
        site: &str,
        client: &str,
    ) -> Result<Option<ClientKeyRecord>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        select_client(&mut conn, site, client, "").await
    }

    async fn record_client_key(
        &self,
        site: &str,
        client: &str,
        kms_key_id: &str,
        now_ms: i64,
    ) -> Result<ClientKeyRecord, StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        ensure_locked(&mut tx, site, client, now_ms).await?;
        sqlx::query(
            "UPDATE client_keys SET kms_key_id = $3 \
             WHERE site_id = $1 AND client_id = $2 AND kms_key_id IS NULL",
        )
        .bind(site)
        .bind(client)
        .bind(kms_key_id)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let row = existing(&mut tx, site, client, "").await?;
        tx.commit().await.map_err(map_err)?;
        Ok(row)
    }

    async fn set_legal_hold(
        &self,
        site: &str,
        client: &str,
        hold: Option<&str>,
        now_ms: i64,
    ) -> Result<ClientKeyRecord, StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let row = ensure_locked(&mut tx, site, client, now_ms).await?;
        if row.state != ClientState::Active {
            return Err(StoreError::ClientNotActive(row.state.as_str()));
        }
        sqlx::query(
            "UPDATE client_keys SET legal_hold = $3, legal_hold_reason = $4, \
             legal_hold_at_ms = $5 WHERE site_id = $1 AND client_id = $2",
        )
        .bind(site)
        .bind(client)
        .bind(i64::from(hold.is_some()))
        .bind(hold)
        .bind(hold.map(|_| now_ms))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let row = existing(&mut tx, site, client, "").await?;
        tx.commit().await.map_err(map_err)?;
        Ok(row)
    }

    async fn begin_erasure(
        &self,
        site: &str,
        client: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<ClientKeyRecord, StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let row = ensure_locked(&mut tx, site, client, now_ms).await?;
        if row.state != ClientState::Active {
            tx.commit().await.map_err(map_err)?;
            return Ok(row);
        }
        if let Some(hold) = &row.legal_hold {
            return Err(StoreError::LegalHold(hold.reason.clone()));
        }
        sqlx::query(
            "UPDATE client_keys SET state = 'ERASING', erasure_started_ms = $3, \
             erasure_reason = $4 WHERE site_id = $1 AND client_id = $2 AND state = 'ACTIVE'",
        )
        .bind(site)
        .bind(client)
        .bind(now_ms)
        .bind(reason)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let row = existing(&mut tx, site, client, "").await?;
        tx.commit().await.map_err(map_err)?;
        Ok(row)
    }

    async fn finish_erasure(
        &self,
        site: &str,
        client: &str,
        erasure: &ErasureRecord,
    ) -> Result<ClientKeyRecord, StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let row = select_client(&mut tx, site, client, "FOR UPDATE")
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
        let (notes, revisions) = count_in(&mut tx, site, client).await?;
        sqlx::query(
            "DELETE FROM note_revisions WHERE note_id IN \
             (SELECT note_id FROM notes WHERE site_id = $1 AND client_id = $2)",
        )
        .bind(site)
        .bind(client)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        sqlx::query("DELETE FROM notes WHERE site_id = $1 AND client_id = $2")
            .bind(site)
            .bind(client)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query(
            "UPDATE client_keys SET state = 'ERASED', erased_at_ms = $3, notes_erased = $4, \
             revisions_erased = $5, receipt = $6, receipt_signature = $7, \
             receipt_fingerprint = $8 WHERE site_id = $1 AND client_id = $2",
        )
        .bind(site)
        .bind(client)
        .bind(erasure.erased_at_ms)
        .bind(i64::try_from(notes).unwrap_or(i64::MAX))
        .bind(i64::try_from(revisions).unwrap_or(i64::MAX))
        .bind(erasure.receipt.as_slice())
        .bind(erasure.receipt_signature.as_slice())
        .bind(&erasure.receipt_fingerprint)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let row = existing(&mut tx, site, client, "").await?;
        tx.commit().await.map_err(map_err)?;
        Ok(row)
    }

    async fn count_client_notes(&self, site: &str, client: &str) -> Result<(u64, u64), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        count_in(&mut conn, site, client).await
    }
}

async fn count_in(
    conn: &mut PgConnection,
    site: &str,
    client: &str,
) -> Result<(u64, u64), StoreError> {
    let (notes, revisions): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM notes WHERE site_id = $1 AND client_id = $2), \
         (SELECT count(*) FROM note_revisions r JOIN notes n ON n.note_id = r.note_id \
          WHERE n.site_id = $1 AND n.client_id = $2)",
    )
    .bind(site)
    .bind(client)
    .fetch_one(&mut *conn)
    .await
    .map_err(map_err)?;
    Ok((count_from_db(notes)?, count_from_db(revisions)?))
}

/// Refuses a write for a client whose erasure has begun. Call inside the write transaction:
/// the shared row lock makes a concurrent `begin_erasure` wait for this write to commit.
pub(super) async fn check_client_writable(
    conn: &mut PgConnection,
    site: &str,
    client: &str,
) -> Result<(), StoreError> {
    let state: Option<String> = sqlx::query_scalar(
        "SELECT state FROM client_keys WHERE site_id = $1 AND client_id = $2 FOR SHARE",
    )
    .bind(site)
    .bind(client)
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_err)?;
    ClientState::check_writable(state.as_deref())
}

#[async_trait]
impl RewrapStore for PostgresStore {
    async fn rewrap_page(
        &self,
        kms_key_id: &str,
        kms_key_version: u32,
        after: Option<(Uuid, u32)>,
        limit: u32,
    ) -> Result<Vec<RewrapRow>, StoreError> {
        // One statement per shape: an `($3 IS NULL OR ...)` condition can keep the planner
        // from using the index for the range, and every page would scan from the start.
        macro_rules! select {
            ($tail:literal) => {
                concat!(
                    "SELECT r.note_id, r.revision, n.site_id, n.client_id, r.kms_key_id, \
                     r.kms_key_version, r.wrapped_key FROM note_revisions r \
                     JOIN notes n ON n.note_id = r.note_id \
                     WHERE r.kms_key_id = $1 AND r.kms_key_version = $2",
                    $tail,
                    " ORDER BY r.note_id, r.revision"
                )
            };
        }
        const FIRST: &str = concat!(select!(""), " LIMIT $3");
        const AFTER: &str = concat!(
            select!(" AND (r.note_id, r.revision) > ($3::uuid, $4::bigint)"),
            " LIMIT $5"
        );
        let query = sqlx::query(if after.is_some() { AFTER } else { FIRST })
            .bind(kms_key_id.to_owned())
            .bind(i64::from(kms_key_version));
        let query = match after {
            None => query.bind(i64::from(limit)),
            Some((id, rev)) => query.bind(id).bind(i64::from(rev)).bind(i64::from(limit)),
        };
        let rows = query.fetch_all(&self.pool).await.map_err(map_err)?;
        rows.iter()
            .map(|row| {
                Ok(RewrapRow {
                    note_id: row.try_get("note_id").map_err(map_err)?,
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
        // One statement for the whole batch: the updates travel as six parallel arrays,
        // joined to the table by primary key; a row changes only if it still holds the old
        // blob. One round trip instead of one per row.
        let applied = sqlx::query(
            "UPDATE note_revisions AS r SET wrapped_key = v.new_key, kms_key_id = v.key_id, \
             kms_key_version = v.key_version \
             FROM UNNEST($1::uuid[], $2::bigint[], $3::bytea[], $4::text[], $5::bigint[], \
                         $6::bytea[]) \
                  AS v (note_id, revision, new_key, key_id, key_version, old_key) \
             WHERE r.note_id = v.note_id AND r.revision = v.revision \
             AND r.wrapped_key = v.old_key",
        )
        .bind(updates.iter().map(|u| u.note_id).collect::<Vec<_>>())
        .bind(
            updates
                .iter()
                .map(|u| i64::from(u.revision))
                .collect::<Vec<_>>(),
        )
        .bind(
            updates
                .iter()
                .map(|u| u.new_wrapped_key.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            updates
                .iter()
                .map(|u| u.kms_key_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            updates
                .iter()
                .map(|u| i64::from(u.kms_key_version))
                .collect::<Vec<_>>(),
        )
        .bind(
            updates
                .iter()
                .map(|u| u.old_wrapped_key.clone())
                .collect::<Vec<_>>(),
        )
        .execute(&self.pool)
        .await
        .map_err(map_err)?
        .rows_affected();
        Ok(applied)
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

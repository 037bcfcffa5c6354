//! Test harness shared by the store suites (`tests/store.rs`, `tests/audit_store.rs`): a fresh
//! PostgreSQL database per test.
//!
//! Also how many frames a SQLite database's WAL holds ([`sqlite_wal_frames`]).
//!
//! PostgreSQL comes from `KMS_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! a role that may create databases. Each test creates `kms_test_<random>` and drops it when
//! done. An unreachable server fails the PostgreSQL tests; they never skip.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub fn pg_admin_url() -> String {
    std::env::var("KMS_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_string())
}

/// Where the tests look for PostgreSQL, without any password the URL may hold.
fn pg_target(url: &str) -> String {
    match PgConnectOptions::from_str(url) {
        Ok(o) => format!("{}@{}:{}", o.get_username(), o.get_host(), o.get_port()),
        Err(_) => "an unparsable KMS_TEST_PG_URL".to_string(),
    }
}

async fn pg_admin() -> PgConnection {
    let url = pg_admin_url();
    let options =
        PgConnectOptions::from_str(&url).expect("KMS_TEST_PG_URL must be a postgres:// URL");
    match tokio::time::timeout(Duration::from_secs(5), PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(err)) => panic!(
            "PostgreSQL tests need a server at {} (set KMS_TEST_PG_URL; role must be allowed to CREATE DATABASE): {err}",
            pg_target(&url)
        ),
        Err(_) => panic!(
            "PostgreSQL tests need a server at {} (set KMS_TEST_PG_URL): connection timed out",
            pg_target(&url)
        ),
    }
}

/// Creates an empty database `kms_test_<random>`; returns its name and URL. Drop it with
/// [`drop_pg_database`].
pub async fn create_pg_database() -> (String, String) {
    let name = format!("kms_test_{}", Uuid::new_v4().simple());
    let mut admin = pg_admin().await;
    // Concurrent CREATE DATABASE can trip over each other on the template; retry a little.
    let mut attempt = 0;
    loop {
        let sql = format!("CREATE DATABASE {name}");
        match sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
        {
            Ok(_) => break,
            Err(err) if attempt < 5 => {
                attempt += 1;
                eprintln!("CREATE DATABASE {name} failed ({err}); retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => panic!("CREATE DATABASE {name} failed: {err}"),
        }
    }
    let _ = admin.close().await;
    let url = pg_url_for_database(&pg_admin_url(), &name);
    (name, url)
}

/// `url` with its database (path) replaced by `database`, query string kept.
pub fn pg_url_for_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let prefix = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(query) => format!("{prefix}/{database}?{query}"),
        None => format!("{prefix}/{database}"),
    }
}

/// Best-effort `DROP DATABASE … WITH (FORCE)` on a thread of its own: callable from `Drop`,
/// inside or outside a runtime.
pub fn drop_pg_database(name: &str) {
    let name = name.to_string();
    let joined = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(options) = PgConnectOptions::from_str(&pg_admin_url()) else {
                return;
            };
            let connect = PgConnection::connect_with(&options);
            let Ok(Ok(mut admin)) = tokio::time::timeout(Duration::from_secs(5), connect).await
            else {
                eprintln!("could not connect to drop test database {name}");
                return;
            };
            let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            if let Err(err) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await
            {
                eprintln!("could not drop test database {name}: {err}");
            }
            let _ = admin.close().await;
        });
    })
    .join();
    if joined.is_err() {
        eprintln!("dropping test database panicked");
    }
}

/// Frames in the WAL of the SQLite database at `url`, from `PRAGMA wal_checkpoint(PASSIVE)`
/// (busy, frames in the WAL, frames checkpointed); it checkpoints them, so call it once.
pub async fn sqlite_wal_frames(url: &str) -> i64 {
    let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
    let (_, wal_frames, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
    wal_frames
}

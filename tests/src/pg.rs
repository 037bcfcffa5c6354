//! A private PostgreSQL database per test on the server named by `KMS_TEST_PG_URL`
//! (default postgres://postgres@127.0.0.1:5432/postgres; `scripts/with-postgres.sh` starts a
//! throwaway cluster when none is running). Dropped again by `drop_database`.

use anyhow::{Context, Result};
use sqlx::{Connection, PgConnection};

pub fn admin_url() -> String {
    std::env::var("KMS_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Creates `kms_e2e_<random>` and returns its URL.
pub async fn create_database() -> Result<(String, String)> {
    let admin = admin_url();
    let name = format!("kms_e2e_{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(&admin).await.with_context(|| {
        format!("PostgreSQL at {admin} is required for this test (make test starts one)")
    })?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b.to_string())
        .unwrap_or(admin.clone());
    Ok((format!("{base}/{name}"), name))
}

pub async fn drop_database(name: &str) {
    if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
    }
}

//! SQLite database files that are private from the start: the file named by a `sqlite:` URL
//! (in-memory databases refused), created with mode 0600 before SQLite opens it, and mode 0600
//! enforced on its `-wal` / `-shm` companions; and how often their WAL is checkpointed
//! ([`WAL_AUTOCHECKPOINT_PAGES`]). Shared by kms-server's and notes-store's stores; errors are
//! plain messages that each store wraps in its own error type.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::sqlite::SqliteConnectOptions;

/// Mode of a database file we create (and of its `-wal` / `-shm` companions).
pub const FILE_MODE: u32 = 0o600;

/// WAL pages after which a committing connection copies the WAL into the database file
/// (SQLite's default is 1,000); every connection of both services sets it (`PRAGMA
/// wal_autocheckpoint`): the pools', notes-store's note inserter's, kms-server's audit
/// appender's. New notes and audit events append at the right edge of every table and index,
/// so each group commit rewrites the same few pages into the WAL; a checkpoint writes each
/// page once, however often the WAL holds it. Every 10,000 pages (about 40 MB of WAL, a
/// checkpoint every ~2 s at 3,000 notes/s) there are ten times fewer database-file writes and
/// fsyncs competing with both services' WAL fsyncs on a shared disk: `notes_create` 0.384-0.407
/// against 0.357-0.376 with notes-store's setting, 0.386-0.414 against 0.368-0.393 with
/// kms-server's added (README, session 10). Durability is unchanged (every commit still
/// fsyncs the WAL); crash recovery replays at most this much WAL.
pub const WAL_AUTOCHECKPOINT_PAGES: u32 = 10_000;

/// The file named by a `sqlite:` URL, refusing in-memory databases (`what` names the data in
/// the refusal, e.g. "key metadata").
pub fn database_path(url: &str, what: &str) -> Result<PathBuf, String> {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let (database, params) = rest.split_once('?').unwrap_or((rest, ""));
    if database.is_empty()
        || database == ":memory:"
        || params.split('&').any(|param| param == "mode=memory")
    {
        return Err(format!(
            "sqlite url must name a database file: {what} must survive a restart"
        ));
    }
    // The same parse sqlx does, for the same (percent-decoded) path.
    let options =
        SqliteConnectOptions::from_str(url).map_err(|e| format!("invalid sqlite url: {e}"))?;
    Ok(options.get_filename().to_path_buf())
}

/// Creates `path` with mode 0600 if it does not exist; returns whether it did. SQLite opens an
/// empty file as an empty database and gives the `-wal` and `-shm` files it creates later the
/// mode of the database file.
pub async fn create_private_file(path: &Path) -> Result<bool, String> {
    let result = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .await;
    match result {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(err) => Err(format!(
            "cannot create sqlite database {}: {err}",
            path.display()
        )),
    }
}

/// Sets mode 0600 on the database file and on its `-wal` / `-shm` files when they exist.
pub async fn restrict_permissions(path: &Path) -> Result<(), String> {
    for file in companion_files(path) {
        match tokio::fs::set_permissions(&file, std::fs::Permissions::from_mode(FILE_MODE)).await {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && file != path => {}
            Err(err) => return Err(format!("cannot set mode 0600 on {}: {err}", file.display())),
        }
    }
    Ok(())
}

/// An existing database is left as the operator made it, but a readable one is worth a warning.
pub async fn warn_if_not_private(path: &Path, what: &str) {
    if let Ok(meta) = tokio::fs::metadata(path).await {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "sqlite {what} database is accessible to group or others; expected 0600"
            );
        }
    }
}

/// The database file, then `<file>-wal` and `<file>-shm`.
pub fn companion_files(path: &Path) -> [PathBuf; 3] {
    let with_suffix = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    [path.to_path_buf(), with_suffix("-wal"), with_suffix("-shm")]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_memory_urls_are_refused() {
        for url in [
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite://?mode=memory",
            "sqlite:",
        ] {
            assert!(database_path(url, "x").is_err(), "{url}");
        }
        assert_eq!(
            database_path("sqlite:/tmp/a.db", "x").unwrap(),
            PathBuf::from("/tmp/a.db")
        );
    }

    #[test]
    fn companions() {
        let [db, wal, shm] = companion_files(Path::new("/d/n.db"));
        assert_eq!(db, PathBuf::from("/d/n.db"));
        assert_eq!(wal, PathBuf::from("/d/n.db-wal"));
        assert_eq!(shm, PathBuf::from("/d/n.db-shm"));
    }
}

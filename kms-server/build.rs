//! Rebuilds the crate when a migration is added. `sqlx::migrate!` embeds `migrations/` at
//! compile time, and Cargo reruns the macro only when a file it already knows changes: a new
//! migration file left the binaries and tests migrating to the old list (seen in session 13: a
//! test of the new migration failed against a stale build). This is sqlx's own advice.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}

//! The benchmark switches of `scripts/with-postgres.sh`, which `scripts/bench-pg-own-core.sh`
//! relies on: a throwaway cluster started with `KMS_PG_DURABLE=1` keeps `fsync`,
//! `synchronous_commit` and `full_page_writes` on (the benchmark's PostgreSQL figures would be
//! flattered otherwise), one started without it has them off as `make test` wants, and
//! `KMS_PG_CPUS` pins the server and only then. Real clusters, started by the script itself.

use std::path::PathBuf;
use std::process::Command;

/// Runs inside the script: the three settings, then the postmaster's allowed CPUs (its pid is
/// the first line of `postmaster.pid` in the server's own data directory).
const PROBE: &str = r#"psql "$KMS_TEST_PG_URL" -Atc 'SHOW fsync' -c 'SHOW synchronous_commit' \
    -c 'SHOW full_page_writes' && \
    data=$(psql "$KMS_TEST_PG_URL" -Atc 'SHOW data_directory') && \
    grep Cpus_allowed_list "/proc/$(head -n 1 "$data/postmaster.pid")/status""#;

fn with_postgres(env: &[(&str, &str)]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/with-postgres.sh");
    let mut command = Command::new(script);
    command.args(["bash", "-euo", "pipefail", "-c", PROBE]);
    // Only what the caller asks for: not the switches of whoever runs the tests.
    for name in ["KMS_PG_THROWAWAY", "KMS_PG_DURABLE", "KMS_PG_CPUS"] {
        command.env_remove(name);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let out = command.output().expect("run scripts/with-postgres.sh");
    assert!(
        out.status.success(),
        "with-postgres.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn own_allowed_cpus() -> String {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list"))
        .expect("Cpus_allowed_list")
        .to_string()
}

#[test]
fn throwaway_cluster_is_durable_and_pinned_only_when_asked() {
    let durable = with_postgres(&[
        ("KMS_PG_THROWAWAY", "1"),
        ("KMS_PG_DURABLE", "1"),
        ("KMS_PG_CPUS", "0"),
    ]);
    assert_eq!(durable, "on\non\non\nCpus_allowed_list:\t0\n");

    let default = with_postgres(&[("KMS_PG_THROWAWAY", "1")]);
    assert_eq!(default, format!("off\noff\noff\n{}\n", own_allowed_cpus()));
}

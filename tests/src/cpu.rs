//! Where a benchmark's CPU went: snapshots of every process's CPU time (all its threads, user
//! and system) and of the machine's idle time, read from Linux's /proc, and the difference
//! between two snapshots as CPU microseconds per operation for each process name.
//!
//! Why: on the 2-core machines the benchmarks run on, the load generator, kms-server,
//! notes-store, PostgreSQL and the kernel's workers share the cores, so a throughput ratio
//! alone cannot say whether a service got slower or a neighbour took its CPU. Per-operation CPU
//! by process says what one operation costs the machine and who pays for it; idle cores say
//! whether the run was CPU-bound at all.
//!
//! Processes are grouped by name (`comm`): every `postgres` backend under "postgres", every
//! kernel worker thread (`kworker/…`) under "kernel_workers". A process is matched with itself
//! by pid (a kernel worker renames itself with each work item, so names would not do). One that
//! started within the window counts in full; one that ended within it is absent from the
//! second snapshot and not counted, so short-lived processes are under-counted. The
//! benchmarks' own processes live through their windows.

use std::collections::BTreeMap;
use std::fs;

/// Clock ticks per second of the /proc time fields: the kernel's USER_HZ, which is 100 on
/// every Linux architecture the project builds for (what `sysconf(_SC_CLK_TCK)` and `getconf
/// CLK_TCK` return). Also kms-bench's unit, through [`process_cpu_seconds`].
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time per process name and the machine's idle time, in clock ticks, at one instant.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    /// Keyed by pid, so a process is compared with itself between two snapshots.
    processes: BTreeMap<u32, (String, u64)>,
    idle_ticks: u64,
}

/// What happened between two snapshots.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuUse {
    /// CPU microseconds per operation by process name, largest first.
    pub us_per_op: Vec<(String, f64)>,
    /// Cores idle on average over the window (idle plus I/O wait).
    pub idle_cores: f64,
}

impl CpuUse {
    /// One measurement's CPU from its slices' (`cpu`, operations, seconds): CPU per operation
    /// weighted by each slice's operations, idle cores by its seconds. `None` if any slice has
    /// no figures.
    pub fn combine(parts: &[(Option<CpuUse>, u64, f64)]) -> Option<CpuUse> {
        let (mut total_us, mut idle_core_seconds) = (BTreeMap::<String, f64>::new(), 0.0);
        let (mut ops, mut seconds) = (0u64, 0.0);
        for (cpu, slice_ops, slice_seconds) in parts {
            let cpu = cpu.as_ref()?;
            for (name, us) in &cpu.us_per_op {
                *total_us.entry(name.clone()).or_default() += us * *slice_ops as f64;
            }
            idle_core_seconds += cpu.idle_cores * slice_seconds;
            ops += slice_ops;
            seconds += slice_seconds;
        }
        if parts.is_empty() {
            return None;
        }
        let mut us_per_op: Vec<(String, f64)> = total_us
            .into_iter()
            .map(|(name, us)| (name, if ops == 0 { 0.0 } else { us / ops as f64 }))
            .collect();
        us_per_op.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Some(CpuUse {
            us_per_op,
            idle_cores: if seconds > 0.0 {
                idle_core_seconds / seconds
            } else {
                0.0
            },
        })
    }
}

impl CpuSnapshot {
    /// Reads every process in /proc. `None` where /proc cannot be read (not Linux).
    pub fn take() -> Option<CpuSnapshot> {
        let idle_ticks = idle_ticks(&fs::read_to_string("/proc/stat").ok()?)?;
        let mut processes = BTreeMap::new();
        for entry in fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            // The process line sums its live threads and those that ended; a process that
            // ends between reads is simply skipped.
            if let Some((name, ticks)) = fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .as_deref()
                .and_then(parse_stat)
            {
                processes.insert(pid, (group_name(&name), ticks));
            }
        }
        Some(CpuSnapshot {
            processes,
            idle_ticks,
        })
    }

    /// CPU per operation between `earlier` and this snapshot, `ops` operations in `seconds`.
    pub fn since(&self, earlier: &CpuSnapshot, ops: u64, seconds: f64) -> CpuUse {
        let mut by_name: BTreeMap<&str, u64> = BTreeMap::new();
        for (pid, (name, ticks)) in &self.processes {
            let before = earlier
                .processes
                .get(pid)
                .filter(|(old_name, _)| old_name == name)
                .map_or(0, |(_, t)| *t);
            *by_name.entry(name.as_str()).or_default() += ticks.saturating_sub(before);
        }
        let per_op = |ticks: u64| {
            if ops == 0 {
                0.0
            } else {
                ticks as f64 / TICKS_PER_SECOND * 1e6 / ops as f64
            }
        };
        let mut us_per_op: Vec<(String, f64)> = by_name
            .into_iter()
            .filter(|(_, ticks)| *ticks > 0)
            .map(|(name, ticks)| (name.to_string(), per_op(ticks)))
            .collect();
        us_per_op.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let idle = self.idle_ticks.saturating_sub(earlier.idle_ticks) as f64 / TICKS_PER_SECOND;
        CpuUse {
            us_per_op,
            idle_cores: if seconds > 0.0 { idle / seconds } else { 0.0 },
        }
    }
}

/// User + system CPU seconds of one process (a pid, or `"self"`) so far, all its threads
/// included; `None` where its /proc entry cannot be read.
pub fn process_cpu_seconds(pid: &str) -> Option<f64> {
    let line = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&line).map(|(_, ticks)| ticks as f64 / TICKS_PER_SECOND)
}

/// The name and the user + system clock ticks of one `/proc/<pid>/stat` line. The name sits
/// in parentheses and may itself contain spaces and parentheses, so the fields are counted
/// from the LAST closing parenthesis: utime and stime are the 14th and 15th fields overall.
pub fn parse_stat(line: &str) -> Option<(String, u64)> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let name = line.get(open + 1..close)?.to_string();
    let mut rest = line.get(close + 1..)?.split_whitespace();
    // After the name: state (3rd), then fields 4..=13 that we skip, then utime and stime.
    let utime: u64 = rest.nth(11)?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some((name, utime + stime))
}

/// Idle plus I/O-wait ticks of all cores: the 4th and 5th numbers of /proc/stat's "cpu" line.
pub fn idle_ticks(proc_stat: &str) -> Option<u64> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let mut fields = line.split_whitespace().skip(4);
    let idle: u64 = fields.next()?.parse().ok()?;
    let iowait: u64 = fields.next()?.parse().ok()?;
    Some(idle + iowait)
}

/// The group a process is reported under.
fn group_name(comm: &str) -> String {
    if comm.starts_with("kworker/") {
        "kernel_workers".to_string()
    } else {
        comm.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_stat_counts_fields_after_the_last_parenthesis() {
        // A name with a space and a parenthesis, as `comm` allows; utime 1234, stime 56.
        let line = "4242 (tokio (rt) w) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 56 0 0 20 0 \
                    9 0 77 123456 789 18446744073709551615";
        assert_eq!(parse_stat(line), Some(("tokio (rt) w".into(), 1290)));
        assert_eq!(parse_stat("4242 (cut) S 1 2"), None);
        assert_eq!(parse_stat("no parentheses at all"), None);
    }

    #[test]
    fn idle_ticks_reads_idle_and_iowait_of_the_all_cores_line() {
        let stat = "cpu  100 5 200 7000 30 0 4 0 0 0\ncpu0 50 2 100 3500 15 0 2 0 0 0\n";
        assert_eq!(idle_ticks(stat), Some(7030));
        assert_eq!(idle_ticks("cpu0 1 2 3 4 5\n"), None);
    }

    #[test]
    fn since_reports_per_operation_cpu_by_name_largest_first() {
        let snapshot = |procs: &[(u32, &str, u64)], idle| CpuSnapshot {
            processes: procs
                .iter()
                .map(|&(pid, name, t)| (pid, (group_name(name), t)))
                .collect(),
            idle_ticks: idle,
        };
        let before = snapshot(
            &[(1, "kms-server", 100), (2, "postgres", 10), (5, "old", 40)],
            1000,
        );
        let after = snapshot(
            &[
                (1, "kms-server", 300),
                (2, "postgres", 60),
                // Two backends and a kernel worker that the first snapshot did not see.
                (3, "postgres", 50),
                (4, "kworker/1:1H-kblockd", 20),
                // A pid reused by another process counts from zero, not from the old value.
                (5, "new", 30),
            ],
            1100,
        );
        let used = after.since(&before, 1000, 2.0);
        // 200 ticks = 2 s = 2,000,000 µs over 1000 operations.
        assert_eq!(
            used.us_per_op,
            vec![
                ("kms-server".to_string(), 2000.0),
                ("postgres".to_string(), 1000.0),
                ("new".to_string(), 300.0),
                ("kernel_workers".to_string(), 200.0),
            ]
        );
        assert!((used.idle_cores - 0.5).abs() < 1e-9, "{}", used.idle_cores);
        assert_eq!(after.since(&before, 0, 0.0).idle_cores, 0.0);
    }

    #[test]
    fn combine_weights_cpu_by_operations_and_idle_by_time() {
        let part = |us: &[(&str, f64)], idle| {
            Some(CpuUse {
                us_per_op: us.iter().map(|&(n, v)| (n.to_string(), v)).collect(),
                idle_cores: idle,
            })
        };
        // 100 ops at 300 µs and 300 ops at 100 µs: 60,000 µs over 400 ops = 150 µs per op.
        // postgres only ran in the second slice: 300 × 40 / 400 = 30 µs per op.
        let combined = CpuUse::combine(&[
            (part(&[("kms-server", 300.0)], 0.2), 100, 1.0),
            (
                part(&[("kms-server", 100.0), ("postgres", 40.0)], 0.8),
                300,
                3.0,
            ),
        ])
        .expect("every slice has figures");
        assert_eq!(
            combined.us_per_op,
            vec![
                ("kms-server".to_string(), 150.0),
                ("postgres".to_string(), 30.0),
            ]
        );
        // (0.2 × 1 s + 0.8 × 3 s) / 4 s.
        assert!(
            (combined.idle_cores - 0.65).abs() < 1e-9,
            "{}",
            combined.idle_cores
        );
        assert_eq!(CpuUse::combine(&[]), None);
        assert_eq!(CpuUse::combine(&[(None, 10, 1.0)]), None);
    }

    #[test]
    fn take_sees_this_process_spend_cpu() {
        let own_seconds = || process_cpu_seconds("self").expect("/proc/self/stat");
        let before = CpuSnapshot::take().expect("/proc is readable on Linux");
        // Spin until this process has used 150 ms of CPU, however busy the machine is (the
        // test suite runs in parallel), or give up after 10 s.
        let (start_seconds, started) = (own_seconds(), std::time::Instant::now());
        let mut x = 0u64;
        while own_seconds() < start_seconds + 0.15 && started.elapsed().as_secs() < 10 {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        let after = CpuSnapshot::take().expect("/proc is readable on Linux");
        let name = &after.processes[&std::process::id()].0;
        let used = after.since(&before, 1, started.elapsed().as_secs_f64());
        let mine = used
            .us_per_op
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |(_, us)| *us);
        assert!(mine >= 150_000.0, "{name}: {mine} µs in {used:?}");
    }
}

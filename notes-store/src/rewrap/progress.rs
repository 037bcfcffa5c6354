//! Pacing and progress display of a re-wrap campaign: a token bucket (blobs per second) and a
//! progress line with rate and ETA — redrawn in place when stderr is a terminal, printed as
//! plain periodic lines otherwise (logs, CI, tests).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, at most `capacity` saved up. Taking more tokens
/// than are available leaves a debt that the returned delay pays off.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, capacity: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// Takes `n` tokens at `now`; returns how long to wait before using them.
    pub fn take(&mut self, n: f64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.tokens -= n;
        if self.tokens >= 0.0 || self.rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Progress of the campaign on stderr.
#[derive(Debug)]
pub struct Progress {
    total: u64,
    started: Instant,
    last_print: Option<Instant>,
    interval: Duration,
    terminal: bool,
}

impl Progress {
    /// `interval`: between plain lines (a terminal is redrawn at most 5 times a second).
    pub fn new(total: u64, interval: Duration) -> Self {
        let terminal = std::io::stderr().is_terminal();
        Progress {
            total,
            started: Instant::now(),
            last_print: None,
            interval: if terminal {
                Duration::from_millis(200)
            } else {
                interval
            },
            terminal,
        }
    }

    /// Reports `done` of `total` (rows handled so far), at most once per interval unless
    /// `force`.
    pub fn update(&mut self, done: u64, rewrapped: u64, failed: u64, force: bool) {
        let now = Instant::now();
        if !force && self.last_print.is_some_and(|t| now - t < self.interval) {
            return;
        }
        self.last_print = Some(now);
        let elapsed = now - self.started;
        let rate = per_second(done, elapsed);
        let eta = eta(done, self.total, rate);
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let width = 30usize;
            let filled = (done.min(self.total) * width as u64)
                .checked_div(self.total)
                .map_or(width, |f| usize::try_from(f).unwrap_or(width));
            let _ = write!(
                err,
                "\r[{}{}] {done}/{} re-wrapped {rewrapped} failed {failed} {rate:.0}/s ETA {}  ",
                "#".repeat(filled),
                ".".repeat(width - filled),
                self.total,
                clock(eta)
            );
            let _ = err.flush();
        } else {
            let _ = writeln!(
                err,
                "rewrap: progress done={done} total={} rewrapped={rewrapped} failed={failed} \
                 rate={rate:.0}/s eta={}",
                self.total,
                clock(eta)
            );
        }
    }

    /// Ends the redrawn line on a terminal.
    pub fn finish(&self) {
        if self.terminal {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// Items per second.
pub fn per_second(n: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// Time left at `rate` (None while unknown).
pub fn eta(done: u64, total: u64, rate: f64) -> Option<Duration> {
    (rate > 0.0).then(|| Duration::from_secs_f64(total.saturating_sub(done) as f64 / rate))
}

/// `h:mm:ss`, or `--:--` when unknown.
pub fn clock(d: Option<Duration>) -> String {
    match d {
        None => "--:--".into(),
        Some(d) => {
            let s = d.as_secs();
            format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paces_to_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 10.0, t0);
        // The first 10 are free (full bucket), the next 10 cost 0.1 s.
        assert_eq!(b.take(10.0, t0), Duration::ZERO);
        let d = b.take(10.0, t0);
        assert!((d.as_secs_f64() - 0.1).abs() < 1e-9, "{d:?}");
        // After paying the debt (0.1 s) the bucket is empty: 5 more cost 0.05 s.
        let d = b.take(5.0, t0 + Duration::from_millis(100));
        assert!((d.as_secs_f64() - 0.05).abs() < 1e-9, "{d:?}");
        // Saving up is capped at the capacity.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(b.take(10.0, later), Duration::ZERO);
        assert!(b.take(1.0, later) > Duration::ZERO);
    }

    #[test]
    fn eta_and_clock() {
        assert_eq!(clock(None), "--:--");
        assert_eq!(clock(Some(Duration::from_secs(3725))), "1:02:05");
        assert_eq!(eta(50, 100, 10.0), Some(Duration::from_secs(5)));
        assert_eq!(eta(0, 100, 0.0), None);
        assert_eq!(per_second(10, Duration::from_secs(2)), 5.0);
    }
}

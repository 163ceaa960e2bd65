//! When a session has stalled: measured on progress, not on bytes.
//!
//! A session makes progress when file bytes are verified (received) or
//! handed to the connections (sent), when entries are settled, and when
//! this side works for the session on its own (checking a journal,
//! hashing held chunks). Bytes alone prove nothing: a peer can trickle
//! them, or send keepalives, for ever.
//!
//! Keepalives are what a peer sends while it works locally for a while
//! (a receiver checking a long journal, a sender hashing the chunks the
//! receiver holds): they stand in for progress, but only for as long as
//! that work can take. Each side knows how much work it let the peer in
//! for (the size of the largest file whose plan it awaits, the bytes of
//! held chunks it offered), and allows keepalives that long at
//! [`KEEPALIVE_RATE`], beyond the stall timeout; after that, the session
//! has stalled however many keepalives come.
//!
//! [`Progress`] is what the session's parts report to; [`StallClock`] is
//! the pure decision, tested on a clock passed in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The slowest a peer's local work may go, in bytes a second, while its
/// keepalives stand in for progress: a disk reading 64 MiB/s (a 1 TiB
/// journal check may take 4.5 hours; then it has stalled).
pub(crate) const KEEPALIVE_RATE: f64 = 64.0 * 1024.0 * 1024.0;

/// What a session's parts report, for its stall watch.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    made: AtomicU64,
    kept_alive: AtomicU64,
    /// The most local work (in bytes) the peer may be doing for us.
    work: AtomicU64,
}

impl Progress {
    /// Something was achieved.
    pub(crate) fn made(&self) {
        self.made.fetch_add(1, Ordering::Relaxed);
    }

    /// The peer said it is alive, and no more.
    pub(crate) fn kept_alive(&self) {
        self.kept_alive.fetch_add(1, Ordering::Relaxed);
    }

    /// The peer may have `bytes` of local work to do for us (a journal to
    /// check, held chunks to hash) during which it only keeps alive.
    pub(crate) fn allow(&self, bytes: u64) {
        self.work.fetch_max(bytes, Ordering::Relaxed);
    }

    fn read(&self) -> (u64, u64, u64) {
        (
            self.made.load(Ordering::Relaxed),
            self.kept_alive.load(Ordering::Relaxed),
            self.work.load(Ordering::Relaxed),
        )
    }
}

/// Decides, from what [`Progress`] says now and then, whether a session
/// has stalled.
pub(crate) struct StallClock {
    timeout: Duration,
    made: u64,
    kept_alive: u64,
    progress_at: Instant,
    alive_at: Instant,
}

impl StallClock {
    pub(crate) fn new(timeout: Duration, now: Instant) -> Self {
        StallClock {
            timeout,
            made: 0,
            kept_alive: 0,
            progress_at: now,
            alive_at: now,
        }
    }

    /// Look at `progress` at `now`: whether the session has stalled. It
    /// has when nothing at all came for the timeout, or when only
    /// keepalives came for longer than the peer's work can explain.
    pub(crate) fn stalled(&mut self, progress: &Progress, now: Instant) -> bool {
        let (made, kept_alive, work) = progress.read();
        if made != self.made {
            self.made = made;
            self.progress_at = now;
            self.alive_at = now;
        } else if kept_alive != self.kept_alive {
            self.kept_alive = kept_alive;
            self.alive_at = now;
        }
        let for_work = Duration::from_secs_f64(work as f64 / KEEPALIVE_RATE);
        now.duration_since(self.alive_at) >= self.timeout
            || now.duration_since(self.progress_at) >= self.timeout + for_work
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn silence_for_the_timeout_is_a_stall() {
        let (p, t0) = (Progress::default(), Instant::now());
        let mut clock = StallClock::new(T, t0);
        assert!(!clock.stalled(&p, t0 + secs(9)));
        assert!(clock.stalled(&p, t0 + secs(10)));
    }

    #[test]
    fn progress_restarts_the_clock() {
        let (p, t0) = (Progress::default(), Instant::now());
        let mut clock = StallClock::new(T, t0);
        for n in 1..10 {
            p.made();
            assert!(!clock.stalled(&p, t0 + secs(9 * n)));
        }
    }

    #[test]
    fn keepalives_alone_stand_in_for_progress_only_for_the_work_allowed() {
        let (p, t0) = (Progress::default(), Instant::now());
        let mut clock = StallClock::new(T, t0);
        let mut at = t0;
        // No work allowed: keepalives every second change nothing.
        while at < t0 + secs(9) {
            at += secs(1);
            p.kept_alive();
            assert!(!clock.stalled(&p, at));
        }
        p.kept_alive();
        assert!(clock.stalled(&p, t0 + secs(10)));

        // 640 MiB of work: ten seconds more.
        let (p, t0) = (Progress::default(), Instant::now());
        let mut clock = StallClock::new(T, t0);
        p.allow(640 << 20);
        for s in 1..20 {
            p.kept_alive();
            assert!(!clock.stalled(&p, t0 + secs(s)), "{s}");
        }
        p.kept_alive();
        assert!(clock.stalled(&p, t0 + secs(20)));
    }

    #[test]
    fn keepalives_that_stop_are_silence() {
        let (p, t0) = (Progress::default(), Instant::now());
        let mut clock = StallClock::new(T, t0);
        p.allow(u64::MAX);
        p.kept_alive();
        assert!(!clock.stalled(&p, t0 + secs(5)));
        assert!(!clock.stalled(&p, t0 + secs(14)));
        assert!(
            clock.stalled(&p, t0 + secs(15)),
            "ten seconds after the last"
        );
    }
}

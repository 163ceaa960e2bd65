//! Choosing the compression level while a transfer runs (`--compress auto`).
//!
//! Compression pays only when the link, not the CPU, is what limits the
//! transfer: over loopback or a fast LAN it slows things down; over a
//! 1 Gbit/s link with text it can multiply the effective rate. Which case
//! holds is not known in advance and can change within a transfer (text
//! files, then photos), so the sender measures and climbs:
//!
//! - Time is cut into windows of file bytes. For each window the sender
//!   reports how many bytes it moved, in how long, and how long it sat
//!   blocked on a full send queue (the downstream is the bottleneck).
//! - Every few windows it probes a neighbouring level for one window: up
//!   when it was mostly blocked (there is room to spend CPU on a better
//!   ratio), down when it never was (the CPU is the bottleneck), and the
//!   other way after a probe that did not pay.
//! - A probe is kept only if it beat the current level's rate by a margin,
//!   so noise does not make it wander, and a bad probe costs one window.
//!
//! The controller holds no clock and does no I/O: the sender feeds it
//! measurements (cut into windows by [`WindowMeter`], which is told the
//! time rather than reading it), which keeps both deterministic to test.

use std::time::{Duration, Instant};

/// The levels `auto` moves between: off, then zstd upwards. Higher levels
/// cost several times the CPU for a few percent of ratio on typical data;
/// they are for `--compress LEVEL`, not for `auto`. zstd's negative levels
/// are left out on purpose: measured on loopback they were slower than
/// level 1 (the worse ratio costs the receiver more than it saves the
/// sender) while raw was four times faster than both, a local minimum
/// that would keep the climb from ever reaching "off".
pub(crate) const LADDER: [Option<i32>; 4] = [None, Some(1), Some(3), Some(6)];
/// Where `auto` starts: zstd level 1, a good ratio at a speed one core
/// sustains at LAN rates; from there one probe reaches either side.
const START: usize = 1;
/// A probe must beat the current rate by this fraction to be kept: rates
/// of consecutive windows differ by more than a few percent on real trees.
const MARGIN: f64 = 0.1;
/// Windows measured at a level before the next probe; doubled after each
/// probe that did not pay (up to [`MAX_SETTLE_WINDOWS`]), so a transfer
/// that has found its level stops paying for probes.
const SETTLE_WINDOWS: u32 = 3;
const MAX_SETTLE_WINDOWS: u32 = 48;
/// A window whose rate is this far from the baseline means conditions
/// changed (other data, other load): probe soon again.
const CHANGED: f64 = 0.5;
/// Blocked for more than this share of a window: the link limits.
const LINK_BOUND: f64 = 0.5;
/// Blocked for less than this share: the CPU limits.
const CPU_BOUND: f64 = 0.1;
/// Beyond these shares the signal is clear enough to probe after a single
/// window: a short transfer cannot afford to wait.
const CLEARLY_LINK_BOUND: f64 = 0.8;
const CLEARLY_CPU_BOUND: f64 = 0.02;

/// A compression window closes after this many file bytes (and at least
/// `WINDOW_MIN_SECS`), or after `WINDOW_MAX_SECS` whatever moved.
const WINDOW_BYTES: u64 = 32 * 1024 * 1024;
const WINDOW_MIN_SECS: f64 = 0.1;
const WINDOW_MAX_SECS: f64 = 1.0;
/// File bytes sent before the first window starts.
const WARMUP_BYTES: u64 = 8 * 1024 * 1024;

/// One window's measurements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub(crate) bytes: u64,
    pub(crate) secs: f64,
    pub(crate) blocked_secs: f64,
}

/// Cuts what the sender does into windows for the controller: the file
/// bytes it sent, and how long it sat blocked on a full send queue.
#[derive(Debug)]
pub(crate) struct WindowMeter {
    started: Instant,
    bytes: u64,
    blocked: Duration,
    warmed_up: bool,
}

impl WindowMeter {
    pub(crate) fn new(now: Instant) -> Self {
        WindowMeter {
            started: now,
            bytes: 0,
            blocked: Duration::ZERO,
            warmed_up: false,
        }
    }

    /// Account time spent waiting for room downstream.
    pub(crate) fn blocked(&mut self, waited: Duration) {
        self.blocked += waited;
    }

    /// Account `bytes` of file data sent by `now`; returns the window this
    /// closes, if it does.
    pub(crate) fn sent(&mut self, bytes: u64, now: Instant) -> Option<Window> {
        self.bytes += bytes;
        if !self.warmed_up {
            // The first bytes fill socket buffers: they move fast and never
            // block whatever the link, so they say nothing about it.
            if self.bytes >= WARMUP_BYTES {
                self.warmed_up = true;
                self.restart(now);
            }
            return None;
        }
        let secs = now.saturating_duration_since(self.started).as_secs_f64();
        let full = self.bytes >= WINDOW_BYTES && secs >= WINDOW_MIN_SECS;
        if !full && secs < WINDOW_MAX_SECS {
            return None;
        }
        let window = Window {
            bytes: self.bytes,
            secs,
            blocked_secs: self.blocked.as_secs_f64(),
        };
        self.restart(now);
        Some(window)
    }

    fn restart(&mut self, now: Instant) {
        self.started = now;
        self.bytes = 0;
        self.blocked = Duration::ZERO;
    }
}

#[derive(Debug)]
pub(crate) struct LevelController {
    at: usize,
    /// Smoothed rate (bytes/s) at `at`.
    baseline: Option<f64>,
    probing: Option<usize>,
    settled: u32,
    /// The direction of the last probe that did not pay, if the last did not.
    failed_up: Option<bool>,
    /// Windows to measure before the next probe.
    settle_for: u32,
    /// The window after a probe: it still carries the probe's effects
    /// (bytes queued in socket buffers, or their absence), so it is not
    /// measured.
    recovering: bool,
    /// Where the controller starts, and probes back towards when the
    /// signal is unclear.
    home: usize,
    /// The blocked share above which the link is taken to limit.
    link_bound: f64,
}

impl LevelController {
    pub(crate) fn new() -> Self {
        LevelController {
            at: START,
            baseline: None,
            probing: None,
            settled: 0,
            failed_up: None,
            settle_for: SETTLE_WINDOWS,
            recovering: false,
            home: START,
            link_bound: LINK_BOUND,
        }
    }

    /// A controller for a link that is most likely faster than any
    /// compressor (loopback): it starts with compression off, and there a
    /// sender that waits now and then waits on the receiver's CPU or disk,
    /// which compression would only load more. It still climbs when the
    /// sender waits nearly all the time, as it does when the loopback
    /// address is a tunnel to a slow link (`ssh -L`).
    pub(crate) fn starting_off() -> Self {
        LevelController {
            at: 0,
            home: 0,
            link_bound: CLEARLY_LINK_BOUND,
            ..Self::new()
        }
    }

    /// The level to compress at now (`None`: send raw).
    pub(crate) fn level(&self) -> Option<i32> {
        LADDER[self.probing.unwrap_or(self.at)]
    }

    /// Account a finished window; returns the level for the next one.
    pub(crate) fn observe(&mut self, w: Window) -> Option<i32> {
        let rate = w.bytes as f64 / w.secs.max(1e-6);
        if let Some(probe) = self.probing.take() {
            let baseline = self.baseline.unwrap_or(0.0);
            if rate > baseline * (1.0 + MARGIN) {
                self.at = probe;
                self.baseline = Some(rate);
                self.failed_up = None;
                self.settle_for = SETTLE_WINDOWS;
            } else {
                self.failed_up = Some(probe > self.at);
                self.settle_for = (self.settle_for * 2).min(MAX_SETTLE_WINDOWS);
            }
            self.settled = 0;
            self.recovering = true;
            return self.level();
        }
        if std::mem::take(&mut self.recovering) {
            return self.level();
        }
        if let Some(b) = self.baseline
            && (rate - b).abs() > CHANGED * b
        {
            self.failed_up = None;
            self.settle_for = SETTLE_WINDOWS;
        }
        self.baseline = Some(match self.baseline {
            Some(b) => 0.5 * b + 0.5 * rate,
            None => rate,
        });
        self.settled += 1;
        let blocked = w.blocked_secs / w.secs.max(1e-6);
        let clear = !(CLEARLY_CPU_BOUND..=CLEARLY_LINK_BOUND).contains(&blocked);
        if self.settled >= self.settle_for || (clear && self.failed_up.is_none()) {
            self.settled = 0;
            let up = match self.failed_up {
                Some(failed_up) => !failed_up,
                None if blocked > self.link_bound => true,
                None if blocked < CPU_BOUND => false,
                None => self.at < self.home,
            };
            self.probing = if up {
                (self.at + 1 < LADDER.len()).then_some(self.at + 1)
            } else {
                self.at.checked_sub(1)
            };
        }
        self.level()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drive controller `c` against a model where each level gives a known
    /// rate and blocked share, for `windows` windows; returns the level.
    fn drive(
        c: &mut LevelController,
        rate_at: impl Fn(Option<i32>) -> (f64, f64),
        windows: usize,
    ) -> Option<i32> {
        for _ in 0..windows {
            let (rate, blocked_share) = rate_at(c.level());
            c.observe(Window {
                bytes: rate as u64,
                secs: 1.0,
                blocked_secs: blocked_share,
            });
        }
        LADDER[c.at]
    }

    /// Where a controller with the default start settles.
    fn settle(rate_at: impl Fn(Option<i32>) -> (f64, f64), windows: usize) -> Option<i32> {
        drive(&mut LevelController::new(), rate_at, windows)
    }

    #[test]
    fn fast_link_turns_compression_off() {
        // Loopback: every level is slower than sending raw; never blocked.
        let rates = |l: Option<i32>| match l {
            None => (1000.0, 0.0),
            Some(1) => (400.0, 0.0),
            _ => (200.0, 0.0),
        };
        let mut c = LevelController::new();
        let mut settled_off = 0;
        for _ in 0..60 {
            let (rate, blocked) = rates(c.level());
            c.observe(Window {
                bytes: rate as u64,
                secs: 1.0,
                blocked_secs: blocked,
            });
            if c.at == 0 {
                settled_off += 1;
            }
        }
        assert_eq!(c.at, 0, "ends at off");
        assert!(
            settled_off > 40,
            "gets there quickly and stays ({settled_off})"
        );
        assert_eq!(settle(rates, 60), None);
    }

    #[test]
    fn loopback_start_never_compresses_a_window() {
        // Raw is fastest; the sender waits now and then, on a receiver
        // that is busy writing: starting off, no window is spent on a
        // probe that cannot pay.
        let mut c = LevelController::starting_off();
        for i in 0..60 {
            assert_eq!(c.level(), None, "window {i}");
            c.observe(Window {
                bytes: 1000,
                secs: 1.0,
                blocked_secs: [0.0, 0.3, 0.6][i % 3],
            });
        }
    }

    #[test]
    fn starting_off_still_climbs_when_the_link_limits() {
        // A receiver behind a slow link after all: mostly blocked, and
        // level 1 doubles the effective rate.
        let rates = |l: Option<i32>| match l {
            None => (100.0, 0.9),
            _ => (200.0, 0.9),
        };
        let level = drive(&mut LevelController::starting_off(), rates, 10);
        assert!(level.is_some(), "climbed to compression");
    }

    #[test]
    fn slow_link_with_text_compresses_harder() {
        // A 1 Gbit/s link: raw is capped at 125 MB/s; each level multiplies
        // the effective rate by its ratio until the CPU becomes the limit.
        let rates = |l: Option<i32>| match l {
            None => (125.0, 0.9),
            Some(1) => (450.0, 0.7),
            Some(3) => (520.0, 0.6),
            _ => (300.0, 0.0),
        };
        assert_eq!(settle(rates, 80), Some(3));
    }

    #[test]
    fn noise_within_the_margin_does_not_move_it() {
        let rates = |l: Option<i32>| match l {
            Some(1) => (1000.0, 0.3),
            _ => (1080.0, 0.3),
        };
        assert_eq!(settle(rates, 100), Some(1));
    }

    #[test]
    fn the_warm_up_is_no_window() {
        let t0 = Instant::now();
        let mut m = WindowMeter::new(t0);
        m.blocked(Duration::from_secs(5));
        let late = t0 + Duration::from_secs(10);
        assert!(m.sent(WARMUP_BYTES - 1, late).is_none());
        // The warm-up ends: what it took, and its blocking, are not
        // measured.
        assert!(m.sent(1, late).is_none());
        let w = m.sent(WINDOW_BYTES, late + Duration::from_secs_f64(0.5));
        let w = w.expect("a full window");
        assert_eq!(w.bytes, WINDOW_BYTES);
        assert!((w.secs - 0.5).abs() < 1e-9);
        assert_eq!(w.blocked_secs, 0.0);
    }

    #[test]
    fn a_window_closes_when_full_and_not_too_short_or_when_long() {
        let t0 = Instant::now();
        let mut m = WindowMeter::new(t0);
        assert!(m.sent(WARMUP_BYTES, t0).is_none());
        let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
        // Full, but too soon to say anything.
        assert!(m.sent(WINDOW_BYTES, at(WINDOW_MIN_SECS / 2.0)).is_none());
        m.blocked(Duration::from_millis(40));
        let w = m
            .sent(1, at(WINDOW_MIN_SECS))
            .expect("full and long enough");
        assert_eq!(w.bytes, WINDOW_BYTES + 1);
        assert!((w.blocked_secs - 0.04).abs() < 1e-9);
        // The next window starts empty; a slow one closes on time alone.
        let start = WINDOW_MIN_SECS;
        assert!(m.sent(1, at(start + WINDOW_MAX_SECS / 2.0)).is_none());
        let w = m.sent(1, at(start + WINDOW_MAX_SECS)).expect("long enough");
        assert_eq!((w.bytes, w.blocked_secs), (2, 0.0));
        assert!((w.secs - WINDOW_MAX_SECS).abs() < 1e-9);
    }

    #[test]
    fn probes_cost_few_windows() {
        let mut c = LevelController::new();
        let mut probes = 0;
        for _ in 0..100 {
            if c.probing.is_some() {
                probes += 1;
            }
            c.observe(Window {
                bytes: 100,
                secs: 1.0,
                blocked_secs: 0.0,
            });
        }
        assert!(probes <= 10, "{probes} probes: failed probes back off");
    }
}

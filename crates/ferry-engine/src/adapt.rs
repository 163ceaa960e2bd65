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
//! measurements, which keeps it deterministic to test.

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

/// One window's measurements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub(crate) bytes: u64,
    pub(crate) secs: f64,
    pub(crate) blocked_secs: f64,
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

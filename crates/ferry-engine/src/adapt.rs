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
//!   blocked on a full send queue (the downstream is the bottleneck); where
//!   lanes compress the chunks (see `sender::lanes`), what they compressed,
//!   how fast, into how much, and how long they waited for the connections.
//! - When the lanes mostly wait, the link limits, and the controller jumps
//!   straight to the highest level it predicts they still outrun the link
//!   at (from their measured speed and ratio, scaled by a table of levels):
//!   a short transfer over a slow link cannot afford a climb of one probe
//!   per few windows.
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

/// The levels `auto` moves between: off, then zstd upwards. Each step
/// costs a few times the CPU for a better ratio. Level 9 is left out: on
/// text it gains under 3% on level 6 for 1.7 times the CPU and 3.5 times
/// the memory (10.5 MiB a compressor, one per lane). zstd's negative levels
/// are left out on purpose too: measured on loopback they were slower than
/// level 1 (the worse ratio costs the receiver more than it saves the
/// sender) while raw was four times faster than both, a local minimum
/// that would keep the climb from ever reaching "off".
pub(crate) const LADDER: [Option<i32>; 4] = [None, Some(1), Some(3), Some(6)];
/// What the controller expects of a level it has not measured, relative to
/// the one it is at: zstd's speed and ratio at each level of the ladder,
/// measured on 1 MiB chunks of 200 MB of real text on the 2-core machine
/// of bench/ (level 1: 500 MB/s per core, 5.0x). Data that compresses
/// better or worse shifts them all alike, which is all the jump needs.
const SPEED: [f64; LADDER.len()] = [f64::INFINITY, 1.0, 0.76, 0.29];
const RATIO: [f64; LADDER.len()] = [1.0, 5.02, 5.45, 6.16];
/// The share of a core one lane counts on: the producer, the connections
/// and the receiver (on a loaded or shared host) take the rest.
const LANE_CORE: f64 = 0.75;
/// A jump goes only to a level whose lanes would compress this many times
/// what the link carries: the link must stay what limits, or the jump
/// costs more than it saves.
const HEADROOM: f64 = 1.2;
/// A jump must promise this much more than the level it leaves.
const JUMP_GAIN: f64 = 0.03;
/// Lanes must have compressed this much in a window for their speed and
/// ratio to be worth a jump.
const JUMP_MIN_BYTES: u64 = 4 * 1024 * 1024;
/// Nor is it worth a jump on data that compresses less than this.
const JUMP_MIN_RATIO: f64 = 2.0;
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
    /// How long the producer waited for room in its queues.
    pub(crate) blocked_secs: f64,
    /// What the lanes did, if they carried any chunk.
    pub(crate) lanes: LaneWindow,
}

/// What the lanes (the threads that compress the chunks of large files,
/// one per core) did in a window.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LaneWindow {
    /// Lanes running.
    pub(crate) lanes: u32,
    /// Frames they handed to the connections' queue.
    pub(crate) frames: u64,
    /// Bytes they compressed, and what came out.
    pub(crate) raw: u64,
    pub(crate) packed: u64,
    /// Time spent compressing, all lanes together.
    pub(crate) squeeze_secs: f64,
    /// Time spent waiting for room in the connections' queue.
    pub(crate) blocked_secs: f64,
}

impl LaneWindow {
    /// The share of the lanes' time spent waiting for the connections.
    fn blocked_share(&self, secs: f64) -> f64 {
        self.blocked_secs / (secs * f64::from(self.lanes.max(1))).max(1e-6)
    }
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

    /// Whether it still waits for the warm-up's bytes.
    pub(crate) fn warming_up(&self) -> bool {
        !self.warmed_up
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
            lanes: LaneWindow::default(),
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
        if self.probing.is_none()
            && !self.recovering
            && let Some(to) = self.jump(&w)
        {
            // What it has measured says where to go: no climb, one level a
            // few windows, that a short transfer would spend getting there.
            self.at = to;
            self.baseline = None;
            self.failed_up = None;
            self.settled = 0;
            self.settle_for = SETTLE_WINDOWS;
            self.recovering = true;
            return self.level();
        }
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
        // Where lanes carry the chunks, it is their waiting that tells a
        // link that limits: the producer waits as well when they are busy
        // compressing.
        let blocked = match w.lanes.frames {
            0 => w.blocked_secs / w.secs.max(1e-6),
            _ => w.lanes.blocked_share(w.secs),
        };
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

impl LevelController {
    /// A higher level worth going to straight away, when the link is what
    /// limits: from the lanes' measured speed and ratio at this level, the
    /// rate each higher level would reach is the lesser of what its lanes
    /// compress and what the link carries at its ratio.
    fn jump(&self, w: &Window) -> Option<usize> {
        let lanes = &w.lanes;
        let compressing = LADDER[self.at].is_some() && lanes.raw >= JUMP_MIN_BYTES;
        let ratio = lanes.raw as f64 / lanes.packed.max(1) as f64;
        // The table's ratios are text's: on data that barely shrinks, a
        // higher level gains next to nothing, whatever they say.
        let compressing = compressing && ratio >= JUMP_MIN_RATIO;
        if !compressing || lanes.squeeze_secs <= 0.0 || lanes.blocked_share(w.secs) < LINK_BOUND {
            return None;
        }
        let speed = lanes.raw as f64 / lanes.squeeze_secs;
        let link = w.bytes as f64 / w.secs.max(1e-6) / ratio;
        let cores = f64::from(lanes.lanes) * LANE_CORE;
        let rate_at = |k: usize| {
            let compressed = cores * speed * SPEED[k] / SPEED[self.at] / HEADROOM;
            compressed.min(link * ratio * RATIO[k] / RATIO[self.at])
        };
        let here = rate_at(self.at);
        let mut best = (self.at, here);
        for k in self.at + 1..LADDER.len() {
            let rate = rate_at(k);
            if rate > best.1 {
                best = (k, rate);
            }
        }
        (best.1 > here * (1.0 + JUMP_GAIN)).then_some(best.0)
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
                lanes: LaneWindow::default(),
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
                lanes: LaneWindow::default(),
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
                lanes: LaneWindow::default(),
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
                lanes: LaneWindow::default(),
            });
        }
        assert!(probes <= 10, "{probes} probes: failed probes back off");
    }

    /// A window at level 1 on a link carrying `link` MB/s (wire bytes) of
    /// text that level 1 shrinks 5x, two lanes compressing at 500 MB/s
    /// each, waiting for their connections `lane_blocked` of the time.
    fn lanes_window(link: f64, ratio: f64, lane_blocked: f64) -> Window {
        let raw = 32u64 << 20;
        let secs = raw as f64 / (link * 1e6 * ratio);
        Window {
            bytes: raw,
            secs,
            blocked_secs: 0.9 * secs,
            lanes: LaneWindow {
                lanes: 2,
                frames: 32,
                raw,
                packed: (raw as f64 / ratio) as u64,
                squeeze_secs: raw as f64 / 500e6,
                blocked_secs: lane_blocked * 2.0 * secs,
            },
        }
    }

    #[test]
    fn a_slow_link_makes_it_jump_to_the_level_the_lanes_sustain() {
        // 100 Mbit/s: two lanes outrun the link even at level 6.
        let mut c = LevelController::new();
        assert_eq!(c.observe(lanes_window(12.0, 5.0, 0.8)), Some(6));
        // The window after a jump carries the old level's bytes: not judged.
        assert_eq!(c.observe(lanes_window(12.0, 6.2, 0.8)), Some(6));
    }

    #[test]
    fn a_fast_link_keeps_the_level_the_cpu_affords() {
        // 1 Gbit/s: level 3 would make the lanes, not the link, the limit.
        let mut c = LevelController::new();
        assert_eq!(c.jump(&lanes_window(117.0, 5.0, 0.8)), None);
        // Lanes that hardly wait: the CPU limits, there is no jump up.
        assert_eq!(c.jump(&lanes_window(12.0, 5.0, 0.05)), None);
        c.observe(lanes_window(12.0, 5.0, 0.05));
        assert_eq!(c.level(), Some(1));
    }

    #[test]
    fn data_that_hardly_shrinks_is_no_reason_to_jump() {
        let c = LevelController::new();
        assert_eq!(c.jump(&lanes_window(12.0, 1.05, 0.9)), None);
        assert_eq!(c.jump(&lanes_window(12.0, 2.5, 0.9)), Some(3));
    }
}

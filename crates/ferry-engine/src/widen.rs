//! Widening: how many connections a transfer uses, following what the path
//! rewards.
//!
//! One connection per core is what the CPU side wants (TLS and hashing run
//! per connection). What the network wants depends on the path and on the
//! congestion control: a flow of a loss-based one (CUBIC, Reno) is held to
//! about MSS / (RTT * sqrt(loss)), so on a long lossy path the transfer goes
//! as many times faster as it has flows (measured through ../shared/wan at
//! 100 Mbit/s, 100 ms, 0.5% loss with Reno: 100 MB in 207 s on 2
//! connections, 53 s on 8). A rate-based one (BBR) fills such a path with
//! one or two flows, and more only add drops at the bottleneck (the same
//! path with BBR: 27.1 s on 2, 26.8 s on 8, with 6 times the queue drops).
//! So the client widens only over a loss-based control, and measures: once
//! the session's rate has settled it doubles its connections, and doubles
//! again for as long as that raises the rate by [`PAYS`]. The first step
//! that does not ends the widening for the session.
//!
//! Pure: the client feeds it the bytes its connections moved per window.

/// New connections are judged to pay if the rate they bring beats the rate
/// before them by this share; less is noise, or a CPU that limits.
const PAYS: f64 = 0.10;
/// Two windows in a row within this share of each other: the rate has
/// settled (TCP's start-up is over), and is worth comparing with.
const SETTLED: f64 = 0.10;
/// Windows new connections are given before they are judged: their
/// handshakes and their own slow start (a second or so at 100 ms RTT).
const GRACE_WINDOWS: u32 = 1;
/// Windows whose mean rate judges it: one window on a lossy path varies by
/// more than the margin.
const JUDGED_WINDOWS: u32 = 2;
/// Connections at most: beyond, the gains measured on lossy paths (8
/// Reno flows 7-9 times one rsync at 100 ms, 0.5% loss) flatten while
/// the server's connection slots do not grow.
pub const MAX_WIDE_STREAMS: u32 = 8;

#[derive(Debug, PartialEq)]
enum State {
    /// Waiting for the rate to settle: the last window's, if any.
    Settling { last: Option<f64> },
    /// A connection was added over the rate `before`; the rates of the
    /// windows since, grace windows included.
    Trying { before: f64, since: Vec<f64> },
    /// The last connection did not pay, or the cap is reached.
    Done,
}

#[derive(Debug)]
pub(crate) struct Widening {
    streams: u32,
    max: u32,
    state: State,
}

impl Widening {
    /// Starting from `streams` connections, up to `max`.
    pub(crate) fn new(streams: u32, max: u32) -> Self {
        let state = match streams < max {
            true => State::Settling { last: None },
            false => State::Done,
        };
        Widening {
            streams,
            max,
            state,
        }
    }

    pub(crate) fn streams(&self) -> u32 {
        self.streams
    }

    /// Whether it will never widen again.
    pub(crate) fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Account a window in which the session moved `bytes` in `secs`;
    /// returns how many more connections to open now.
    pub(crate) fn observe(&mut self, bytes: u64, secs: f64) -> u32 {
        let rate = bytes as f64 / secs.max(1e-6);
        match &mut self.state {
            State::Done => 0,
            State::Settling { last } => match *last {
                // Two windows alike: the rate has settled, their mean is
                // what a new connection must beat.
                Some(last) if rate > 0.0 && (rate - last).abs() <= SETTLED * last.max(rate) => {
                    self.widen((rate + last) / 2.0)
                }
                _ => {
                    *last = Some(rate);
                    0
                }
            },
            State::Trying { before, since } => {
                since.push(rate);
                if since.len() < (GRACE_WINDOWS + JUDGED_WINDOWS) as usize {
                    return 0;
                }
                let judged = &since[GRACE_WINDOWS as usize..];
                let after = judged.iter().sum::<f64>() / judged.len() as f64;
                if after > *before * (1.0 + PAYS) {
                    self.widen(after)
                } else {
                    self.state = State::Done;
                    0
                }
            }
        }
    }

    /// Double the connections (up to the cap) over `rate`; returns how
    /// many to open.
    fn widen(&mut self, rate: f64) -> u32 {
        let wider = (self.streams * 2).min(self.max);
        if wider <= self.streams {
            self.state = State::Done;
            return 0;
        }
        let more = wider - self.streams;
        self.streams = wider;
        self.state = State::Trying {
            before: rate,
            since: Vec::new(),
        };
        more
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drive a widening from `start` connections against a path where `n`
    /// connections move `rate(n)` per window; returns where it stops.
    fn widen_on(start: u32, rate: impl Fn(u32) -> f64, windows: usize) -> u32 {
        let mut w = Widening::new(start, MAX_WIDE_STREAMS);
        for _ in 0..windows {
            let bytes = rate(w.streams()) as u64;
            w.observe(bytes, 1.0);
        }
        w.streams()
    }

    #[test]
    fn a_lossy_path_gets_every_connection_that_pays() {
        // Loss-based flows: the rate grows with each one, until the link.
        let lossy = |n: u32| (f64::from(n) * 250e3).min(12.5e6);
        assert_eq!(widen_on(2, lossy, 40), MAX_WIDE_STREAMS);
    }

    #[test]
    fn a_path_that_is_full_gets_one_try_and_no_more() {
        // The link (or the CPU) is what limits: more connections bring nothing.
        let full = |_: u32| 12.5e6;
        assert_eq!(widen_on(2, full, 40), 4);
        let mut w = Widening::new(2, MAX_WIDE_STREAMS);
        let opened: u32 = (0..40).map(|_| w.observe(12_500_000, 1.0)).sum();
        assert_eq!(opened, 2, "one doubling, then done");
        assert!(w.done());
    }

    #[test]
    fn no_connection_is_added_while_the_rate_still_climbs() {
        // TCP's start-up: each window doubles.
        let mut w = Widening::new(2, MAX_WIDE_STREAMS);
        let opened: Vec<u32> = (0..6).map(|k| w.observe(1 << (20 + k), 1.0)).collect();
        assert!(opened.iter().all(|&o| o == 0), "{opened:?}");
    }

    #[test]
    fn gains_under_the_margin_stop_it() {
        let flat = |n: u32| 10e6 * (1.0 + 0.02 * f64::from(n));
        assert_eq!(widen_on(2, flat, 40), 4);
    }

    #[test]
    fn a_fixed_count_or_the_cap_never_widens() {
        let mut w = Widening::new(MAX_WIDE_STREAMS, MAX_WIDE_STREAMS);
        assert!((0..10).all(|_| w.observe(1_000_000, 1.0) == 0));
        // From 3, doubling stops at the cap.
        assert_eq!(widen_on(3, |n| f64::from(n) * 1e6, 60), MAX_WIDE_STREAMS);
    }
}

//! `--bwlimit`: keeping a transfer under a rate, smoothly.
//!
//! A token bucket over the bytes the sender hands to its connections (all
//! streams together, since one producer feeds them all). The bucket holds
//! at most 50 ms of the rate, so the sender never runs at full speed for
//! longer than that; a frame larger than what is in the bucket is sent and
//! paid for by waiting afterwards, so the average is exact whatever the
//! frame sizes. Pure: the caller says what time it is and does the waiting.

use std::time::{Duration, Instant};

/// The slowest rate accepted, in bytes per second: a session held open by
/// a trickle would hold a server's slot for ever.
pub const MIN_RATE: u64 = 1024;
/// How much of the rate may go out at once, as a share of a second.
const BURST_SECS: f64 = 0.05;

pub(crate) struct Pacer {
    /// Bytes per second.
    rate: f64,
    burst: f64,
    /// Bytes that may go now; below zero, what was sent ahead of time.
    tokens: f64,
    last: Instant,
}

impl Pacer {
    pub(crate) fn new(rate: u64, now: Instant) -> Self {
        let rate = rate.max(MIN_RATE) as f64;
        let burst = rate * BURST_SECS;
        Pacer {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// `n` bytes go out at `now`: how long to wait before the next ones.
    pub(crate) fn sent(&mut self, n: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A rate as people write it: bytes per second, with an optional `K`, `M`
/// or `G` (powers of 1024, as rsync's), e.g. `500K`, `50M`, `1G`.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = digits.parse().map_err(|_| {
        format!("{text:?} is not a rate: a number of bytes per second, with K, M or G")
    })?;
    let factor: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("{text:?}: unknown unit {unit:?}; use K, M or G")),
    };
    let rate = n
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if rate < MIN_RATE {
        return Err(format!(
            "{text:?} is below the slowest rate, {MIN_RATE} bytes per second"
        ));
    }
    Ok(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes sent in `frames` of `size`, waiting as told: how long it took.
    fn send(pacer: &mut Pacer, start: Instant, frames: u64, size: u64) -> Duration {
        let mut now = start;
        for _ in 0..frames {
            now += pacer.sent(size, now);
        }
        now - start
    }

    #[test]
    fn the_average_is_the_rate_whatever_the_frame_size() {
        for size in [100, 64 * 1024, 1 << 20] {
            let start = Instant::now();
            let mut pacer = Pacer::new(4 << 20, start);
            let took = send(&mut pacer, start, (40 << 20) / size, size).as_secs_f64();
            // 40 MiB at 4 MiB/s, less what the first burst and the last frame save.
            assert!(
                (9.5..=10.05).contains(&took),
                "{size}-byte frames: {took} s"
            );
        }
    }

    #[test]
    fn no_more_than_a_burst_goes_at_once_after_a_pause() {
        let start = Instant::now();
        let mut pacer = Pacer::new(1 << 20, start);
        // Idle for a minute: the bucket holds 50 ms of the rate, not 60 s.
        let later = start + Duration::from_secs(60);
        let mut sent = 0;
        while pacer.sent(1024, later).is_zero() {
            sent += 1024;
        }
        assert!(sent <= (1 << 20) / 20, "{sent}");
    }

    #[test]
    fn rates_read_like_rsyncs() {
        assert_eq!(parse_rate("50M"), Ok(50 << 20));
        assert_eq!(parse_rate("1G"), Ok(1 << 30));
        assert_eq!(parse_rate("500k"), Ok(500 << 10));
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert!(parse_rate("10").is_err(), "too slow");
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("5X").is_err());
        assert!(parse_rate("99999999999G").is_err());
    }
}

//! Slowing down failed authentication, per client address.
//!
//! The server answers a failed `auth` only after a delay that doubles with
//! each recent failure from the same address: 1 s, 2 s, 4 s, … up to 30 s.
//! The count belongs to the address, not to the connection, so a guesser
//! gains nothing by opening connections in parallel: each of them waits
//! longer than the one before.
//!
//! What this buys, and what it does not: a success is answered at once,
//! whatever failed before from its address, so that a user behind the same
//! NAT as a guesser is never locked out (and a success forgets the
//! address's failures). A guesser who takes silence for "wrong" therefore
//! learns no more slowly; what bounds its rate is the cost of a TLS
//! handshake per guess and the server's budget of pending handshakes. The
//! token's strength is the defence (a generated one has 256 bits); the
//! delay makes sequential guessing slow and keeps the log readable.
//!
//! Pure logic: the clock is passed in, so the tests need no sleeping.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The delay before answering the first failure from an address.
const FIRST_DELAY: Duration = Duration::from_secs(1);
/// The delay doubles with each failure up to this.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(30);
/// An address whose last failure is this old starts again from the first
/// delay: a user who mistyped the token once is not punished all day.
pub(crate) const WINDOW: Duration = Duration::from_secs(10 * 60);
/// Addresses remembered at most. A flood of failures from many addresses
/// cannot grow the server's memory past this; it can only make the server
/// forget the oldest, which then starts again from the first delay.
const MAX_TRACKED: usize = 4096;

/// Recent authentication failures, by client address.
#[derive(Debug, Default)]
pub(crate) struct AuthThrottle {
    sources: HashMap<IpAddr, Failures>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    /// Failures since the address last succeeded, within the window.
    count: u32,
    last: Instant,
}

/// What the server does with a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Penalty {
    /// Recent failures from the address, this one included.
    pub(crate) failures: u32,
    /// How long to wait before answering this one.
    pub(crate) delay: Duration,
}

impl AuthThrottle {
    /// Count a failed authentication from `addr` at `now`.
    pub(crate) fn failure(&mut self, addr: IpAddr, now: Instant) -> Penalty {
        let source = source_of(addr);
        let recent = self
            .sources
            .get(&source)
            .filter(|f| now.saturating_duration_since(f.last) < WINDOW)
            .map_or(0, |f| f.count);
        if !self.sources.contains_key(&source) {
            self.make_room(now);
        }
        let count = recent.saturating_add(1);
        self.sources.insert(source, Failures { count, last: now });
        Penalty {
            failures: count,
            delay: delay_for(count),
        }
    }

    /// A successful authentication from `addr`: its failures are
    /// forgotten. A success itself is never delayed.
    pub(crate) fn success(&mut self, addr: IpAddr) {
        self.sources.remove(&source_of(addr));
    }

    /// Make room for one more address: forget those outside the window,
    /// and if that is not enough, the one whose last failure is oldest.
    fn make_room(&mut self, now: Instant) {
        if self.sources.len() < MAX_TRACKED {
            return;
        }
        self.sources
            .retain(|_, f| now.saturating_duration_since(f.last) < WINDOW);
        if self.sources.len() < MAX_TRACKED {
            return;
        }
        // A scan, but only when full, and each failure cost its sender a
        // whole TLS handshake first.
        if let Some(oldest) = self
            .sources
            .iter()
            .min_by_key(|(_, f)| f.last)
            .map(|(addr, _)| *addr)
        {
            self.sources.remove(&oldest);
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.sources.len()
    }
}

/// The delay before answering the `count`-th recent failure.
fn delay_for(count: u32) -> Duration {
    // 2^5 s is past the cap already; the shift stays small.
    let doublings = count.saturating_sub(1).min(5);
    (FIRST_DELAY * (1 << doublings)).min(MAX_DELAY)
}

/// Whose failure it is. An IPv4 address stands for itself (an IPv4-mapped
/// IPv6 address too), but an IPv6 address stands for its /64: a single
/// host is routinely given a whole /64, so counting its addresses one by
/// one would let it start afresh with each.
pub(crate) fn source_of(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn the_delay_doubles_with_each_failure_up_to_the_cap() {
        let mut throttle = AuthThrottle::default();
        let t0 = Instant::now();
        let delays: Vec<u64> = (0..8)
            .map(|i| throttle.failure(A, t0 + secs(i)).delay.as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(throttle.failure(A, t0 + secs(9)).failures, 9);
    }

    #[test]
    fn the_count_never_overflows() {
        let mut throttle = AuthThrottle::default();
        let t0 = Instant::now();
        throttle.sources.insert(
            A,
            Failures {
                count: u32::MAX,
                last: t0,
            },
        );
        let penalty = throttle.failure(A, t0 + secs(1));
        assert_eq!(penalty.failures, u32::MAX);
        assert_eq!(penalty.delay, MAX_DELAY);
    }

    #[test]
    fn addresses_are_counted_apart_and_ports_do_not_matter() {
        let mut throttle = AuthThrottle::default();
        let t0 = Instant::now();
        throttle.failure(A, t0);
        throttle.failure(A, t0);
        assert_eq!(throttle.failure(B, t0).delay, secs(1));
        assert_eq!(throttle.failure(A, t0).delay, secs(4));
    }

    #[test]
    fn a_success_forgets_the_failures_of_its_address_only() {
        let mut throttle = AuthThrottle::default();
        let t0 = Instant::now();
        for _ in 0..4 {
            throttle.failure(A, t0);
            throttle.failure(B, t0);
        }
        throttle.success(A);
        assert_eq!(throttle.failure(A, t0 + secs(1)).delay, secs(1));
        assert_eq!(throttle.failure(B, t0 + secs(1)).delay, secs(16));
    }

    #[test]
    fn failures_older_than_the_window_are_forgotten() {
        let mut throttle = AuthThrottle::default();
        let t0 = Instant::now();
        for _ in 0..5 {
            throttle.failure(A, t0);
        }
        // Within the window, counted from the last failure: still counting.
        let later = t0 + WINDOW - secs(1);
        assert_eq!(throttle.failure(A, later).failures, 6);
        let after = later + WINDOW;
        let penalty = throttle.failure(A, after);
        assert_eq!(penalty.failures, 1);
        assert_eq!(penalty.delay, secs(1));
    }

    #[test]
    fn at_most_max_tracked_addresses_are_remembered_oldest_forgotten_first() {
        let mut throttle = AuthThrottle::default();
        let t0 = Instant::now();
        let addr = |i: u32| IpAddr::V4((0x0a00_0000 + i).into());
        for i in 0..MAX_TRACKED as u32 {
            throttle.failure(addr(i), t0 + Duration::from_millis(u64::from(i)));
        }
        // The first address failed again, the latest of all: keep it.
        throttle.failure(addr(0), t0 + secs(60));
        assert_eq!(throttle.tracked(), MAX_TRACKED);
        for i in 0..10u32 {
            let newcomer = addr(MAX_TRACKED as u32 + i);
            throttle.failure(newcomer, t0 + secs(61));
            assert_eq!(throttle.tracked(), MAX_TRACKED, "bounded");
        }
        // The oldest (1 to 10) went first; the one that failed again stayed.
        assert_eq!(throttle.failure(addr(0), t0 + secs(62)).failures, 3);
        assert_eq!(throttle.failure(addr(12), t0 + secs(62)).failures, 2);
        assert_eq!(throttle.failure(addr(1), t0 + secs(62)).failures, 1);
    }

    #[test]
    fn when_full_expired_addresses_go_before_any_recent_one() {
        let mut throttle = AuthThrottle::default();
        let t0 = Instant::now();
        let addr = |i: u32| IpAddr::V4((0x0a00_0000 + i).into());
        for i in 0..MAX_TRACKED as u32 {
            throttle.failure(addr(i), t0);
        }
        let later = t0 + WINDOW;
        throttle.failure(B, later);
        assert_eq!(throttle.tracked(), 1, "all but the newcomer had expired");
    }

    #[test]
    fn an_ipv6_host_is_counted_by_its_64_and_mapped_ipv4_as_ipv4() {
        let mut throttle = AuthThrottle::default();
        let t0 = Instant::now();
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let other_in_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let next_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        throttle.failure(one, t0);
        assert_eq!(throttle.failure(other_in_64, t0).failures, 2);
        assert_eq!(throttle.failure(next_64, t0).failures, 1);

        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        throttle.failure(A, t0);
        assert_eq!(throttle.failure(mapped, t0).failures, 2);
    }
}

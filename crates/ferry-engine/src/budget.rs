//! What a server's sessions share, and how much of it each may take.
//!
//! A server has a budget of file descriptors: what its open-files limit
//! leaves after the sockets it accepts and its own use. A budget is a
//! [`Pool`] in two parts:
//!
//! - a *reserved* part, from which every session gets a fixed reserve when
//!   it is admitted. A session that cannot get its reserve is refused
//!   (the client hears that the server is busy and tries again later), so
//!   an admitted session always has enough to make progress, whatever the
//!   others hold;
//! - a *shared* part, from which a session may borrow beyond its reserve,
//!   up to a share of its own, while the part lasts. What a session cannot
//!   borrow it waits for (the reading of its data connections pauses) or
//!   goes without (a file past its share of descriptors is answered
//!   `incomplete`, and sent again by the client's next attempt).
//!
//! No session can take another's reserve, and none can take more than its
//! share of what is shared, so a crowd of hostile sessions slows the
//! others down at worst; it cannot make them fail.
//!
//! [`Pool`] is pure accounting, tested on plain numbers; [`Budget`],
//! [`Account`] and [`Charge`] share it between threads and give back what
//! they hold when dropped.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_proto::message::Outcome;

/// Descriptors a server keeps for itself beyond the sockets it accepts:
/// its listener, root, log file, the runtime's own, and a walk of the
/// tree by the sweeper.
const OWN_DESCRIPTORS: u64 = 64;
/// Every session's reserve of descriptors: its destination and parent
/// handles, a few directories deep, and a file with its journal.
pub(crate) const SESSION_DESCRIPTORS: u64 = 32;
/// How a budget's capacity is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Split {
    /// What every admitted session holds for itself.
    pub(crate) reserve: u64,
    /// At most this much is held as reserves, in all.
    pub(crate) reserved_max: u64,
    /// What sessions borrow from beyond their reserves.
    pub(crate) shared: u64,
    /// At most this much of it for one session.
    pub(crate) share: u64,
}

impl Split {
    /// `capacity` split into reserves of `reserve` (at most `reserved_part`
    /// of it) and a shared rest, half of it at most for one session (but
    /// never less than `min_share`, if the rest holds that much).
    pub(crate) fn of(capacity: u64, reserve: u64, reserved_part: f64, min_share: u64) -> Split {
        let reserved_max = (capacity as f64 * reserved_part) as u64;
        let shared = capacity - reserved_max;
        Split {
            reserve,
            reserved_max,
            shared,
            share: (shared / 2).max(min_share).min(shared),
        }
    }

    /// File descriptors: of the `open_files` a process may have, those its
    /// sockets (`sockets`: session slots and pending handshakes) and its
    /// own use leave, half for reserves.
    pub(crate) fn descriptors(open_files: u64, sockets: u64) -> Split {
        let capacity = open_files.saturating_sub(sockets + OWN_DESCRIPTORS);
        Split::of(capacity, SESSION_DESCRIPTORS, 0.5, SESSION_DESCRIPTORS)
    }

    /// How many sessions can hold their reserves at once.
    pub(crate) fn sessions(&self) -> u64 {
        self.reserved_max / self.reserve.max(1)
    }
}

/// One budget's accounting: what is reserved and what is borrowed.
#[derive(Debug)]
pub(crate) struct Pool {
    split: Split,
    reserved: u64,
    borrowed: u64,
}

/// What one session holds of a pool.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Holding {
    /// Its reserve (nothing for an account that only borrows).
    reserve: u64,
    /// What it uses now, reserve first.
    used: u64,
}

impl Holding {
    fn borrowed(&self) -> u64 {
        self.used.saturating_sub(self.reserve)
    }
}

impl Pool {
    pub(crate) fn new(split: Split) -> Pool {
        Pool {
            split,
            reserved: 0,
            borrowed: 0,
        }
    }

    /// A new session's holding with its reserve, if there is room for it.
    pub(crate) fn admit(&mut self) -> Option<Holding> {
        if self.reserved + self.split.reserve > self.split.reserved_max {
            return None;
        }
        self.reserved += self.split.reserve;
        Some(Holding {
            reserve: self.split.reserve,
            used: 0,
        })
    }

    /// A session ends: its reserve and all it borrowed come back.
    pub(crate) fn leave(&mut self, holding: &mut Holding) {
        self.give(holding, holding.used);
        self.reserved -= holding.reserve;
        holding.reserve = 0;
    }

    /// Take `n` more for `holding`, if its reserve and share and the
    /// shared part allow.
    pub(crate) fn take(&mut self, holding: &mut Holding, n: u64) -> bool {
        let used = holding.used + n;
        let borrowed = used.saturating_sub(holding.reserve);
        let more = borrowed - holding.borrowed();
        // Within its reserve, whatever the others hold or overdrew.
        let allowed = more == 0
            || (borrowed <= self.split.share && self.borrowed + more <= self.split.shared);
        if allowed {
            self.borrowed += more;
            holding.used = used;
        }
        allowed
    }

    /// Give back `n` of what `holding` uses (borrowed first).
    pub(crate) fn give(&mut self, holding: &mut Holding, n: u64) {
        let used = holding.used.saturating_sub(n);
        self.borrowed -= holding.borrowed() - used.saturating_sub(holding.reserve);
        holding.used = used;
    }

    /// What is borrowed from the shared part now, in all.
    #[cfg(test)]
    fn borrowed(&self) -> u64 {
        self.borrowed
    }
}

/// A [`Pool`] shared by a server's sessions, which wait on it for room.
pub(crate) struct Budget {
    pool: Mutex<Pool>,
    /// Signalled whenever something is given back.
    freed: tokio::sync::Notify,
}

impl Budget {
    pub(crate) fn new(split: Split) -> Arc<Budget> {
        Arc::new(Budget {
            pool: Mutex::new(Pool::new(split)),
            freed: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A session's account with its reserve; `None` if the reserves are
    /// all taken.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Arc<Account>> {
        let holding = self.lock().admit()?;
        Some(Account::new(Some(self.clone()), holding))
    }
}

/// What one session holds of a [`Budget`] (or of none: a client's
/// sessions are not budgeted). Given back when dropped.
pub(crate) struct Account {
    budget: Option<Arc<Budget>>,
    holding: Mutex<Holding>,
}

impl Account {
    fn new(budget: Option<Arc<Budget>>, holding: Holding) -> Arc<Account> {
        Arc::new(Account {
            budget,
            holding: Mutex::new(holding),
        })
    }

    /// An account without limits.
    pub(crate) fn unlimited() -> Arc<Account> {
        Account::new(None, Holding::default())
    }

    /// Run `f` on the pool and this account's holding, under the locks.
    fn with<T>(&self, f: impl FnOnce(&mut Pool, &mut Holding) -> T) -> Option<T> {
        let budget = self.budget.as_ref()?;
        let mut holding = self.holding.lock().unwrap_or_else(|p| p.into_inner());
        Some(f(&mut budget.lock(), &mut holding))
    }

    /// Take `n` if the limits allow, as a charge that gives it back.
    pub(crate) fn try_take(self: &Arc<Self>, n: u64) -> Option<Charge> {
        let taken = self.with(|pool, h| pool.take(h, n)).unwrap_or(true);
        taken.then(|| Charge {
            account: self.clone(),
            n,
        })
    }

    fn give(&self, n: u64) {
        if n > 0
            && self.with(|pool, h| pool.give(h, n)).is_some()
            && let Some(budget) = &self.budget
        {
            budget.freed.notify_waiters();
        }
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        if self.with(|pool, h| pool.leave(h)).is_some()
            && let Some(budget) = &self.budget
        {
            budget.freed.notify_waiters();
        }
    }
}

/// Part of an account, given back when dropped: the memory of a chunk
/// read, the descriptors of an open file.
pub(crate) struct Charge {
    account: Arc<Account>,
    n: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.account.give(self.n);
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Charge({})", self.n)
    }
}

/// What a session may take of its server's budgets. A client's sessions
/// have no limits but the protocol's.
#[derive(Clone)]
pub(crate) struct SessionBudget {
    /// Descriptors for the files and directories it holds open.
    pub(crate) descriptors: Arc<Account>,
}

impl SessionBudget {
    pub(crate) fn unlimited() -> SessionBudget {
        SessionBudget {
            descriptors: Account::unlimited(),
        }
    }
}

/// Why a server turned a session or connection away for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    #[error("its file descriptors are all reserved by other sessions")]
    Descriptors,
}

/// How many files this process may have open, once its soft limit is
/// raised as far as its hard limit allows (as servers commonly do: the
/// soft limit is often 1024 where the hard one is far higher).
pub(crate) fn open_files_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // No limit at all: count on what Linux allows a process by default.
    const UNLIMITED: u64 = 1 << 20;
    let hard = limit.maximum.unwrap_or(UNLIMITED).min(UNLIMITED);
    let soft = limit.current.unwrap_or(UNLIMITED);
    if soft < hard {
        let raised = Rlimit {
            current: Some(hard),
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return hard;
        }
    }
    soft.min(hard)
}

/// The sockets a server accepts at most, which its descriptors must leave
/// room for: session slots and pending handshakes.
pub(crate) fn socket_descriptors(slots: usize, pending: usize) -> u64 {
    (slots + pending) as u64
}

/// Whether an error means that this process (EMFILE) or the whole system
/// (ENFILE) has run out of file descriptors: a condition that passes, so
/// the file it hit is worth sending again later.
pub(crate) fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
    )
}

/// The outcome of an entry whose file system work failed with `e`:
/// `incomplete` (sent again by the client's next attempt) when the server
/// was only out of descriptors for now, `failed` otherwise.
pub(crate) fn outcome_of_error(e: &io::Error, why: String) -> Outcome {
    if out_of_descriptors(e) {
        Outcome::Incomplete(why)
    } else {
        Outcome::Failed(why)
    }
}

/// Why a file or directory is put off: the session is at its share.
pub(crate) const NO_DESCRIPTORS: &str =
    "the server has as many files open as it allows this session; sent again on the next attempt";

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(capacity: u64) -> Pool {
        Pool::new(Split::of(capacity, 10, 0.5, 10))
    }

    #[test]
    fn reserves_are_given_while_the_reserved_part_lasts() {
        let mut p = pool(100);
        let held: Vec<Holding> = (0..5).map_while(|_| p.admit()).collect();
        assert_eq!(held.len(), 5, "50 reserved, in reserves of 10");
        assert!(p.admit().is_none());
        let mut first = held.into_iter().next().unwrap();
        p.leave(&mut first);
        assert!(p.admit().is_some(), "a session that left makes room");
    }

    #[test]
    fn a_session_uses_its_reserve_then_borrows_up_to_its_share() {
        let mut p = pool(100); // shared 50, share 25 (a half)
        assert_eq!(p.split.share, 25);
        let mut h = p.admit().unwrap();
        assert!(p.take(&mut h, 10), "its reserve");
        assert_eq!(p.borrowed(), 0);
        assert!(p.take(&mut h, 25), "its share");
        assert_eq!(p.borrowed(), 25);
        assert!(!p.take(&mut h, 1), "past its share");
        p.give(&mut h, 5);
        assert_eq!(p.borrowed(), 20, "what is given back is borrowed first");
        assert_eq!(h.used, 30);
        p.leave(&mut h);
        assert_eq!((p.borrowed(), h.used), (0, 0));
    }

    #[test]
    fn the_shared_part_runs_out_but_reserves_stay() {
        let mut p = pool(100);
        let mut hogs: Vec<Holding> = (0..2).map(|_| p.admit().unwrap()).collect();
        for h in &mut hogs {
            while p.take(h, 1) {}
        }
        p.give(&mut hogs[1], 2);
        assert_eq!(p.borrowed(), 48, "two shares of 25, less 2");
        let mut late = p.admit().expect("a reserve is left");
        assert!(
            p.take(&mut late, 10),
            "its reserve, whatever the others hold"
        );
        assert!(p.take(&mut late, 2), "the shared part has 2 left");
        assert!(!p.take(&mut late, 1), "past what is shared");
    }

    #[test]
    fn splits_for_descriptors_and_memory() {
        let fds = Split::descriptors(20_000, 320);
        assert_eq!(fds.reserve, SESSION_DESCRIPTORS);
        assert!(
            fds.sessions() >= 256,
            "{fds:?}: every slot can have a session"
        );
        let small = Split::descriptors(2048, 320);
        assert!(small.sessions() >= 16 && small.share >= SESSION_DESCRIPTORS);
        assert_eq!(Split::descriptors(100, 320).sessions(), 0);
    }

    #[test]
    fn running_out_of_descriptors_is_incomplete_not_failed() {
        let emfile = io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        let enfile = io::Error::from_raw_os_error(rustix::io::Errno::NFILE.raw_os_error());
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(matches!(
            outcome_of_error(&emfile, "x".into()),
            Outcome::Incomplete(_)
        ));
        assert!(matches!(
            outcome_of_error(&enfile, "x".into()),
            Outcome::Incomplete(_)
        ));
        assert!(matches!(
            outcome_of_error(&denied, "x".into()),
            Outcome::Failed(_)
        ));
    }
}

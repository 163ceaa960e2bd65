//! What a server's sessions share, and how much of it each may take.
//!
//! A server has one budget of file descriptors (what its open-files limit
//! leaves after the sockets it accepts and its own use) and one of memory
//! (`--max-memory`). Each budget is a [`Pool`] in two parts:
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
//! Beside them, [`Addresses`] caps the sessions and connections of one
//! client address, so that one address cannot take every slot.
//!
//! [`Pool`] and [`Addresses`] are pure accounting, tested on plain
//! numbers; [`Budget`], [`Account`], [`Charge`] and [`FromAddress`] share
//! them between threads and give back what they hold when dropped.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_proto::limits::{DEFAULT_CHUNK_LEN, MAX_CHUNK_LEN};

use ferry_proto::message::{Compression, Outcome};

/// Descriptors a server keeps for itself beyond the sockets it accepts:
/// its listener, root, log file, the runtime's own, and a walk of the
/// tree by the sweeper.
const OWN_DESCRIPTORS: u64 = 64;
/// Every session's reserve of descriptors: its destination and parent
/// handles, a few directories deep, and a file with its journal.
pub(crate) const SESSION_DESCRIPTORS: u64 = 32;
/// The memory each reader of a session has for itself: its control
/// connection, and its data connections together. Room for a chunk of the
/// size ferry sends and the frame after it, so that each always makes
/// progress, however much the other (or any other session) holds.
pub(crate) const READER_MEMORY: u64 = 2 * DEFAULT_CHUNK_LEN as u64;
/// The memory each session has for itself for what it holds while
/// entries wait: the names of dozens of files or directories at least.
pub(crate) const HELD_MEMORY: u64 = 256 << 10;
/// All a session's reserves of memory.
pub(crate) const SESSION_MEMORY: u64 = 2 * READER_MEMORY + HELD_MEMORY;
/// The default memory budget of a server (`--max-memory`).
pub const DEFAULT_MAX_MEMORY: u64 = 512 << 20;
/// The smallest memory budget a server accepts: a few sessions' reserves
/// and shares.
pub const MIN_MAX_MEMORY: u64 = 32 << 20;

/// Sessions one client address may have at once.
pub(crate) const SESSIONS_PER_ADDRESS: u32 = 16;
/// Connections (control and data) one client address may hold session
/// slots with at once: a quarter of the server's 256.
pub(crate) const CONNECTIONS_PER_ADDRESS: u32 = 64;
/// Connections still in their handshake one address may have; its oldest
/// make way for its newest.
pub(crate) const PENDING_PER_ADDRESS: usize = 16;

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

    /// Memory: three quarters of `max_memory` for reserves (two of
    /// [`READER_MEMORY`] and one of [`HELD_MEMORY`] per session, see
    /// [`SESSION_MEMORY`]), the rest shared, at least a frame of the
    /// largest size per account (a peer's chunks of up to 4 MiB go through
    /// while the shared part lasts).
    pub(crate) fn memory(max_memory: u64) -> Split {
        let largest = u64::from(MAX_CHUNK_LEN) + (1 << 20);
        Split::of(max_memory, READER_MEMORY, 0.75, largest)
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

    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.used
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
    #[cfg(test)]
    pub(crate) fn admit(&mut self) -> Option<Holding> {
        self.admit_with(self.split.reserve)
    }

    /// A holding with a reserve of `reserve`, if there is room for it.
    pub(crate) fn admit_with(&mut self, reserve: u64) -> Option<Holding> {
        if self.reserved + reserve > self.split.reserved_max {
            return None;
        }
        self.reserved += reserve;
        Some(Holding { reserve, used: 0 })
    }

    /// A holding with no reserve: it only borrows.
    #[cfg(test)]
    pub(crate) fn borrower() -> Holding {
        Holding::default()
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

    /// Take `n` more for `holding` whatever the limits: for what is in
    /// memory already. Later takes see the overdraft.
    pub(crate) fn force(&mut self, holding: &mut Holding, n: u64) {
        let used = holding.used + n;
        self.borrowed += used.saturating_sub(holding.reserve) - holding.borrowed();
        holding.used = used;
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
        let reserve = self.lock().split.reserve;
        self.admit_with(reserve)
    }

    /// A session's account with a reserve of `reserve`.
    pub(crate) fn admit_with(self: &Arc<Self>, reserve: u64) -> Option<Arc<Account>> {
        let holding = self.lock().admit_with(reserve)?;
        Some(Account::new(Some(self.clone()), holding))
    }

    /// A session's account with no reserve, that only borrows.
    #[cfg(test)]
    pub(crate) fn borrower(self: &Arc<Self>) -> Arc<Account> {
        Account::new(Some(self.clone()), Pool::borrower())
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

    /// Take `n`, waiting until the limits allow it.
    pub(crate) async fn take(self: &Arc<Self>, n: u64) -> Charge {
        loop {
            let Some(budget) = &self.budget else {
                return Charge::free(self, n);
            };
            // Registered before trying, so that a release in between wakes us.
            let freed = budget.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(charge) = self.try_take(n) {
                return charge;
            }
            freed.await;
        }
    }

    /// Take `n` whatever the limits (it is in memory already).
    pub(crate) fn force(self: &Arc<Self>, n: u64) -> Charge {
        self.with(|pool, h| pool.force(h, n));
        Charge::free(self, n)
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

impl Account {
    /// What the account uses now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.holding.lock().map_or(0, |h| h.used())
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

impl Charge {
    /// Nothing, yet, of `account`.
    #[cfg(test)]
    pub(crate) fn none(account: &Arc<Account>) -> Charge {
        Charge::free(account, 0)
    }

    fn free(account: &Arc<Account>, n: u64) -> Charge {
        Charge {
            account: account.clone(),
            n,
        }
    }

    /// The account it is charged to.
    pub(crate) fn account(&self) -> &Arc<Account> {
        &self.account
    }

    /// Add `other` (of the same account) to this charge.
    pub(crate) fn absorb(&mut self, mut other: Charge) {
        self.n += std::mem::take(&mut other.n);
    }

    /// Split `n` off into a charge of its own (at most what is held).
    pub(crate) fn split_off(&mut self, n: u64) -> Charge {
        let n = n.min(self.n);
        self.n -= n;
        Charge::free(&self.account, n)
    }

    /// Give back all but `keep`.
    pub(crate) fn shrink_to(&mut self, keep: u64) {
        if self.n > keep {
            self.account.give(self.n - keep);
            self.n = keep;
        }
    }

    #[cfg(test)]
    pub(crate) fn amount(&self) -> u64 {
        self.n
    }
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
    /// Memory for what its control connection reads, and for the journals
    /// it checks.
    pub(crate) control: Arc<Account>,
    /// Memory for what its data connections read. Apart from `control`,
    /// so that chunks parked for entries still to come on the control
    /// connection never keep it from reading them.
    pub(crate) data: Arc<Account>,
    /// Memory for what it holds while entries wait: the names of its open
    /// files and directories, and of hard links waiting for their files.
    /// Apart from the readers': what does not fit waits for the client's
    /// next attempt, and never keeps a reader from reading.
    pub(crate) state: Arc<Account>,
}

/// What an entry held open takes of its session's budgets, given back
/// when it is dropped.
pub(crate) struct Held {
    _descriptors: Charge,
    _memory: Charge,
}

impl SessionBudget {
    /// Room to hold an entry open with `descriptors` descriptors and
    /// `bytes` of memory, if the session's shares allow both.
    pub(crate) fn hold(&self, descriptors: u64, bytes: u64) -> Option<Held> {
        Some(Held {
            _descriptors: self.descriptors.try_take(descriptors)?,
            _memory: self.state.try_take(bytes)?,
        })
    }
}

impl SessionBudget {
    pub(crate) fn unlimited() -> SessionBudget {
        SessionBudget {
            descriptors: Account::unlimited(),
            control: Account::unlimited(),
            data: Account::unlimited(),
            state: Account::unlimited(),
        }
    }
}

/// Why a server turned a session or connection away for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    #[error("its file descriptors are all reserved by other sessions")]
    Descriptors,
    #[error("its memory is all reserved by other sessions")]
    Memory,
    #[error("{limit} sessions from this address are running already")]
    SessionsFromAddress { limit: u32 },
    #[error("{limit} connections from this address are open already")]
    ConnectionsFromAddress { limit: u32 },
    #[error("a snapshot of this backup was taken this very second")]
    SnapshotTaken,
}

/// The sessions and slot-holding connections of each client address.
#[derive(Debug, Default)]
pub(crate) struct Addresses {
    by_source: HashMap<IpAddr, (u32, u32)>,
}

impl Addresses {
    /// One more session from `addr`, if its cap allows.
    pub(crate) fn open_session(&mut self, addr: IpAddr) -> Result<(), Busy> {
        let (sessions, _) = self.by_source.entry(source_of(addr)).or_default();
        if *sessions >= SESSIONS_PER_ADDRESS {
            return Err(Busy::SessionsFromAddress {
                limit: SESSIONS_PER_ADDRESS,
            });
        }
        *sessions += 1;
        Ok(())
    }

    /// One more connection from `addr` holds a slot, if its cap allows.
    pub(crate) fn open_connection(&mut self, addr: IpAddr) -> Result<(), Busy> {
        let (_, connections) = self.by_source.entry(source_of(addr)).or_default();
        if *connections >= CONNECTIONS_PER_ADDRESS {
            return Err(Busy::ConnectionsFromAddress {
                limit: CONNECTIONS_PER_ADDRESS,
            });
        }
        *connections += 1;
        Ok(())
    }

    pub(crate) fn close_session(&mut self, addr: IpAddr) {
        self.close(addr, |counts| &mut counts.0);
    }

    pub(crate) fn close_connection(&mut self, addr: IpAddr) {
        self.close(addr, |counts| &mut counts.1);
    }

    fn close(&mut self, addr: IpAddr, which: impl Fn(&mut (u32, u32)) -> &mut u32) {
        let source = source_of(addr);
        if let Some(counts) = self.by_source.get_mut(&source) {
            let n = which(counts);
            *n = n.saturating_sub(1);
            if *counts == (0, 0) {
                self.by_source.remove(&source);
            }
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.by_source.len()
    }
}

/// Whose connection it is, for the caps: as for failed authentication,
/// an IPv6 host by its /64 (see `throttle`).
pub(crate) fn source_of(addr: IpAddr) -> IpAddr {
    crate::throttle::source_of(addr)
}

/// A session or a slot-holding connection from an address, counted until
/// it is dropped.
pub(crate) struct FromAddress {
    book: Arc<Mutex<Addresses>>,
    addr: IpAddr,
    session: bool,
}

impl FromAddress {
    fn lock(book: &Mutex<Addresses>) -> MutexGuard<'_, Addresses> {
        book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session from `addr`, if its cap allows.
    pub(crate) fn session(book: &Arc<Mutex<Addresses>>, addr: IpAddr) -> Result<Self, Busy> {
        Self::lock(book).open_session(addr)?;
        Ok(FromAddress {
            book: book.clone(),
            addr,
            session: true,
        })
    }

    /// A new connection from `addr` that takes a slot, if its cap allows.
    pub(crate) fn connection(book: &Arc<Mutex<Addresses>>, addr: IpAddr) -> Result<Self, Busy> {
        Self::lock(book).open_connection(addr)?;
        Ok(FromAddress {
            book: book.clone(),
            addr,
            session: false,
        })
    }
}

impl Drop for FromAddress {
    fn drop(&mut self) {
        let mut book = Self::lock(&self.book);
        if self.session {
            book.close_session(self.addr);
        } else {
            book.close_connection(self.addr);
        }
    }
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

/// What a download's compressors hold in memory, beyond the reserves of
/// its session (which hold its queued chunks: measured, a download that
/// is not read holds 2.4 MiB uncompressed, 7 MiB at zstd level 19): the
/// producer's and each lane's (`lanes` of them), at the highest level
/// they may reach (`auto` climbs to 6). Measured for 1 MiB chunks with
/// zstd 1.5.7 (`sizeof` of a context that compressed one): 1.2 MiB at
/// level 3, 3.0 MiB at 6, 5.5 MiB at 7 and 8, 10.5 MiB at 9 to 12,
/// 16.5 MiB at 13 to 15, 17.25 MiB at 19.
pub(crate) fn compressor_memory(compression: Compression, lanes: u32) -> u64 {
    let each: u64 = match compression {
        Compression::Off => 0,
        Compression::Level(level) if level >= 13 => 18 << 20,
        Compression::Level(level) if level >= 7 => 11 << 20,
        Compression::Level(level) if level >= 4 => 3 << 20,
        Compression::Level(_) => 2 << 20,
        Compression::Auto => 3 << 20,
    };
    each * (1 + u64::from(lanes))
}

/// Why an entry is put off: the session is at its share.
pub(crate) const PUT_OFF: &str = "the server has as many files open, or holds as much, as it allows \
     this session; sent again on the next attempt";

/// What holding an entry open costs in memory beyond its names: its place
/// in the maps, its handles, its ledger.
pub(crate) const HELD_ENTRY_MEMORY: u64 = 512;

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
    fn a_forced_take_overdraws_and_blocks_later_takes() {
        let mut p = pool(100);
        let mut borrower = Pool::borrower();
        p.force(&mut borrower, 60);
        assert_eq!(p.borrowed(), 60);
        let mut other = p.admit().unwrap();
        assert!(p.take(&mut other, 10), "reserves are not shared");
        assert!(!p.take(&mut other, 1), "the shared part is overdrawn");
        p.give(&mut borrower, 60);
        assert!(p.take(&mut other, 1));
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
        let mem = Split::memory(DEFAULT_MAX_MEMORY);
        assert!(mem.reserved_max / SESSION_MEMORY >= 64, "{mem:?}");
        assert!(mem.reserve + mem.share > u64::from(MAX_CHUNK_LEN));
        // A 1 TiB file's journal can be checked.
        assert!(mem.share >= crate::journal::memory_for(1 << 40), "{mem:?}");
        let tight = Split::memory(MIN_MAX_MEMORY);
        assert!(
            tight.reserved_max / SESSION_MEMORY >= 4 && tight.share <= tight.shared,
            "{tight:?}"
        );
    }

    #[test]
    fn an_address_has_at_most_its_sessions_and_connections() {
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let mut book = Addresses::default();
        for _ in 0..SESSIONS_PER_ADDRESS {
            book.open_session(a).unwrap();
        }
        assert!(matches!(
            book.open_session(a),
            Err(Busy::SessionsFromAddress { .. })
        ));
        book.open_session(b).unwrap();
        book.close_session(a);
        book.open_session(a).unwrap();
        for _ in 0..CONNECTIONS_PER_ADDRESS {
            book.open_connection(a).unwrap();
        }
        assert!(book.open_connection(a).is_err());
        for _ in 0..CONNECTIONS_PER_ADDRESS {
            book.close_connection(a);
        }
        for _ in 0..SESSIONS_PER_ADDRESS {
            book.close_session(a);
        }
        book.close_session(b);
        assert_eq!(book.tracked(), 0, "forgotten once nothing is open");
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64() {
        let mut book = Addresses::default();
        for i in 0..SESSIONS_PER_ADDRESS {
            let addr: IpAddr = format!("2001:db8::{:x}", i + 1).parse().unwrap();
            book.open_session(addr).unwrap();
        }
        let next: IpAddr = "2001:db8::ffff".parse().unwrap();
        assert!(book.open_session(next).is_err());
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

    #[tokio::test]
    async fn a_waiting_take_goes_on_once_room_is_given_back() {
        let budget = Budget::new(Split::of(100, 10, 0.5, 10));
        let hogs: Vec<Arc<Account>> = (0..2).map(|_| budget.borrower()).collect();
        let mut held: Vec<Charge> = hogs.iter().map(|h| h.try_take(24).unwrap()).collect();
        assert!(hogs[0].try_take(2).is_none(), "a share is 25");
        let waiter = tokio::spawn({
            let other = budget.borrower();
            async move { other.take(5).await.amount() }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "2 left of the 50 shared");
        held.pop();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await;
        assert_eq!(got.unwrap().unwrap(), 5);
        drop(held);
        assert!(hogs.iter().all(|h| h.used() == 0));
    }

    #[test]
    fn a_charge_splits_and_shrinks() {
        let budget = Budget::new(Split::of(100, 10, 0.5, 10));
        let account = budget.borrower();
        let mut held = Charge::none(&account);
        held.absorb(account.try_take(20).unwrap());
        let part = held.split_off(8);
        assert_eq!((held.amount(), part.amount()), (12, 8));
        held.shrink_to(2);
        assert_eq!(account.used(), 10);
        drop(part);
        drop(held);
        assert_eq!(account.used(), 0);
    }
}

//! The server: accepts connections, runs one session per connection, and
//! shuts down cleanly.
//!
//! [`serve`] takes a bound listener and a shutdown future (mini-redis
//! style): the binary passes its signal handler, tests and the in-process
//! copy pass their own. On shutdown the server stops accepting, cancels
//! the sessions in flight (each removes its part files and tells its
//! client why) and returns once they have finished.
//!
//! Connections are admitted in two stages. Until it has sent its preface
//! and its `hello` or `join`, a connection is *pending*: it costs nothing
//! to open and proves nothing, so pending connections share a small budget
//! of their own, and when it is full the oldest is dropped. Only a
//! connection past its handshake takes one of the slots that bound the
//! sessions served at once. So a crowd of silent sockets can neither hold
//! those slots nor keep a newcomer waiting behind them. One address may
//! have only so many pending connections, slots and sessions, and every
//! session gets its reserve of the descriptors and memory the sessions
//! share, or is refused as busy (`budget`).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::limits::MAX_STREAMS;
use ferry_proto::message::{Compression, ErrorCode, Keep, Message, Mirror};
use ferry_proto::path::{WireBytes, WirePath, escape};
use ferry_proto::preface::{MAGIC, Preface};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::{self, EXPORTER_LABEL, EXPORTER_LEN};
use crate::budget::{self, Addresses, Budget, Busy, Charge, FromAddress, SessionBudget, Split};
use crate::conn::{
    BoxRead, BoxWrite, DataConn, FrameReader, FrameWriter, HANDSHAKE_TIMEOUT, Meter, check_version,
    watch_for_stall,
};
use crate::error::{EngineError, Op, Refusal, RefusalReason, Side, TlsError, reason};
use crate::events::{Event, EventSink, Origin, SERVER_LISTED, Tally};
use crate::filter::Filter;
use crate::fsx;
use crate::policy::{Grant, LivePolicy, Policy};
use crate::progress::Progress;
use crate::receiver::{
    BackupPlan, Destination, LinkDest, MAX_LINK_DESTS, Pruning, Publish, publish, run_receiver,
};
use crate::sender::{SendJob, lane_count, run_sender};
use crate::snapshots;
use crate::throttle::{self, AuthThrottle};
use crate::tls::ServerTls;

/// Connections past their handshake served at once (control and data
/// connections alike). A connection that has finished its handshake while
/// all are taken waits for one, still counted as pending.
const MAX_CONNECTIONS: usize = 256;
/// Connections still in their handshake (or waiting for a slot after it).
/// A client gets through its handshake within a round trip or two, so a
/// connection still pending after this many newer ones arrived is almost
/// surely idle or hostile: it is the one dropped to admit the next.
const MAX_PENDING: usize = 64;
/// How long sessions get to wind down after a shutdown request.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub use crate::policy::Access;

/// What the server serves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Which client gets which root, and which way files may move there:
    /// every remote path of a session is resolved below its root, and only
    /// below it. Consulted as each session starts, so it may be replaced
    /// while the server runs.
    pub policy: LivePolicy,
    /// A session that makes no progress for this long is ended (its
    /// journaled part files stay for the client's retry).
    pub idle_timeout: Duration,
    /// Part files nobody has touched for this long are removed (at start
    /// and then every hour); `None` keeps them forever.
    pub part_max_age: Option<Duration>,
    /// Make the device nodes that uploads hold (when running as root);
    /// otherwise they are skipped.
    pub devices: bool,
    /// The server's TLS identity; `None` serves plain TCP (`--no-tls`).
    pub tls: Option<ServerTls>,
    /// The memory the sessions share, in bytes (`--max-memory`; see
    /// [`budget::DEFAULT_MAX_MEMORY`]).
    pub max_memory: u64,
    /// How long a connection has for its whole handshake, TLS and
    /// authentication included (`--handshake-timeout`).
    pub handshake_timeout: Duration,
}

/// The server's default stall timeout, the client's too: after a network
/// stall both ends give up at about the same time, so the client's retry
/// soon finds the part file its old session held free again.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection has for its handshake by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = HANDSHAKE_TIMEOUT;
/// How long abandoned part files are kept for a resume by default.
pub const DEFAULT_PART_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Serve sessions on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let cancel = CancellationToken::new();
    if let Some(max_age) = config.part_max_age {
        let policy = config.policy.clone();
        tokio::spawn(sweep_every_hour(policy, max_age, cancel.clone()));
    }
    let shared = Arc::new(Shared {
        policy: config.policy,
        descriptors: descriptor_budget(),
        memory: memory_budget(config.max_memory),
        registry: Registry::default(),
        slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        idle_timeout: config.idle_timeout,
        handshake_timeout: config.handshake_timeout,
        addresses: Arc::default(),
        devices: config.devices,
        tls: config.tls,
        throttle: Mutex::default(),
    });
    let pending = Pending::default();
    let sessions = TaskTracker::new();
    tokio::pin!(shutdown);
    // Accept at once, always: waiting for a free slot before accepting
    // would leave newcomers queued in the kernel's backlog behind whatever
    // holds the slots. The pending budget bounds what accepting costs.
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    warn!("accept failed: {}", reason(&e));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let ticket = pending.admit(peer.ip());
        let shared = shared.clone();
        let cancel = cancel.child_token();
        sessions.spawn(async move {
            info!(%peer, "connection");
            match connection(stream, peer, ticket, &shared, &cancel).await {
                Ok(Outcome::Finished) => info!(%peer, "session finished"),
                Ok(Outcome::Dropped(why)) => info!(%peer, "connection dropped: {why}"),
                Err(e) => warn!(%peer, "session ended: {e}"),
            }
        });
    }
    wind_down(sessions, cancel).await;
    Ok(())
}

/// The file descriptors sessions share: what the open-files limit leaves
/// after the sockets the server accepts and its own use.
fn descriptor_budget() -> Arc<Budget> {
    let limit = budget::open_files_limit();
    let split = Split::descriptors(
        limit,
        budget::socket_descriptors(MAX_CONNECTIONS, MAX_PENDING),
    );
    info!(
        "file descriptors: {limit} open at most; {} sessions get {} each, and may borrow up to {} more each of {} shared",
        split.sessions(),
        split.reserve,
        split.share,
        split.shared,
    );
    if split.sessions() < 16 {
        warn!(
            "the open-files limit ({limit}) leaves room for only {} sessions at once: raise it (ulimit -n)",
            split.sessions()
        );
    }
    Budget::new(split)
}

/// The memory sessions share: what they read is charged to it.
fn memory_budget(max_memory: u64) -> Arc<Budget> {
    let split = Split::memory(max_memory.max(budget::MIN_MAX_MEMORY));
    let mib = |n: u64| n >> 20;
    info!(
        "memory: {} MiB for sessions; {} sessions get {:.2} MiB each, and may borrow up to {} MiB more for each of their 3 accounts of {} MiB shared",
        mib(max_memory),
        split.reserved_max / budget::SESSION_MEMORY,
        budget::SESSION_MEMORY as f64 / f64::from(1 << 20),
        mib(split.share),
        mib(split.shared),
    );
    Budget::new(split)
}

/// Cancel the sessions in flight and give them `SHUTDOWN_GRACE` to end.
async fn wind_down(sessions: TaskTracker, cancel: CancellationToken) {
    info!(
        "shutting down: no new connections; ending {} session(s)",
        sessions.len()
    );
    cancel.cancel();
    sessions.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, sessions.wait())
        .await
        .is_err()
    {
        warn!(
            "sessions did not finish within {} s",
            SHUTDOWN_GRACE.as_secs()
        );
    }
}

/// What every connection of a server shares.
struct Shared {
    /// Who gets which grant: read as each session starts.
    policy: LivePolicy,
    /// What sessions may hold open.
    descriptors: Arc<Budget>,
    /// What sessions may hold in memory.
    memory: Arc<Budget>,
    registry: Registry,
    /// One permit per connection past its handshake.
    slots: Arc<Semaphore>,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    /// The sessions and slot-holding connections of each client address.
    addresses: Arc<Mutex<Addresses>>,
    devices: bool,
    tls: Option<ServerTls>,
    /// Recent authentication failures by address: what slows a guesser
    /// down whichever connection it guesses on.
    throttle: Mutex<AuthThrottle>,
}

/// The pending connections, oldest first, each with the token that drops
/// it. Only the accept loop adds to it, so its length is exact.
#[derive(Clone, Default)]
struct Pending(Arc<Mutex<PendingQueue>>);

#[derive(Default)]
struct PendingQueue {
    next_id: u64,
    /// Id, whose it is (see `budget::source_of`), and its token.
    queue: VecDeque<(u64, IpAddr, CancellationToken)>,
}

/// A connection's place among the pending ones; dropping it leaves.
struct Ticket {
    pending: Pending,
    id: u64,
    /// Cancelled when newer connections need the place.
    evicted: CancellationToken,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, PendingQueue> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admit a new connection from `addr`, dropping the oldest pending one
    /// of its address if that has `PENDING_PER_ADDRESS`, or the oldest of
    /// all if the budget is full. Dropping the oldest, not refusing the
    /// newest: an idle flood then only ever pushes out its own sockets,
    /// while a client that connects after it finishes its handshake long
    /// before MAX_PENDING newer connections could push it out in turn;
    /// and a flood from one address pushes out only its own.
    fn admit(&self, addr: IpAddr) -> Ticket {
        let source = budget::source_of(addr);
        let mut q = self.lock();
        let same = q
            .queue
            .iter()
            .filter(|(_, from, _)| *from == source)
            .count();
        let oldest = if same >= budget::PENDING_PER_ADDRESS {
            q.queue.iter().position(|(_, from, _)| *from == source)
        } else {
            (q.queue.len() >= MAX_PENDING).then_some(0)
        };
        if let Some((_, _, evicted)) = oldest.and_then(|at| q.queue.remove(at)) {
            evicted.cancel();
        }
        let id = q.next_id;
        q.next_id += 1;
        let evicted = CancellationToken::new();
        q.queue.push_back((id, source, evicted.clone()));
        Ticket {
            pending: self.clone(),
            id,
            evicted,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Gone already if it was evicted.
        self.pending
            .lock()
            .queue
            .retain(|(id, _, _)| *id != self.id);
    }
}

/// How a connection that did not fail ended.
enum Outcome {
    Finished,
    /// Dropped before its handshake was through.
    Dropped(&'static str),
}

/// What a connection asked for in its handshake.
enum Opened {
    /// `hello`: a new session, with this as its control connection, and
    /// what its client may do (kept for the whole session).
    Session {
        reader: FrameReader<BoxRead>,
        writer: FrameWriter<BoxWrite>,
        software: String,
        grant: Arc<Grant>,
    },
    /// `join`: a data connection for a session in progress.
    Join {
        reader: FrameReader<BoxRead>,
        writer: FrameWriter<BoxWrite>,
        session_id: String,
        secret: String,
    },
}

/// Serve one connection: its handshake while it is pending (and may be
/// dropped for a newer one), then its session or join while it holds a
/// slot.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    ticket: Ticket,
    shared: &Shared,
    cancel: &CancellationToken,
) -> Result<Outcome, EngineError> {
    let admitted = async {
        let deadline = Deadline::after(shared.handshake_timeout);
        let opened = open(stream, peer, shared, deadline).await?;
        let from = match FromAddress::connection(&shared.addresses, peer.ip()) {
            Ok(from) => from,
            Err(busy) => return refuse_opened(opened, busy).await,
        };
        let permit = shared
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        Ok::<_, EngineError>((opened, (permit, from)))
    };
    let (opened, _held) = tokio::select! {
        _ = ticket.evicted.cancelled() => {
            return Ok(Outcome::Dropped("no handshake yet, and newer connections needed its place"));
        }
        _ = cancel.cancelled() => return Ok(Outcome::Dropped("the server is shutting down")),
        admitted = admitted => admitted?,
    };
    drop(ticket);
    match opened {
        Opened::Session {
            reader,
            writer,
            software,
            grant,
        } => {
            let client = (software.as_str(), grant, peer.ip());
            session(reader, writer, client, shared, cancel).await
        }
        Opened::Join {
            reader,
            writer,
            session_id,
            secret,
        } => join(reader, writer, &shared.registry, &session_id, &secret).await,
    }
    .map(|()| Outcome::Finished)
}

/// The handshake: TLS unless the server runs with `--no-tls`, prefaces
/// both ways, then `hello` or `join`.
async fn open(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    deadline: Deadline,
) -> Result<Opened, EngineError> {
    let tls = shared.tls.as_ref();
    let Transport {
        r,
        w,
        exporter,
        plaintext_client,
    } = transport(stream, tls, deadline).await?;
    // One meter per connection: the control connection's is what the stall
    // watch reads (it also carries data, and the session cannot finish
    // without it moving).
    let meter = Meter::default();
    let mut reader = FrameReader::new(r, meter.clone(), Side::Client);
    let mut writer = FrameWriter::new(w, meter.clone());

    let theirs = deadline.within(reader.preface()).await?;
    // Always answer with our own preface, so that a client of another
    // version can name both versions to its user.
    writer.preface().await?;
    if let Err(e) = check_version(theirs) {
        let _ = writer
            .send_now(&Message::error(e.code(), e.to_string()))
            .await;
        return Err(e);
    }
    let hello = deadline.within(reader.message()).await?;
    if tls.is_some() && plaintext_client {
        // Answered in plaintext, after its hello, so that the client reads
        // the refusal rather than a reset connection.
        warn!("a plaintext (--no-tls) client connected to this TLS server");
        return refuse(&mut writer, Refusal::new(RefusalReason::NeedsTls)).await;
    }
    match hello {
        Message::Hello { software, mac } => {
            // The policy as it is now: a reload after this point is for
            // the sessions that start after it.
            let policy = shared.policy.current();
            let grant = match policy.open_grant() {
                Some(grant) => grant,
                None => {
                    // A proof given at once stands only where the TLS
                    // exporter binds it to this connection; without TLS
                    // it could be a replay, and the challenge decides.
                    let early = mac.filter(|_| !exporter.is_empty());
                    let proof = (&*policy, exporter.as_slice(), deadline);
                    authenticate(&mut reader, &mut writer, proof, early, (peer, shared)).await?
                }
            };
            Ok(Opened::Session {
                reader,
                writer,
                software,
                grant,
            })
        }
        Message::Join { session_id, secret } => Ok(Opened::Join {
            reader,
            writer,
            session_id,
            secret,
        }),
        other => {
            let refusal = Refusal::new(RefusalReason::NotHello(other.name()));
            refuse(&mut writer, refusal).await
        }
    }
}

/// A connection's two halves, with TLS unless one end runs without it.
struct Transport {
    r: BoxRead,
    w: BoxWrite,
    /// The TLS session's channel binding for authentication (empty
    /// without TLS).
    exporter: Vec<u8>,
    /// The client sent the plaintext preface rather than a TLS handshake.
    plaintext_client: bool,
}

/// The connection's transport: TLS when the server has it and the client
/// starts a TLS handshake, plain TCP otherwise (a plaintext client at a TLS
/// server is refused by `open`, after its hello). A TLS client at a
/// `--no-tls` server is told why it cannot be served.
async fn transport(
    stream: TcpStream,
    tls: Option<&ServerTls>,
    deadline: Deadline,
) -> Result<Transport, EngineError> {
    crate::conn::tune(&stream);
    // The first byte tells a TLS client (a handshake record, 0x16) from a
    // plaintext ferry one (the preface's `F`), so that a client on the
    // other setting hears why it cannot be served.
    let mut first = [0u8; 1];
    if deadline.within(stream.peek(&mut first)).await? == 0 {
        return Err(EngineError::Closed);
    }
    let plaintext_client = first[0] == MAGIC[0];
    let mut exporter = Vec::new();
    let (r, w): (BoxRead, BoxWrite) = match tls {
        Some(tls) if !plaintext_client => {
            let accepting = tls.acceptor().accept(stream);
            let accepted = tokio::time::timeout_at(deadline.at, accepting)
                .await
                .map_err(|_| deadline.elapsed())?
                .map_err(|e| EngineError::Tls(TlsError::Io(e)))?;
            exporter = accepted
                .get_ref()
                .1
                .export_keying_material(vec![0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
                .map_err(|e| EngineError::Tls(e.into()))?;
            let (r, w) = tokio::io::split(accepted);
            (Box::new(r), Box::new(w))
        }
        None if first[0] == TLS_HANDSHAKE_RECORD => return tls_client_refused(stream).await,
        _ => {
            let (r, w) = stream.into_split();
            (Box::new(r), Box::new(w))
        }
    };
    Ok(Transport {
        r,
        w,
        exporter,
        plaintext_client,
    })
}

/// Have the client prove a token: `challenge`, `auth`. The token it
/// proves selects its grant.
///
/// A failure is logged once, with the peer's address and why, and counted
/// against the address: its answer waits the longer the more recent
/// failures the address has (see `throttle`). The wait happens here, in
/// the handshake, so the connection still counts as pending: it never
/// holds a session slot, and a crowd of them only pushes out each other
/// (the oldest pending go first). A success is answered at once and
/// forgets the address's failures: a user behind the same NAT as a guesser
/// must not be locked out.
async fn authenticate(
    reader: &mut FrameReader<BoxRead>,
    writer: &mut FrameWriter<BoxWrite>,
    (policy, exporter, deadline): (&Policy, &[u8], Deadline),
    early: Option<String>,
    (peer, shared): (SocketAddr, &Shared),
) -> Result<Arc<Grant>, EngineError> {
    let (nonce, answer) = match early {
        // Proved in the hello, over the TLS exporter alone.
        Some(mac) => (Vec::new(), Ok(Ok(Message::Auth { mac }))),
        None => challenge(reader, writer, deadline).await?,
    };
    // A client without a token gives up at the challenge: it goes away
    // (or says nothing). That is a failed attempt too, or a guesser could
    // probe for free by hanging up.
    let (why, gone) = match &answer {
        Ok(Ok(Message::Auth { mac })) => match policy.grant_for(&nonce, exporter, mac) {
            Some(grant) => {
                lock_throttle(shared).success(peer.ip());
                info!(%peer, token = %grant.name(), "authenticated");
                return Ok(grant);
            }
            None => ("wrong token".to_string(), false),
        },
        // A client without a token makes its request at once (it could
        // not answer a challenge anyway) and gives up when challenged.
        Ok(Ok(Message::Upload { .. } | Message::Download { .. } | Message::Rollback { .. })) => (
            "the client made its request without proving the token (no token?)".into(),
            true,
        ),
        Ok(Ok(_)) => (
            "answered the challenge with another message than auth".into(),
            false,
        ),
        Ok(Err(_)) => ("no answer to the challenge (no token?)".to_string(), true),
        Err(_) => (
            format!(
                "no answer to the challenge within the handshake's {} s (no token?)",
                deadline.secs
            ),
            false,
        ),
    };
    let penalty = lock_throttle(shared).failure(peer.ip(), Instant::now());
    // The one log line per failed attempt.
    let answer = if gone {
        String::new()
    } else {
        format!("; answering in {} s", penalty.delay.as_secs())
    };
    warn!(
        %peer,
        "authentication failed: {why}; failure {} from this address in {} min{answer}",
        penalty.failures,
        throttle::WINDOW.as_secs() / 60,
    );
    if !gone {
        tokio::time::sleep(penalty.delay).await;
        let refusal = Message::error(ErrorCode::PermissionDenied, "authentication failed");
        // The client may be gone by now: the failure is logged already.
        let answered = async {
            writer.send_now(&refusal).await?;
            writer.shutdown().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), answered).await;
    }
    Err(EngineError::RefusedPeer(Refusal::new(
        RefusalReason::Unauthenticated,
    )))
}

/// The answer to a challenge: a message, a broken connection, or none in
/// time.
type ChallengeAnswer = Result<Result<Message, EngineError>, tokio::time::error::Elapsed>;

/// Send a challenge and read its answer, before the handshake's deadline.
async fn challenge(
    reader: &mut FrameReader<BoxRead>,
    writer: &mut FrameWriter<BoxWrite>,
    deadline: Deadline,
) -> Result<(Vec<u8>, ChallengeAnswer), EngineError> {
    let nonce = match auth::random_bytes(32) {
        Ok(n) => n,
        Err(error) => {
            let reason = RefusalReason::NoRandom {
                what: "the challenge",
                error,
            };
            return refuse(writer, Refusal::new(reason)).await;
        }
    };
    let challenge = Message::Challenge {
        nonce: auth::hex(&nonce),
    };
    writer.send_now(&challenge).await?;
    let answer = tokio::time::timeout_at(deadline.at, reader.message()).await;
    Ok((nonce, answer))
}

fn lock_throttle(shared: &Shared) -> std::sync::MutexGuard<'_, AuthThrottle> {
    shared.throttle.lock().unwrap_or_else(|p| p.into_inner())
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A TLS client at a `--no-tls` server. It is answered with the plaintext
/// preface, which its TLS stack rejects as "not TLS" and reports as such;
/// then its hello is read away, so that closing does not reset the
/// connection before the client has read the answer.
async fn tls_client_refused<T>(mut stream: TcpStream) -> Result<T, EngineError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer = async {
        stream.write_all(&Preface::ours().encode()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), answer).await;
    Err(EngineError::RefusedPeer(Refusal::new(
        RefusalReason::TlsClient,
    )))
}

/// Remove abandoned part files now and then every hour, off the async
/// threads (it walks the whole tree), until the server stops.
async fn sweep_every_hour(policy: LivePolicy, max_age: Duration, stop: CancellationToken) {
    const EVERY: Duration = Duration::from_secs(3600);
    loop {
        // The roots of the policy in force: a reload may have named others.
        for (path, root) in policy.current().roots() {
            let swept = tokio::task::spawn_blocking(move || {
                crate::sweep::sweep_stale_parts(root.as_fd(), max_age, std::time::SystemTime::now())
            })
            .await;
            let root = path.display();
            match swept {
                Ok(Ok(r)) if r.parts_removed + r.journals_removed > 0 => info!(
                    "removed {} abandoned part file(s) and {} journal(s), {} bytes, below {root}",
                    r.parts_removed, r.journals_removed, r.bytes_freed
                ),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!("sweeping abandoned part files below {root}: {}", reason(&e)),
                Err(e) => warn!("sweeping abandoned part files below {root}: {e}"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// Logs what a session moves.
struct LogEvents {
    verb: &'static str,
}

impl EventSink for LogEvents {
    fn event(&self, event: Event) {
        match event {
            // A line per file would flood the log of a busy server (and
            // cost a tree of small files a fifth of its time): the session
            // ends with a summary; `RUST_LOG=debug` lists every file.
            Event::FileDone { path, size } => debug!("{} {path} ({size} bytes)", self.verb),
            Event::FileFailed {
                path,
                reason,
                origin,
                ..
            } => warn!("{}{path}: {reason}", side(origin)),
            Event::Skipped { path, reason } => info!("skipped {path}: {reason}"),
            Event::FileIncomplete {
                path,
                reason,
                origin,
                ..
            } => warn!("{}{path}: {reason} (kept for a resume)", side(origin)),
            Event::Resumed { path, bytes } => info!("resuming {path}: {bytes} bytes already here"),
            _ => {}
        }
    }
}

/// How the log names the side an entry failed on: its client's, if not
/// here.
fn side(origin: Origin) -> &'static str {
    match origin {
        Origin::Here => "",
        Origin::Peer => "client: ",
    }
}

/// The sessions in progress, by id: where their data connections go.
type Registry = Arc<Mutex<HashMap<String, SessionSlot>>>;

struct SessionSlot {
    secret: String,
    joins: mpsc::Sender<DataConn>,
    /// Data connections attached so far.
    joined: u32,
}

/// Takes a session out of the registry when it ends, however it ends.
struct Registered {
    registry: Registry,
    id: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.registry).remove(&self.id);
    }
}

fn lock(registry: &Registry) -> std::sync::MutexGuard<'_, HashMap<String, SessionSlot>> {
    registry.lock().unwrap_or_else(|p| p.into_inner())
}

/// Compare secrets in time that does not depend on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A session on its control connection, from `welcome` to the end.
async fn session(
    mut reader: FrameReader<BoxRead>,
    mut writer: FrameWriter<BoxWrite>,
    (software, grant, from): (&str, Arc<Grant>, IpAddr),
    shared: &Shared,
    cancel: &CancellationToken,
) -> Result<(), EngineError> {
    let (budget, _from) = match admit(shared, from) {
        Ok(admitted) => admitted,
        Err(busy) => return refuse(&mut writer, Refusal::new(busy.into())).await,
    };
    let (session_id, secret) = match random_hex().and_then(|id| Ok((id, random_hex()?))) {
        Ok(pair) => pair,
        Err(error) => {
            let reason = RefusalReason::NoRandom {
                what: "the session secret",
                error,
            };
            return refuse(&mut writer, Refusal::new(reason)).await;
        }
    };
    info!(
        session = %session_id,
        client = %escape(software.as_bytes()),
        token = %grant.name(),
        "handshake"
    );
    let (joins, _registered) = register(&shared.registry, &session_id, &secret);
    writer
        .send_now(&Message::Welcome {
            software: crate::SOFTWARE.to_string(),
            session_id,
            secret,
            max_streams: MAX_STREAMS,
        })
        .await?;

    let request = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.message())
        .await
        .map_err(|_| EngineError::Timeout(HANDSHAKE_TIMEOUT.as_secs()))??;
    let started = Instant::now();
    let accepted = match accept_request(shared, &grant, budget, request) {
        Ok(a) => a,
        Err(refusal) => return refuse(&mut writer, refusal).await,
    };
    writer.send_now(&Message::Ready).await?;
    let io = (&mut reader, &mut writer);
    let local_peer = from.is_loopback();
    let run = watched(accepted, io, local_peer, shared.idle_timeout, cancel, joins);
    let (verb, result, tally) = run.await;
    say_goodbye(&mut writer, &result).await;
    log_summary(verb, &result, &tally, started);
    result
}

/// Run an accepted request under a stall watch: ended once it makes no
/// progress for `timeout`.
async fn watched(
    accepted: Accepted,
    (reader, writer): (&mut FrameReader<BoxRead>, &mut FrameWriter<BoxWrite>),
    local_peer: bool,
    timeout: Duration,
    cancel: &CancellationToken,
    joins: mpsc::Receiver<DataConn>,
) -> (&'static str, Result<(), EngineError>, Arc<Tally>) {
    let watched = cancel.child_token();
    let progress = Arc::new(Progress::default());
    let stalled = watch_for_stall(progress.clone(), timeout, watched.clone());
    let io = (reader, writer);
    let (verb, result, tally) = transfer(accepted, io, local_peer, progress, &watched, joins).await;
    watched.cancel(); // ends the stall watch
    let result = match result {
        Err(EngineError::Cancelled) if stalled.load(std::sync::atomic::Ordering::Acquire) => {
            Err(EngineError::Stalled(timeout.as_secs()))
        }
        other => other,
    };
    (verb, result, tally)
}

/// A new session's share of what the server's sessions share, counted
/// against its address, or why the server is too busy for it now.
fn admit(shared: &Shared, addr: IpAddr) -> Result<(SessionBudget, FromAddress), Busy> {
    let from = FromAddress::session(&shared.addresses, addr)?;
    let descriptors = shared.descriptors.admit().ok_or(Busy::Descriptors)?;
    let control = shared.memory.admit().ok_or(Busy::Memory)?;
    let data = shared.memory.admit().ok_or(Busy::Memory)?;
    let budget = SessionBudget {
        descriptors,
        control,
        data,
        state: (shared.memory)
            .admit_with(budget::HELD_MEMORY)
            .ok_or(Busy::Memory)?,
    };
    Ok((budget, from))
}

/// When a connection's handshake must be through.
#[derive(Clone, Copy)]
struct Deadline {
    at: tokio::time::Instant,
    secs: u64,
}

impl Deadline {
    fn after(timeout: Duration) -> Self {
        Deadline {
            at: tokio::time::Instant::now() + timeout,
            secs: timeout.as_secs(),
        }
    }

    fn elapsed(&self) -> EngineError {
        EngineError::Timeout(self.secs)
    }

    /// `step`, if it is done before the deadline.
    async fn within<T, E: Into<EngineError>>(
        &self,
        step: impl Future<Output = Result<T, E>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout_at(self.at, step).await {
            Ok(done) => done.map_err(Into::into),
            Err(_) => Err(self.elapsed()),
        }
    }
}

/// Turn away a connection whose address has as many as it may.
async fn refuse_opened<T>(opened: Opened, busy: Busy) -> Result<T, EngineError> {
    let (Opened::Session { mut writer, .. } | Opened::Join { mut writer, .. }) = opened;
    refuse(&mut writer, Refusal::new(busy.into())).await
}

/// Put a new session in the registry, where its data connections will
/// find it: what they send it, and the guard that takes it out again.
fn register(
    registry: &Registry,
    session_id: &str,
    secret: &str,
) -> (mpsc::Receiver<DataConn>, Registered) {
    let (joins_tx, joins) = mpsc::channel(MAX_STREAMS as usize);
    let slot = SessionSlot {
        secret: secret.to_string(),
        joins: joins_tx,
        joined: 0,
    };
    lock(registry).insert(session_id.to_string(), slot);
    let registered = Registered {
        registry: registry.clone(),
        id: session_id.to_string(),
    };
    (joins, registered)
}

/// Run an accepted request on the control connection (and the data
/// connections that join): what it was, how it ended, what it moved.
async fn transfer(
    accepted: Accepted,
    (reader, writer): (&mut FrameReader<BoxRead>, &mut FrameWriter<BoxWrite>),
    local_peer: bool,
    progress: Arc<Progress>,
    watched: &CancellationToken,
    joins: mpsc::Receiver<DataConn>,
) -> (&'static str, Result<(), EngineError>, Arc<Tally>) {
    let tally = |verb| {
        Arc::new(Tally::listing(Arc::new(LogEvents { verb }), SERVER_LISTED).watched(progress))
    };
    match accepted {
        Accepted::Receive(dest) => {
            info!("upload to {}", dest.label);
            let tally = tally("received");
            let result = run_receiver(reader, writer, *dest, tally.clone(), watched, joins).await;
            ("upload", result, tally)
        }
        Accepted::Send(mut job, _held) => {
            info!("download of {}", job.label);
            job.local_peer = local_peer;
            let tally = tally("sent");
            let conn = (reader, writer);
            let result = run_sender(conn, *job, tally.clone(), watched, (None, joins)).await;
            ("download", result, tally)
        }
        Accepted::RolledBack => ("rollback", Ok(()), tally("rolled back")),
    }
}

/// Tell the client why the server ended its session, if the server did,
/// and close the control connection.
async fn say_goodbye(writer: &mut FrameWriter<BoxWrite>, result: &Result<(), EngineError>) {
    let farewell = match result {
        Err(EngineError::Cancelled) => {
            Some((ErrorCode::ShuttingDown, "the server is shutting down"))
        }
        Err(EngineError::Stalled(_)) => Some((
            ErrorCode::Io,
            "no progress for too long; ending the session",
        )),
        _ => None,
    };
    if let Some((code, text)) = farewell {
        let msg = Message::error(code, text);
        let _ = tokio::time::timeout(Duration::from_secs(2), writer.send_now(&msg)).await;
    }
    // Bounded: after a stall, the connection may never drain.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer.shutdown()).await;
}

/// The one log line that sums up a session.
fn log_summary(verb: &str, result: &Result<(), EngineError>, tally: &Tally, started: Instant) {
    let report = tally.report();
    let dirs = match report.dirs_failed {
        0 => String::new(),
        n => format!(" ({n} directories failed)"),
    };
    info!(
        "{verb} {}: {} ok ({} unchanged), {} failed{dirs}, {} incomplete, {} skipped, {} bytes in {:.1} s",
        if result.is_ok() {
            "complete"
        } else {
            "ended early"
        },
        report.files_ok,
        report.files_unchanged,
        report.files_failed,
        report.files_incomplete,
        report.files_skipped,
        report.file_bytes,
        started.elapsed().as_secs_f64()
    );
}

/// What an accepted request runs.
enum Accepted {
    /// Boxed: a mirror carries its filter's compiled globs too.
    Receive(Box<Destination>),
    /// With what it holds of the server's budgets for as long as it runs;
    /// boxed: a job carries its filter's compiled globs.
    Send(Box<SendJob>, (SessionBudget, Charge)),
    /// A rollback, done: nothing more to run.
    RolledBack,
}

/// Check a request against the session's grant (its access and root),
/// and prepare what it will run. Every path is validated here, whatever the
/// client already checked.
fn accept_request(
    shared: &Shared,
    grant: &Grant,
    budget: SessionBudget,
    request: Message,
) -> Result<Accepted, Refusal> {
    let root = &grant.root;
    // Before anything touches the filesystem: a read-only server must not
    // even create an upload's parent directories.
    check_access(&request, grant.access)?;
    match request {
        upload @ Message::Upload { .. } => {
            let append_only = grant.access == Access::AppendOnly;
            let mut accepted = accept_upload_request(root, shared.devices, budget, upload);
            if let Ok(Accepted::Receive(dest)) = &mut accepted {
                // A backup writes only into its new snapshot's staging
                // directory, which is nobody's backup yet: replacing a file
                // staged by an interrupted attempt destroys nothing (nor
                // does it touch an earlier snapshot's inode: a file is
                // replaced by a rename, and one that may share its inode
                // with the previous snapshot never has its metadata fixed
                // in place). Refusing it would leave the backup unfinished
                // for good once the source changed.
                dest.append_only = append_only && dest.backup.is_none();
                // A signature describes the file held here: never to a
                // client that may not read it.
                dest.delta &= grant.access != Access::WriteOnly;
            }
            accepted
        }
        Message::Rollback { dest } => accept_rollback(root, dest.as_bytes()),
        // The client receives, and applies `ignore_times` itself.
        Message::Download {
            source,
            compression,
            ignore_times: _,
            owners,
            filters,
            gitignore,
            bwlimit,
            checksum,
        } => {
            let filter = Filter::new(&filters, gitignore).map_err(|e| Refusal::new(e.into()))?;
            // Compressors beyond the reserves, one per lane (core) and the
            // producer's; only the producer's while memory is shorter; none
            // when it is shorter still: compression saves time, it is never
            // owed.
            let afford = |lanes| {
                budget
                    .data
                    .try_take(budget::compressor_memory(compression, lanes))
            };
            let (compression, lanes, memory) = match (afford(lane_count()), afford(0)) {
                (Some(memory), _) => (compression, lane_count(), memory),
                (None, Some(memory)) => (compression, 0, memory),
                (None, None) => (Compression::Off, 0, budget.data.force(0)),
            };
            let mut job = accept_download(root, source.as_bytes(), compression, owners, filter)?;
            job.lanes = lanes;
            // Never below the slowest rate: a trickle would hold a slot.
            job.bwlimit = bwlimit.map(|rate| rate.max(crate::pace::MIN_RATE));
            job.checksum = checksum;
            Ok(Accepted::Send(Box::new(job), (budget, memory)))
        }
        other => Err(Refusal::new(RefusalReason::NotARequest(other.name()))),
    }
}

/// An upload: where it lands, and what the receiver is to do beyond
/// receiving (mirror, itemize, dry run, atomic publish, backup, checksum,
/// link-dest), all checked before anything is made for it.
fn accept_upload_request(
    root: &OwnedFd,
    devices: bool,
    budget: SessionBudget,
    request: Message,
) -> Result<Accepted, Refusal> {
    let Message::Upload {
        dest,
        ignore_times,
        mirror,
        itemize,
        dry_run,
        atomic,
        checksum,
        source_name,
        mut link_dest,
        backup,
        whole_file,
    } = request
    else {
        return Err(Refusal::new(RefusalReason::NotARequest(request.name())));
    };
    let inside = source_name
        .map(|name| one_name(name.as_bytes()))
        .transpose()?;
    let (dest, plan) = match backup {
        Some(keep) => {
            let (snapshot, plan) = backup_target(root, dest.as_bytes(), keep)?;
            link_dest.extend(plan.newest.clone());
            (snapshot, Some(plan))
        }
        None => (dest, None),
    };
    let atomic = atomic || plan.is_some();
    let link_dests = link_dests_of(root, &link_dest)?;
    // An atomic publish mirrors: the new version is the source.
    let mirror = mirror.or_else(|| atomic.then(Mirror::default));
    let label = escape(dest.as_bytes());
    let pruning = mirror.map(|m| pruning_of(m, label)).transpose()?;
    let mut accepted = accept_upload(root, devices, dest.as_bytes(), dry_run);
    if let Ok(Accepted::Receive(dest)) = &mut accepted {
        dest.budget = budget;
        dest.inside = inside;
        dest.pruning = pruning;
        dest.ignore_times = ignore_times;
        dest.itemize = itemize || dry_run;
        dest.dry_run = dry_run;
        dest.checksum = checksum;
        dest.link_dests = link_dests;
        dest.delta = !whole_file;
        dest.backup = plan;
        // A dry run looks at the live tree itself.
        if atomic && !dry_run {
            stage(dest);
        }
    }
    accepted
}

/// A backup into the directory `dir`: the snapshot it makes (the path of
/// the upload), and the plan. An interrupted snapshot (a staging directory
/// left there) is resumed under its own name; otherwise the name is now.
fn backup_target(
    root: &OwnedFd,
    dir: &[u8],
    keep: Keep,
) -> Result<(WireBytes, BackupPlan), Refusal> {
    let path = parse_remote(dir)?;
    if path.is_root() {
        return Err(Refusal::new(RefusalReason::RootPath));
    }
    let components: Vec<Vec<u8>> = path.components().map(<[u8]>::to_vec).collect();
    let parts: Vec<&[u8]> = components.iter().map(Vec::as_slice).collect();
    let listed = match fsx::open_dir_beneath(root.as_fd(), &parts) {
        Ok(fd) => fsx::list_dir(fd.as_fd()).map_err(|error| {
            Refusal::of_path(
                dir,
                RefusalReason::Io {
                    op: Op::Read,
                    error,
                },
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => {
            return Err(Refusal::of_path(
                dir,
                RefusalReason::Io {
                    op: Op::Open,
                    error,
                },
            ));
        }
    };
    let (complete, pending) = snapshots::sort_listing(&listed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let name = pending
        .last()
        .cloned()
        .unwrap_or_else(|| snapshots::name_at(now));
    if complete.contains(&name) {
        return Err(Refusal::new(RefusalReason::Busy(
            crate::budget::Busy::SnapshotTaken,
        )));
    }
    let newest = complete
        .last()
        .map(|n| WireBytes([dir, b"/", n.as_bytes()].concat()));
    let snapshot = WireBytes([dir, b"/", name.as_bytes()].concat());
    let plan = BackupPlan {
        dir: components,
        keep,
        newest,
    };
    Ok((snapshot, plan))
}

/// `ferry rollback`: the previous version of `dest` switched back in.
fn accept_rollback(root: &OwnedFd, dest: &[u8]) -> Result<Accepted, Refusal> {
    let path = parse_remote(dest)?;
    let live: Vec<Vec<u8>> = path.components().map(<[u8]>::to_vec).collect();
    publish::roll_back(root.as_fd(), &live).map_err(|error| {
        let op = Op::Rename;
        Refusal::of_path(path.as_bytes(), RefusalReason::Io { op, error })
    })?;
    Ok(Accepted::RolledBack)
}

/// Refuse the direction a read-only or write-only server does not serve.
fn check_access(request: &Message, access: Access) -> Result<(), Refusal> {
    match (request, access) {
        (Message::Upload { dest, .. } | Message::Rollback { dest }, Access::ReadOnly) => {
            Err(Refusal::of_path(dest.as_bytes(), RefusalReason::ReadOnly))
        }
        (Message::Download { source, .. }, Access::WriteOnly) => Err(Refusal::of_path(
            source.as_bytes(),
            RefusalReason::WriteOnly,
        )),
        (
            Message::Upload {
                dest,
                mirror,
                atomic,
                link_dest,
                ..
            },
            Access::WriteOnly,
        ) if mirror.is_some() || *atomic || !link_dest.is_empty() => Err(Refusal::of_path(
            dest.as_bytes(),
            RefusalReason::WriteOnlyMirror,
        )),
        (request, Access::AppendOnly) => refuse_destruction(request),
        _ => Ok(()),
    }
}

/// What an append-only server refuses: whatever would overwrite or delete
/// what exists (a backup's new snapshot is new; its rotation is not).
fn refuse_destruction(request: &Message) -> Result<(), Refusal> {
    let refused = |dest: &WireBytes, what| {
        Err(Refusal::of_path(
            dest.as_bytes(),
            RefusalReason::AppendOnly(what),
        ))
    };
    match request {
        Message::Rollback { dest } => refused(dest, "ferry rollback"),
        // A new snapshot is new (its mirror only cleans its own staging).
        Message::Upload {
            dest,
            backup: Some(keep),
            ..
        } => match *keep == Keep::default() {
            true => Ok(()),
            false => refused(dest, "a backup's --keep-*"),
        },
        Message::Upload {
            dest,
            mirror: Some(_),
            ..
        } => refused(dest, "--delete"),
        Message::Upload {
            dest, atomic: true, ..
        } => refused(dest, "--atomic"),
        _ => Ok(()),
    }
}

/// An atomic publish: the upload lands in the live tree's staging sibling,
/// and takes unchanged files from the live tree before any other.
fn stage(dest: &mut Destination) {
    if let Some((staging, publish)) = Publish::of(&dest.prefix) {
        if let Ok(base) = dest.base.try_clone() {
            let live = LinkDest::new(base, publish.live());
            dest.link_dests.insert(0, live);
        }
        dest.prefix = staging;
        dest.publish = Some(publish);
    }
}

/// An upload's `--link-dest` trees, each confined to the root like any
/// remote path (a tree that is not there is simply never found).
fn link_dests_of(root: &OwnedFd, dirs: &[WireBytes]) -> Result<Vec<LinkDest>, Refusal> {
    if dirs.len() > MAX_LINK_DESTS {
        return Err(Refusal::new(RefusalReason::TooManyLinkDests(dirs.len())));
    }
    dirs.iter()
        .map(|dir| {
            let path = parse_remote(dir.as_bytes())?;
            let base = root
                .try_clone()
                .map_err(|e| Refusal::new(RefusalReason::RootUnavailable(e)))?;
            let prefix = path.components().map(<[u8]>::to_vec).collect();
            Ok(LinkDest::new(base, prefix))
        })
        .collect()
}

/// What an upload's `mirror` asks of this server's receiver: its deletions
/// are told to the client, where the user is.
fn pruning_of(mirror: Mirror, label: String) -> Result<Pruning, Refusal> {
    let filter =
        Filter::new(&mirror.filters, mirror.gitignore).map_err(|e| Refusal::new(e.into()))?;
    Ok(Pruning {
        max_delete: mirror.max_delete,
        delete_excluded: mirror.delete_excluded,
        filter,
        tell_sender: true,
        label,
    })
}

fn parse_remote(bytes: &[u8]) -> Result<WirePath, Refusal> {
    WirePath::parse(bytes).map_err(|e| Refusal::of_path(bytes, RefusalReason::BadPath(e)))
}

/// An upload to `dest`: its parent directories are made now (unless in a
/// dry run, which changes nothing), so that the receiver only ever works
/// beneath them.
fn accept_upload(
    root: &OwnedFd,
    devices: bool,
    dest: &[u8],
    dry_run: bool,
) -> Result<Accepted, Refusal> {
    let path = parse_remote(dest)?;
    if path.is_root() {
        return Err(Refusal::new(RefusalReason::RootPath));
    }
    let prefix: Vec<Vec<u8>> = path.components().map(<[u8]>::to_vec).collect();
    let parents: Vec<&[u8]> = prefix[..prefix.len() - 1]
        .iter()
        .map(Vec::as_slice)
        .collect();
    let base = fsx::open_dir_beneath(root.as_fd(), &[])
        .map_err(|e| Refusal::new(RefusalReason::RootUnavailable(e)))?;
    if !dry_run {
        fsx::create_dirs_beneath(root.as_fd(), &parents, 0o755).map_err(|error| {
            let op = Op::Create;
            Refusal::of_path(&parents.join(&b'/'), RefusalReason::Io { op, error })
        })?;
    }
    let mut dest = Destination::plain(base, prefix, path.display());
    // Entries carry owners unless the client said --no-owner.
    dest.owners = fsx::may_chown();
    dest.devices = devices && fsx::may_chown();
    // The user is at the client.
    dest.tell_sender = true;
    Ok(Accepted::Receive(Box::new(dest)))
}

/// An upload's `source_name`: one component, as an entry's name would
/// be (under it, a root that is not a directory goes inside an existing
/// directory at `dest`).
fn one_name(name: &[u8]) -> Result<Vec<u8>, Refusal> {
    let path = parse_remote(name)?;
    let mut components = path.components();
    match (components.next(), components.next()) {
        (Some(one), None) => Ok(one.to_vec()),
        _ => Err(Refusal::of_path(name, RefusalReason::SourceName)),
    }
}

/// A download of `source`, confined to the root.
fn accept_download(
    root: &OwnedFd,
    source: &[u8],
    compression: Compression,
    owners: bool,
    filter: Filter,
) -> Result<SendJob, Refusal> {
    if let Compression::Level(level) = compression
        && !(1..=19).contains(&level)
    {
        // About the request, not its path.
        return Err(Refusal::new(RefusalReason::CompressionLevel(level)));
    }
    let path = parse_remote(source)?;
    let root_entry = fsx::open_confined_root(root.as_fd(), &path).map_err(|error| {
        let op = Op::Open;
        Refusal::of_path(path.as_bytes(), RefusalReason::Io { op, error })
    })?;
    Ok(SendJob {
        root: root_entry,
        compression,
        local_peer: false,
        lanes: 0,
        label: path.display(),
        // The client cannot tell us whether it shows progress: count.
        early_totals: true,
        owners,
        filter,
        bwlimit: None,
        // A downloading client mirrors on its own, after `done`.
        mirror: false,
        itemize: false,
        atomic: false,
        checksum: false,
        dest_label: String::new(),
    })
}

/// Refuse a request with a reason the client will show its user.
async fn refuse<T, W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    refusal: Refusal,
) -> Result<T, EngineError> {
    warn!("refused: {refusal}");
    writer.send_now(&refusal.message()).await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), writer.shutdown()).await;
    Err(EngineError::RefusedPeer(refusal))
}

/// Attach a data connection to its session, which then owns it.
async fn join(
    reader: FrameReader<BoxRead>,
    mut writer: FrameWriter<BoxWrite>,
    registry: &Registry,
    session_id: &str,
    secret: &str,
) -> Result<(), EngineError> {
    let joins = {
        let mut sessions = lock(registry);
        match sessions.get_mut(session_id) {
            Some(slot) if same_secret(&slot.secret, secret) && slot.joined + 1 < MAX_STREAMS => {
                slot.joined += 1;
                Some(slot.joins.clone())
            }
            _ => None,
        }
    };
    let Some(joins) = joins else {
        return refuse(&mut writer, Refusal::new(RefusalReason::CannotJoin)).await;
    };
    writer.send_now(&Message::Joined).await?;
    info!(session = %escape(session_id.as_bytes()), "data connection joined");
    joins
        .send(DataConn { reader, writer })
        .await
        .map_err(|_| EngineError::Closed)
}

/// 128 random bits, hex: session ids and the secrets that join them. A
/// secret must be unguessable, so there is no fallback: without the
/// kernel's random source the session is refused.
fn random_hex() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_names_its_source_in_one_component() {
        assert_eq!(one_name(b"f.txt").ok(), Some(b"f.txt".to_vec()));
        assert_eq!(one_name(b".f").ok(), Some(b".f".to_vec()));
        for bad in [&b"a/b"[..], b"", b"..", b"/x", b"a/", b"a\0b"] {
            let refused = one_name(bad).err().map(|r| r.code());
            assert_eq!(refused, Some(ErrorCode::BadPath), "{}", escape(bad));
        }
    }
}

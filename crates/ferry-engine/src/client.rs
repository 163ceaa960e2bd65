//! The client: connect, shake hands, ask, then send or receive; and try
//! again when the connection breaks.
//!
//! A retry is a new session for the same request. It costs little: the
//! receiver skips files it already holds (same size and mtime) and resumes
//! large files from their journals, so only what is missing moves again.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::message::{Compression, ErrorCode, FilterRule, Keep, Message, Mirror};
use ferry_proto::path::{WireBytes, WirePath, escape};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::{self, EXPORTER_LABEL, EXPORTER_LEN, Token};
use crate::conn::{
    BoxRead, BoxWrite, DataConn, FrameReader, FrameWriter, HANDSHAKE_TIMEOUT, Meter, check_version,
    watch_for_stall,
};
use crate::error::{ConnectError, EngineError, LocalCause, Op, Side, TlsError, Violation};
use crate::events::{Event, EventSink, Failure, Tally, TransferReport, TransferSummary};
use crate::filter::Filter;
use crate::fsx;
use crate::progress::Progress;
use crate::receiver::{Destination, LinkDest, Pruning, Publish, run_receiver};
use crate::sender::{BeforeReplies, SendJob, lane_count, run_sender};
use crate::throttle;
use crate::tls::ClientTls;
use crate::widen::{self, Widening};

/// How long to wait for a TCP connection to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server is and how to talk to it.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port`, as given by the user (a name or an address).
    pub addr: String,
    pub compression: Compression,
    /// Connections for the session, the control one included (at least 1;
    /// the server may allow fewer).
    pub streams: u32,
    /// Double the connections beyond `streams` while that raises the
    /// session's rate, over a loss-based congestion control (see
    /// [`crate::widen`]), up to
    /// [`MAX_WIDE_STREAMS`](crate::widen::MAX_WIDE_STREAMS); never to a
    /// server on this host.
    pub widen_streams: bool,
    /// Count an upload's tree before sending, so that progress shows totals
    /// from the start. Costs a stat of every entry: worth it only when
    /// someone watches the progress.
    pub early_totals: bool,
    /// Send every file, even those the receiver has with the same size
    /// and mtime.
    pub ignore_times: bool,
    /// Preserve owners (by number) where the receiver can apply them: a
    /// server or a downloading client that runs as root.
    pub owners: bool,
    /// Make device nodes when this client receives (downloads) as root.
    pub devices: bool,
    /// What the sender leaves out, in order (the first matching rule
    /// decides), and whether it honours the tree's `.gitignore` files.
    pub filters: Vec<FilterRule>,
    pub gitignore: bool,
    /// `--bwlimit`: the sender (this client, or the server for a
    /// download) stays under this many bytes per second.
    pub bwlimit: Option<u64>,
    /// `--delete`: the receiver deletes what the source does not have
    /// (the filters of the transfer are filled in from `filters`).
    pub mirror: Option<Mirror>,
    /// `--itemize`: report what each entry changes in the destination.
    pub itemize: bool,
    /// `--dry-run`: change nothing on either side; report what would
    /// change (as `itemize` does) and what would be deleted.
    pub dry_run: bool,
    /// `--atomic`: the new version is assembled beside the live tree and
    /// switched in by one rename once whole (it mirrors the source).
    pub atomic: bool,
    /// `--checksum`: a file is unchanged when its content is the same,
    /// whatever its mtime; both sides read every file of the same size.
    pub checksum: bool,
    /// `ferry ls`: a download that only lists what it is sent.
    pub listing: bool,
    /// `ferry backup`: the remote path is a directory of snapshots, and the
    /// upload makes a new one (published atomically), keeping these.
    pub backup: Option<Keep>,
    /// `--link-dest`: trees whose unchanged files the receiver hard-links
    /// instead of receiving: paths on the server for an upload, local
    /// paths for a download.
    pub link_dest: Vec<Vec<u8>>,
    /// `--whole-file`: no delta transfer; a changed file travels whole
    /// even when the receiver holds another version of it.
    pub whole_file: bool,
    /// How often a failed attempt is tried again in a row before giving
    /// up; an attempt that made progress resets the count.
    pub retries: u32,
    /// A session that makes no progress for this long has stalled.
    pub timeout: Duration,
    /// TLS and what to trust; `None` speaks plain TCP (`--no-tls`).
    pub tls: Option<ClientTls>,
    /// The token to prove if the server asks for one.
    pub token: Option<Token>,
    /// With no `token`: the token of this user's own server (the `token`
    /// file in the state directory `tls` was made with), proved only to
    /// that server, known by its certificate. Without TLS nothing tells
    /// which server answered, so it is offered to none.
    pub own_token: Option<Token>,
}

impl ClientConfig {
    /// What the receiver mirrors: `--delete`'s, or an atomic publish's
    /// (the new version is the source, exactly).
    fn mirrored(&self) -> Option<Mirror> {
        match (&self.mirror, self.publishes()) {
            (Some(m), _) => Some(m.clone()),
            (None, true) => Some(Mirror::default()),
            (None, false) => None,
        }
    }

    /// Whether the receiver publishes atomically (`--atomic`, a backup).
    fn publishes(&self) -> bool {
        self.atomic || self.backup.is_some()
    }
}

/// The first pause between attempts; it doubles after each attempt that
/// made no progress, up to `MAX_BACKOFF`. With the default 12 retries the
/// pauses add up to about 3.5 minutes (at least 2.6 with the jitter).
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The default number of retries in a row without progress.
pub const DEFAULT_RETRIES: u32 = 12;
/// The default stall timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The default number of connections: one per core, at most 8. More
/// connections than cores add context switches and no parallelism on the
/// CPU side, while a few already fill a long fat link.
pub fn default_streams() -> u32 {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8) as u32)
}

/// What identifies a session to the connections that join it.
#[derive(Clone)]
struct SessionKey {
    id: String,
    secret: String,
    max_streams: u32,
}

struct Connection {
    reader: FrameReader<BoxRead>,
    writer: FrameWriter<BoxWrite>,
    /// Bytes over all of the session's connections.
    meter: Meter,
    /// Whether the server is on this host (a loopback address).
    local_peer: bool,
    /// Whether the connection's congestion control is loss-based.
    loss_based: bool,
}

/// A connection ready for its first message.
struct Connected {
    reader: FrameReader<BoxRead>,
    writer: FrameWriter<BoxWrite>,
    /// The TLS channel binding (empty without TLS).
    exporter: Vec<u8>,
    /// Whether the server showed this user's own server's certificate.
    own_server: bool,
    /// Whether the server is on this host (a loopback address).
    local_peer: bool,
    /// Whether the connection's congestion control is loss-based (not
    /// BBR): over a long lossy path more connections would pay.
    loss_based: bool,
}

/// Connect, with our preface queued: a connection ready for its first
/// message (see [`first_reply`]).
async fn connect(
    addr: &str,
    tls: Option<&ClientTls>,
    meter: &Meter,
) -> Result<Connected, EngineError> {
    let connect_error = |cause| EngineError::Connect {
        addr: addr.to_string(),
        cause,
    };
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Err(_) => {
            let waited = CONNECT_TIMEOUT.as_secs();
            return Err(connect_error(ConnectError::TimedOut(waited)));
        }
        Ok(Err(e)) => return Err(connect_error(ConnectError::Io(e))),
        Ok(Ok(s)) => s,
    };
    crate::conn::tune(&stream);
    let local_peer = stream.peer_addr().is_ok_and(|a| a.ip().is_loopback());
    let loss_based =
        rustix::net::sockopt::tcp_congestion(&stream).is_ok_and(|cc| !cc.starts_with("bbr"));
    let mut exporter = Vec::new();
    let mut own_server = false;
    let (r, w): (BoxRead, BoxWrite) = match tls {
        None => {
            let (r, w) = stream.into_split();
            (Box::new(r), Box::new(w))
        }
        Some(tls) => {
            let handshake = tls.connector().connect(ClientTls::server_name(), stream);
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Err(_) => return Err(EngineError::Timeout(HANDSHAKE_TIMEOUT.as_secs())),
                Ok(Err(e)) => {
                    return Err(tls.refusal().unwrap_or_else(|| handshake_error(addr, e)));
                }
                Ok(Ok(s)) => s,
            };
            let session = stream.get_ref().1;
            exporter = session
                .export_keying_material(vec![0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
                .map_err(|e| EngineError::Tls(e.into()))?;
            own_server = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .is_some_and(|cert| tls.is_own(cert));
            let (r, w) = tokio::io::split(stream);
            (Box::new(r), Box::new(w))
        }
    };
    let reader = FrameReader::new(r, meter.clone(), Side::Server);
    let mut writer = FrameWriter::new(w, meter.clone());
    // It goes with the first message, and the server's preface is read
    // with the first answer: no round trip of their own.
    writer.queue_preface().await?;
    Ok(Connected {
        reader,
        writer,
        exporter,
        own_server,
        local_peer,
        loss_based,
    })
}

/// Why a TLS handshake failed, in the user's words. A peer that answers
/// a TLS hello with bytes that are not even a TLS record header is a ferry
/// server running with `--no-tls` (it answers with its plaintext preface,
/// `F` where a record type should be): trying again would not help. Other
/// malformed records may be damage on the way, and are worth a retry.
fn handshake_error(addr: &str, e: std::io::Error) -> EngineError {
    use rustls::InvalidMessage::{InvalidContentType, UnknownProtocolVersion};
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidMessage(InvalidContentType | UnknownProtocolVersion)) => {
            EngineError::NotTls {
                addr: addr.to_string(),
            }
        }
        Some(tls) => EngineError::Tls(TlsError::Rustls(tls.clone())),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            EngineError::Tls(TlsError::ClosedInHandshake)
        }
        None => EngineError::Tls(TlsError::Io(e)),
    }
}

/// The peer's next message, within the handshake timeout.
async fn reply(reader: &mut FrameReader<BoxRead>) -> Result<Message, EngineError> {
    reply_within(reader, HANDSHAKE_TIMEOUT).await
}

/// The server's preface, checked, then its first message, within
/// `timeout` in all.
async fn first_reply(
    reader: &mut FrameReader<BoxRead>,
    timeout: Duration,
) -> Result<Message, EngineError> {
    let answer = async {
        check_version(reader.preface().await?)?;
        reader.message().await
    };
    tokio::time::timeout(timeout, answer)
        .await
        .map_err(|_| EngineError::Timeout(timeout.as_secs()))?
}

async fn reply_within(
    reader: &mut FrameReader<BoxRead>,
    timeout: Duration,
) -> Result<Message, EngineError> {
    tokio::time::timeout(timeout, reader.message())
        .await
        .map_err(|_| EngineError::Timeout(timeout.as_secs()))?
}

/// Open a data connection and attach it to `session`.
async fn join(
    addr: &str,
    tls: Option<&ClientTls>,
    session: &SessionKey,
    meter: &Meter,
) -> Result<DataConn, EngineError> {
    let Connected {
        mut reader,
        mut writer,
        ..
    } = connect(addr, tls, meter).await?;
    writer
        .send_now(&Message::Join {
            session_id: session.id.clone(),
            secret: session.secret.clone(),
        })
        .await?;
    match first_reply(&mut reader, HANDSHAKE_TIMEOUT).await? {
        Message::Joined => Ok(DataConn { reader, writer }),
        other => Err(Violation::Expected {
            expected: "joined",
            got: other.name(),
        }
        .into()),
    }
}

/// Say hello and make `request`, proving the token (`token`, else `own`
/// to this user's own server). The request is sent at once, with the
/// hello, whenever no challenge can come between them: with TLS the proof
/// goes in the hello (the exporter binds it to this connection), and a
/// client without a token could not answer a challenge anyway. Then the
/// answers are not read here ([`Greeted::Pipelined`]). Only a client with
/// a token and no TLS waits for the challenge's nonce, and answers it with
/// its proof and its request together ([`Greeted::Proved`]). Either way
/// the transfer may start before `welcome` is read.
async fn greet(
    conn: &mut Connected,
    (token, own): (Option<&Token>, Option<&Token>),
    request: &Message,
) -> Result<Greeted, EngineError> {
    let token = token.or(own.filter(|_| conn.own_server));
    let early = token
        .filter(|_| !conn.exporter.is_empty())
        .map(|t| t.mac(&[], &conn.exporter));
    let pipelined = early.is_some() || token.is_none();
    let software = crate::SOFTWARE.to_string();
    conn.writer
        .send(&Message::Hello {
            software,
            mac: early,
        })
        .await?;
    if pipelined {
        conn.writer.send(request).await?;
        conn.writer.flush().await?;
        return Ok(Greeted::Pipelined);
    }
    conn.writer.flush().await?;
    let nonce = match first_reply(&mut conn.reader, HANDSHAKE_TIMEOUT).await? {
        Message::Challenge { nonce } => nonce,
        other => return Ok(Greeted::Answered(other)),
    };
    let mac = proof(token, &nonce, &conn.exporter)?;
    conn.writer.send(&Message::Auth { mac }).await?;
    conn.writer.send(request).await?;
    conn.writer.flush().await?;
    Ok(Greeted::Proved)
}

/// How far [`greet`] read the server's answers; the request is sent.
enum Greeted {
    /// Not at all: its preface and `welcome` are still to come.
    Pipelined,
    /// Its preface and `challenge`: `welcome` is still to come.
    Proved,
    /// Its preface and its answer to the hello (`welcome`, unless it
    /// refused).
    Answered(Message),
}

/// A server answers a wrong token only after a delay of up to MAX_DELAY:
/// wait for it, or a mistyped token would look like a stalled server and
/// be retried, failing again each time.
const AUTH_PATIENCE: Duration = HANDSHAKE_TIMEOUT.saturating_add(throttle::MAX_DELAY);

/// A refused proof is final: a wrong token stays wrong, not worth a retry.
fn refused_if_denied(answer: Result<Message, EngineError>) -> Result<Message, EngineError> {
    match answer {
        Err(EngineError::Remote(failure)) if failure.code == ErrorCode::PermissionDenied => {
            Err(EngineError::Refused(failure))
        }
        other => other,
    }
}

/// The session a `welcome` opens, or why there is none: a `challenge` to
/// a client that sent its request without a proof means it has no token.
fn session_of(answer: Message) -> Result<SessionKey, EngineError> {
    match answer {
        Message::Welcome {
            session_id,
            secret,
            max_streams,
            ..
        } => Ok(SessionKey {
            id: session_id,
            secret,
            max_streams,
        }),
        Message::Challenge { .. } => Err(EngineError::TokenRequired),
        other => Err(Violation::Expected {
            expected: "welcome",
            got: other.name(),
        }
        .into()),
    }
}

/// Read the server's answers before the transfer, as far as [`greet`]
/// did not: its preface, `welcome`, then `ready`. The session's key.
async fn accept(
    reader: &mut FrameReader<BoxRead>,
    greeted: Greeted,
) -> Result<SessionKey, EngineError> {
    let welcome = match greeted {
        Greeted::Pipelined => refused_if_denied(first_reply(reader, AUTH_PATIENCE).await)?,
        Greeted::Proved => refused_if_denied(reply_within(reader, AUTH_PATIENCE).await)?,
        Greeted::Answered(answer) => answer,
    };
    let key = session_of(welcome)?;
    accepted(reader).await?;
    Ok(key)
}

/// What opening a session's data connections takes.
#[derive(Clone)]
struct JoinPlan {
    addr: String,
    tls: Option<ClientTls>,
    streams: u32,
    /// Open more while they pay (see [`crate::widen`]).
    widen: bool,
    meter: Meter,
}

/// The shortest window widening measures the session's rate over: long
/// enough for a new connection's handshake and start-up at 100 ms RTT to
/// show; and the bytes per connection it must have moved (see
/// [`JoinPlan::keep_widening`]). It looks this often whether one is over.
const WIDEN_WINDOW: Duration = Duration::from_secs(1);
const WIDEN_WINDOW_BYTES: u64 = 1 << 20;
const WIDEN_POLL: Duration = Duration::from_millis(100);

impl JoinPlan {
    /// Connections widen only over a loss-based congestion control (see
    /// [`crate::widen`]), and never to a server on this host: there the
    /// link is memory, and the cores are what limit.
    fn of(config: &ClientConfig, conn: &Connection) -> JoinPlan {
        JoinPlan {
            addr: config.addr.clone(),
            tls: config.tls.clone(),
            streams: config.streams,
            widen: config.widen_streams && conn.loss_based && !conn.local_peer,
            meter: conn.meter.clone(),
        }
    }

    /// Open the session's data connections in the background, each handed
    /// to `joins` once it has joined: the transfer starts on the control
    /// connection and widens as they come, and then for as long as new
    /// connections pay.
    fn spawn(self, key: &SessionKey, joins: mpsc::Sender<DataConn>) {
        let start = self.streams.min(key.max_streams);
        for _ in 1..start {
            self.join_one(key, &joins);
        }
        if self.widen {
            let max = widen::MAX_WIDE_STREAMS.min(key.max_streams);
            let key = key.clone();
            tokio::spawn(async move { self.keep_widening(start, max, &key, joins).await });
        }
    }

    fn join_one(&self, key: &SessionKey, joins: &mpsc::Sender<DataConn>) {
        let (addr, key, joins) = (self.addr.clone(), key.clone(), joins.clone());
        let (tls, meter) = (self.tls.clone(), self.meter.clone());
        tokio::spawn(async move {
            match join(&addr, tls.as_ref(), &key, &meter).await {
                Ok(conn) => {
                    let _ = joins.send(conn).await;
                }
                // One connection fewer is slower, not wrong; and a session
                // that ended meanwhile wants none.
                Err(e) if !joins.is_closed() => {
                    tracing::warn!("a data connection could not join: {e}")
                }
                Err(_) => {}
            }
        });
    }

    /// Open one more connection whenever [`Widening`] says so, until it is
    /// done or the session ends. The meter counts what is written in steps
    /// of up to 256 KiB, so a window lasts until it moved
    /// [`WIDEN_WINDOW_BYTES`] per connection: then a step in flight on each
    /// connection is at most a quarter of what it measures.
    async fn keep_widening(
        self,
        start: u32,
        max: u32,
        key: &SessionKey,
        joins: mpsc::Sender<DataConn>,
    ) {
        let mut widening = Widening::new(start, max);
        let moved = || self.meter.load(std::sync::atomic::Ordering::Relaxed);
        let mut last = (Instant::now(), moved());
        while !widening.done() && !joins.is_closed() {
            tokio::time::sleep(WIDEN_POLL).await;
            let now = (Instant::now(), moved());
            let (secs, bytes) = (now.0.duration_since(last.0), now.1 - last.1);
            let enough = WIDEN_WINDOW_BYTES * u64::from(widening.streams());
            if secs < WIDEN_WINDOW || bytes < enough {
                continue;
            }
            let secs = secs.as_secs_f64();
            tracing::trace!(
                streams = widening.streams(),
                rate = bytes as f64 / secs,
                "window"
            );
            let more = widening.observe(bytes, secs);
            if more > 0 {
                tracing::debug!(streams = widening.streams(), "widening");
            }
            for _ in 0..more {
                self.join_one(key, &joins);
            }
            last = now;
        }
    }
}

/// Wait for the server to accept the request.
async fn accepted(reader: &mut FrameReader<BoxRead>) -> Result<(), EngineError> {
    let reply = match reply(reader).await {
        // A refusal is final, unless the server is only going away.
        Err(EngineError::Remote(failure)) if failure.code != ErrorCode::ShuttingDown => {
            return Err(EngineError::Refused(failure));
        }
        other => other?,
    };
    match reply {
        Message::Ready => Ok(()),
        other => Err(Violation::Expected {
            expected: "ready",
            got: other.name(),
        }
        .into()),
    }
}

/// The answer to the challenge `nonce` (hex) on a connection whose channel
/// binding is `exporter`.
fn proof(token: Option<&Token>, nonce: &str, exporter: &[u8]) -> Result<String, EngineError> {
    let Some(token) = token else {
        return Err(EngineError::TokenRequired);
    };
    let nonce = auth::unhex(nonce).ok_or(Violation::BadChallenge)?;
    Ok(token.mac(&nonce, exporter))
}

impl Connection {
    /// Open a session and make `request` (see [`greet`]): what the server
    /// answers is read by [`accept`], as far as [`greet`] has not.
    async fn open(
        config: &ClientConfig,
        meter: Meter,
        events: &dyn EventSink,
        request: &Message,
    ) -> Result<(Self, Greeted), EngineError> {
        let (addr, tls) = (config.addr.as_str(), config.tls.as_ref());
        let mut conn = connect(addr, tls, &meter).await?;
        if let Some(new) = tls.map(ClientTls::remember).transpose()?.flatten() {
            events.event(Event::NewServer {
                addr: addr.to_string(),
                fingerprint: new.fingerprint,
                file: new.file,
            });
        }
        let tokens = (config.token.as_ref(), config.own_token.as_ref());
        let greeted = greet(&mut conn, tokens, request).await?;
        let conn = Connection {
            reader: conn.reader,
            writer: conn.writer,
            meter,
            local_peer: conn.local_peer,
            loss_based: conn.loss_based,
        };
        Ok((conn, greeted))
    }

    /// Open a session, have `request` accepted, and start joining its data
    /// connections.
    async fn start(
        config: &ClientConfig,
        session: &Session,
        request: &Message,
        events: &dyn EventSink,
    ) -> Result<(Self, mpsc::Receiver<DataConn>), EngineError> {
        let (mut conn, greeted) =
            Connection::open(config, session.meter.clone(), events, request).await?;
        let key = accept(&mut conn.reader, greeted).await?;
        let (joins, joined) = mpsc::channel(ferry_proto::limits::MAX_STREAMS as usize);
        JoinPlan::of(config, &conn).spawn(&key, joins);
        Ok((conn, joined))
    }

    /// End the session's control connection, passing on the result. After
    /// a failure nothing more is flushed: the connection may be the very
    /// thing that stalled.
    async fn finish(mut self, result: Result<(), EngineError>) -> Result<(), EngineError> {
        if result.is_ok() {
            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.writer.shutdown()).await;
        }
        result
    }
}

/// Send the local file or tree at `local` to `remote` (relative to the
/// server's root; the copy itself, not a directory to put it in).
pub async fn upload(
    config: &ClientConfig,
    local: &Path,
    remote: &[u8],
    events: Arc<dyn EventSink>,
    cancel: &CancellationToken,
) -> Result<TransferSummary, EngineError> {
    with_retries(config, events, cancel, |tally, session| {
        upload_once(config, local, remote, tally, session)
    })
    .await
}

/// Switch back the previous version an atomic publish kept of `remote`
/// (the live one takes its place, so a second rollback undoes the first).
pub async fn rollback(
    config: &ClientConfig,
    remote: &[u8],
    events: Arc<dyn EventSink>,
    cancel: &CancellationToken,
) -> Result<TransferSummary, EngineError> {
    let single = ClientConfig {
        streams: 1,
        widen_streams: false,
        ..config.clone()
    };
    let request = Message::Rollback {
        dest: WireBytes(remote.to_vec()),
    };
    with_retries(&single, events, cancel, |tally, session| {
        let (single, request) = (&single, &request);
        async move {
            let (mut conn, greeted) =
                Connection::open(single, session.meter.clone(), &*tally, request).await?;
            accept(&mut conn.reader, greeted).await?;
            conn.finish(Ok(())).await
        }
    })
    .await
}

/// Switch back the previous version an atomic publish kept of the local
/// tree at `path`.
pub fn rollback_local(path: &Path) -> Result<(), EngineError> {
    let shown = || escape(path.as_os_str().as_bytes());
    let dest = local_destination(path, shown(), true)?;
    crate::receiver::publish::roll_back(std::os::fd::AsFd::as_fd(&dest.base), &dest.prefix)
        .map_err(|e| EngineError::local(shown(), Op::Rename, LocalCause::Io(e)))
}

/// List the remote file or tree at `remote`: each entry is an
/// [`Event::Listed`]; nothing is written here, and no file data is sent.
pub async fn list(
    config: &ClientConfig,
    remote: &[u8],
    events: Arc<dyn EventSink>,
    cancel: &CancellationToken,
) -> Result<TransferSummary, EngineError> {
    let listing = ClientConfig {
        dry_run: true,
        listing: true,
        owners: false,
        mirror: None,
        atomic: false,
        checksum: false,
        ..config.clone()
    };
    // A name no listing ever creates or looks at.
    let nowhere = Path::new(".ferry-listing");
    with_retries(&listing, events, cancel, |tally, session| {
        download_once(&listing, remote, nowhere, tally, session)
    })
    .await
}

/// Fetch the remote file or tree at `remote` into `local` (the copy itself;
/// missing parent directories are created).
pub async fn download(
    config: &ClientConfig,
    remote: &[u8],
    local: &Path,
    events: Arc<dyn EventSink>,
    cancel: &CancellationToken,
) -> Result<TransferSummary, EngineError> {
    with_retries(config, events, cancel, |tally, session| {
        download_once(config, remote, local, tally, session)
    })
    .await
}

/// One attempt at an upload.
async fn upload_once(
    config: &ClientConfig,
    local: &Path,
    remote: &[u8],
    tally: Arc<Tally>,
    session: Session,
) -> Result<(), EngineError> {
    let filter = Filter::new(&config.filters, config.gitignore)?;
    let root = fsx::open_local_root(local)
        .map_err(|e| EngineError::local(escape(local.as_os_str().as_bytes()), Op::Open, e))?;
    let request = Message::Upload {
        dest: WireBytes(remote.to_vec()),
        ignore_times: config.ignore_times,
        mirror: config.mirrored().map(|m| Mirror {
            filters: config.filters.clone(),
            gitignore: config.gitignore,
            ..m
        }),
        itemize: config.itemize || config.dry_run,
        dry_run: config.dry_run,
        atomic: config.atomic,
        checksum: config.checksum,
        // A file goes inside `remote` if that is a directory already.
        source_name: local.file_name().map(|n| WireBytes(n.as_bytes().to_vec())),
        link_dest: config.link_dest.iter().cloned().map(WireBytes).collect(),
        backup: config.backup,
        whole_file: config.whole_file,
    };
    let (mut conn, greeted) =
        Connection::open(config, session.meter.clone(), &*tally, &request).await?;
    // The transfer starts at once; the server's answers to the hello and
    // the request are read meanwhile, and then the data connections join.
    let (joins, joined) = mpsc::channel(ferry_proto::limits::MAX_STREAMS as usize);
    let plan = JoinPlan::of(config, &conn);
    let accepted: BeforeReplies<BoxRead> = Box::new(move |reader| {
        Box::pin(async move {
            let key = accept(reader, greeted).await?;
            plan.spawn(&key, joins);
            Ok(())
        })
    });
    let job = SendJob {
        root,
        compression: config.compression,
        local_peer: conn.local_peer,
        lanes: lane_count(),
        label: escape(local.as_os_str().as_bytes()),
        early_totals: config.early_totals,
        owners: config.owners,
        filter,
        bwlimit: config.bwlimit,
        mirror: config.mirrored().is_some(),
        itemize: config.itemize || config.dry_run,
        atomic: config.publishes() && !config.dry_run,
        checksum: config.checksum,
        dest_label: escape(remote),
    };
    let result = session
        .watched(config.timeout, async |cancel| {
            let conn = (&mut conn.reader, &mut conn.writer);
            run_sender(conn, job, tally, cancel, (Some(accepted), joined)).await
        })
        .await;
    conn.finish(result).await
}

/// One attempt at a download.
async fn download_once(
    config: &ClientConfig,
    remote: &[u8],
    local: &Path,
    tally: Arc<Tally>,
    session: Session,
) -> Result<(), EngineError> {
    // The server checks the rules too; a wrong one is the user's to fix
    // before anything connects.
    let filter = Filter::new(&config.filters, config.gitignore)?;
    let mut dest = local_destination(local, escape(remote), config.dry_run)?;
    dest.itemize = config.itemize || config.dry_run;
    dest.dry_run = config.dry_run;
    dest.checksum = config.checksum;
    dest.listing = config.listing;
    dest.link_dests = local_link_dests(&config.link_dest)?;
    dest.delta = !config.whole_file;
    if config.atomic && !config.dry_run {
        let (staging, publish) = Publish::of(&dest.prefix).ok_or(EngineError::Closed)?;
        let base = dest.base.try_clone().map_err(EngineError::from)?;
        let live = LinkDest::new(base, publish.live());
        dest.link_dests.insert(0, live);
        dest.prefix = staging;
        dest.publish = Some(publish);
    }
    dest.pruning = config.mirrored().map(|m| Pruning {
        max_delete: m.max_delete,
        delete_excluded: m.delete_excluded,
        filter,
        tell_sender: false,
        label: escape(local.as_os_str().as_bytes()),
    });
    // A file goes inside `local` if that is a directory already.
    dest.inside = WirePath::parse(remote)
        .ok()
        .and_then(|path| path.components().last().map(<[u8]>::to_vec));
    dest.ignore_times = config.ignore_times;
    dest.owners = config.owners && fsx::may_chown();
    dest.devices = config.devices && fsx::may_chown();
    let request = Message::Download {
        source: WireBytes(remote.to_vec()),
        compression: config.compression,
        ignore_times: config.ignore_times,
        owners: dest.owners,
        filters: config.filters.clone(),
        gitignore: config.gitignore,
        bwlimit: config.bwlimit,
        checksum: config.checksum,
    };
    let (mut conn, joins) = Connection::start(config, &session, &request, &*tally).await?;
    let result = session
        .watched(config.timeout, async |cancel| {
            run_receiver(
                &mut conn.reader,
                &mut conn.writer,
                dest,
                tally,
                cancel,
                joins,
            )
            .await
        })
        .await;
    conn.finish(result).await
}

/// What one attempt runs under: the user's cancellation, a byte meter
/// over all of its connections, and what its stall watch reads.
struct Session {
    cancel: CancellationToken,
    meter: Meter,
    progress: Arc<Progress>,
}

impl Session {
    /// Run `transfer` under a stall watch: when it makes no progress for
    /// `timeout` (keepalives alone stand in for progress only so long),
    /// it is cancelled and the attempt fails as stalled.
    async fn watched<F>(&self, timeout: Duration, transfer: F) -> Result<(), EngineError>
    where
        F: AsyncFnOnce(&CancellationToken) -> Result<(), EngineError>,
    {
        let token = self.cancel.child_token();
        let stalled = watch_for_stall(self.progress.clone(), timeout, token.clone());
        let result = transfer(&token).await;
        token.cancel(); // ends the watch
        match result {
            Err(EngineError::Cancelled) if stalled.load(std::sync::atomic::Ordering::Acquire) => {
                Err(EngineError::Stalled(timeout.as_secs()))
            }
            other => other,
        }
    }
}

/// Run attempts of one transfer until one completes, the error is not
/// worth retrying, or `config.retries` attempts in a row made no progress.
///
/// A failure to reach the server on the very first attempt is not
/// retried: it is far more likely a wrong host or port than a blip, and
/// the user should hear so at once (as from rsync or scp). Once a session
/// has worked, the server may restart, and the retries wait for it.
async fn with_retries<F, Fut>(
    config: &ClientConfig,
    events: Arc<dyn EventSink>,
    cancel: &CancellationToken,
    mut attempt: F,
) -> Result<TransferSummary, EngineError>
where
    F: FnMut(Arc<Tally>, Session) -> Fut,
    Fut: Future<Output = Result<(), EngineError>>,
{
    let started = Instant::now();
    let (mut file_bytes, mut wire_bytes) = (0, 0);
    let mut retries = 0u32;
    // Failed attempts in a row; one that made progress counts as the
    // first of a new row, so a transfer that keeps moving keeps going.
    let mut failures = 0u32;
    let mut reached_server = false;
    // An entry that vanished is not met again by the next attempt's walk:
    // it is remembered from the attempt that met it.
    let mut vanished = Vec::new();
    loop {
        let progress = Arc::new(Progress::default());
        let tally = Arc::new(Tally::new(events.clone()).watched(progress.clone()));
        let meter = Meter::default();
        let session = Session {
            cancel: cancel.clone(),
            meter: meter.clone(),
            progress,
        };
        let result = attempt(tally.clone(), session).await;
        let moved = meter.load(std::sync::atomic::Ordering::Relaxed);
        wire_bytes += moved;
        reached_server |= moved > 0;
        let mut report = tally.report();
        vanished.append(&mut report.vanished);
        file_bytes += report.file_bytes;
        let progress = report.file_bytes > 0 || report.files_ok > 0;
        failures = if progress { 1 } else { failures + 1 };
        let why = retry_reason(&result, &report, reached_server);
        let give_up = failures > config.retries || cancel.is_cancelled();
        match why {
            Some(why) if !give_up => {
                retries += 1;
                let delay = backoff(failures);
                tracing::warn!("attempt {retries} failed: {why}; retrying in {delay:.1?}");
                events.event(Event::Retry {
                    attempt: retries,
                    delay,
                    reason: why,
                });
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = cancel.cancelled() => return Err(EngineError::Cancelled),
                }
            }
            _ => {
                result?;
                // What could not be completed counts as failed in the end.
                report.give_up_incomplete();
                report.vanished = vanished;
                report.file_bytes = file_bytes;
                report.wire_bytes = wire_bytes;
                report.retries = retries;
                return Ok(TransferSummary {
                    report,
                    elapsed: started.elapsed(),
                });
            }
        }
    }
}

/// Why another attempt may do better than this one, if it may: files
/// that may arrive if sent again, or a failure that may pass. A first
/// attempt that reached no server at all is not retried (a wrong host or
/// port should fail at once).
fn retry_reason(
    result: &Result<(), EngineError>,
    report: &TransferReport,
    reached_server: bool,
) -> Option<String> {
    match result {
        Ok(()) if report.incomplete.is_empty() => None,
        Ok(()) => {
            let Failure { path, reason, .. } = &report.incomplete[0];
            let more = report.incomplete.len() - 1;
            let others = if more > 0 {
                format!(" (and {more} more)")
            } else {
                String::new()
            };
            Some(format!("{path}: {reason}{others}"))
        }
        Err(EngineError::Connect { .. }) if !reached_server => None,
        Err(e) if e.is_transient() => Some(e.to_string()),
        Err(_) => None,
    }
}

/// The pause after `failures` failed attempts in a row: exponential,
/// capped, with ±25% jitter so that many clients cut off at once do not
/// all come back at once.
fn backoff(failures: u32) -> Duration {
    let base = FIRST_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(16));
    let base = base.min(MAX_BACKOFF);
    let noise = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().rotate_left(16);
    let spread = f64::from(ferry_proto::digest::chunk_hash(&noise.to_le_bytes()) as u32)
        / f64::from(u32::MAX);
    base.mul_f64(0.75 + 0.5 * spread)
}

/// A download's `--link-dest` trees: local directories, each opened (a
/// missing one is the user's to fix).
fn local_link_dests(dirs: &[Vec<u8>]) -> Result<Vec<LinkDest>, EngineError> {
    dirs.iter()
        .map(|dir| {
            let path = Path::new(std::ffi::OsStr::from_bytes(dir));
            let flags = rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC;
            let base = rustix::fs::open(path, flags, rustix::fs::Mode::empty())
                .map_err(|e| EngineError::local(escape(dir), Op::Open, LocalCause::Io(e.into())))?;
            Ok(LinkDest::new(base, Vec::new()))
        })
        .collect()
}

/// The local destination `path`: its parent directory (created if
/// missing, the user's own path, so followed as given) and its name. A dry
/// run creates nothing: the nearest existing ancestor is the base, and the
/// rest of the path its prefix.
fn local_destination(
    path: &Path,
    label: String,
    dry_run: bool,
) -> Result<Destination, EngineError> {
    let local_error =
        |op, cause: LocalCause| EngineError::local(escape(path.as_os_str().as_bytes()), op, cause);
    let name = path
        .file_name()
        .ok_or_else(|| local_error(Op::Create, LocalCause::NoName))?;
    let mut parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut prefix = vec![name.as_bytes().to_vec()];
    if dry_run {
        while !parent.is_dir()
            && let (Some(up), Some(missing)) = (parent.parent(), parent.file_name())
        {
            prefix.insert(0, missing.as_bytes().to_vec());
            parent = if up.as_os_str().is_empty() {
                Path::new(".")
            } else {
                up
            };
        }
    } else {
        std::fs::create_dir_all(parent).map_err(|e| local_error(Op::Create, e.into()))?;
    }
    let base: OwnedFd = rustix::fs::open(
        parent,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| local_error(Op::Open, std::io::Error::from(e).into()))?;
    let mut dest = Destination::plain(base, prefix, label);
    dest.dest_label = escape(path.as_os_str().as_bytes());
    Ok(dest)
}

//! The engine's errors, and how OS errors are worded for people.
//!
//! Each way a session can fail is a typed value: an I/O error keeps the
//! `io::Error` (its kind too) with the path and the operation it failed
//! on, a protocol violation names the rule broken ([`Violation`]), and a
//! failure the peer reported carries its code. Text is made only when an
//! error is shown.

use std::io;

use ferry_proto::frame::FrameError;
use ferry_proto::limits::MAX_PATH_LEN;
use ferry_proto::message::{ErrorCode, Message};
use ferry_proto::path::{PathError, WireBytes, escape};
use ferry_proto::preface::PrefaceError;
use thiserror::Error;

use crate::events::peer_text;

/// Why a session (not a single file) failed.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("cannot connect to {addr}: {cause} (is `ferry server` running there?)")]
    Connect {
        addr: String,
        #[source]
        cause: ConnectError,
    },
    /// A local file or setting this side cannot use: `path` names it (a
    /// file, or an option such as `--fingerprint`), `op` says what was
    /// being done to it.
    #[error("{path}: {cause}")]
    Local {
        path: String,
        op: Op,
        #[source]
        cause: LocalCause,
    },
    #[error(
        "protocol version mismatch: the peer speaks version {peer}, this ferry speaks version {ours}; \
         run the same ferry release on both ends"
    )]
    VersionMismatch { peer: u16, ours: u16 },
    #[error(transparent)]
    NotFerry(#[from] PrefaceError),
    #[error("protocol error: {0}")]
    Protocol(#[from] Violation),
    #[error("invalid path from the peer: {0}")]
    BadPath(#[from] PathError),
    /// The connection failed under the session (reset, broken pipe, …).
    #[error("connection lost: {}", reason(.0))]
    Connection(#[source] io::Error),
    /// A task that served one of the session's connections panicked (a
    /// bug) or was cancelled.
    #[error("a task of this session failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[error("the peer did not answer within {0} seconds")]
    Timeout(u64),
    #[error("no progress for {0} seconds: the transfer stalled")]
    Stalled(u64),
    /// The peer ended the session with `error`.
    #[error("{0}")]
    Remote(PeerFailure),
    /// The server turned the request down (a path it will not serve, a
    /// permission): asking again would get the same answer.
    #[error("{0}")]
    Refused(PeerFailure),
    /// This side turned the peer down, and told it why.
    #[error("{0}")]
    RefusedPeer(Refusal),
    /// The server asked for a token, and this client has none (its user's
    /// own token is offered only to its user's own server).
    #[error(
        "authentication required: set FERRY_TOKEN or pass --token-file FILE with this server's \
         token (the `token` file in the server's state directory)"
    )]
    TokenRequired,
    #[error("the connection was closed before the transfer finished")]
    Closed,
    #[error("interrupted")]
    Cancelled,
    /// An `--include`/`--exclude` rule the matcher cannot take.
    #[error(transparent)]
    Filter(#[from] crate::filter::FilterError),
    /// The TLS handshake or a TLS record failed (damaged bytes, a peer
    /// that went away mid-handshake): worth another try.
    #[error("TLS: {0}")]
    Tls(#[source] TlsError),
    /// The peer answered a TLS hello with something that is not TLS.
    #[error("the server at {addr} does not speak TLS (is it running with --no-tls?)")]
    NotTls { addr: String },
    #[error(
        "the server at {addr} presented the certificate {got}, not {expected} as given with \
         --fingerprint; refusing to connect"
    )]
    FingerprintMismatch {
        addr: String,
        expected: String,
        got: String,
    },
    #[error(
        "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
         @    WARNING: REMOTE SERVER KEY CHANGED!                  @\n\
         @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
         IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n\
         The ferry server at {addr} presented a certificate that is not the one\n\
         remembered for it: someone may be intercepting this connection, or the\n\
         server's key was replaced.\n\
         expected: {expected}\n\
         got:      {got}\n\
         If the server's key was changed on purpose, remove line {line} of {file}\n\
         (or pass --fingerprint with the new fingerprint) and run again.\n\
         Refusing to connect."
    )]
    KeyChanged {
        addr: String,
        expected: String,
        got: String,
        file: String,
        line: usize,
    },
}

/// Socket I/O: what `?` makes of an `io::Error` on a connection. A local
/// file's error is an [`EngineError::Local`], built with its path.
impl From<io::Error> for EngineError {
    fn from(e: io::Error) -> Self {
        EngineError::Connection(e)
    }
}

impl EngineError {
    /// A local failure on `path` (as the user named it) during `op`.
    pub(crate) fn local(path: impl Into<String>, op: Op, cause: impl Into<LocalCause>) -> Self {
        EngineError::Local {
            path: path.into(),
            op,
            cause: cause.into(),
        }
    }
}

/// One end of a session, as the user sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Server => "server",
        })
    }
}

/// A failure the peer reported with `error`: which side it is, its code,
/// the path the failure is about if the peer named one, and its message.
/// The peer chose the path and the message, so both are kept escaped and
/// bounded, ready for a terminal. Shown as `server: <path>: <message>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFailure {
    pub(crate) side: Side,
    pub(crate) code: ErrorCode,
    pub(crate) path: Option<String>,
    pub(crate) message: String,
}

impl PeerFailure {
    /// The failure in an `error` from the peer, which is `side`.
    pub(crate) fn received(
        side: Side,
        code: ErrorCode,
        message: &str,
        path: Option<&WireBytes>,
    ) -> Self {
        let path = path.map(|p| escape(&p.as_bytes()[..p.as_bytes().len().min(MAX_PATH_LEN)]));
        PeerFailure {
            side,
            code,
            path,
            message: peer_text(message),
        }
    }

    /// The side that failed: the peer.
    pub fn side(&self) -> Side {
        self.side
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The path the failure is about, escaped: a request's path (relative
    /// to the server's root) or an entry's (relative to the transfer's).
    pub fn path(&self) -> Option<&str> {
        self.path.as_deref()
    }

    /// The peer's words, escaped.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for PeerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.path {
            Some(path) => write!(f, "{}: {path}: {}", self.side, self.message),
            None => write!(f, "{}: {}", self.side, self.message),
        }
    }
}

impl std::error::Error for PeerFailure {}

/// Why this server turned a client down: the request's path it is about,
/// if any, and the reason. The client hears both in an `error`; the log
/// shows them as `<path>: <reason>`.
#[derive(Debug)]
pub struct Refusal {
    pub(crate) path: Option<WireBytes>,
    pub(crate) reason: RefusalReason,
}

/// What a server refuses, in the words its client will show.
#[derive(Debug, Error)]
pub enum RefusalReason {
    #[error("this server is read-only: it serves downloads, not uploads")]
    ReadOnly,
    #[error("this server is write-only: it accepts uploads, not downloads")]
    WriteOnly,
    #[error(
        "this server is write-only: --delete, --atomic and --link-dest would tell what it holds, \
         so they are refused"
    )]
    WriteOnlyMirror,
    #[error("this server is append-only: it never overwrites or deletes, so {0} is refused")]
    AppendOnly(&'static str),
    #[error("{0} --link-dest trees; at most 20 are taken")]
    TooManyLinkDests(usize),
    #[error("compression level {0} is outside 1..=19")]
    CompressionLevel(i32),
    #[error(transparent)]
    Filter(#[from] crate::filter::FilterError),
    /// The request's path failed validation (it is named beside this).
    #[error("the remote path {}", .0.problem())]
    BadPath(PathError),
    #[error("the remote path must name a file or directory below the server's root")]
    RootPath,
    /// An upload's `source_name` is not one path component.
    #[error("the source's name must be a single path component")]
    SourceName,
    /// The request's path could not be opened or its parents made.
    #[error("{}", reason(.error))]
    Io {
        op: Op,
        #[source]
        error: io::Error,
    },
    #[error("server root: {}", reason(.0))]
    RootUnavailable(#[source] io::Error),
    #[error("expected a request, got {0}")]
    NotARequest(&'static str),
    #[error("expected hello, got {0}")]
    NotHello(&'static str),
    #[error("this server requires TLS; drop --no-tls on the client")]
    NeedsTls,
    #[error("cannot join: unknown session, wrong secret, or too many connections")]
    CannotJoin,
    /// Not now: what the server shares among its clients is taken (the
    /// client tries again later).
    #[error("the server is busy: {0}; try again later")]
    Busy(#[from] crate::budget::Busy),
    /// No random bytes for `what` (a session secret, a challenge).
    #[error("no random source for {what}: {}", reason(.error))]
    NoRandom {
        what: &'static str,
        #[source]
        error: io::Error,
    },
    /// Logged; the client is told only "authentication failed".
    #[error("the client did not prove the token")]
    Unauthenticated,
    /// Logged; the client is told by the plaintext preface it gets back.
    #[error(
        "a TLS client connected to this --no-tls server (drop --no-tls here, \
         or run the client with --no-tls)"
    )]
    TlsClient,
}

impl Refusal {
    /// A refusal about no path in particular.
    pub(crate) fn new(reason: RefusalReason) -> Self {
        Refusal { path: None, reason }
    }

    /// A refusal of the request's path `path`. The root (empty) and a path
    /// too long for the wire are not named: the reason says enough.
    pub(crate) fn of_path(path: &[u8], reason: RefusalReason) -> Self {
        let named = !path.is_empty() && path.len() <= MAX_PATH_LEN;
        Refusal {
            path: named.then(|| WireBytes(path.to_vec())),
            reason,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match &self.reason {
            RefusalReason::ReadOnly
            | RefusalReason::WriteOnly
            | RefusalReason::WriteOnlyMirror
            | RefusalReason::AppendOnly(_)
            | RefusalReason::Unauthenticated => ErrorCode::PermissionDenied,
            RefusalReason::BadPath(_) | RefusalReason::RootPath | RefusalReason::SourceName => {
                ErrorCode::BadPath
            }
            RefusalReason::Io { error, .. } | RefusalReason::RootUnavailable(error) => {
                code_for(error)
            }
            RefusalReason::NotHello(_) => ErrorCode::Protocol,
            // `io`: a client tries again after a while.
            RefusalReason::NoRandom { .. } | RefusalReason::Busy(_) => ErrorCode::Io,
            RefusalReason::CompressionLevel(_)
            | RefusalReason::TooManyLinkDests(_)
            | RefusalReason::Filter(_)
            | RefusalReason::NotARequest(_)
            | RefusalReason::NeedsTls
            | RefusalReason::CannotJoin
            | RefusalReason::TlsClient => ErrorCode::BadRequest,
        }
    }

    /// The `error` that tells the client.
    pub(crate) fn message(&self) -> Message {
        Message::Error {
            code: self.code(),
            message: self.reason.to_string(),
            path: self.path.clone(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.path {
            Some(path) => write!(f, "{}: {}", escape(path.as_bytes()), self.reason),
            None => write!(f, "{}", self.reason),
        }
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.reason)
    }
}

/// Why a TCP connection to the server could not be made.
#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("no answer within {0} s")]
    TimedOut(u64),
    #[error("{}", reason(.0))]
    Io(#[source] io::Error),
}

/// What was being done to a local file when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Open,
    Create,
    Read,
    Write,
    /// Reading a value (a token, a fingerprint) out of text.
    Parse,
    Rename,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Open => "open",
            Op::Create => "create",
            Op::Read => "read",
            Op::Write => "write",
            Op::Parse => "parse",
            Op::Rename => "rename",
        })
    }
}

/// Why a local file or setting could not be used.
#[derive(Debug, Error)]
pub enum LocalCause {
    #[error("{}", reason(.0))]
    Io(#[source] io::Error),
    /// A token file that others may read (or write) is refused, as ssh
    /// refuses such a key: `file` is named again in the command that fixes it.
    #[error(
        "permissions {mode:o} are too open: a token must be private to its owner (chmod 600 {})",
        .file.display()
    )]
    TokenReadableByOthers { mode: u32, file: std::path::PathBuf },
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Fingerprint(#[from] FingerprintError),
    #[error("the destination must name a file or directory")]
    NoName,
    /// One half of the server's identity (key, certificate) without the other.
    #[error(
        "missing, but {} is there; restore it, or remove both to make a new identity \
         (clients will then refuse the new one until told)",
        .present.display()
    )]
    HalfIdentity { present: std::path::PathBuf },
    #[error("cannot make a certificate: {0}")]
    Certificate(#[source] rcgen::Error),
    #[error(transparent)]
    Pem(#[from] rustls_pki_types::pem::Error),
    #[error(transparent)]
    Tls(#[from] rustls::Error),
}

impl From<io::Error> for LocalCause {
    fn from(e: io::Error) -> Self {
        LocalCause::Io(e)
    }
}

/// Why a server's policy (which token gets which root, and how) cannot be
/// used; each names the token or root it is about.
#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("root {name}: {}: {}", .path.display(), reason(.error))]
    Root {
        name: String,
        path: std::path::PathBuf,
        #[source]
        error: io::Error,
    },
    #[error(
        "tokens {first} and {second} are the same token: each must be different, since the \
         token is what tells their clients apart"
    )]
    SameToken { first: String, second: String },
    #[error("two tokens are named {0}")]
    SameName(String),
    #[error("no token is configured")]
    NoTokens,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenError {
    #[error("the token is empty")]
    Empty,
}

/// Why a text is not a certificate fingerprint (`SHA256:<base64>`); each
/// names the text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FingerprintError {
    #[error("{0:?} is not a fingerprint: expected SHA256:<base64>")]
    NoPrefix(String),
    #[error("{0:?} is not a fingerprint: the part after SHA256: is not base64")]
    NotBase64(String),
    #[error("{0:?} is not a fingerprint: it does not hold 32 bytes")]
    WrongLength(String),
}

/// Why a TLS handshake or record failed.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    #[error("{}", reason(.0))]
    Io(#[source] io::Error),
    #[error(
        "the server closed the connection during the handshake \
         (if this persists: is it running with --no-tls?)"
    )]
    ClosedInHandshake,
}

impl From<FrameError> for EngineError {
    fn from(e: FrameError) -> Self {
        EngineError::Protocol(Violation::Frame(e))
    }
}

/// Which way an entry or a chunk travels, to say who broke a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sender,
    Receiver,
    Client,
    Server,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Sender => "sender",
            Role::Receiver => "receiver",
            Role::Client => "client",
            Role::Server => "server",
        })
    }
}

/// What a peer did that the protocol does not allow. Such a peer is
/// broken or hostile: the session ends, and the peer is told why.
#[derive(Debug, Error)]
pub enum Violation {
    #[error(transparent)]
    Frame(FrameError),
    #[error("expected {expected}, got {got}")]
    Expected {
        expected: &'static str,
        got: &'static str,
    },
    #[error("unexpected message from the {from}: {message}")]
    UnexpectedMessage { from: Role, message: &'static str },
    #[error("a data chunk arrived on the control connection where none may")]
    UnexpectedData,
    #[error("a control message arrived on a data connection")]
    ControlOnDataConnection,
    #[error("entry id {id} is not increasing")]
    EntryIdNotIncreasing { id: u64 },
    #[error("{message} for entry {id}, which was never announced")]
    NeverAnnounced { message: &'static str, id: u64 },
    #[error("verdict for unknown entry {id}")]
    UnknownVerdict { id: u64 },
    #[error("entry {id} has an invalid owner {uid}:{gid}")]
    InvalidOwner { id: u64, uid: u32, gid: u32 },
    #[error("malformed digest for entry {id}")]
    MalformedDigest { id: u64 },
    #[error("hard link {id} names entry {first}, which does not come before it")]
    LinkAhead { id: u64, first: u64 },
    #[error("hard link {id} names the root of the transfer")]
    LinkToRoot { id: u64 },
    #[error("too many {what} at once (limit {limit})")]
    OverLimit { what: &'static str, limit: usize },
    #[error("chunks arrived for entries that were never announced")]
    OrphanChunks,
    #[error("the receiver's signature of entry {id} is malformed: {why}")]
    BadSignature { id: u64, why: String },
    #[error("the receiver listed {runs} runs of held chunks, more than {limit}")]
    TooManyHeldRuns { runs: usize, limit: usize },
    #[error(
        "the receiver claims chunks it cannot hold: [{start}, {len}, {count}] of a {size}-byte file"
    )]
    ImpossibleHeld {
        start: u64,
        len: u32,
        count: u64,
        size: u64,
    },
    #[error(
        "the receiver claims held chunks off the chunk boundaries: [{start}, {len}]; \
         only whole chunks where the sender cuts them may be held"
    )]
    UnalignedHeld { start: u64, len: u32 },
    #[error("a challenge that is not hex")]
    BadChallenge,
}

impl EngineError {
    /// The code to send to the peer when this error ends a session.
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            EngineError::BadPath(_) => ErrorCode::BadPath,
            EngineError::Remote(failure) | EngineError::Refused(failure) => failure.code,
            EngineError::RefusedPeer(refusal) => refusal.code(),
            EngineError::TokenRequired => ErrorCode::PermissionDenied,
            EngineError::Cancelled => ErrorCode::ShuttingDown,
            EngineError::Filter(_) => ErrorCode::BadRequest,
            EngineError::Protocol(_) | EngineError::NotFerry(_) => ErrorCode::Protocol,
            EngineError::Connect { .. }
            | EngineError::Local { .. }
            | EngineError::Connection(_)
            | EngineError::Task(_)
            | EngineError::Timeout(_)
            | EngineError::Stalled(_)
            | EngineError::Closed
            | EngineError::Tls(_)
            | EngineError::NotTls { .. }
            | EngineError::FingerprintMismatch { .. }
            | EngineError::KeyChanged { .. } => ErrorCode::Io,
        }
    }

    /// Whether the peer should be told this error before the session ends:
    /// not when the peer is the one who ended it, nor when the connection
    /// itself is gone.
    pub fn is_for_the_peer(&self) -> bool {
        !matches!(
            self,
            EngineError::Remote(_)
                | EngineError::Closed
                | EngineError::Cancelled
                | EngineError::Connection(_)
                | EngineError::Task(_)
                | EngineError::Timeout(_)
                | EngineError::Stalled(_)
        )
    }

    /// Whether trying the session again may succeed: the connection broke
    /// or stalled, the peer restarted, or bytes were damaged on the way.
    /// Not: a refusal, a wrong path, a version mismatch, a local problem,
    /// or the user's own interruption.
    pub fn is_transient(&self) -> bool {
        match self {
            EngineError::Connect { .. }
            | EngineError::Connection(_)
            | EngineError::Task(_)
            | EngineError::Closed
            | EngineError::Timeout(_)
            | EngineError::Stalled(_)
            | EngineError::Tls(_)
            | EngineError::Protocol(_) => true,
            EngineError::Remote(failure) => matches!(
                failure.code,
                ErrorCode::ShuttingDown | ErrorCode::Io | ErrorCode::Protocol
            ),
            EngineError::Local { .. }
            | EngineError::Refused(_)
            | EngineError::RefusedPeer(_)
            | EngineError::TokenRequired
            | EngineError::VersionMismatch { .. }
            | EngineError::NotFerry(_)
            | EngineError::BadPath(_)
            | EngineError::NotTls { .. }
            | EngineError::FingerprintMismatch { .. }
            | EngineError::KeyChanged { .. }
            | EngineError::Cancelled
            | EngineError::Filter(_) => false,
        }
    }
}

/// An OS error worded the way people read it: "permission denied",
/// "no space left on device", without Rust's "(os error N)" suffix.
pub fn reason(e: &io::Error) -> String {
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "unknown error".to_string(),
    }
}

/// The protocol's error code for an OS error.
pub fn code_for(e: &io::Error) -> ErrorCode {
    match e.kind() {
        io::ErrorKind::NotFound => ErrorCode::NotFound,
        io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        io::ErrorKind::StorageFull => ErrorCode::NoSpace,
        io::ErrorKind::NotADirectory => ErrorCode::BadPath,
        _ => ErrorCode::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_read_like_prose() {
        let e = io::Error::from_raw_os_error(28);
        assert_eq!(reason(&e), "no space left on device");
        assert_eq!(code_for(&e), ErrorCode::NoSpace);
        assert_eq!(
            reason(&io::Error::from_raw_os_error(13)),
            "permission denied"
        );
        assert_eq!(
            reason(&io::Error::from_raw_os_error(2)),
            "no such file or directory"
        );
    }

    #[test]
    fn a_lost_connection_keeps_its_io_error() {
        let e = EngineError::from(io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(
            matches!(&e, EngineError::Connection(io) if io.kind() == io::ErrorKind::ConnectionReset)
        );
        assert_eq!(e.to_string(), "connection lost: connection reset");
        assert_eq!(e.code(), ErrorCode::Io);
        assert!(e.is_transient());
    }

    #[test]
    fn a_failed_task_is_its_own_error() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let joined = runtime.block_on(async {
            let task = tokio::spawn(std::future::pending::<()>());
            task.abort();
            task.await
        });
        let e = EngineError::Task(joined.unwrap_err());
        assert!(
            e.to_string().starts_with("a task of this session failed: "),
            "{e}"
        );
        assert_eq!(e.code(), ErrorCode::Io);
        assert!(e.is_transient());
    }

    #[test]
    fn local_errors_keep_path_operation_and_cause() {
        let e = EngineError::local("dst/f", Op::Open, io::Error::from_raw_os_error(13));
        assert_eq!(e.to_string(), "dst/f: permission denied");
        match &e {
            EngineError::Local {
                path,
                op: Op::Open,
                cause: LocalCause::Io(io),
            } => {
                assert_eq!(path, "dst/f");
                assert_eq!(io.kind(), io::ErrorKind::PermissionDenied);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.code(), ErrorCode::Io);
        assert!(!e.is_transient());

        let mode = LocalCause::TokenReadableByOthers {
            mode: 0o640,
            file: "/s/token".into(),
        };
        let e = EngineError::local("/s/token", Op::Read, mode);
        assert_eq!(
            e.to_string(),
            "/s/token: permissions 640 are too open: a token must be private to its owner \
             (chmod 600 /s/token)"
        );
        assert!(!e.is_transient());
        let e = EngineError::local(
            "--fingerprint",
            Op::Parse,
            FingerprintError::NoPrefix("x".into()),
        );
        assert_eq!(
            e.to_string(),
            r#"--fingerprint: "x" is not a fingerprint: expected SHA256:<base64>"#
        );
        let e = EngineError::local("t", Op::Parse, TokenError::Empty);
        assert_eq!(e.to_string(), "t: the token is empty");
        let e = EngineError::local("out", Op::Create, LocalCause::NoName);
        assert_eq!(
            e.to_string(),
            "out: the destination must name a file or directory"
        );
    }

    #[test]
    fn a_peer_failure_names_its_side_and_path_escaped() {
        let path = WireBytes(b"photos/\x1b[2J".to_vec());
        let failure = PeerFailure::received(
            Side::Server,
            ErrorCode::NotFound,
            "no such file\x07",
            Some(&path),
        );
        assert_eq!(failure.side(), Side::Server);
        assert_eq!(failure.code(), ErrorCode::NotFound);
        assert_eq!(failure.path(), Some("photos/\\x1b[2J"));
        assert_eq!(failure.message(), "no such file\\x07");
        let e = EngineError::Refused(failure.clone());
        assert_eq!(e.to_string(), "server: photos/\\x1b[2J: no such file\\x07");
        assert_eq!(e.code(), ErrorCode::NotFound);
        assert!(!e.is_transient());

        let failure = PeerFailure::received(Side::Client, ErrorCode::Io, "disk on fire", None);
        let e = EngineError::Remote(failure);
        assert_eq!(e.to_string(), "client: disk on fire");
        assert_eq!(e.code(), ErrorCode::Io);
        assert!(e.is_transient());
        let e = EngineError::Remote(PeerFailure::received(
            Side::Server,
            ErrorCode::NoSpace,
            "full",
            None,
        ));
        assert!(!e.is_transient());
    }

    #[test]
    fn a_refusal_tells_the_client_its_path_code_and_reason() {
        let refusal = Refusal::of_path(b"a/b", RefusalReason::ReadOnly);
        assert_eq!(refusal.code(), ErrorCode::PermissionDenied);
        assert_eq!(
            refusal.message(),
            Message::Error {
                code: ErrorCode::PermissionDenied,
                message: "this server is read-only: it serves downloads, not uploads".into(),
                path: Some("a/b".into()),
            }
        );
        let e = EngineError::RefusedPeer(refusal);
        assert_eq!(
            e.to_string(),
            "a/b: this server is read-only: it serves downloads, not uploads"
        );
        assert_eq!(e.code(), ErrorCode::PermissionDenied);
        assert!(!e.is_transient());

        let bad = ferry_proto::path::WirePath::parse(b"../x").unwrap_err();
        let refusal = Refusal::of_path(b"../x", RefusalReason::BadPath(bad));
        assert_eq!(refusal.code(), ErrorCode::BadPath);
        assert_eq!(
            refusal.to_string(),
            "../x: the remote path climbs out of the root with '..'"
        );
        let error = io::Error::from_raw_os_error(2);
        let op = Op::Open;
        let refusal = Refusal::of_path(b"gone", RefusalReason::Io { op, error });
        assert_eq!(refusal.code(), ErrorCode::NotFound);
        assert_eq!(refusal.to_string(), "gone: no such file or directory");
        // The root and an overlong path are left to the reason.
        assert!(
            Refusal::of_path(b"", RefusalReason::RootPath)
                .path
                .is_none()
        );
        let long = vec![b'a'; MAX_PATH_LEN + 1];
        assert!(
            Refusal::of_path(&long, RefusalReason::ReadOnly)
                .path
                .is_none()
        );
        let e = EngineError::RefusedPeer(Refusal::new(RefusalReason::NotHello("upload")));
        assert_eq!(e.code(), ErrorCode::Protocol);
        assert_eq!(e.to_string(), "expected hello, got upload");
    }

    #[test]
    fn a_client_without_a_token_is_refused_for_good() {
        let e = EngineError::TokenRequired;
        assert_eq!(e.code(), ErrorCode::PermissionDenied);
        assert!(!e.is_transient());
        assert!(
            e.to_string()
                .starts_with("authentication required: set FERRY_TOKEN or pass --token-file"),
            "{e}"
        );
    }

    #[test]
    fn connect_and_tls_failures_are_typed_and_worth_a_retry() {
        let e = EngineError::Connect {
            addr: "h:1".into(),
            cause: ConnectError::TimedOut(10),
        };
        assert_eq!(
            e.to_string(),
            "cannot connect to h:1: no answer within 10 s (is `ferry server` running there?)"
        );
        assert!(e.is_transient());
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let e = EngineError::Connect {
            addr: "h:1".into(),
            cause: ConnectError::Io(refused),
        };
        assert!(
            e.to_string()
                .starts_with("cannot connect to h:1: connection refused"),
            "{e}"
        );
        assert_eq!(e.code(), ErrorCode::Io);

        let e = EngineError::Tls(TlsError::ClosedInHandshake);
        assert_eq!(
            e.to_string(),
            "TLS: the server closed the connection during the handshake \
             (if this persists: is it running with --no-tls?)"
        );
        assert!(e.is_transient());
        let e = EngineError::Tls(rustls::Error::DecryptError.into());
        assert_eq!(
            e.to_string(),
            format!("TLS: {}", rustls::Error::DecryptError)
        );
        assert_eq!(e.code(), ErrorCode::Io);
    }
}

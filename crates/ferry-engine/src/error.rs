//! The engine's errors, and how OS errors are worded for people.
//!
//! Each way a session can fail is a typed value: an I/O error keeps the
//! `io::Error` (its kind too) with the path and the operation it failed
//! on, a protocol violation names the rule broken ([`Violation`]), and a
//! failure the peer reported carries its code. Text is made only when an
//! error is shown.

use std::io;

use ferry_proto::frame::FrameError;
use ferry_proto::message::ErrorCode;
use ferry_proto::path::PathError;
use ferry_proto::preface::PrefaceError;
use thiserror::Error;

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
    #[error("no data moved for {0} seconds: the connection stalled")]
    Stalled(u64),
    #[error("{message}")]
    Remote { code: ErrorCode, message: String },
    /// The server turned the request down (a path it will not serve, a
    /// permission): asking again would get the same answer.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    #[error("the connection was closed before the transfer finished")]
    Closed,
    #[error("interrupted")]
    Cancelled,
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
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Open => "open",
            Op::Create => "create",
            Op::Read => "read",
            Op::Write => "write",
            Op::Parse => "parse",
        })
    }
}

/// Why a local file or setting could not be used.
#[derive(Debug, Error)]
pub enum LocalCause {
    #[error("{}", reason(.0))]
    Io(#[source] io::Error),
    /// A token file others may read is refused, as ssh refuses such a key.
    #[error("readable by others (mode {mode:o}); chmod 600 it, or remove it to make a new token")]
    TokenReadableByOthers { mode: u32 },
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
    #[error("a challenge that is not hex")]
    BadChallenge,
}

impl EngineError {
    /// The code to send to the peer when this error ends a session.
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            EngineError::BadPath(_) => ErrorCode::BadPath,
            EngineError::Remote { code, .. } | EngineError::Refused { code, .. } => *code,
            EngineError::Cancelled => ErrorCode::ShuttingDown,
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
            EngineError::Remote { code, .. } => matches!(
                code,
                ErrorCode::ShuttingDown | ErrorCode::Io | ErrorCode::Protocol
            ),
            EngineError::Local { .. }
            | EngineError::Refused { .. }
            | EngineError::VersionMismatch { .. }
            | EngineError::NotFerry(_)
            | EngineError::BadPath(_)
            | EngineError::NotTls { .. }
            | EngineError::FingerprintMismatch { .. }
            | EngineError::KeyChanged { .. }
            | EngineError::Cancelled => false,
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

        let mode = LocalCause::TokenReadableByOthers { mode: 0o644 };
        let e = EngineError::local("/s/token", Op::Read, mode);
        assert_eq!(
            e.to_string(),
            "/s/token: readable by others (mode 644); chmod 600 it, or remove it to make a new token"
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

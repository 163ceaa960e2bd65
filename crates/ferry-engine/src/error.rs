//! The engine's error type, and how OS errors are worded for people.

use std::io;

use ferry_proto::frame::FrameError;
use ferry_proto::message::ErrorCode;
use ferry_proto::path::PathError;
use ferry_proto::preface::PrefaceError;
use thiserror::Error;

/// Why a session (not a single file) failed.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("cannot connect to {addr}: {reason} (is `ferry server` running there?)")]
    Connect { addr: String, reason: String },
    #[error("{path}: {reason}")]
    Local { path: String, reason: String },
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
    #[error("connection lost: {0}")]
    Io(String),
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
    Tls(String),
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

impl From<io::Error> for EngineError {
    fn from(e: io::Error) -> Self {
        EngineError::Io(reason(&e))
    }
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
            EngineError::Remote { code, .. } | EngineError::Refused { code, .. } => *code,
            EngineError::Cancelled => ErrorCode::ShuttingDown,
            EngineError::Protocol(_) | EngineError::NotFerry(_) => ErrorCode::Protocol,
            _ => ErrorCode::Io,
        }
    }

    /// Whether the peer should be told this error before the session ends:
    /// not when the peer is the one who ended it, nor when the connection
    /// itself is gone.
    pub fn is_for_the_peer(&self) -> bool {
        !matches!(
            self,
            EngineError::Remote { .. }
                | EngineError::Closed
                | EngineError::Cancelled
                | EngineError::Io(_)
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
            | EngineError::Io(_)
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
}

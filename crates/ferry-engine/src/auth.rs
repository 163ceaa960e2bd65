//! Client authentication: a shared token, proven by an HMAC over a server
//! nonce and the TLS session's exporter, so that the token never crosses
//! the wire and a proof cannot be relayed to another connection.
//!
//! The server sends `challenge {nonce}` (32 random bytes, hex) after the
//! client's `hello`; the client answers `auth {mac}`, with
//! `mac = HMAC-SHA256(token, "ferry-auth-v1" ‖ nonce ‖ exporter)` where
//! `exporter` is `export_keying_material(32, "EXPORTER-ferry-auth", None)`
//! of the TLS connection (empty without TLS). The server checks it in
//! constant time.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{EngineError, LocalCause, Op, TokenError};

/// The TLS exporter label both ends derive the channel binding with.
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-ferry-auth";
/// Bytes of channel binding taken from the TLS exporter.
pub(crate) const EXPORTER_LEN: usize = 32;
/// What the MAC is over, before the nonce and the exporter.
const DOMAIN: &[u8] = b"ferry-auth-v1";
/// The file the server keeps a generated token in, in its state directory.
pub const TOKEN_FILE: &str = "token";
/// The environment variable both ends read the token from.
pub const TOKEN_ENV: &str = "FERRY_TOKEN";

/// A shared secret. Never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Vec<u8>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// A token from its text (surrounding whitespace and the trailing
    /// newline of a file are not part of it); empty is refused.
    pub fn new(text: &str) -> Result<Token, TokenError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(TokenError::Empty);
        }
        Ok(Token(t.as_bytes().to_vec()))
    }

    /// A new token: 32 bytes from the kernel's random source, as hex.
    pub fn random() -> io::Result<Token> {
        Ok(Token(hex(&random_bytes(32)?).into_bytes()))
    }

    /// The token's text, for the operator who has to hand it on.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("")
    }

    /// The proof for `nonce` on a connection with channel binding `exporter`.
    pub(crate) fn mac(&self, nonce: &[u8], exporter: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        hex(ring::hmac::sign(&key, &message(nonce, exporter)).as_ref())
    }

    /// Whether `mac` (hex) proves this token, compared in constant time.
    pub(crate) fn verify(&self, nonce: &[u8], exporter: &[u8], mac: &str) -> bool {
        let Some(tag) = unhex(mac) else { return false };
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        ring::hmac::verify(&key, &message(nonce, exporter), &tag).is_ok()
    }
}

fn message(nonce: &[u8], exporter: &[u8]) -> Vec<u8> {
    [DOMAIN, nonce, exporter].concat()
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from hex; `None` if it is not hex.
pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `n` bytes from the kernel's random source; no fallback.
pub(crate) fn random_bytes(n: usize) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// The token configured for this process: `FERRY_TOKEN` (given here as
/// `env`) wins, else the file. Tokens are never taken from the command
/// line itself, where other users could read them.
pub fn configured_token(
    env: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<Token>, EngineError> {
    if let Some(text) = env.filter(|t| !t.is_empty()) {
        return Token::new(text)
            .map(Some)
            .map_err(|e| EngineError::local(TOKEN_ENV, Op::Parse, e));
    }
    file.map(read_token_file).transpose()
}

/// The token this user's own server keeps in `state_dir`, if it has made
/// one: what a client of the same user proves to that server without being
/// told (`client::ClientConfig::own_token`).
pub fn own_token(state_dir: &Path) -> Result<Option<Token>, EngineError> {
    match read_token_file(&state_dir.join(TOKEN_FILE)) {
        Ok(token) => Ok(Some(token)),
        Err(EngineError::Local {
            cause: LocalCause::Io(e),
            ..
        }) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The token in the file at `path`, which only its owner may read or
/// write: a token others can read is no secret, so it is refused (as ssh
/// refuses a private key others can read), checked on the open file.
pub fn read_token_file(path: &Path) -> Result<Token, EngineError> {
    let local = |op, cause: LocalCause| EngineError::local(path.display().to_string(), op, cause);
    let mut file = std::fs::File::open(path).map_err(|e| local(Op::Open, e.into()))?;
    let mode = file
        .metadata()
        .map_err(|e| local(Op::Read, e.into()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        let cause = LocalCause::TokenReadableByOthers {
            mode: mode & 0o777,
            file: path.to_path_buf(),
        };
        return Err(local(Op::Read, cause));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| local(Op::Read, e.into()))?;
    Token::new(&text).map_err(|e| local(Op::Parse, e.into()))
}

/// The server's generated token: read from `state_dir/token` if it is
/// there, else made (32 random bytes, hex) and stored with mode 0600. The
/// answer says where, and whether it was made now.
pub fn load_or_create_token(state_dir: &Path) -> Result<(Token, PathBuf, bool), EngineError> {
    let path = state_dir.join(TOKEN_FILE);
    if let Some(token) = own_token(state_dir)? {
        return Ok((token, path, false));
    }
    let local = |op, cause: LocalCause| EngineError::local(path.display().to_string(), op, cause);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|e| local(Op::Create, e.into()))?;
    let token = Token::random().map_err(|e| local(Op::Create, e.into()))?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let write = || -> io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{}\n", token.as_str()).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| local(Op::Write, e.into()))?;
    Ok((token, path, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_verifies_only_with_the_same_token_nonce_and_binding() {
        let t = Token::new("secret\n").unwrap();
        let mac = t.mac(b"nonce", b"binding");
        assert!(t.verify(b"nonce", b"binding", &mac));
        assert!(
            !Token::new("other")
                .unwrap()
                .verify(b"nonce", b"binding", &mac)
        );
        assert!(!t.verify(b"nonce2", b"binding", &mac));
        assert!(!t.verify(b"nonce", b"other binding", &mac));
        assert!(!t.verify(b"nonce", b"binding", "zz"));
        assert!(!t.verify(b"nonce", b"binding", ""));
        assert_eq!(mac.len(), 64);
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])).unwrap(),
            [0, 1, 0xab, 0xff]
        );
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }

    #[test]
    fn token_sources() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "from-file\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = configured_token(Some("from-env"), Some(&file)).unwrap();
        assert_eq!(t.unwrap().as_str(), "from-env");
        let t = configured_token(None, Some(&file)).unwrap();
        assert_eq!(t.unwrap().as_str(), "from-file");
        assert!(configured_token(None, None).unwrap().is_none());
        std::fs::write(&file, "\n").unwrap();
        assert!(configured_token(None, Some(&file)).is_err());
        assert!(configured_token(None, Some(&dir.path().join("missing"))).is_err());
        for mode in [0o640, 0o604, 0o620] {
            std::fs::write(&file, "from-file\n").unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = configured_token(None, Some(&file)).unwrap_err();
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
        assert!(!format!("{:?}", Token::new("hidden").unwrap()).contains("hidden"));
    }

    #[test]
    fn generated_token_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (made, path, created) = load_or_create_token(&state).unwrap();
        assert!(created);
        assert_eq!(made.as_str().len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, _, created) = load_or_create_token(&state).unwrap();
        assert!(!created);
        assert_eq!(again, made);
        assert_eq!(own_token(&state).unwrap(), Some(made));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_or_create_token(&state).is_err());
        assert!(own_token(&state).is_err());
        assert_eq!(own_token(&dir.path().join("none")).unwrap(), None);
    }
}

//! TLS 1.3 for every connection: the server's self-signed identity, and a
//! client that pins it the way ssh pins host keys.
//!
//! There is no certificate authority. The server makes a key and a
//! self-signed certificate on its first start and keeps them in its state
//! directory; what identifies it is the SHA-256 fingerprint of that
//! certificate, `SHA256:<base64 without padding>` as ssh writes them. The
//! client trusts a fingerprint given with `--fingerprint`, else the one its
//! `known_hosts` file remembers for `host:port`, else the first one it sees
//! (trust on first use), which it then remembers. A fingerprint that differs
//! from the one expected ends the connection before any ferry byte moves.
//!
//! One crypto provider (ring) serves rustls and rcgen; TLS 1.2 is not built
//! in, since both ends are ferry.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::error::{EngineError, FingerprintError, LocalCause, Op};

/// The server's certificate and key, in its state directory.
const CERT_FILE: &str = "server-cert.pem";
const KEY_FILE: &str = "server-key.pem";
/// The client's remembered servers, in its state directory.
const KNOWN_HOSTS_FILE: &str = "known_hosts";
/// The name the client asks for and the certificate carries. Identity
/// comes from the pinned fingerprint, never from a name.
const SERVER_NAME: &str = "ferry";

/// ring's provider, with AES-128-GCM preferred: on a bulk transfer the
/// cipher is the cost, AES-128 is about a third cheaper than AES-256 with
/// AES-NI, and 128 bits is TLS 1.3's baseline strength.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// The SHA-256 of a certificate (its DER bytes).
fn digest(cert: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, cert);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// `SHA256:<base64 of the digest, no padding>`.
fn format_fingerprint(digest: &[u8; 32]) -> String {
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// The fingerprint of a certificate, as the server prints it.
pub fn fingerprint(cert_der: &[u8]) -> String {
    format_fingerprint(&digest(cert_der))
}

/// Read a fingerprint as the server prints it (`SHA256:` and unpadded
/// base64; padding is forgiven).
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], FingerprintError> {
    let b64 = text
        .trim()
        .strip_prefix("SHA256:")
        .ok_or_else(|| FingerprintError::NoPrefix(text.to_string()))?;
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(b64.trim_end_matches('='))
        .map_err(|_| FingerprintError::NotBase64(text.to_string()))?;
    bytes
        .try_into()
        .map_err(|_| FingerprintError::WrongLength(text.to_string()))
}

/// Compare in time that does not depend on where the inputs differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn local_error(path: &Path, op: Op, cause: impl Into<LocalCause>) -> EngineError {
    EngineError::local(path.display().to_string(), op, cause)
}

/// Create the state directory (0700) if it is missing.
fn make_state_dir(dir: &Path) -> Result<(), EngineError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| local_error(dir, Op::Create, e))
}

/// Write a new file that only its owner may read, whole or not at all.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), EngineError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let write = || -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| local_error(path, Op::Write, e))
}

/// The server's side: its identity, ready to accept TLS connections.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    fingerprint: String,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl ServerTls {
    /// Load the key and certificate from `state_dir`, making them on the
    /// first start. The answer says whether they were made now.
    pub fn load_or_create(state_dir: &Path) -> Result<(Self, bool), EngineError> {
        let cert_path = state_dir.join(CERT_FILE);
        let key_path = state_dir.join(KEY_FILE);
        let created = match (cert_path.exists(), key_path.exists()) {
            (true, true) => false,
            (false, false) => {
                make_state_dir(state_dir)?;
                let made = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
                    .map_err(|e| local_error(&cert_path, Op::Create, LocalCause::Certificate(e)))?;
                // The key first: a certificate on disk always has its key.
                write_private(&key_path, made.signing_key.serialize_pem().as_bytes())?;
                write_private(&cert_path, made.cert.pem().as_bytes())?;
                true
            }
            (cert, _) => {
                let (there, missing) = if cert {
                    (&cert_path, &key_path)
                } else {
                    (&key_path, &cert_path)
                };
                let present = there.clone();
                return Err(local_error(
                    missing,
                    Op::Open,
                    LocalCause::HalfIdentity { present },
                ));
            }
        };
        let cert = CertificateDer::from_pem_file(&cert_path)
            .map_err(|e| local_error(&cert_path, Op::Read, e))?;
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| local_error(&key_path, Op::Read, e))?;
        let fingerprint = fingerprint(&cert);
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .and_then(|b| b.with_no_client_auth().with_single_cert(vec![cert], key))
            .map_err(|e| local_error(&key_path, Op::Read, e))?;
        let tls = ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            fingerprint,
        };
        Ok((tls, created))
    }

    /// The certificate's fingerprint, for the operator to hand to clients.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub(crate) fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }
}

/// Where the fingerprint a client expects came from.
#[derive(Debug, Clone)]
enum Expected {
    /// `--fingerprint`.
    Given([u8; 32]),
    /// known_hosts, at this line (from 1).
    Remembered([u8; 32], usize),
}

/// Why the server's certificate was refused.
#[derive(Debug, Clone)]
enum Refusal {
    Given {
        expected: String,
        got: String,
    },
    Remembered {
        expected: String,
        got: String,
        line: usize,
    },
}

#[derive(Debug, Default)]
struct PinState {
    expected: Option<Expected>,
    /// A server seen for the first time, not yet remembered.
    new: Option<[u8; 32]>,
    refused: Option<Refusal>,
}

/// A server's fingerprint, remembered for the first time.
#[derive(Debug, Clone)]
pub(crate) struct NewServer {
    pub(crate) fingerprint: String,
    pub(crate) file: PathBuf,
}

/// Checks the server's certificate against what the client expects.
#[derive(Debug)]
struct Pin {
    state: Mutex<PinState>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Pin {
    fn lock(&self) -> std::sync::MutexGuard<'_, PinState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ServerCertVerifier for Pin {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = digest(end_entity);
        let mut state = self.lock();
        let refusal = match state.expected.clone() {
            None => {
                state.new = Some(got);
                return Ok(ServerCertVerified::assertion());
            }
            Some(Expected::Given(want)) if same(&want, &got) => None,
            Some(Expected::Remembered(want, _)) if same(&want, &got) => None,
            Some(Expected::Given(want)) => Some(Refusal::Given {
                expected: format_fingerprint(&want),
                got: format_fingerprint(&got),
            }),
            Some(Expected::Remembered(want, line)) => Some(Refusal::Remembered {
                expected: format_fingerprint(&want),
                got: format_fingerprint(&got),
                line,
            }),
        };
        match refusal {
            None => Ok(ServerCertVerified::assertion()),
            Some(r) => {
                state.refused = Some(r);
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is not offered, so this is never asked.
        Err(rustls::Error::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The client's side: how it connects and what it trusts.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    pin: Arc<Pin>,
    addr: String,
    known_hosts: PathBuf,
    /// The certificate of this user's own server (in the same state
    /// directory), if it has one: the server to offer its token to.
    own: Option<[u8; 32]>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("addr", &self.addr)
            .field("known_hosts", &self.known_hosts)
            .finish()
    }
}

impl ClientTls {
    /// Trust for the server at `addr` (`host:port`, as the user wrote it):
    /// `fingerprint` if given, else what `state_dir/known_hosts` says,
    /// else the first certificate seen, which is then remembered there.
    pub fn new(
        addr: &str,
        state_dir: &Path,
        fingerprint: Option<&str>,
    ) -> Result<Self, EngineError> {
        let known_hosts = state_dir.join(KNOWN_HOSTS_FILE);
        let expected = match fingerprint {
            Some(text) => {
                let fp = parse_fingerprint(text)
                    .map_err(|e| EngineError::local("--fingerprint", Op::Parse, e))?;
                Some(Expected::Given(fp))
            }
            None => {
                remembered(&known_hosts, addr)?.map(|(fp, line)| Expected::Remembered(fp, line))
            }
        };
        let provider = provider();
        let pin = Arc::new(Pin {
            state: Mutex::new(PinState {
                expected,
                ..PinState::default()
            }),
            algorithms: provider.signature_verification_algorithms,
        });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| EngineError::Tls(e.into()))?
            .dangerous()
            .with_custom_certificate_verifier(pin.clone())
            .with_no_client_auth();
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            pin,
            addr: addr.to_string(),
            known_hosts,
            own: own_certificate(state_dir),
        })
    }

    /// Whether `cert` is this user's own server's certificate.
    pub(crate) fn is_own(&self, cert: &[u8]) -> bool {
        self.own.is_some_and(|own| same(&own, &digest(cert)))
    }

    pub(crate) fn connector(&self) -> &tokio_rustls::TlsConnector {
        &self.connector
    }

    pub(crate) fn server_name() -> ServerName<'static> {
        ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
    }

    /// Why the last handshake was refused, if the certificate was the
    /// reason: the error to end the transfer with.
    pub(crate) fn refusal(&self) -> Option<EngineError> {
        let refused = self.pin.lock().refused.take()?;
        Some(match refused {
            Refusal::Given { expected, got } => EngineError::FingerprintMismatch {
                addr: self.addr.clone(),
                expected,
                got,
            },
            Refusal::Remembered {
                expected,
                got,
                line,
            } => EngineError::KeyChanged {
                addr: self.addr.clone(),
                expected,
                got,
                file: self.known_hosts.display().to_string(),
                line,
            },
        })
    }

    /// After a handshake went through: remember a server seen for the
    /// first time, and expect the same certificate from now on (on the
    /// session's other connections too).
    pub(crate) fn remember(&self) -> Result<Option<NewServer>, EngineError> {
        let mut state = self.pin.lock();
        let Some(fp) = state.new.take() else {
            return Ok(None);
        };
        let fingerprint = format_fingerprint(&fp);
        if let Some(dir) = self.known_hosts.parent() {
            make_state_dir(dir)?;
        }
        let line = append_known_host(&self.known_hosts, &self.addr, &fingerprint)?;
        state.expected = Some(Expected::Remembered(fp, line));
        Ok(Some(NewServer {
            fingerprint,
            file: self.known_hosts.clone(),
        }))
    }
}

/// The digest of the server certificate kept in `state_dir`, if there is
/// a readable one. Not being able to read it only means no server is taken
/// for this user's own.
fn own_certificate(state_dir: &Path) -> Option<[u8; 32]> {
    CertificateDer::from_pem_file(state_dir.join(CERT_FILE))
        .ok()
        .map(|cert| digest(&cert))
}

/// What `known_hosts` remembers for `addr`, and on which line.
fn remembered(file: &Path, addr: &str) -> Result<Option<([u8; 32], usize)>, EngineError> {
    let text = match fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(local_error(file, Op::Read, e)),
    };
    for (i, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        let (Some(host), Some(fp)) = (words.next(), words.next()) else {
            continue;
        };
        if host.starts_with('#') || host != addr {
            continue;
        }
        let fp = parse_fingerprint(fp).map_err(|e| {
            EngineError::local(format!("{}, line {}", file.display(), i + 1), Op::Parse, e)
        })?;
        return Ok(Some((fp, i + 1)));
    }
    Ok(None)
}

/// Add `addr fingerprint` to `known_hosts`; the answer is its line number.
/// Under an exclusive lock, and only if no line for `addr` is there yet:
/// clients meeting the same new server at once (or a retry racing its
/// first attempt) remember it once.
fn append_known_host(file: &Path, addr: &str, fingerprint: &str) -> Result<usize, EngineError> {
    let add = || -> io::Result<usize> {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(file)?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)?;
        let mut text = String::new();
        io::Read::read_to_string(&mut f, &mut text)?;
        let line_of = |l: &str| l.split_whitespace().next() == Some(addr);
        if let Some(i) = text.lines().position(line_of) {
            return Ok(i + 1);
        }
        let mut entry = String::new();
        if !text.is_empty() && !text.ends_with('\n') {
            entry.push('\n');
        }
        entry.push_str(&format!("{addr} {fingerprint}\n"));
        f.write_all(entry.as_bytes())?;
        Ok(text.lines().count() + 1)
    };
    add().map_err(|e| local_error(file, Op::Write, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_round_trip() {
        let fp = fingerprint(b"a certificate");
        assert!(fp.starts_with("SHA256:"));
        assert!(!fp.ends_with('='));
        assert_eq!(fp.len(), "SHA256:".len() + 43);
        assert_eq!(format_fingerprint(&parse_fingerprint(&fp).unwrap()), fp);
        assert!(parse_fingerprint("MD5:abc").is_err());
        assert!(parse_fingerprint("SHA256:!!").is_err());
        assert!(parse_fingerprint("SHA256:AAAA").is_err());
    }

    #[test]
    fn identity_is_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (first, created) = ServerTls::load_or_create(&state).unwrap();
        assert!(created);
        let (again, created) = ServerTls::load_or_create(&state).unwrap();
        assert!(!created);
        assert_eq!(first.fingerprint(), again.fingerprint());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(KEY_FILE)), 0o600);
        fs::remove_file(state.join(CERT_FILE)).unwrap();
        assert!(ServerTls::load_or_create(&state).is_err());
    }

    #[test]
    fn a_server_is_remembered_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("known_hosts");
        let fp = fingerprint(b"cert");
        assert_eq!(append_known_host(&file, "a:1", &fp).unwrap(), 1);
        assert_eq!(append_known_host(&file, "b:2", &fp).unwrap(), 2);
        assert_eq!(append_known_host(&file, "a:1", &fp).unwrap(), 1);
        let text = fs::read_to_string(&file).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    #[test]
    fn a_client_knows_its_own_users_server_by_its_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (mine, other) = (dir.path().join("mine"), dir.path().join("other"));
        ServerTls::load_or_create(&mine).unwrap();
        ServerTls::load_or_create(&other).unwrap();
        let cert = |d: &Path| CertificateDer::from_pem_file(d.join(CERT_FILE)).unwrap();
        let client = ClientTls::new("h:1", &mine, None).unwrap();
        assert!(client.is_own(&cert(&mine)));
        assert!(!client.is_own(&cert(&other)));
        // A user without a server of their own has no own server.
        let client = ClientTls::new("h:1", &dir.path().join("none"), None).unwrap();
        assert!(!client.is_own(&cert(&mine)));
    }

    #[test]
    fn known_hosts_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(KNOWN_HOSTS_FILE);
        assert!(remembered(&file, "a:1").unwrap().is_none());
        let fp = fingerprint(b"x");
        fs::write(&file, "# comment\nb:2 SHA256:zz").unwrap();
        assert_eq!(append_known_host(&file, "a:1", &fp).unwrap(), 3);
        let (got, line) = remembered(&file, "a:1").unwrap().unwrap();
        assert_eq!(line, 3);
        assert_eq!(format_fingerprint(&got), fp);
        assert!(remembered(&file, "b:2").is_err());
    }
}

//! The server's configuration file (`ferry server --config FILE`): its
//! settings, its named roots, and one `[[token]]` per kind of client, each
//! with its root and mode. The README has the format and an example.
//!
//! ```toml
//! [server]
//! host = "0.0.0.0"
//!
//! [roots]
//! www = "/srv/www"
//!
//! [[token]]
//! name = "deploy"
//! token_file = "/etc/ferry/deploy.token"
//! root = "www"
//! mode = "write-only"
//! ```
//!
//! Tokens are never written in the file itself: each lives in a file of its
//! own that only its owner may read (as `--token-file`), so the
//! configuration may be readable by anyone. The configuration may not be
//! writable by anyone but its owner: whoever changes it decides who gets
//! in. Every key is known or the file is refused, with its line.
//!
//! Parsing and checking ([`load`]) is apart from reading the token files
//! and opening the roots ([`policy`]), so that a reload on SIGHUP can do
//! both before it replaces anything.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_engine::EngineError;
use ferry_engine::error::PolicyError;
use ferry_engine::policy::{Access, GrantSpec, Policy};
use serde::Deserialize;

use crate::cli::{self, MAX_HANDSHAKE_TIMEOUT, MAX_TIMEOUT};

/// Why a configuration file cannot be used; each names the file first.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {}", .path.display(), ferry_engine::error::reason(.error))]
    Read {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error(
        "{}: permissions {mode:o} let others change it, and with it who may use this server \
         (chmod go-w {})",
        .path.display(), .path.display()
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error("{}, line {line}: {message}", .path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A value that parsed but makes no sense: `what` names where.
    #[error("{}: {what}: {problem}", .path.display())]
    Invalid {
        path: PathBuf,
        what: String,
        problem: String,
    },
    #[error("{}: token {name}: {error}", .path.display())]
    Token {
        path: PathBuf,
        name: String,
        /// Boxed: an engine error is large, and this one is rare.
        #[source]
        error: Box<EngineError>,
    },
    #[error("{}: {error}", .path.display())]
    Policy {
        path: PathBuf,
        #[source]
        error: PolicyError,
    },
}

impl ConfigError {
    /// The file says something wrong, as opposed to naming something that
    /// cannot be read or opened: a usage error, as an unknown option is.
    pub fn is_usage(&self) -> bool {
        match self {
            ConfigError::Syntax { .. } | ConfigError::Invalid { .. } => true,
            ConfigError::Policy { error, .. } => !matches!(error, PolicyError::Root { .. }),
            _ => false,
        }
    }
}

/// The file as written. Unknown keys are refused, at every level.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    roots: BTreeMap<String, PathBuf>,
    #[serde(default, rename = "token")]
    tokens: Vec<TokenSection>,
}

/// `[server]`: what the command-line options of the same names set, and
/// what they override. Read at start only: a reload leaves these alone.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub state_dir: Option<PathBuf>,
    pub log_file: Option<PathBuf>,
    pub timeout: Option<u64>,
    pub handshake_timeout: Option<u64>,
    /// As `--keep-parts`: `36h`, `7d`, `0`.
    keep_parts: Option<String>,
    /// As `--max-memory`: `256M`, `2G`.
    max_memory: Option<String>,
    pub devices: Option<bool>,
    /// `false` is `--no-tls`.
    pub tls: Option<bool>,
}

impl ServerSection {
    pub fn keep_parts(&self) -> Option<Duration> {
        // Checked by `load`.
        self.keep_parts
            .as_deref()
            .and_then(|s| cli::parse_age(s).ok())
    }

    pub fn max_memory(&self) -> Option<u64> {
        self.max_memory
            .as_deref()
            .and_then(|s| cli::parse_size(s).ok())
    }
}

/// `[[token]]`: one kind of client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenSection {
    name: String,
    /// The secret's file, which only its owner may read.
    token_file: PathBuf,
    /// A name from `[roots]`.
    root: String,
    mode: Mode,
}

/// A token's mode, as the file spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    ReadWrite,
    ReadOnly,
    WriteOnly,
    AppendOnly,
}

impl From<Mode> for Access {
    fn from(mode: Mode) -> Access {
        match mode {
            Mode::ReadWrite => Access::ReadWrite,
            Mode::ReadOnly => Access::ReadOnly,
            Mode::WriteOnly => Access::WriteOnly,
            Mode::AppendOnly => Access::AppendOnly,
        }
    }
}

/// A checked configuration file.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub server: ServerSection,
    pub grants: Vec<ConfiguredGrant>,
}

/// One `[[token]]`, its root looked up.
#[derive(Debug, Clone)]
pub struct ConfiguredGrant {
    pub name: String,
    pub token_file: PathBuf,
    pub root_name: String,
    pub root: PathBuf,
    pub access: Access,
}

/// The server's settings: each from the command line if given there, else
/// from the file's `[server]`, else the default.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub state_dir: Option<PathBuf>,
    pub log_file: Option<PathBuf>,
    pub timeout: Duration,
    pub handshake_timeout: Duration,
    /// `None`: part files are kept for ever.
    pub keep_parts: Option<Duration>,
    pub max_memory: u64,
    pub devices: bool,
    pub tls: bool,
}

impl Settings {
    pub fn new(args: &cli::ServerArgs, file: Option<&ServerSection>) -> Settings {
        let file = file.cloned().unwrap_or_default();
        let secs = Duration::from_secs;
        let keep_parts = (args.keep_parts)
            .or(file.keep_parts())
            .unwrap_or(ferry_engine::server::DEFAULT_PART_MAX_AGE);
        let max_memory = (args.max_memory.or(file.max_memory()))
            .unwrap_or(ferry_engine::budget::DEFAULT_MAX_MEMORY);
        Settings {
            host: args
                .host
                .clone()
                .or(file.host)
                .unwrap_or_else(|| "127.0.0.1".into()),
            port: args.port.or(file.port).unwrap_or(cli::DEFAULT_PORT),
            state_dir: args.state_dir.clone().or(file.state_dir),
            log_file: args.log_file.clone().or(file.log_file),
            timeout: (args.timeout.or(file.timeout).map(secs))
                .unwrap_or(ferry_engine::server::DEFAULT_IDLE_TIMEOUT),
            handshake_timeout: (args.handshake_timeout.or(file.handshake_timeout).map(secs))
                .unwrap_or(ferry_engine::server::DEFAULT_HANDSHAKE_TIMEOUT),
            keep_parts: (!keep_parts.is_zero()).then_some(keep_parts),
            max_memory,
            // Flags can only turn these on (or TLS off).
            devices: args.devices || file.devices == Some(true),
            tls: !args.no_tls && file.tls != Some(false),
        }
    }
}

/// Read and check the file at `path`: its syntax, every key, every value,
/// and that each token names a root. Token files are not read yet.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read_config(path)?;
    let file: File = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        line: e.span().map_or(1, |span| line_of(&text, span.start)),
        message: one_line(e.message()),
    })?;
    let invalid = |what: &str, problem: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        what: what.to_string(),
        problem,
    };
    check_server(&file.server).map_err(|(what, problem)| invalid(what, problem))?;
    for (name, root) in &file.roots {
        check_name(name).map_err(|p| invalid(&format!("[roots] {name:?}"), p))?;
        check_absolute(root).map_err(|p| invalid(&format!("[roots] {name}"), p))?;
    }
    if file.tokens.is_empty() {
        let problem = "no [[token]]: name at least one, with its token_file, root and mode".into();
        return Err(invalid("[[token]]", problem));
    }
    let mut grants: Vec<ConfiguredGrant> = Vec::with_capacity(file.tokens.len());
    for token in file.tokens {
        let what = format!("token {:?}", token.name);
        check_name(&token.name).map_err(|p| invalid(&what, p))?;
        if grants.iter().any(|g| g.name == token.name) {
            return Err(invalid(&what, "another [[token]] has that name".into()));
        }
        check_absolute(&token.token_file).map_err(|p| invalid(&format!("{what} token_file"), p))?;
        let Some(root) = file.roots.get(&token.root) else {
            let known: Vec<&str> = file.roots.keys().map(String::as_str).collect();
            let problem = format!(
                "root {:?} is not in [roots] ({})",
                token.root,
                if known.is_empty() {
                    "which names none".to_string()
                } else {
                    known.join(", ")
                }
            );
            return Err(invalid(&what, problem));
        };
        grants.push(ConfiguredGrant {
            name: token.name,
            token_file: token.token_file,
            root_name: token.root,
            root: root.clone(),
            access: token.mode.into(),
        });
    }
    Ok(Config {
        path: path.to_path_buf(),
        server: file.server,
        grants,
    })
}

/// The file's text, refused if others may change it.
fn read_config(path: &Path) -> Result<String, ConfigError> {
    let read = |error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    };
    let mut file = std::fs::File::open(path).map_err(read)?;
    let mode = file.metadata().map_err(read)?.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(ConfigError::Writable {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read)?;
    Ok(text)
}

/// The values of `[server]` that the types alone do not check, as the
/// command line checks the options of the same names.
fn check_server(server: &ServerSection) -> Result<(), (&'static str, String)> {
    if let Some(t) = server.timeout
        && !(1..=MAX_TIMEOUT).contains(&t)
    {
        return Err((
            "[server] timeout",
            format!("{t} is not in 1..={MAX_TIMEOUT}"),
        ));
    }
    if let Some(t) = server.handshake_timeout
        && !(1..=MAX_HANDSHAKE_TIMEOUT).contains(&t)
    {
        let problem = format!("{t} is not in 1..={MAX_HANDSHAKE_TIMEOUT}");
        return Err(("[server] handshake_timeout", problem));
    }
    if let Some(age) = &server.keep_parts {
        cli::parse_age(age).map_err(|p| ("[server] keep_parts", format!("{age:?}: {p}")))?;
    }
    if let Some(size) = &server.max_memory {
        cli::parse_size(size).map_err(|p| ("[server] max_memory", format!("{size:?}: {p}")))?;
    }
    for (what, path) in [
        ("[server] state_dir", &server.state_dir),
        ("[server] log_file", &server.log_file),
    ] {
        if let Some(path) = path {
            check_absolute(path).map_err(|p| (what, p))?;
        }
    }
    Ok(())
}

/// Names go into log lines: letters, digits, `.`, `_` and `-` only.
fn check_name(name: &str) -> Result<(), String> {
    let fits = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if fits {
        Ok(())
    } else {
        Err("a name is 1 to 64 letters, digits, '.', '_' or '-'".into())
    }
}

/// Paths in the file are absolute: a service's working directory is
/// nobody's choice.
fn check_absolute(path: &Path) -> Result<(), String> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(format!("{} is not an absolute path", path.display()))
    }
}

/// The policy the file describes: each token read from its file (refused
/// if others may read it) and each root opened.
pub fn policy(config: &Config) -> Result<Policy, ConfigError> {
    let path = &config.path;
    let mut grants = Vec::with_capacity(config.grants.len());
    for grant in &config.grants {
        let token = ferry_engine::auth::read_token_file(&grant.token_file).map_err(|error| {
            ConfigError::Token {
                path: path.clone(),
                name: grant.name.clone(),
                error: Box::new(error),
            }
        })?;
        let root = grant.root.canonicalize().map_err(|error| {
            let (name, path) = (grant.root_name.clone(), grant.root.clone());
            PolicyError::Root { name, path, error }
        });
        let root = root.map_err(|error| ConfigError::Policy {
            path: path.clone(),
            error,
        })?;
        let spec = GrantSpec {
            name: grant.name.clone(),
            root_name: grant.root_name.clone(),
            root,
            access: grant.access,
        };
        grants.push((token, spec));
    }
    Policy::tokens(grants).map_err(|error| ConfigError::Policy {
        path: path.clone(),
        error,
    })
}

/// The line (from 1) of byte `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    let at = at.min(text.len());
    text.as_bytes()[..at]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A message on one line, for a log that has one line per event.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` as a configuration file (0600) in a new directory.
    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        (dir, path)
    }

    const TWO_TOKENS: &str = r#"
[server]
host = "0.0.0.0"
port = 9000
keep_parts = "36h"
max_memory = "1G"
tls = true

[roots]
www = "/srv/www"
backup = "/srv/backup"

[[token]]
name = "deploy"
token_file = "/etc/ferry/deploy.token"
root = "www"
mode = "write-only"

[[token]]
name = "restore"
token_file = "/etc/ferry/restore.token"
root = "backup"
mode = "read-only"
"#;

    #[test]
    fn a_file_with_two_tokens() {
        let (_dir, path) = write(TWO_TOKENS);
        let config = load(&path).unwrap();
        assert_eq!(config.server.host.as_deref(), Some("0.0.0.0"));
        assert_eq!(config.server.port, Some(9000));
        assert_eq!(
            config.server.keep_parts(),
            Some(Duration::from_secs(36 * 3600))
        );
        assert_eq!(config.server.max_memory(), Some(1 << 30));
        assert_eq!(config.server.tls, Some(true));
        let grants: Vec<(&str, &str, &Path, Access)> = config
            .grants
            .iter()
            .map(|g| {
                (
                    g.name.as_str(),
                    g.root_name.as_str(),
                    g.root.as_path(),
                    g.access,
                )
            })
            .collect();
        assert_eq!(
            grants,
            [
                ("deploy", "www", Path::new("/srv/www"), Access::WriteOnly),
                (
                    "restore",
                    "backup",
                    Path::new("/srv/backup"),
                    Access::ReadOnly
                ),
            ]
        );
    }

    /// The error `load` gives for `text`, as the user sees it.
    fn refusal(text: &str) -> (String, bool) {
        let (_dir, path) = write(text);
        let e = load(&path).unwrap_err();
        let shown = e.to_string();
        assert!(shown.starts_with(&path.display().to_string()), "{shown}");
        assert!(!shown.contains('\n'), "one line: {shown}");
        (shown, e.is_usage())
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let text = TWO_TOKENS.replace("tls = true", "tls = true\ncolour = \"blue\"");
        let (shown, usage) = refusal(&text);
        assert!(shown.contains("line 8"), "{shown}");
        assert!(shown.contains("`colour`"), "{shown}");
        assert!(usage);
        let (shown, _) = refusal(&TWO_TOKENS.replace("[roots]", "[rots]"));
        assert!(shown.contains("`rots`"), "{shown}");
        let (shown, _) = refusal(&TWO_TOKENS.replace(
            "mode = \"read-only\"",
            "mode = \"read-only\"\ntoken = \"inline\"",
        ));
        assert!(shown.contains("`token`"), "{shown}");
    }

    #[test]
    fn bad_values_are_named() {
        for (from, to, needle) in [
            (
                "mode = \"write-only\"",
                "mode = \"delete-everything\"",
                "delete-everything",
            ),
            (
                "root = \"www\"",
                "root = \"web\"",
                "root \"web\" is not in [roots] (backup, www)",
            ),
            (
                "\"/srv/www\"",
                "\"srv/www\"",
                "[roots] www: srv/www is not an absolute path",
            ),
            (
                "keep_parts = \"36h\"",
                "keep_parts = \"3w\"",
                "[server] keep_parts",
            ),
            (
                "max_memory = \"1G\"",
                "max_memory = \"1M\"",
                "[server] max_memory",
            ),
            ("port = 9000", "port = 90000", "line 4"),
            (
                "name = \"restore\"",
                "name = \"deploy\"",
                "another [[token]] has that name",
            ),
            (
                "name = \"restore\"",
                "name = \"re store\"",
                "a name is 1 to 64",
            ),
            (
                "port = 9000",
                "timeout = 0",
                "[server] timeout: 0 is not in 1..=86400",
            ),
        ] {
            assert!(TWO_TOKENS.contains(from), "{from}");
            let (shown, usage) = refusal(&TWO_TOKENS.replacen(from, to, 1));
            assert!(shown.contains(needle), "{needle:?} in {shown}");
            assert!(usage, "{shown}");
        }
        let (shown, _) = refusal("[server]\nport = 1\n");
        assert!(shown.contains("no [[token]]"), "{shown}");
    }

    #[test]
    fn a_file_others_may_change_is_refused() {
        let (_dir, path) = write(TWO_TOKENS);
        for mode in [0o664, 0o646] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = load(&path).unwrap_err();
            assert!(e.to_string().contains("chmod go-w"), "{e}");
            assert!(!e.is_usage());
        }
        // Readable by all is fine: it holds no secret.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(&path).is_ok());
    }

    #[test]
    fn the_policy_reads_private_token_files_and_opens_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("www");
        std::fs::create_dir(&root).unwrap();
        let token = dir.path().join("deploy.token");
        std::fs::write(&token, "secret\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "[roots]\nwww = {root:?}\n[[token]]\nname = \"deploy\"\ntoken_file = {token:?}\n\
             root = \"www\"\nmode = \"read-write\"\n"
        );
        let (_cfg, path) = write(&text);
        let config = load(&path).unwrap();
        let policy = policy(&config).unwrap();
        let grants = policy.grants();
        assert_eq!(grants.len(), 1);
        assert_eq!(
            grants[0].root(),
            ("www", root.canonicalize().unwrap().as_path())
        );

        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = super::policy(&config).unwrap_err().to_string();
        assert!(e.contains("token deploy") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::remove_dir(&root).unwrap();
        let e = super::policy(&config).unwrap_err();
        assert!(e.to_string().contains("root www"), "{e}");
        assert!(!e.is_usage());
    }

    /// The example shipped beside the systemd unit (and shown in the
    /// README) is a file ferry accepts.
    #[test]
    fn the_example_in_contrib_is_valid() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/ferry.toml");
        // Installed 0644, whatever the checkout's umask made it.
        let (_dir, path) = write(&std::fs::read_to_string(example).unwrap());
        let config = load(&path).unwrap_or_else(|e| panic!("{e}"));
        let tokens: Vec<(&str, &str, Access)> = config
            .grants
            .iter()
            .map(|g| (g.name.as_str(), g.root_name.as_str(), g.access))
            .collect();
        assert_eq!(
            tokens,
            [
                ("deploy", "www", Access::WriteOnly),
                ("restore", "backups", Access::ReadOnly)
            ]
        );
        assert_eq!(config.server.host.as_deref(), Some("0.0.0.0"));
    }

    #[test]
    fn lines_are_counted_from_one() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 99), 3);
        assert_eq!(one_line("a\n  b\tc"), "a b c");
    }
}

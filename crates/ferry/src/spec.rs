//! Which side of `ferry cp SRC DST` is where: a local path, or a path on a
//! server. Pure: text in, a [`Spec`] or a [`Refused`] out.
//!
//! Each accepted form has one meaning:
//!
//! | typed | means |
//! |---|---|
//! | `/x`, `./x`, `../x`, `.`, `..` | always a local path (`./a:b` is the local `a:b`) |
//! | no `:` before the first `/` | a local path (`dir/a:b` too) |
//! | `HOST:PATH` | `PATH` on the server `HOST` (a host name or IPv4 address), port from `--port` |
//! | `[IPV6]:PATH` | the same, for an IPv6 address |
//! | `ferry://HOST[:PORT]/PATH`, `ferry://[IPV6][:PORT]/PATH` | with the port in the argument |
//!
//! Anything that could be read two ways is refused with the forms above,
//! never guessed: a copy made locally when it was meant for a server (or
//! the other way round) is the one thing this must not do. So `::1:x` (a
//! bare IPv6 address), `host:8834:x` (a port, or a path `8834:x`?),
//! `user@host:x` (ferry has no users), `host:~/x` (there is no home on the
//! server: remote paths are relative to its root), `host::x` (rsync's
//! daemon form), `scp://…` and `%XX` escapes in a URL are all refused.

use std::ffi::OsStr;
use std::fmt;
use std::net::Ipv6Addr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// One side of `ferry cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Local(PathBuf),
    Remote(Remote),
}

/// A path on a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// A host name, an IPv4 address, or an IPv6 address (without brackets).
    pub host: String,
    /// The port the argument named (`ferry://` only).
    pub port: Option<u16>,
    /// Relative to the server's root, as typed.
    pub path: Vec<u8>,
}

/// What `ferry cp` takes, shown with every refusal.
pub const FORMS: &str = "accepted forms: HOST:PATH, [IPV6]:PATH, ferry://HOST[:PORT]/PATH, \
                         ferry://[IPV6][:PORT]/PATH; a local path with a colon is written ./a:b";

/// Why an argument is refused: it could mean more than one thing, or
/// something ferry does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    Empty,
    /// `user@host:path`.
    User {
        user: String,
    },
    /// A remote path starting with `~`.
    Home,
    /// `::1:x`: an IPv6 address needs brackets (as in `example`).
    BareIpv6 {
        example: String,
    },
    /// `host:8834:x`: a port, or part of the path?
    PortOrPath {
        host: String,
        port: String,
        rest: String,
    },
    /// `host::x`: rsync's daemon module syntax.
    Module,
    /// Not a host name (`my file:x`), or nothing before the colon (`:x`).
    Host {
        host: String,
    },
    /// `[x]:path` where `x` is not an IPv6 address.
    Ipv6 {
        addr: String,
    },
    /// A URL of another scheme.
    Scheme {
        scheme: String,
    },
    /// A port that is not 1 to 65535.
    Port {
        port: String,
    },
    /// `%XX` in a `ferry://` path: escaped, or meant as typed?
    Escape,
    /// The port in `ferry://` and `--port` differ.
    TwoPorts {
        url: u16,
        flag: u16,
    },
}

impl Refused {
    /// What is wrong, without the forms.
    pub fn reason(&self) -> String {
        match self {
            Refused::Empty => "an empty path".into(),
            Refused::User { user } => format!(
                "ferry has no users ('{user}@'): a server serves its root to every client that \
                 proves its token; leave out '{user}@'"
            ),
            Refused::Home => {
                "'~' is not expanded: a remote path is relative to the server's root (its \
                 --root), not to a home directory; leave out '~/'"
                    .into()
            }
            Refused::BareIpv6 { example } => format!("an IPv6 address goes in brackets: {example}"),
            Refused::PortOrPath { host, port, rest } => format!(
                "is {port} a port or part of the path? For the port write \
                 ferry://{host}:{port}/{rest}, for the path {host}:./{port}:{rest}"
            ),
            Refused::Module => "'::': ferry has no rsync modules".into(),
            Refused::Host { host } if host.is_empty() => "no host name".into(),
            Refused::Host { host } => format!("'{host}' is not a host name"),
            Refused::Ipv6 { addr } => format!("'{addr}' in brackets is not an IPv6 address"),
            Refused::Scheme { scheme } => format!("ferry does not speak {scheme}://"),
            Refused::Port { port } => format!("port '{port}' is not a number from 1 to 65535"),
            Refused::Escape => "'%' escapes are not decoded in a ferry:// path; write HOST:PATH \
                 with the path as it is"
                .into(),
            Refused::TwoPorts { url, flag } => {
                format!("two ports: {url} in the URL and --port {flag}")
            }
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({FORMS})", self.reason())
    }
}

/// Read one side of `ferry cp`.
pub fn parse(arg: &OsStr) -> Result<Spec, Refused> {
    let bytes = arg.as_bytes();
    if bytes.is_empty() {
        return Err(Refused::Empty);
    }
    if always_local(bytes) {
        return Ok(Spec::Local(PathBuf::from(arg)));
    }
    if let Some((scheme, rest)) = url_scheme(bytes) {
        return match scheme.eq_ignore_ascii_case("ferry") {
            true => url(rest).map(Spec::Remote),
            false => Err(Refused::Scheme { scheme }),
        };
    }
    if let Some(remote) = bracketed(bytes) {
        return remote.map(Spec::Remote);
    }
    // scp's rule: a colon before any slash makes HOST:PATH.
    let before_slash = &bytes[..bytes.iter().position(|&b| b == b'/').unwrap_or(bytes.len())];
    let Some(colon) = before_slash.iter().position(|&b| b == b':') else {
        return Ok(Spec::Local(PathBuf::from(arg)));
    };
    if let Some(addr) = bare_ipv6(before_slash) {
        let rest = match bytes.get(addr.len() + 1..) {
            Some(rest) if !rest.is_empty() => text(rest),
            _ => "PATH".into(),
        };
        let example = format!("[{addr}]:{rest}");
        return Err(Refused::BareIpv6 { example });
    }
    host_path(&bytes[..colon], &bytes[colon + 1..]).map(Spec::Remote)
}

/// The port to reach `remote` on: the one its URL names, else `--port`,
/// else `default`; refused if the URL's and `--port` differ.
pub fn port(remote: &Remote, flag: Option<u16>, default: u16) -> Result<u16, Refused> {
    match (remote.port, flag) {
        (Some(url), Some(flag)) if url != flag => Err(Refused::TwoPorts { url, flag }),
        (Some(port), _) | (None, Some(port)) => Ok(port),
        (None, None) => Ok(default),
    }
}

/// Check a path meant for the server as typed (the remote side of
/// `upload` and `download` too).
pub fn remote_path(path: &[u8]) -> Result<&[u8], Refused> {
    match path.first() {
        Some(b'~') => Err(Refused::Home),
        Some(b':') => Err(Refused::Module),
        _ => Ok(path),
    }
}

/// Paths that name a local file whatever follows.
fn always_local(bytes: &[u8]) -> bool {
    bytes.starts_with(b"/")
        || bytes.starts_with(b"./")
        || bytes.starts_with(b"../")
        || bytes == b"."
        || bytes == b".."
}

/// `scheme://rest`, for a scheme as URLs spell it.
fn url_scheme(bytes: &[u8]) -> Option<(String, &[u8])> {
    let at = bytes.windows(3).position(|w| w == b"://")?;
    let scheme = &bytes[..at];
    let well_formed = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"+.-".contains(&b));
    well_formed.then(|| (text(scheme), &bytes[at + 3..]))
}

/// `ferry://` was stripped: `AUTHORITY[/PATH]`.
fn url(rest: &[u8]) -> Result<Remote, Refused> {
    let slash = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
    let (authority, path) = (&rest[..slash], rest.get(slash + 1..).unwrap_or_default());
    if let Some(at) = authority.iter().rposition(|&b| b == b'@') {
        return Err(Refused::User {
            user: text(&authority[..at]),
        });
    }
    let (host, port) = match authority.strip_prefix(b"[") {
        Some(inner) => {
            let close = inner
                .iter()
                .position(|&b| b == b']')
                .ok_or(Refused::Ipv6 { addr: text(inner) })?;
            let port = match &inner[close + 1..] {
                [] => None,
                [b':', port @ ..] => Some(port),
                _ => {
                    return Err(Refused::Host {
                        host: text(authority),
                    });
                }
            };
            (ipv6(&inner[..close])?, port)
        }
        None if bare_ipv6(authority).is_some() => {
            let example = "ferry://[IPV6]:PORT/PATH".into();
            return Err(Refused::BareIpv6 { example });
        }
        None => match authority.iter().position(|&b| b == b':') {
            Some(c) => (host_name(&authority[..c])?, Some(&authority[c + 1..])),
            None => (host_name(authority)?, None),
        },
    };
    let port = port.map(port_number).transpose()?;
    if has_escape(path) {
        return Err(Refused::Escape);
    }
    let path = remote_path(path)?.to_vec();
    Ok(Remote { host, port, path })
}

/// `[IPV6]:PATH`, if the argument has that shape.
fn bracketed(bytes: &[u8]) -> Option<Result<Remote, Refused>> {
    let inner = bytes.strip_prefix(b"[")?;
    let close = inner.iter().position(|&b| b == b']')?;
    let path = inner[close + 1..].strip_prefix(b":")?;
    Some(ipv6(&inner[..close]).and_then(|host| {
        let path = remote_path(path)?;
        if let Some((port, rest)) = port_like(path) {
            let host = format!("[{host}]");
            return Err(Refused::PortOrPath { host, port, rest });
        }
        Ok(Remote {
            host,
            port: None,
            path: path.to_vec(),
        })
    }))
}

/// `HOST:PATH`, split at its first colon.
fn host_path(host: &[u8], path: &[u8]) -> Result<Remote, Refused> {
    if let Some(at) = host.iter().rposition(|&b| b == b'@') {
        return Err(Refused::User {
            user: text(&host[..at]),
        });
    }
    let host = host_name(host)?;
    let path = remote_path(path)?;
    if let Some((port, rest)) = port_like(path) {
        return Err(Refused::PortOrPath { host, port, rest });
    }
    Ok(Remote {
        host,
        port: None,
        path: path.to_vec(),
    })
}

/// A host name or an IPv4 address: letters, digits, `-`, `.` and `_`,
/// not starting with `-` or `.` (an option, a relative path).
fn host_name(host: &[u8]) -> Result<String, Refused> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with(b"-")
        && !host.starts_with(b".")
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    match ok {
        true => Ok(text(host)),
        false => Err(Refused::Host { host: text(host) }),
    }
}

fn ipv6(addr: &[u8]) -> Result<String, Refused> {
    std::str::from_utf8(addr)
        .ok()
        .filter(|a| a.parse::<Ipv6Addr>().is_ok())
        .map(str::to_string)
        .ok_or_else(|| Refused::Ipv6 { addr: text(addr) })
}

/// The longest IPv6 address that `text` starts with, up to a colon or its
/// end, if any: `::1:x` is `::1` and then `x`.
fn bare_ipv6(text: &[u8]) -> Option<String> {
    let colons = text.iter().enumerate().filter(|&(_, &b)| b == b':');
    let ends = colons.map(|(i, _)| i).chain([text.len()]);
    ends.rev()
        .filter_map(|end| std::str::from_utf8(&text[..end]).ok())
        .find(|a| a.parse::<Ipv6Addr>().is_ok())
        .map(str::to_string)
}

/// `DIGITS:REST`: a port in front of a path, or a path of its own.
fn port_like(path: &[u8]) -> Option<(String, String)> {
    let colon = path.iter().position(|&b| b == b':')?;
    let digits = &path[..colon];
    (!digits.is_empty() && digits.iter().all(u8::is_ascii_digit))
        .then(|| (text(digits), text(&path[colon + 1..])))
}

fn port_number(port: &[u8]) -> Result<u16, Refused> {
    std::str::from_utf8(port)
        .ok()
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|&p| p != 0)
        .ok_or_else(|| Refused::Port { port: text(port) })
}

fn has_escape(path: &[u8]) -> bool {
    path.windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
}

/// For messages: what the user typed (invalid UTF-8 shown replaced).
fn text(bytes: &[u8]) -> String {
    ferry_engine::escape(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(host: &str, port: Option<u16>, path: &str) -> Result<Spec, Refused> {
        Ok(Spec::Remote(Remote {
            host: host.into(),
            port,
            path: path.as_bytes().to_vec(),
        }))
    }

    fn local(path: &str) -> Result<Spec, Refused> {
        Ok(Spec::Local(path.into()))
    }

    fn parsed(arg: &str) -> Result<Spec, Refused> {
        parse(OsStr::new(arg))
    }

    #[test]
    fn accepted_remote_forms() {
        let table = [
            ("host:dir/f", remote("host", None, "dir/f")),
            (
                "my-host.example.com:x",
                remote("my-host.example.com", None, "x"),
            ),
            ("10.0.0.1:", remote("10.0.0.1", None, "")),
            ("host:a:b", remote("host", None, "a:b")),
            ("host:2024", remote("host", None, "2024")),
            ("host:./8834:x", remote("host", None, "./8834:x")),
            ("[::1]:x", remote("::1", None, "x")),
            ("[::1]:", remote("::1", None, "")),
            (
                "[2001:db8::7]:data/x",
                remote("2001:db8::7", None, "data/x"),
            ),
            (
                "ferry://host:9000/dir/x",
                remote("host", Some(9000), "dir/x"),
            ),
            ("ferry://host/dir/", remote("host", None, "dir/")),
            ("ferry://host", remote("host", None, "")),
            ("ferry://host:9000/", remote("host", Some(9000), "")),
            ("ferry://127.0.0.1:1/x", remote("127.0.0.1", Some(1), "x")),
            ("ferry://[::1]:9000/x", remote("::1", Some(9000), "x")),
            ("ferry://[::1]/x", remote("::1", None, "x")),
            ("FERRY://h/x", remote("h", None, "x")),
            ("ferry://h/8834:x", remote("h", None, "8834:x")),
            ("ferry://h/a:b/c", remote("h", None, "a:b/c")),
        ];
        for (arg, want) in table {
            assert_eq!(parsed(arg), want, "{arg}");
        }
    }

    #[test]
    fn local_forms() {
        for arg in [
            "./a:b",
            "/abs/x:y",
            "../a:b",
            ".",
            "..",
            "plain",
            "dir/a:b",
            "dir/sub/",
            "[draft] notes",
            "~/x",
            "user@host",
            "./scp://x",
        ] {
            assert_eq!(parsed(arg), local(arg), "{arg}");
        }
    }

    #[test]
    fn refused_forms() {
        let user = |u: &str| Refused::User { user: u.into() };
        let host = |h: &str| Refused::Host { host: h.into() };
        let bare = |e: &str| Refused::BareIpv6 { example: e.into() };
        let port = |p: &str| Refused::Port { port: p.into() };
        let table = [
            ("", Refused::Empty),
            ("user@host:x", user("user")),
            ("user@[::1]:x", user("user")),
            ("ferry://user@host/x", user("user")),
            ("host:~/x", Refused::Home),
            ("host:~", Refused::Home),
            ("[::1]:~/x", Refused::Home),
            ("ferry://h/~/x", Refused::Home),
            ("::1:v6/x", bare("[::1]:v6/x")),
            ("::1", bare("[::1]:PATH")),
            ("fe80::1:x", bare("[fe80::1]:x")),
            ("ferry://::1/x", bare("ferry://[IPV6]:PORT/PATH")),
            ("host::x", Refused::Module),
            ("my file:x", host("my file")),
            (":x", host("")),
            ("-o:x", host("-o")),
            ("ferry:///x", host("")),
            (
                "[nothost]:x",
                Refused::Ipv6 {
                    addr: "nothost".into(),
                },
            ),
            ("ferry://[::1/x", Refused::Ipv6 { addr: "::1".into() }),
            ("ferry://[::1]x/y", host("[::1]x")),
            (
                "scp://host/x",
                Refused::Scheme {
                    scheme: "scp".into(),
                },
            ),
            (
                "http://host/x",
                Refused::Scheme {
                    scheme: "http".into(),
                },
            ),
            ("ferry://h:0/x", port("0")),
            ("ferry://h:65536/x", port("65536")),
            ("ferry://h:+1/x", port("+1")),
            ("ferry://h:/x", port("")),
            ("ferry://h/a%20b", Refused::Escape),
        ];
        for (arg, want) in table {
            assert_eq!(parsed(arg), Err(want), "{arg}");
        }
        let ambiguous = [
            ("host:8834:x", "host", "8834", "x"),
            ("host:8834:", "host", "8834", ""),
            ("[::1]:8834:x", "[::1]", "8834", "x"),
        ];
        for (arg, host, port, rest) in ambiguous {
            let (host, port, rest) = (host.into(), port.into(), rest.into());
            let want = Refused::PortOrPath { host, port, rest };
            assert_eq!(parsed(arg), Err(want), "{arg}");
        }
    }

    #[test]
    fn a_refusal_is_one_line_that_shows_the_forms() {
        for arg in ["user@h:x", "::1:x", "h:1:x", "h:~", "scp://h/x", ":x"] {
            let message = parsed(arg).unwrap_err().to_string();
            assert!(!message.contains('\n'), "{message}");
            assert!(message.ends_with(&format!("({FORMS})")), "{message}");
        }
        let message = parsed("h:8834:x").unwrap_err().to_string();
        assert!(
            message.contains("ferry://h:8834/x") && message.contains("h:./8834:x"),
            "{message}"
        );
        let message = parsed("alice@h:x").unwrap_err().to_string();
        assert!(message.contains("no users"), "{message}");
        let message = parsed("h:~/x").unwrap_err().to_string();
        assert!(
            message.contains("relative to the server's root"),
            "{message}"
        );
    }

    #[test]
    fn the_port_comes_from_the_url_or_the_flag_never_both_differing() {
        let at = |port| Remote {
            host: "h".into(),
            port,
            path: vec![],
        };
        assert_eq!(port(&at(None), None, 8834), Ok(8834));
        assert_eq!(port(&at(None), Some(1), 8834), Ok(1));
        assert_eq!(port(&at(Some(9)), None, 8834), Ok(9));
        assert_eq!(port(&at(Some(9)), Some(9), 8834), Ok(9));
        assert_eq!(
            port(&at(Some(9)), Some(1), 8834),
            Err(Refused::TwoPorts { url: 9, flag: 1 })
        );
    }

    #[test]
    fn remote_paths_have_no_home_and_no_modules() {
        assert_eq!(remote_path(b"a/~b"), Ok(&b"a/~b"[..]));
        assert_eq!(remote_path(b"./~"), Ok(&b"./~"[..]));
        assert_eq!(remote_path(b""), Ok(&b""[..]));
        assert_eq!(remote_path(b"~x"), Err(Refused::Home));
        assert_eq!(remote_path(b":x"), Err(Refused::Module));
    }
}

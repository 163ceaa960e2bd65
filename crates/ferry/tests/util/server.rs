//! A `ferry server` to test against: the fixture on an ephemeral loopback
//! port, the magic and version that open a connection (for peers that are
//! not ferry), and a port that nothing listens on.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::Duration;

use rustix::process::{Pid, Signal};

use super::process::{
    DRAIN_GRACE, Drain, Output, RunOptions, Running, SERVER_TIMEOUT, clip, contains_ci,
    describe_status, poll_until, run_os, spawn_os, state_home, to_os_args, wait_deadline,
};

/// The protocol version the binary speaks; bump together with
/// `ferry_proto::PROTOCOL_VERSION` (the tests pin the wire, like golden bytes).
pub const PROTOCOL_VERSION: u16 = 8;
/// The 6 magic bytes that open every ferry connection.
pub const MAGIC: &[u8; 6] = b"FERRY\0";

/// A `ferry server` on 127.0.0.1 (or another loopback address) with an
/// ephemeral port; killed on drop.
///
/// Its clients are, by default, its own user's on this machine: they share
/// its state directory, where they find its token, as a user's clients do
/// (see [`Server::client_args`]). A client of another user gets nothing
/// from it, and must be handed the token ([`Server::token`]).
pub struct Server {
    child: Option<Child>,
    addr: String,
    /// The address it listens on, as `--host` takes it.
    host: String,
    port: u16,
    root: PathBuf,
    /// Where the server keeps its key, certificate and token.
    state_dir: PathBuf,
    /// Who it runs as (`None`: as the tests do).
    user: Option<(u32, u32)>,
    tls: bool,
    stdout: Drain,
    stderr: Drain,
}

impl Server {
    pub fn start(root: &Path) -> Server {
        Server::start_with(root, &[])
    }

    /// Starts with extra arguments after `--root ROOT` (e.g. `--log-file F`).
    pub fn start_with(root: &Path, extra: &[&dyn AsRef<OsStr>]) -> Server {
        Server::start_as(root, extra, &RunOptions::default())
    }

    /// Starts with extra arguments and process options (user, program, cwd).
    pub fn start_as(root: &Path, extra: &[&dyn AsRef<OsStr>], opts: &RunOptions) -> Server {
        Server::start_on(root, 0, extra, opts)
    }

    /// Starts on a given port (0: any free one), e.g. to restart a killed
    /// server where its clients will reconnect.
    pub fn start_on(
        root: &Path,
        port: u16,
        extra: &[&dyn AsRef<OsStr>],
        opts: &RunOptions,
    ) -> Server {
        Server::start_at(root, "127.0.0.1", port, extra, opts)
    }

    /// Starts listening on `host` (e.g. `::1`), on `port` (0: any free one).
    pub fn start_at(
        root: &Path,
        host: &str,
        port: u16,
        extra: &[&dyn AsRef<OsStr>],
        opts: &RunOptions,
    ) -> Server {
        let port = port.to_string();
        let mut args: Vec<OsString> = ["server", "--host", host, "--port", &port, "--root"]
            .iter()
            .map(OsString::from)
            .collect();
        args.push(root.as_os_str().to_os_string());
        args.extend(to_os_args(extra));
        Server::launch(args, host, root, opts)
    }

    /// Starts `ferry server --config CONFIG` with extra arguments on any
    /// free port. Its [`Server::root`] is the file's directory; its clients
    /// are handed a token of the file's (`FERRY_TOKEN`).
    pub fn start_config(config: &Path, extra: &[&dyn AsRef<OsStr>], opts: &RunOptions) -> Server {
        let mut args: Vec<OsString> = ["server", "--host", "127.0.0.1", "--port", "0", "--config"]
            .iter()
            .map(OsString::from)
            .collect();
        args.push(config.as_os_str().to_os_string());
        args.extend(to_os_args(extra));
        let dir = config
            .parent()
            .expect("a configuration file has a directory");
        Server::launch(args, "127.0.0.1", dir, opts)
    }

    /// Runs `ferry ARGS` as a server and waits until it says where it
    /// listens; panics with its output if it does not.
    fn launch(args: Vec<OsString>, host: &str, root: &Path, opts: &RunOptions) -> Server {
        let state_dir = state_dir_of(&args, opts);
        let tls = !args.iter().any(|a| a == "--no-tls");
        let Running {
            mut child,
            command,
            stdout,
            stderr,
        } = spawn_os(&args, opts);

        let mut exited = None;
        let addr = poll_until(SERVER_TIMEOUT, || {
            if let Some(addr) = parse_listening(&stdout.snapshot()) {
                return Some(addr);
            }
            // A server that died will never print: stop waiting at once.
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return parse_listening(&stdout.snapshot()).or(Some(String::new()));
            }
            None
        });
        let addr = match addr {
            Some(addr) if !addr.is_empty() => addr,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let why = match exited {
                    Some(status) => format!("it exited with {}", describe_status(status)),
                    None => format!("no `listening on` line within {SERVER_TIMEOUT:?}"),
                };
                panic!(
                    "server did not start ({why}): {command}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    clip(&stdout.finish(DRAIN_GRACE)),
                    clip(&stderr.finish(DRAIN_GRACE)),
                );
            }
        };
        let port = addr
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .filter(|&port| port != 0)
            .unwrap_or_else(|| panic!("server printed an address without a port: {addr:?}"));
        Server {
            child: Some(child),
            addr,
            host: host.to_string(),
            port,
            root: root.to_path_buf(),
            state_dir,
            user: opts.user,
            tls,
            stdout,
            stderr,
        }
    }

    /// `HOST:PORT` as the server printed it.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What the server has logged to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.snapshot()
    }

    pub fn stdout(&self) -> String {
        self.stdout.snapshot()
    }

    /// Waits (bounded) until the server's stderr mentions `needle`; the
    /// server may log a file a moment after the client has exited.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        poll_until(timeout, || {
            contains_ci(&self.stderr(), needle).then_some(())
        })
        .is_some()
    }

    /// The server's state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The token the server made in its state directory, for a client of
    /// another user to be handed (`FERRY_TOKEN`), as its operator would.
    pub fn token(&self) -> String {
        let file = self.state_dir.join("token");
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("the server's token {}: {e}", file.display()));
        text.trim().to_string()
    }

    /// `opts` with the server's token in `FERRY_TOKEN`: a client of another
    /// user, handed the token as the server's operator would.
    pub fn handed_token(&self, opts: RunOptions) -> RunOptions {
        let mut opts = opts;
        opts.env.push(("FERRY_TOKEN".into(), self.token().into()));
        opts
    }

    /// A connection of a hand-written client of the server's own user to
    /// this `--no-tls` server: both prefaces, `hello` (as `software`), the
    /// server's `challenge`, and the `auth` that answers it with the
    /// server's token. The server's `welcome` is next on the stream.
    pub fn plaintext_session(&self, software: &str) -> TcpStream {
        let mut stream = TcpStream::connect(&self.addr).expect("connect to the server");
        stream.set_read_timeout(Some(SERVER_TIMEOUT)).unwrap();
        let mut hello = preface().to_vec();
        let json = format!(r#"{{"type":"hello","software":"{software}"}}"#);
        hello.extend(control_frame(&json));
        stream.write_all(&hello).unwrap();
        let mut theirs = [0u8; 8];
        stream
            .read_exact(&mut theirs)
            .expect("the server's preface");
        assert_eq!(theirs, preface(), "the server's preface");
        let mut header = [0u8; 5];
        stream
            .read_exact(&mut header)
            .expect("the server's challenge");
        let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
        assert!(header[0] == 1 && len < 4096, "a control frame: {header:?}");
        let mut body = vec![0u8; len];
        stream
            .read_exact(&mut body)
            .expect("the server's challenge");
        let challenge: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(challenge["type"], "challenge", "{challenge}");
        let nonce = challenge["nonce"].as_str().expect("a nonce");
        let mac = proof(&self.token(), nonce, b"");
        stream
            .write_all(&control_frame(&format!(
                r#"{{"type":"auth","mac":"{mac}"}}"#
            )))
            .unwrap();
        stream
    }

    /// `--host HOST --port PORT`, and what a client of the server's
    /// own user needs ([`Server::own_user_args`]), for commands that take them.
    pub fn client_args(&self) -> Vec<OsString> {
        let mut args = self.address_args();
        args.extend(self.own_user_args());
        args
    }

    fn address_args(&self) -> Vec<OsString> {
        vec![
            "--host".into(),
            self.host.clone().into(),
            "--port".into(),
            self.port.to_string().into(),
        ]
    }

    /// A client of the server's own user shares its state directory and
    /// finds its token there by itself: `--state-dir DIR`. Without TLS
    /// nothing tells the client which server it reached, so such a client
    /// names the token file: `--token-file DIR/token` too (if the server
    /// made one).
    pub fn own_user_args(&self) -> Vec<OsString> {
        let mut args = vec!["--state-dir".into(), self.state_dir.clone().into()];
        let token = self.state_dir.join("token");
        if !self.tls && token.exists() {
            args.extend(["--token-file".into(), token.into()]);
        }
        args
    }

    /// Runs `ferry ARGS --host HOST --port PORT` (upload/download) as
    /// a client of the server's own user.
    pub fn run(&self, args: &[&dyn AsRef<OsStr>]) -> Output {
        self.run_with(args, &RunOptions::default())
    }

    /// The same with `opts`. A client of the server's user that keeps no
    /// state of its own (`XDG_CONFIG_HOME`, `--state-dir`, `--token-file`)
    /// shares the server's; any other finds no token.
    pub fn run_with(&self, args: &[&dyn AsRef<OsStr>], opts: &RunOptions) -> Output {
        let mut all = to_os_args(args);
        all.extend(self.address_args());
        let own_state = opts.env.iter().any(|(key, _)| key == "XDG_CONFIG_HOME")
            || all
                .iter()
                .any(|a| a == "--state-dir" || a == "--token-file");
        if opts.user == self.user && !own_state {
            all.extend(self.own_user_args());
        }
        run_os(&all, opts)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// Sends `signal` and returns at once (SIGHUP: reload the configuration).
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.pid() as i32).expect("a child has a positive pid");
        rustix::process::kill_process(pid, signal).expect("signal the server");
    }

    /// How many file descriptors the server holds now.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|dir| dir.count())
            .unwrap_or(0)
    }

    /// The server's peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.status_field("VmHWM:")
    }

    /// A `kB` line of /proc/PID/status, in bytes (0 if unreadable).
    fn status_field(&self, name: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()));
        status
            .ok()
            .and_then(|text| {
                let line = text.lines().find(|l| l.starts_with(name))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map_or(0, |kib| kib * 1024)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGTERM, then wait at most 10 s for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with(Signal::TERM)
    }

    /// Sends `signal`, then waits at most 10 s for the exit status; panics
    /// (with the server's stderr) if it does not exit.
    pub fn stop_with(&mut self, signal: Signal) -> ExitStatus {
        let mut child = self.child.take().expect("server already stopped");
        if let Some(status) = child.try_wait().expect("try_wait on the server") {
            panic!(
                "server had already exited ({}) before it was stopped\n--- stderr ---\n{}",
                describe_status(status),
                clip(&self.stderr())
            );
        }
        let pid = Pid::from_raw(child.id() as i32).expect("a child has a positive pid");
        rustix::process::kill_process(pid, signal).expect("signal the server");
        match wait_deadline(&mut child, SERVER_TIMEOUT) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "server did not exit within {SERVER_TIMEOUT:?} of signal {signal:?}\n--- stderr ---\n{}",
                    clip(&self.stderr())
                );
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// This version's preface: the magic, then the version (PROTOCOL.md §2).
fn preface() -> [u8; 8] {
    let mut bytes = [0u8; 8];
    bytes[..6].copy_from_slice(MAGIC);
    bytes[6..].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    bytes
}

/// A control frame (PROTOCOL.md §3): type 1, u32 BE length, JSON.
fn control_frame(json: &str) -> Vec<u8> {
    let mut frame = vec![1u8];
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(json.as_bytes());
    frame
}

/// The answer to the challenge `nonce` (hex) with `token` on a connection
/// whose TLS exporter is `exporter` (empty without TLS), as PROTOCOL.md
/// defines it: hex HMAC-SHA256(token, "ferry-auth-v1" ‖ nonce ‖ exporter).
/// The `auth` proof of `token` for `nonce` over a TLS `exporter` (empty
/// without TLS), as a client computes it.
pub fn proof(token: &str, nonce: &str, exporter: &[u8]) -> String {
    let nonce: Vec<u8> = (0..nonce.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&nonce[i..i + 2], 16).expect("a hex nonce"))
        .collect();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    let tag = ring::hmac::sign(&key, &[b"ferry-auth-v1", &nonce[..], exporter].concat());
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The state directory of a server started with `args` and `opts`: its
/// `--state-dir`, else `ferry` in its `XDG_CONFIG_HOME`.
fn state_dir_of(args: &[OsString], opts: &RunOptions) -> PathBuf {
    if let Some(dir) = args.iter().skip_while(|a| *a != "--state-dir").nth(1) {
        return PathBuf::from(dir);
    }
    let home = opts
        .env
        .iter()
        .find(|(key, _)| key == "XDG_CONFIG_HOME")
        .map_or_else(|| state_home(args), |(_, home)| PathBuf::from(home));
    home.join("ferry")
}

/// The token after `listening on ` in the server's stdout, once the whole
/// line has arrived.
fn parse_listening(stdout: &str) -> Option<String> {
    stdout
        .split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .find_map(|line| {
            let (_, rest) = line.split_once("listening on ")?;
            rest.split_whitespace().next().map(str::to_string)
        })
}

/// A port on 127.0.0.1 that nothing listens on (bound, noted, released).
pub fn unused_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

mod self_test {
    use super::*;

    #[test]
    fn listening_line_is_parsed_only_when_complete() {
        let line = "ferry server listening on 127.0.0.1:40123 (root: /srv)\n";
        assert_eq!(parse_listening(line).as_deref(), Some("127.0.0.1:40123"));
        assert_eq!(parse_listening(line.trim_end()), None);
        assert_eq!(parse_listening("starting\n"), None);
    }
}

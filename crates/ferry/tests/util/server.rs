//! A `ferry server` to test against: the fixture on an ephemeral loopback
//! port, the magic and version that open a connection (for peers that are
//! not ferry), and a port that nothing listens on.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::Duration;

use rustix::process::{Pid, Signal};

use super::process::{
    DRAIN_GRACE, Drain, Output, RunOptions, Running, SERVER_TIMEOUT, clip, contains_ci,
    describe_status, poll_until, run_os, spawn_os, to_os_args, wait_deadline,
};

/// The protocol version the binary speaks; bump together with
/// `ferry_proto::PROTOCOL_VERSION` (the tests pin the wire, like golden bytes).
pub const PROTOCOL_VERSION: u16 = 6;
/// The 6 magic bytes that open every ferry connection.
pub const MAGIC: &[u8; 6] = b"FERRY\0";

/// A `ferry server` on 127.0.0.1 with an ephemeral port; killed on drop.
pub struct Server {
    child: Option<Child>,
    addr: String,
    port: u16,
    root: PathBuf,
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
        let port = port.to_string();
        let mut args: Vec<OsString> = ["server", "--host", "127.0.0.1", "--port", &port, "--root"]
            .iter()
            .map(OsString::from)
            .collect();
        args.push(root.as_os_str().to_os_string());
        args.extend(to_os_args(extra));
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
            port,
            root: root.to_path_buf(),
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

    /// `--host 127.0.0.1 --port PORT`, for commands that take both.
    pub fn client_args(&self) -> Vec<OsString> {
        vec![
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            self.port.to_string().into(),
        ]
    }

    /// Runs `ferry ARGS --host 127.0.0.1 --port PORT` (upload/download).
    pub fn run(&self, args: &[&dyn AsRef<OsStr>]) -> Output {
        self.run_with(args, &RunOptions::default())
    }

    pub fn run_with(&self, args: &[&dyn AsRef<OsStr>], opts: &RunOptions) -> Output {
        let mut all = to_os_args(args);
        all.extend(self.client_args());
        run_os(&all, opts)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
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

//! Helpers shared by the integration tests: running the real `ferry` binary
//! under a deadline, a server fixture on an ephemeral loopback port, and a
//! tree builder and comparer that check bytes, modes, mtimes and links.
//!
//! Every wait here is a poll with a deadline, so a hung binary fails a test
//! with its output instead of hanging the suite.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps};
use rustix::process::{Pid, Signal};

/// The protocol version the binary speaks; bump together with
/// `ferry_proto::PROTOCOL_VERSION` (the tests pin the wire, like golden bytes).
pub const PROTOCOL_VERSION: u16 = 5;
/// The 6 magic bytes that open every ferry connection.
pub const MAGIC: &[u8; 6] = b"FERRY\0";

/// How long an ordinary command may run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a command that is expected to fail may run: errors must be quick.
pub const ERROR_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to print its address, or to stop.
const SERVER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a killed process's pipes to reach end-of-file.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// The unprivileged user (`nobody`) the permission tests run as when the
/// suite runs as root, because root bypasses the permission checks.
pub const NOBODY: (u32, u32) = (65534, 65534);

pub const MIB: u64 = 1024 * 1024;

pub fn ferry_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferry"))
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Calls `f` every 20 ms until it returns `Some` or `timeout` has passed.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    // The count bound is a second fence in case the clock misbehaves.
    let max_polls = timeout.as_millis() / POLL.as_millis() + 2;
    for _ in 0..max_polls {
        if let Some(value) = f() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(POLL);
    }
    f()
}

/// Waits for `child` to exit, at most `timeout`; `None` if it is still running.
fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    poll_until(timeout, || child.try_wait().expect("try_wait on a child"))
}

// ---------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------

/// Everything a test may change about how a process is started.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub timeout: Duration,
    /// Run as this uid/gid (needs root); supplementary groups are dropped.
    pub user: Option<(u32, u32)>,
    pub env: Vec<(OsString, OsString)>,
    pub current_dir: Option<PathBuf>,
    /// Run this copy of the binary instead of `ferry_bin()` (an unprivileged
    /// user may not be able to reach the build directory).
    pub program: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: DEFAULT_TIMEOUT,
            user: None,
            env: Vec::new(),
            current_dir: None,
            program: None,
        }
    }
}

impl RunOptions {
    pub fn with_timeout(timeout: Duration) -> Self {
        RunOptions {
            timeout,
            ..RunOptions::default()
        }
    }

    fn command(&self, args: &[OsString]) -> (Command, String) {
        let program = self.program.as_deref().unwrap_or(ferry_bin());
        let mut cmd = Command::new(program);
        cmd.args(args);
        if !self.env.iter().any(|(key, _)| key == "XDG_CONFIG_HOME") {
            cmd.env("XDG_CONFIG_HOME", state_home(args));
        }
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        if let Some(dir) = &self.current_dir {
            cmd.current_dir(dir);
        }
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let mut shown = format!("{}", program.display());
        for arg in args {
            shown.push(' ');
            shown.push_str(&shell_quote(arg));
        }
        if let Some((uid, gid)) = self.user {
            shown.push_str(&format!("  (as uid {uid}, gid {gid})"));
        }
        (cmd, shown)
    }
}

fn shell_quote(arg: &OsStr) -> String {
    let text = arg.to_string_lossy();
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@".contains(&b));
    if plain {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

fn to_os_args(args: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// What a finished `ferry` run produced.
pub struct Output {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Exit status 0 and no panic.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        self.assert_code(0)
    }

    /// The given exit status and no panic (a panic is never a proper error).
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            Some(code),
            "expected exit status {code}\n{self}"
        );
        self.assert_no_panic()
    }

    #[track_caller]
    pub fn assert_no_panic(&self) -> &Self {
        assert!(
            !self.stderr.contains("panicked"),
            "the binary panicked\n{self}"
        );
        self
    }

    /// Case-insensitive: error wording may be capitalised either way.
    #[track_caller]
    pub fn assert_stderr_contains(&self, needle: &str) -> &Self {
        assert!(
            contains_ci(&self.stderr, needle),
            "stderr should mention {needle:?}\n{self}"
        );
        self
    }

    /// The last NDJSON event named `name` on stdout (a run with `--json`).
    #[track_caller]
    pub fn json_event(&self, name: &str) -> serde_json::Value {
        self.stdout
            .lines()
            .rev()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|v| v["event"] == name)
            .unwrap_or_else(|| panic!("no {name:?} event on stdout\n{self}"))
    }

    #[track_caller]
    pub fn assert_stdout_contains(&self, needle: &str) -> &Self {
        assert!(
            contains_ci(&self.stdout, needle),
            "stdout should mention {needle:?}\n{self}"
        );
        self
    }
}

/// Shows the command and its output, trimmed so a chatty run stays readable.
impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "command: {}", self.command)?;
        writeln!(f, "status: {}", describe_status(self.status))?;
        writeln!(f, "--- stdout ---\n{}", clip(&self.stdout))?;
        write!(f, "--- stderr ---\n{}", clip(&self.stderr))
    }
}

impl fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => format!("{status}"),
    }
}

/// Keeps the head and tail of long output.
fn clip(text: &str) -> String {
    const KEEP: usize = 3000;
    if text.len() <= 2 * KEEP {
        return text.to_string();
    }
    let mut head_end = KEEP;
    while !text.is_char_boundary(head_end) {
        head_end -= 1;
    }
    let mut tail_start = text.len() - KEEP;
    while !text.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    format!(
        "{}\n[... {} bytes elided ...]\n{}",
        &text[..head_end],
        tail_start - head_end,
        &text[tail_start..]
    )
}

pub fn contains_ci(haystack: &str, needle: &str) -> bool {
    haystack.to_lowercase().contains(&needle.to_lowercase())
}

/// Runs `ferry ARGS` with the default 60 s deadline.
pub fn run(args: &[&dyn AsRef<OsStr>]) -> Output {
    run_with(args, &RunOptions::default())
}

/// Runs `ferry ARGS`; kills it and panics if it outlives `timeout`.
pub fn run_timeout(args: &[&dyn AsRef<OsStr>], timeout: Duration) -> Output {
    run_with(args, &RunOptions::with_timeout(timeout))
}

pub fn run_with(args: &[&dyn AsRef<OsStr>], opts: &RunOptions) -> Output {
    run_os(&to_os_args(args), opts)
}

fn run_os(args: &[OsString], opts: &RunOptions) -> Output {
    spawn_os(args, opts).wait(opts.timeout)
}

/// A `ferry` process running in the background, so that a test can act
/// on it mid-transfer (kill it, break its connection).
pub struct Running {
    child: Child,
    command: String,
    stdout: Drain,
    stderr: Drain,
}

/// Starts `ferry ARGS` in the background.
pub fn spawn(args: &[&dyn AsRef<OsStr>], opts: &RunOptions) -> Running {
    spawn_os(&to_os_args(args), opts)
}

fn spawn_os(args: &[OsString], opts: &RunOptions) -> Running {
    let (mut cmd, command) = opts.command(args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
    let stdout = Drain::spawn(child.stdout.take().expect("piped stdout"));
    let stderr = Drain::spawn(child.stderr.take().expect("piped stderr"));
    Running {
        child,
        command,
        stdout,
        stderr,
    }
}

impl Running {
    /// Sends `signal` and waits (bounded) for the process to end.
    pub fn kill(self, signal: Signal) -> Output {
        let pid = Pid::from_raw(self.child.id() as i32).expect("a child has a positive pid");
        let _ = rustix::process::kill_process(pid, signal);
        self.wait(SERVER_TIMEOUT)
    }

    /// Waits at most `timeout` for the process to end; kills it and panics
    /// with its output if it does not.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let Some(status) = wait_deadline(&mut self.child, timeout) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "timed out after {timeout:?}, killed: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.command,
                clip(&self.stdout.finish(DRAIN_GRACE)),
                clip(&self.stderr.finish(DRAIN_GRACE)),
            );
        };
        Output {
            command: self.command,
            status,
            stdout: self.stdout.finish(DRAIN_GRACE),
            stderr: self.stderr.finish(DRAIN_GRACE),
        }
    }
}

/// Reads a pipe to its end on a thread, keeping everything read so far
/// available to the test (server logs are asserted on while it runs).
struct Drain {
    buf: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

impl Drain {
    fn spawn(mut pipe: impl Read + Send + 'static) -> Drain {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = mpsc::channel();
        let sink = Arc::clone(&buf);
        thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            // Ends at end-of-file, which comes when the process exits.
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => sink.lock().unwrap().extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = tx.send(());
        });
        Drain { buf, done }
    }

    fn snapshot(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }

    /// Waits (bounded) for end-of-file, then returns everything read.
    fn finish(self, grace: Duration) -> String {
        let _ = self.done.recv_timeout(grace);
        self.snapshot()
    }
}

/// Where a ferry process started by a test keeps its state (the server's
/// TLS key, the client's known_hosts): never the real home, and never a
/// place another test uses. A server gets one directory per root, so that
/// one restarted on the same root keeps its key, as a real one would; a
/// client gets a fresh one per run, so it trusts on first use and never
/// meets a port that another test's server held before. A test that needs
/// something else sets XDG_CONFIG_HOME or passes --state-dir itself.
fn state_home(args: &[OsString]) -> PathBuf {
    use std::hash::{Hash, Hasher};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    static CLIENTS: AtomicU64 = AtomicU64::new(0);
    let base = BASE.get_or_init(|| {
        remove_stale_state_homes();
        let dir = tempfile::Builder::new()
            .prefix("ferry-test-state-")
            .tempdir()
            .expect("make the tests' state directory")
            .keep();
        set_mode(&dir, 0o755);
        dir
    });
    let name = if args.first().is_some_and(|a| a == "server") {
        let root = args
            .iter()
            .skip_while(|a| *a != "--root")
            .nth(1)
            .cloned()
            .unwrap_or_default();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        root.hash(&mut hasher);
        format!("server-{:016x}", hasher.finish())
    } else {
        format!("client-{}", CLIENTS.fetch_add(1, Ordering::Relaxed))
    };
    let dir = base.join(name);
    if fs::create_dir(&dir).is_ok() {
        // Tests run some processes as `nobody`.
        set_mode(&dir, 0o777);
    }
    dir
}

/// The state directories of earlier test runs (a static cannot remove its
/// own at exit): those untouched for a day, so that a run going on beside
/// this one keeps its own.
fn remove_stale_state_homes() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let stale = entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| {
            t.elapsed()
                .is_ok_and(|age| age > Duration::from_secs(86_400))
        });
        if stale
            && entry
                .file_name()
                .as_bytes()
                .starts_with(b"ferry-test-state-")
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Options that let `nobody` run the client or the server when the suite
/// runs as root: a world-readable copy of the binary inside `scratch` (the
/// build directory may not be reachable by other users) and a working
/// directory it can enter. When not root, the defaults already run
/// unprivileged.
pub fn unprivileged(scratch: &Scratch) -> RunOptions {
    if !is_root() {
        return RunOptions::default();
    }
    scratch.open_to_all();
    let bin_dir = scratch.path().join("bin");
    let program = bin_dir.join("ferry");
    if !program.exists() {
        fs::create_dir_all(&bin_dir).unwrap();
        set_mode(&bin_dir, 0o755);
        fs::copy(ferry_bin(), &program).unwrap_or_else(|e| {
            panic!(
                "copy {} to {}: {e}",
                ferry_bin().display(),
                program.display()
            )
        });
        set_mode(&program, 0o755);
    }
    RunOptions {
        user: Some(NOBODY),
        current_dir: Some(scratch.path().to_path_buf()),
        program: Some(program),
        ..RunOptions::default()
    }
}

// ---------------------------------------------------------------------------
// The server fixture
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Scratch directories
// ---------------------------------------------------------------------------

/// A temporary directory that can always be removed: on drop it gives its
/// owner write and search permission on every directory again (trees under
/// test contain 0o555 directories, which stop a non-root removal).
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("ferry-test-")
                .tempdir()
                .expect("create a temporary directory"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Creates `relative` (and parents) with mode 0o755 and returns its path.
    pub fn mkdir(&self, relative: impl AsRef<Path>) -> PathBuf {
        let path = self.join(relative);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        set_mode(&path, 0o755);
        path
    }

    /// Makes the scratch directory enterable by other users (tempdirs are
    /// 0o700); its parent, the system temp directory, already is.
    pub fn open_to_all(&self) {
        set_mode(self.path(), 0o755);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut stack = vec![self.dir.path().to_path_buf()];
        // Bounded by the size of the tree; each directory is visited once.
        while let Some(dir) = stack.pop() {
            if let Ok(meta) = fs::symlink_metadata(&dir)
                && meta.is_dir()
                && meta.mode() & 0o700 != 0o700
            {
                let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(meta.mode() | 0o700));
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(entry.path());
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Files: content, modes, times
// ---------------------------------------------------------------------------

/// xorshift64*: tiny, deterministic and good enough that zstd cannot
/// compress its output.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Mix the seed so small seeds do not start with small numbers; never 0.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    Rng::new(seed).fill(&mut buf);
    buf
}

/// Writes `size` pseudo-random bytes (from `seed`) to `path`, mode 0o644.
pub fn write_random_file(path: &Path, size: u64, seed: u64) {
    let mut file =
        fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        file.write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        left -= n as u64;
    }
    drop(file);
    set_mode(path, 0o644);
}

/// Writes `bytes` to `path`, mode 0o644.
pub fn write_file(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    set_mode(path, 0o644);
}

/// chmod (follows symlinks; never call it on one).
pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, path.display()));
}

/// Sets atime and mtime of `path` itself, not following a symlink.
pub fn set_mtime(path: &Path, secs: i64, nanos: i64) {
    let time = Timespec {
        tv_sec: secs as _,
        tv_nsec: nanos as _,
    };
    let times = Timestamps {
        last_access: time,
        last_modification: time,
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|e| panic!("utimensat {}: {e}", path.display()));
}

pub fn lstat(path: &Path) -> fs::Metadata {
    fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()))
}

pub fn mkfifo(path: &Path) {
    rustix::fs::mknodat(CWD, path, FileType::Fifo, Mode::from_raw_mode(0o644), 0)
        .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
}

/// Hands out distinct timestamps, each with a non-zero nanosecond part, so
/// a receiver that drops nanoseconds or mixes up entries is caught.
struct Clock(i64);

impl Clock {
    fn next(&mut self) -> (i64, i64) {
        self.0 += 1;
        let secs = 1_600_000_000 + self.0 * 86_413;
        let nanos = (self.0 * 7_919_773 + 123_456_789) % 1_000_000_000;
        (secs, nanos)
    }
}

// Names in the full tree that tests refer to.
pub const DEEP_FILE: &str = "a/b/c/deep.txt";
pub const BIG_FILE: &str = "five-mib.bin";
pub const SPACED_FILE: &str = "name with spaces.txt";
pub const FIFO: &str = "fifo";

/// Builds every case the transfer must preserve under `root` (created here).
///
/// ```text
/// root/                       0o755
///   a/b/c/deep.txt            three levels deep
///   a/b/mid.txt  a/top.txt
///   empty-dir/                empty
///   zero.bin  one.bin  mib-plus-one.bin  five-mib.bin   (0, 1, 1 MiB+1, 5 MiB+123 bytes; random)
///   compressible.txt          ~3 MiB of text
///   "name with spaces.txt"  "-rf"  "ünïcödé 日本.txt"  b"bad\xffname"
///   private.txt 0o600  run.sh 0o755  readonly.txt 0o444
///   private-dir/ 0o700 (secret.txt)   sealed-dir/ 0o555 (inside.txt)
///   links/to-file -> ../a/b/c/deep.txt   links/to-dir -> ../a/b
///   links/dangling -> missing-target     links/absolute -> /etc/hostname
///   fifo                      0o644, recreated as a fifo
/// ```
pub fn build_full_tree(root: &Path) {
    fs::create_dir_all(root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
    let mut clock = Clock(0);
    // (directory, mode); the root first, so it is set last below.
    let mut dirs = vec![(root.to_path_buf(), 0o755)];
    for (relative, mode) in [
        ("a", 0o755),
        ("a/b", 0o755),
        ("a/b/c", 0o755),
        ("empty-dir", 0o755),
        ("private-dir", 0o700),
        ("sealed-dir", 0o555),
        ("links", 0o755),
    ] {
        let path = root.join(relative);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        dirs.push((path, mode));
    }

    // (name, size, seed): random content, so compression cannot hide bugs.
    let random_files: [(&str, u64, u64); 9] = [
        (DEEP_FILE, 4096, 1),
        ("a/b/mid.txt", 100, 2),
        ("a/top.txt", 10_000, 3),
        ("zero.bin", 0, 4),
        ("one.bin", 1, 5),
        ("mib-plus-one.bin", MIB + 1, 6),
        (BIG_FILE, 5 * MIB + 123, 7),
        ("private-dir/secret.txt", 33, 8),
        ("sealed-dir/inside.txt", 777, 9),
    ];
    let mut files = Vec::new();
    for (name, size, seed) in random_files {
        let path = root.join(name);
        write_random_file(&path, size, seed);
        files.push((path, 0o644));
    }

    let mut text = String::new();
    let mut line = 0;
    while text.len() < 3 * MIB as usize {
        line += 1;
        text.push_str(&format!(
            "line {line}: the quick brown fox jumps over the lazy dog\n"
        ));
    }
    files.push((root.join("compressible.txt"), 0o644));
    write_file(&root.join("compressible.txt"), text.as_bytes());

    // Names that break naive quoting, argument parsing and UTF-8 handling.
    let odd_names: [&OsStr; 4] = [
        OsStr::new(SPACED_FILE),
        OsStr::new("-rf"),
        OsStr::new("ünïcödé 日本.txt"),
        OsStr::from_bytes(b"bad\xffname"),
    ];
    for (i, name) in odd_names.into_iter().enumerate() {
        let path = root.join(name);
        write_random_file(&path, 64 + i as u64, 20 + i as u64);
        files.push((path, 0o644));
    }

    for (name, mode) in [
        ("private.txt", 0o600),
        ("run.sh", 0o755),
        ("readonly.txt", 0o444),
    ] {
        let path = root.join(name);
        write_file(&path, format!("{name}: mode {mode:o}\n").as_bytes());
        files.push((path, mode));
    }

    let links = [
        ("links/to-file", "../a/b/c/deep.txt"),
        ("links/to-dir", "../a/b"),
        ("links/dangling", "missing-target"),
        ("links/absolute", "/etc/hostname"),
    ];
    for (name, target) in links {
        let path = root.join(name);
        symlink(target, &path).unwrap_or_else(|e| panic!("symlink {}: {e}", path.display()));
        let (secs, nanos) = clock.next();
        set_mtime(&path, secs, nanos);
    }

    mkfifo(&root.join(FIFO));
    let (secs, nanos) = clock.next();
    set_mtime(&root.join(FIFO), secs, nanos);

    for (path, mode) in &files {
        set_mode(path, *mode);
        let (secs, nanos) = clock.next();
        set_mtime(path, secs, nanos);
    }

    // Directory modes and mtimes last: creating anything inside a directory
    // changes its mtime, and 0o555 would stop a non-root builder filling it.
    // Deepest first, the order a receiver must also follow.
    dirs.sort_by_key(|(dir, _)| std::cmp::Reverse(dir.components().count()));
    for (dir, mode) in &dirs {
        set_mode(dir, *mode);
        let (secs, nanos) = clock.next();
        set_mtime(dir, secs, nanos);
    }
}

/// A few files and a subdirectory, for tests about naming rather than content.
pub fn build_small_tree(root: &Path) {
    fs::create_dir_all(root.join("sub")).unwrap();
    write_random_file(&root.join("one.txt"), 1000, 41);
    write_random_file(&root.join("sub/two.txt"), 2000, 42);
    set_mtime(&root.join("one.txt"), 1_500_000_001, 111_111_111);
    set_mtime(&root.join("sub/two.txt"), 1_500_000_002, 222_222_222);
    set_mode(&root.join("sub"), 0o755);
    set_mtime(&root.join("sub"), 1_500_000_003, 333_333_333);
    set_mode(root, 0o755);
    set_mtime(root, 1_500_000_004, 444_444_444);
}

// ---------------------------------------------------------------------------
// Comparing
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Device,
    /// Sockets: never transferred.
    Special,
}

fn kind_of(meta: &fs::Metadata) -> Kind {
    let file_type = meta.file_type();
    if file_type.is_symlink() {
        Kind::Symlink
    } else if file_type.is_dir() {
        Kind::Dir
    } else if file_type.is_file() {
        Kind::File
    } else if file_type.is_fifo() {
        Kind::Fifo
    } else if file_type.is_block_device() || file_type.is_char_device() {
        Kind::Device
    } else {
        debug_assert!(file_type.is_socket());
        Kind::Special
    }
}

/// Every entry under `root` (the root itself as ""), by lstat: symlinks are
/// never followed.
fn walk(root: &Path) -> BTreeMap<PathBuf, fs::Metadata> {
    let mut entries = BTreeMap::new();
    entries.insert(PathBuf::new(), lstat(root));
    let mut stack = vec![PathBuf::new()];
    // Bounded by the tree: each directory is pushed once, links are not entered.
    while let Some(relative) = stack.pop() {
        let dir = root.join(&relative);
        let listing =
            fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
        for entry in listing {
            let entry = entry.unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
            let child = relative.join(entry.file_name());
            let meta = lstat(&root.join(&child));
            if meta.is_dir() {
                stack.push(child.clone());
            }
            entries.insert(child, meta);
        }
    }
    entries
}

fn show(relative: &Path) -> String {
    if relative.as_os_str().is_empty() {
        ".".to_string()
    } else {
        format!("{:?}", relative)
    }
}

fn is_part_name(name: &OsStr) -> bool {
    name.as_bytes().ends_with(b".ferry-part") || name.as_bytes().ends_with(b".ferry-journal")
}

/// Every `*.ferry-part` (or `*.ferry-journal`) leftover under `root`.
pub fn part_files(root: &Path) -> Vec<PathBuf> {
    walk(root)
        .into_keys()
        .filter(|p| p.file_name().is_some_and(is_part_name))
        .collect()
}

/// Asserts `dst` is a faithful copy of `src`: the same names (less the
/// sockets, which are skipped by design), kinds, bytes, permission bits,
/// link targets, device numbers and mtimes to the nanosecond, the root
/// included; and no sockets or `*.ferry-part` leftovers in `dst`.
#[track_caller]
pub fn assert_trees_equal(src: &Path, dst: &Path) {
    let src_entries: BTreeMap<_, _> = walk(src)
        .into_iter()
        .filter(|(_, meta)| kind_of(meta) != Kind::Special)
        .collect();
    let dst_entries = walk(dst);

    let junk: Vec<String> = dst_entries
        .iter()
        .filter(|(path, meta)| {
            kind_of(meta) == Kind::Special || path.file_name().is_some_and(is_part_name)
        })
        .map(|(path, _)| show(path))
        .collect();
    assert!(
        junk.is_empty(),
        "{} has sockets or .ferry-part leftovers: {junk:?}",
        dst.display()
    );

    let missing: Vec<String> = src_entries
        .keys()
        .filter(|p| !dst_entries.contains_key(*p))
        .map(|p| show(p))
        .collect();
    let extra: Vec<String> = dst_entries
        .keys()
        .filter(|p| !src_entries.contains_key(*p))
        .map(|p| show(p))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} differs from {}:\n  missing: {missing:?}\n  unexpected: {extra:?}",
        dst.display(),
        src.display()
    );

    for (relative, src_meta) in &src_entries {
        let dst_meta = &dst_entries[relative];
        compare_entry(
            relative,
            &src.join(relative),
            src_meta,
            &dst.join(relative),
            dst_meta,
        );
    }
}

/// Asserts two single files match in bytes, permission bits and mtime.
#[track_caller]
pub fn assert_files_equal(src: &Path, dst: &Path) {
    let src_meta = lstat(src);
    let dst_meta =
        fs::symlink_metadata(dst).unwrap_or_else(|e| panic!("{} should exist: {e}", dst.display()));
    compare_entry(
        Path::new(dst.file_name().unwrap_or(dst.as_os_str())),
        src,
        &src_meta,
        dst,
        &dst_meta,
    );
}

#[track_caller]
fn compare_entry(
    relative: &Path,
    src: &Path,
    src_meta: &fs::Metadata,
    dst: &Path,
    dst_meta: &fs::Metadata,
) {
    let name = show(relative);
    let kind = kind_of(src_meta);
    assert_eq!(kind, kind_of(dst_meta), "{name}: kind differs");
    match kind {
        Kind::File => {
            assert_eq!(
                src_meta.mode() & 0o777,
                dst_meta.mode() & 0o777,
                "{name}: mode differs (left {:o}, right {:o})",
                src_meta.mode() & 0o777,
                dst_meta.mode() & 0o777
            );
            assert_eq!(src_meta.len(), dst_meta.len(), "{name}: size differs");
            if let Some(offset) = first_difference(src, dst) {
                panic!("{name}: content differs, first at byte offset {offset}");
            }
        }
        Kind::Dir => assert_eq!(
            src_meta.mode() & 0o1777,
            dst_meta.mode() & 0o1777,
            "{name}: directory mode differs (left {:o}, right {:o})",
            src_meta.mode() & 0o1777,
            dst_meta.mode() & 0o1777
        ),
        Kind::Symlink => {
            let src_target = fs::read_link(src).unwrap();
            let dst_target = fs::read_link(dst).unwrap();
            assert_eq!(
                src_target.as_os_str().as_bytes(),
                dst_target.as_os_str().as_bytes(),
                "{name}: symlink target differs ({src_target:?} vs {dst_target:?})"
            );
        }
        Kind::Fifo => assert_eq!(
            src_meta.mode() & 0o777,
            dst_meta.mode() & 0o777,
            "{name}: fifo mode differs"
        ),
        Kind::Device => {
            assert_eq!(src_meta.rdev(), dst_meta.rdev(), "{name}: device differs");
            assert_eq!(
                (
                    src_meta.file_type().is_block_device(),
                    src_meta.mode() & 0o777
                ),
                (
                    dst_meta.file_type().is_block_device(),
                    dst_meta.mode() & 0o777
                ),
                "{name}: device kind or mode differs"
            );
        }
        Kind::Special => unreachable!("sockets are filtered out before comparing"),
    }
    assert_eq!(
        (src_meta.mtime(), src_meta.mtime_nsec()),
        (dst_meta.mtime(), dst_meta.mtime_nsec()),
        "{name}: mtime (seconds, nanoseconds) differs"
    );
}

/// The first byte offset at which the two files differ (a length
/// difference counts), without holding either file in memory.
fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let open = |p: &Path| fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let mut buf_a = vec![0u8; 256 * 1024];
    let mut buf_b = vec![0u8; 256 * 1024];
    let mut offset = 0u64;
    // Ends at the end of the shorter file.
    loop {
        let na = read_full(&mut fa, &mut buf_a);
        let nb = read_full(&mut fb, &mut buf_b);
        let common = na.min(nb);
        if let Some(i) = (0..common).find(|&i| buf_a[i] != buf_b[i]) {
            return Some(offset + i as u64);
        }
        if na != nb {
            return Some(offset + common as u64);
        }
        if na == 0 {
            return None;
        }
        offset += na as u64;
    }
}

fn read_full(file: &mut fs::File, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    filled
}

/// A port on 127.0.0.1 that nothing listens on (bound, noted, released).
pub fn unused_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

/// The comparer is what every transfer test rests on: prove that it
/// accepts a faithful copy and rejects each kind of difference.
mod self_test {
    use super::*;
    use std::panic::{AssertUnwindSafe, catch_unwind};

    /// A faithful copy made by `cp -a`.
    fn tree_and_copy() -> (Scratch, PathBuf, PathBuf) {
        let scratch = Scratch::new();
        let src = scratch.join("src");
        build_full_tree(&src);
        let dst = scratch.join("dst");
        let status = Command::new("cp")
            .arg("-a")
            .arg(&src)
            .arg(&dst)
            .status()
            .expect("run cp -a");
        assert!(status.success(), "cp -a failed");
        (scratch, src, dst)
    }

    #[track_caller]
    fn assert_rejected(src: &Path, dst: &Path, expect: &str) {
        let result = catch_unwind(AssertUnwindSafe(|| assert_trees_equal(src, dst)));
        let message = match result {
            Ok(()) => panic!("the comparer accepted a tree with a difference ({expect})"),
            Err(payload) => payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
        };
        assert!(
            message.contains(expect),
            "expected {expect:?} in: {message}"
        );
    }

    #[test]
    fn full_tree_has_every_case() {
        let scratch = Scratch::new();
        let src = scratch.join("src");
        build_full_tree(&src);
        assert!(lstat(&src.join(FIFO)).file_type().is_fifo());
        assert!(lstat(&src.join("links/absolute")).file_type().is_symlink());
        assert_eq!(lstat(&src.join("sealed-dir")).mode() & 0o777, 0o555);
        assert_eq!(lstat(&src.join(BIG_FILE)).len(), 5 * MIB + 123);
        assert!(lstat(&src.join(OsStr::from_bytes(b"bad\xffname"))).is_file());
        assert_ne!(lstat(&src.join(DEEP_FILE)).mtime_nsec(), 0);
        assert!(
            fs::read_dir(src.join("empty-dir"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[test]
    fn comparer_accepts_a_faithful_copy() {
        let (_scratch, src, dst) = tree_and_copy();
        assert_trees_equal(&src, &dst);
    }

    #[test]
    fn comparer_rejects_each_kind_of_difference() {
        let (_scratch, src, dst) = tree_and_copy();

        // One flipped byte deep inside a big file, same size and mtime.
        let big = dst.join(BIG_FILE);
        let (secs, nanos) = (lstat(&big).mtime(), lstat(&big).mtime_nsec());
        let mut bytes = fs::read(&big).unwrap();
        bytes[3 * MIB as usize + 7] ^= 1;
        fs::write(&big, &bytes).unwrap();
        set_mtime(&big, secs, nanos);
        assert_rejected(&src, &dst, &format!("byte offset {}", 3 * MIB + 7));
        fs::copy(src.join(BIG_FILE), &big).unwrap();
        set_mtime(&big, secs, nanos);
        assert_trees_equal(&src, &dst);

        set_mode(&dst.join("run.sh"), 0o644);
        assert_rejected(&src, &dst, "mode differs");
        set_mode(&dst.join("run.sh"), 0o755);

        let link = dst.join("links/to-file");
        set_mtime(&link, secs, nanos + 1);
        assert_rejected(&src, &dst, "mtime");
        let meta = lstat(&src.join("links/to-file"));
        set_mtime(&link, meta.mtime(), meta.mtime_nsec());

        let dst_meta = lstat(&dst);
        let stray = dst.join(".x.ferry-part");
        write_file(&stray, b"half");
        assert_rejected(&src, &dst, ".ferry-part");
        fs::remove_file(&stray).unwrap();
        set_mtime(&dst, dst_meta.mtime(), dst_meta.mtime_nsec());

        let empty = dst.join("empty-dir");
        let empty_meta = lstat(&empty);
        fs::remove_dir(&empty).unwrap();
        assert_rejected(&src, &dst, "empty-dir");
        fs::create_dir(&empty).unwrap();
        set_mtime(&empty, empty_meta.mtime(), empty_meta.mtime_nsec());
        set_mtime(&dst, dst_meta.mtime(), dst_meta.mtime_nsec());

        // Everything restored: the copy is faithful again.
        assert_trees_equal(&src, &dst);
    }

    #[test]
    fn poll_until_gives_up_at_the_deadline() {
        let start = Instant::now();
        assert_eq!(poll_until(Duration::from_millis(100), || None::<()>), None);
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn listening_line_is_parsed_only_when_complete() {
        let line = "ferry server listening on 127.0.0.1:40123 (root: /srv)\n";
        assert_eq!(parse_listening(line).as_deref(), Some("127.0.0.1:40123"));
        assert_eq!(parse_listening(line.trim_end()), None);
        assert_eq!(parse_listening("starting\n"), None);
    }
}

//! Running the real `ferry` binary under a deadline: how it is started
//! ([`RunOptions`], [`unprivileged`]), what it produced ([`Output`]), one in
//! the background ([`Running`]), where each run keeps its state, and
//! [`poll_until`], the bounded wait the others are built on.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use super::files::{Scratch, set_mode};

/// How long an ordinary command may run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a command that is expected to fail may run: errors must be quick.
pub const ERROR_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to print its address, or to stop.
pub(super) const SERVER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a killed process's pipes to reach end-of-file.
pub(super) const DRAIN_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// The unprivileged user (`nobody`) the permission tests run as when the
/// suite runs as root, because root bypasses the permission checks.
pub const NOBODY: (u32, u32) = (65534, 65534);

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
pub(super) fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    poll_until(timeout, || child.try_wait().expect("try_wait on a child"))
}

/// Everything a test may change about how a process is started.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub timeout: Duration,
    /// Run as this uid/gid (needs root); supplementary groups are dropped.
    pub user: Option<(u32, u32)>,
    pub env: Vec<(OsString, OsString)>,
    /// Variables the process does not inherit (e.g. `HOME`, for a service
    /// without one). `XDG_CONFIG_HOME` among them: no state home is set.
    pub unset: Vec<OsString>,
    pub current_dir: Option<PathBuf>,
    /// Run this copy of the binary instead of `ferry_bin()` (an unprivileged
    /// user may not be able to reach the build directory).
    pub program: Option<PathBuf>,
    /// Start it with this limit on open files (soft and hard), through
    /// prlimit(1).
    pub nofile: Option<u64>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: DEFAULT_TIMEOUT,
            user: None,
            env: Vec::new(),
            unset: Vec::new(),
            current_dir: None,
            program: None,
            nofile: None,
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
        let mut cmd = match self.nofile {
            // prlimit execs the program: the pid stays the server's.
            Some(n) => {
                let mut cmd = Command::new("prlimit");
                cmd.arg(format!("--nofile={n}:{n}")).arg("--").arg(program);
                cmd
            }
            None => Command::new(program),
        };
        cmd.args(args);
        let own_home = self.env.iter().any(|(key, _)| key == "XDG_CONFIG_HOME")
            || self.unset.iter().any(|key| key == "XDG_CONFIG_HOME");
        if !own_home {
            cmd.env("XDG_CONFIG_HOME", state_home(args));
        }
        for key in &self.unset {
            cmd.env_remove(key);
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
        if !self.unset.is_empty() {
            let unset: Vec<_> = self.unset.iter().map(|k| k.to_string_lossy()).collect();
            shown.push_str(&format!("  (without {})", unset.join(", ")));
        }
        if let Some(n) = self.nofile {
            shown.push_str(&format!("  (at most {n} open files)"));
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

pub(super) fn to_os_args(args: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
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

pub(super) fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => format!("{status}"),
    }
}

/// Keeps the head and tail of long output.
pub(super) fn clip(text: &str) -> String {
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

pub fn run_os(args: &[OsString], opts: &RunOptions) -> Output {
    spawn_os(args, opts).wait(opts.timeout)
}

/// A `ferry` process running in the background, so that a test can act
/// on it mid-transfer (kill it, break its connection).
pub struct Running {
    pub(super) child: Child,
    pub(super) command: String,
    pub(super) stdout: Drain,
    pub(super) stderr: Drain,
}

/// Starts `ferry ARGS` in the background.
pub fn spawn(args: &[&dyn AsRef<OsStr>], opts: &RunOptions) -> Running {
    spawn_os(&to_os_args(args), opts)
}

pub fn spawn_os(args: &[OsString], opts: &RunOptions) -> Running {
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
pub(super) struct Drain {
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

    pub(super) fn snapshot(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }

    /// Waits (bounded) for end-of-file, then returns everything read.
    pub(super) fn finish(self, grace: Duration) -> String {
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
/// something else sets XDG_CONFIG_HOME or passes --state-dir itself. A
/// server run with `--config` gets one per configuration file.
pub(super) fn state_home(args: &[OsString]) -> PathBuf {
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
        // A server configured by a file is known by the file.
        let after = |flag: &str| args.iter().skip_while(|a| *a != flag).nth(1).cloned();
        let root = after("--root")
            .or_else(|| after("--config"))
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

mod self_test {
    use super::*;

    #[test]
    fn poll_until_gives_up_at_the_deadline() {
        let start = Instant::now();
        assert_eq!(poll_until(Duration::from_millis(100), || None::<()>), None);
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}

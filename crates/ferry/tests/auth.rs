//! Authentication: a server with a token serves only clients that prove
//! it, refuses the others clearly (and slowly, in its log), and the token
//! itself never crosses the wire.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::tls::Capture;
use crate::util::*;

const TOKEN: &str = "c0ffee-test-token-5e1f";

fn with_token(token: Option<&str>) -> RunOptions {
    let mut opts = RunOptions::with_timeout(ERROR_TIMEOUT);
    if let Some(t) = token {
        opts.env.push(("FERRY_TOKEN".into(), t.into()));
    }
    opts
}

/// A server that requires `TOKEN`, once it says so, and a file `a.txt`
/// holding `content` to upload to it.
fn token_server(content: &[u8]) -> (Scratch, PathBuf, PathBuf, Server) {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let file = scratch.join("a.txt");
    write_file(&file, content);
    let server = Server::start_as(&root, &[], &with_token(Some(TOKEN)));
    assert!(
        server.wait_for_log("clients must prove the token", ERROR_TIMEOUT),
        "{}",
        server.stderr()
    );
    (scratch, root, file, server)
}

#[test]
fn a_server_with_a_token_serves_only_clients_that_prove_it() {
    let (scratch, root, file, server) = token_server(b"authenticated\n");

    let none = server.run_with(&[&"up", &file, &"none.txt"], &with_token(None));
    none.assert_code(1)
        .assert_no_panic()
        .assert_stderr_contains("authentication required: set FERRY_TOKEN or pass --token-file");
    assert!(!root.join("none.txt").exists());

    let wrong = server.run_with(&[&"up", &file, &"wrong.txt"], &with_token(Some("guess")));
    wrong
        .assert_code(1)
        .assert_no_panic()
        .assert_stderr_contains("authentication failed");
    assert!(!root.join("wrong.txt").exists());
    assert!(
        server.wait_for_log("authentication failed", ERROR_TIMEOUT),
        "the failed attempt is logged: {}",
        server.stderr()
    );

    server
        .run_with(&[&"up", &file, &"env.txt"], &with_token(Some(TOKEN)))
        .assert_success();
    assert_eq!(fs::read(root.join("env.txt")).unwrap(), b"authenticated\n");

    let token_file = scratch.join("token");
    write_file(&token_file, format!("{TOKEN}\n").as_bytes());
    set_mode(&token_file, 0o600);
    server
        .run_with(
            &[&"up", &"--token-file", &token_file, &file, &"file.txt"],
            &with_token(None),
        )
        .assert_success();
    assert_eq!(fs::read(root.join("file.txt")).unwrap(), b"authenticated\n");
}

/// The server's log lines that report a failed attempt.
fn failure_lines(server: &Server) -> Vec<String> {
    server
        .stderr()
        .lines()
        .filter(|line| line.contains("authentication failed"))
        .map(str::to_string)
        .collect()
}

#[test]
fn failed_attempts_are_logged_and_slowed_per_address_and_the_right_token_still_works() {
    let (_scratch, root, file, server) = token_server(b"after the guessing\n");

    // A client without a token makes its request at once, gives up at
    // the challenge and hangs up: that counts as a failure from its
    // address, though nobody waits for the answer.
    server
        .run_with(&[&"up", &file, &"none.txt"], &with_token(None))
        .assert_code(1)
        .assert_no_panic();
    assert!(
        server.wait_for_log("without proving the token (no token?)", ERROR_TIMEOUT),
        "the hang-up is logged as a failed attempt: {}",
        server.stderr()
    );

    // The second failure from 127.0.0.1, on a connection of its own, is
    // answered after 2 s rather than the first failure's 1 s: the count
    // belongs to the address. Only a lower bound: the machine is shared.
    let started = std::time::Instant::now();
    server
        .run_with(&[&"up", &file, &"wrong.txt"], &with_token(Some("guess")))
        .assert_code(1)
        .assert_no_panic()
        .assert_stderr_contains("authentication failed");
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(1900),
        "the second failure from the address was answered after {took:?}"
    );
    assert!(!root.join("wrong.txt").exists());

    // One log line per attempt, saying why and how many.
    let lines = failure_lines(&server);
    assert_eq!(lines.len(), 2, "{}", server.stderr());
    assert!(
        lines[0].contains("failure 1 from this address"),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("wrong token"), "{}", lines[1]);
    assert!(
        lines[1].contains("failure 2 from this address"),
        "{}",
        lines[1]
    );
    assert!(lines[1].contains("127.0.0.1"), "{}", lines[1]);

    // Whatever failed before from its address, the right token is served
    // (and not made to wait: a user behind a shared NAT address is never
    // locked out by someone else's guessing).
    server
        .run_with(&[&"up", &file, &"ok.txt"], &with_token(Some(TOKEN)))
        .assert_success();
    assert_eq!(
        fs::read(root.join("ok.txt")).unwrap(),
        b"after the guessing\n"
    );
    assert_eq!(failure_lines(&server).len(), 2, "{}", server.stderr());
}

#[test]
fn a_server_with_no_auth_serves_any_client() {
    // The explicit opt-out: no token made, none asked for, and the log
    // says that every local user is served.
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let file = scratch.join("a.txt");
    write_file(&file, b"local\n");
    let server = Server::start_with(&root, &[&"--no-auth"]);
    assert!(!server.state_dir().join("token").exists());
    assert!(
        server.wait_for_log("every local user included", ERROR_TIMEOUT),
        "{}",
        server.stderr()
    );
    // A client with a state of its own, without a token or with one it is
    // never asked for.
    for token in [None, Some(TOKEN)] {
        let opts = with_state_home(&with_token(token), &scratch.mkdir("client"));
        let name = format!("{}.txt", token.is_some());
        server
            .run_with(&[&"up", &file, &name], &opts)
            .assert_success();
        assert!(root.join(&name).exists());
    }
}

#[test]
fn the_token_never_crosses_the_wire() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let file = scratch.join("a.txt");
    write_file(&file, b"plaintext on purpose\n");
    let server = Server::start_as(&root, &[&"--no-tls"], &with_token(Some(TOKEN)));
    let capture = Capture::start(server.addr());
    let port = capture.port.to_string();
    let args: Vec<OsString> = ["up", "--no-tls", "--host", "127.0.0.1", "--port", &port]
        .iter()
        .map(OsString::from)
        .chain([file.clone().into(), "a.txt".into()])
        .collect();
    let refs: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as _).collect();
    run_with(&refs, &with_token(Some(TOKEN))).assert_success();
    let wire = capture.captured();
    assert!(
        wire.windows(b"plaintext on purpose".len())
            .any(|w| w == b"plaintext on purpose"),
        "the capture sees the plaintext session"
    );
    assert!(
        !wire.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
        "the token crossed the wire"
    );
}

/// A network namespace with a veth pair, one end on a 10.x address, removed
/// on drop: a place to bind a non-loopback address without touching the
/// host's network.
struct Netns(String);

impl Netns {
    const ADDR: &str = "10.231.0.1";

    fn create() -> Option<Netns> {
        if !is_root() {
            return None;
        }
        let name = format!("ferry-auth-{}", std::process::id());
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let ns = Netns(name);
        let n = ns.0.as_str();
        let ok = ip(&["-n", n, "link", "set", "lo", "up"])
            && ip(&[
                "-n", n, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
            ])
            && ip(&[
                "-n",
                n,
                "addr",
                "add",
                &format!("{}/24", Netns::ADDR),
                "dev",
                "v0",
            ])
            && ip(&["-n", n, "link", "set", "v0", "up"])
            && ip(&["-n", n, "link", "set", "v1", "up"]);
        ok.then_some(ns)
    }

    fn command(&self, env: &[(&str, &std::path::Path)]) -> std::process::Command {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.0]).arg(ferry_bin());
        cmd.env_remove("FERRY_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn a_server_on_a_network_address_makes_a_token_and_requires_it() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let Some(ns) = Netns::create() else {
        eprintln!("skipped: cannot create a network namespace (needs root and `ip netns`)");
        return;
    };
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let server_state = scratch.mkdir("server-state");
    let client_state = scratch.mkdir("client-state");
    let file = scratch.join("a.txt");
    write_file(&file, b"over the network\n");

    let mut server = ns
        .command(&[("XDG_CONFIG_HOME", &server_state)])
        .args(["server", "--host", Netns::ADDR, "--port", "0", "--root"])
        .arg(&root)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = server.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let (mut port, mut token) = (None, None);
    while port.is_none() || token.is_none() {
        let Ok(line) = rx.recv_timeout(ERROR_TIMEOUT) else {
            let _ = server.kill();
            panic!("no listening or token line (port {port:?}, token {token:?})");
        };
        if let Some(rest) = line.strip_prefix("ferry server listening on ") {
            let addr = rest.split_whitespace().next().unwrap();
            port = Some(addr.rsplit_once(':').unwrap().1.to_string());
        }
        if let Some(rest) = line.strip_prefix("ferry server token: ") {
            token = Some(rest.split_whitespace().next().unwrap().to_string());
        }
    }
    let (port, token) = (port.unwrap(), token.unwrap());
    assert_eq!(token.len(), 64, "{token}");
    let token_file = server_state.join("ferry").join("token");
    assert_eq!(fs::read_to_string(&token_file).unwrap().trim(), token);
    let mode = fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let upload = |name: &str, token: Option<&str>| {
        let mut cmd = ns.command(&[("XDG_CONFIG_HOME", &client_state)]);
        cmd.args([
            "up",
            "--retries",
            "0",
            "--host",
            Netns::ADDR,
            "--port",
            &port,
        ])
        .arg(&file)
        .arg(name);
        if let Some(t) = token {
            cmd.env("FERRY_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let refused = upload("none.txt", None);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("authentication required"), "{stderr}");
    assert!(!root.join("none.txt").exists());

    let served = upload("a.txt", Some(&token));
    assert!(
        served.status.success(),
        "{}",
        String::from_utf8_lossy(&served.stderr)
    );
    assert_eq!(fs::read(root.join("a.txt")).unwrap(), b"over the network\n");
    let _ = server.kill();
    let _ = server.wait();
}

/// A state home (`XDG_CONFIG_HOME`) that `user` owns, as a real one would be.
fn state_home_of(scratch: &Scratch, name: &str, user: Option<(u32, u32)>) -> PathBuf {
    let home = scratch.mkdir(name);
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&home, Some(uid), Some(gid)).unwrap();
    }
    home
}

fn with_state_home(opts: &RunOptions, home: &std::path::Path) -> RunOptions {
    let mut opts = opts.clone();
    opts.env
        .push(("XDG_CONFIG_HOME".into(), home.as_os_str().to_os_string()));
    opts
}

/// Exit status 1 and one line on stderr: authentication required, and how
/// to get access.
#[track_caller]
fn assert_authentication_required(out: &Output) {
    out.assert_code(1)
        .assert_stderr_contains("ferry: authentication required")
        .assert_stderr_contains("FERRY_TOKEN")
        .assert_stderr_contains("--token-file");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("ferry: new server "))
        .collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr\n{out}");
}

#[test]
fn another_local_user_gets_authentication_required_never_a_file() {
    if !is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let secret = root.join("secret.txt");
    write_file(&secret, b"root's eyes only\n");
    set_mode(&secret, 0o600);
    let victim = root.join("victim.txt");
    write_file(&victim, b"root's file\n");
    // Root's server with the defaults: loopback, no token configured.
    let server = Server::start(&root);

    let other = RunOptions {
        timeout: ERROR_TIMEOUT,
        ..unprivileged(&scratch)
    };
    let theirs = state_home_of(&scratch, "nobody-home", other.user);
    let got = theirs.join("got.txt");
    let out = server.run_with(&[&"down", &"secret.txt", &got], &other);
    assert_authentication_required(&out);
    assert!(!got.exists(), "another user read a root-only file\n{out}");

    let mine = theirs.join("mine.txt");
    write_file(&mine, b"nobody was here\n");
    set_mode(&mine, 0o644);
    let out = server.run_with(&[&"up", &mine, &"victim.txt"], &other);
    assert_authentication_required(&out);
    assert_eq!(fs::read(&victim).unwrap(), b"root's file\n", "{out}");

    // Nor does a token of their own help: their own server's token is
    // offered only to their own server.
    let own_root = theirs.join("root");
    fs::create_dir(&own_root).unwrap();
    std::os::unix::fs::chown(&own_root, Some(NOBODY.0), Some(NOBODY.1)).unwrap();
    let own = with_state_home(&other, &theirs);
    let _their_server = Server::start_as(&own_root, &[], &own);
    let out = server.run_with(&[&"down", &"secret.txt", &got], &own);
    assert_authentication_required(&out);
    assert!(!got.exists(), "another user read a root-only file\n{out}");
    assert!(
        !server.stderr().contains("wrong token"),
        "their own token was offered to another user's server: {}",
        server.stderr()
    );
}

#[test]
fn the_first_run_needs_no_set_up_for_the_same_user() {
    // As the README starts: `ferry server`, then `ferry up` by the same
    // user, who shares its state directory, with no token configured.
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let file = scratch.join("a.txt");
    write_file(&file, b"first run\n");
    let home = scratch.mkdir("home");
    let opts = with_state_home(&with_token(None), &home);
    let server = Server::start_as(&root, &[], &opts);
    let args: Vec<OsString> = ["up".into(), file.clone().into(), "a.txt".into()]
        .into_iter()
        .chain(["--host", "127.0.0.1", "--port"].map(OsString::from))
        .chain([server.port().to_string().into()])
        .collect();
    let refs: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as _).collect();
    run_with(&refs, &opts).assert_success();
    assert_eq!(fs::read(root.join("a.txt")).unwrap(), b"first run\n");
    let token = home.join("ferry").join("token");
    assert_eq!(lstat(&token).mode() & 0o777, 0o600);
    let stdout = server.stdout();
    assert!(
        stdout.contains(&format!("stored in {}", token.display())),
        "{stdout}"
    );
}

/// A token file holding `TOKEN` with `mode`.
fn token_file(scratch: &Scratch, mode: u32) -> PathBuf {
    let path = scratch.join(format!("token-{mode:o}"));
    write_file(&path, format!("{TOKEN}\n").as_bytes());
    set_mode(&path, mode);
    path
}

#[test]
fn a_client_refuses_a_token_file_other_users_can_read() {
    let (scratch, root, file, server) = token_server(b"secret\n");
    for mode in [0o644, 0o640, 0o604] {
        let path = token_file(&scratch, mode);
        let name = format!("{mode:o}.txt");
        let out = server.run_with(
            &[&"up", &"--token-file", &path, &file, &name],
            &with_token(None),
        );
        out.assert_code(1)
            .assert_stderr_contains(&format!("chmod 600 {}", path.display()));
        assert!(!root.join(&name).exists(), "{out}");
    }
    let private = token_file(&scratch, 0o600);
    server
        .run_with(
            &[&"up", &"--token-file", &private, &file, &"ok.txt"],
            &with_token(None),
        )
        .assert_success();
}

#[test]
fn a_server_refuses_a_token_file_other_users_can_read() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    for mode in [0o644, 0o640] {
        let path = token_file(&scratch, mode);
        let server = spawn(
            &[
                &"server",
                &"--port",
                &"0",
                &"--root",
                &root,
                &"--token-file",
                &path,
            ],
            &with_token(None),
        );
        let out = server.wait(std::time::Duration::from_secs(10));
        out.assert_code(1)
            .assert_stderr_contains(&format!("chmod 600 {}", path.display()));
        assert!(!out.stdout.contains("listening on"), "{out}");
    }
}

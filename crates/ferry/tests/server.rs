//! The server process: its address line, its logs, how it stops, and how it
//! treats peers that are not (this version of) ferry.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::Signal;

use crate::util::*;

const LOG_WAIT: Duration = Duration::from_secs(5);
const FOREIGN_VERSION: u16 = 99;

/// Writes `scratch/NAME` (a small file) and returns its path.
fn small_file(scratch: &Scratch, name: &str, seed: u64) -> PathBuf {
    let path = scratch.join(name);
    write_random_file(&path, 2000, seed);
    path
}

/// Uploads a small file and checks it arrived: the server still serves.
#[track_caller]
fn assert_serves(server: &Server, scratch: &Scratch, name: &str) {
    let file = small_file(scratch, name, 77);
    server.run(&[&"up", &file, &name]).assert_success();
    assert_files_equal(&file, &server.root().join(name));
}

#[track_caller]
fn assert_server_healthy(server: &mut Server) {
    let log = server.stderr();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    assert!(server.is_running(), "the server exited:\n{log}");
}

/// Reads until the peer closes the connection, at most `timeout`. Returns
/// what was read, or why the connection is considered still open. A reset
/// counts as closed: a server that drops a connection with unread input
/// makes the kernel send one.
fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded twice: by the deadline and by the amount a closing peer may send.
    while got.len() < 1024 * 1024 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("still open after {timeout:?}, read {got:02x?}"));
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "still open after {timeout:?}, read {} bytes",
                    got.len()
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(got),
        }
    }
    Err("the peer kept sending instead of closing".to_string())
}

fn preface(version: u16) -> [u8; 8] {
    let mut bytes = [0u8; 8];
    bytes[..6].copy_from_slice(MAGIC);
    bytes[6..].copy_from_slice(&version.to_be_bytes());
    bytes
}

#[test]
fn prints_one_listening_line_with_address_and_root() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let server = Server::start(&root);

    assert!(
        server.addr().starts_with("127.0.0.1:"),
        "address: {}",
        server.addr()
    );
    // The first start also makes the token, and says where it is.
    poll_until(LOG_WAIT, || {
        (server.stdout().lines().count() >= 3).then_some(())
    });
    let stdout = server.stdout();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "exactly three lines on stdout: {stdout:?}");
    let token = server.state_dir().join("token");
    assert!(
        lines[2].starts_with(&format!(
            "ferry server token: {} (stored in {}; ",
            server.token(),
            token.display()
        )),
        "no token line: {stdout:?}"
    );
    let fingerprint = lines[1]
        .strip_prefix("ferry server fingerprint SHA256:")
        .unwrap_or_else(|| panic!("no fingerprint line: {stdout:?}"));
    assert_eq!(
        fingerprint.len(),
        43,
        "base64 of SHA-256, unpadded: {stdout:?}"
    );
    assert!(
        lines[0].starts_with("ferry server listening on ")
            && lines[0].contains(&format!("(root: {})", root.display())),
        "unexpected line: {:?}",
        lines[0]
    );
}

#[test]
fn logs_each_file_received() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    let file = small_file(&scratch, "hello.txt", 1);

    server.run(&[&"up", &file, &"hello.txt"]).assert_success();
    assert!(
        server.wait_for_log("hello.txt", LOG_WAIT),
        "the server log should name hello.txt:\n{}",
        server.stderr()
    );
}

/// Starts a server logging to `log`, uploads `name`, stops it cleanly.
fn serve_one_upload(scratch: &Scratch, root: &Path, log: &Path, name: &str) {
    let mut server = Server::start_with(root, &[&"--log-file", &log]);
    let file = small_file(scratch, name, 2);
    server.run(&[&"up", &file, &name]).assert_success();
    let status = server.stop();
    assert_eq!(
        status.code(),
        Some(0),
        "stop: {status}\n{}",
        server.stderr()
    );
}

#[test]
fn log_file_is_written_and_appended_across_restarts() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let log = scratch.join("ferry.log");

    serve_one_upload(&scratch, &root, &log, "hello.txt");
    let first = fs::read_to_string(&log).unwrap_or_else(|e| panic!("read {}: {e}", log.display()));
    assert!(
        first.contains("hello.txt"),
        "log file after one run:\n{first}"
    );

    serve_one_upload(&scratch, &root, &log, "second.txt");
    let both = fs::read_to_string(&log).unwrap();
    assert!(
        both.starts_with(&first) && both.contains("second.txt"),
        "the second run must append, not replace:\n{both}"
    );
}

#[test]
fn sigterm_exits_zero() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let mut server = Server::start(&root);

    // The server announces itself only once its signal handling is in place.
    let status = server.stop_with(Signal::TERM);
    assert_eq!(
        status.code(),
        Some(0),
        "after SIGTERM: {status}\n{}",
        server.stderr()
    );
}

#[test]
fn sigint_exits_zero_after_serving() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let mut server = Server::start(&root);
    assert_serves(&server, &scratch, "before-sigint.txt");

    let status = server.stop_with(Signal::INT);
    assert_eq!(
        status.code(),
        Some(0),
        "after SIGINT: {status}\n{}",
        server.stderr()
    );
}

#[test]
fn client_of_another_version_gets_our_preface_and_is_closed() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let mut server = Server::start(&root);

    let mut stream = TcpStream::connect(server.addr()).expect("connect to the server");
    stream.write_all(&preface(FOREIGN_VERSION)).unwrap();
    // The server says which version it speaks (possibly followed by an
    // error frame), then closes: never a hang.
    let reply = read_until_closed(&mut stream, Duration::from_secs(5))
        .unwrap_or_else(|why| panic!("server did not close: {why}\n{}", server.stderr()));
    assert!(
        reply.len() >= 8 && reply[..8] == preface(PROTOCOL_VERSION),
        "expected the server's preface first, got {:02x?}",
        &reply[..reply.len().min(16)]
    );
    assert!(
        server.wait_for_log("version", LOG_WAIT),
        "the server log should mention the version mismatch:\n{}",
        server.stderr()
    );

    assert_serves(&server, &scratch, "after-mismatch.txt");
    assert_server_healthy(&mut server);
}

/// A one-connection fake server that speaks `FOREIGN_VERSION`. Returns the
/// preface the client sent (what arrived of it), or why it failed.
fn spawn_foreign_server() -> (u16, thread::JoinHandle<Result<Vec<u8>, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().unwrap().port();
    let handle = thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let accepted = poll_until(Duration::from_secs(10), || match listener.accept() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            other => Some(other),
        });
        let (mut conn, _) = accepted
            .ok_or("no connection within 10 s")?
            .map_err(|e| format!("accept: {e}"))?;
        conn.set_nonblocking(false).unwrap();
        // Send first: the client gets our preface whether it writes or
        // reads first, so the test does not depend on that order.
        conn.write_all(&preface(FOREIGN_VERSION))
            .map_err(|e| format!("write preface: {e}"))?;
        // Then give the client up to 2 s to send its preface and hang up.
        let got = read_until_closed(&mut conn, Duration::from_secs(2)).unwrap_or_default();
        Ok(got)
    });
    (port, handle)
}

/// `ferry up FILE x` to a fake server on `port`, plaintext.
fn upload_to_fake(file: &std::path::Path, port: u16) -> Output {
    let port = port.to_string();
    let args: [&dyn AsRef<std::ffi::OsStr>; 8] = [
        &"up",
        &file,
        &"x",
        &"--host",
        &"127.0.0.1",
        &"--port",
        &port,
        &"--no-tls",
    ];
    run_timeout(&args, ERROR_TIMEOUT)
}

#[test]
fn server_of_another_version_is_a_clear_client_error() {
    let scratch = Scratch::new();
    let file = small_file(&scratch, "somefile", 3);
    let (port, fake) = spawn_foreign_server();

    let out = upload_to_fake(&file, port);
    out.assert_code(1).assert_stderr_contains("version");

    let sent = fake
        .join()
        .expect("fake server thread")
        .unwrap_or_else(|why| panic!("fake server: {why}\n{out}"));
    if sent.len() >= 8 {
        assert_eq!(sent[..8], preface(PROTOCOL_VERSION), "the client's preface");
    }
}

#[test]
fn garbage_is_dropped_and_the_server_keeps_serving() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let mut server = Server::start(&root);

    let mut garbage = random_bytes(64, 4);
    garbage[0] = b'X'; // never the magic
    let mut stream = TcpStream::connect(server.addr()).expect("connect to the server");
    stream.write_all(&garbage).unwrap();
    read_until_closed(&mut stream, Duration::from_secs(5))
        .unwrap_or_else(|why| panic!("server did not drop garbage: {why}\n{}", server.stderr()));

    assert_serves(&server, &scratch, "after-garbage.txt");
    assert_server_healthy(&mut server);
}

#[test]
fn shutdown_mid_file_abandons_it_cleanly() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let mut server = Server::start_with(&root, &[&"--no-tls"]);

    // A client that announces a 10 MiB file and then stalls, as a slow or
    // wedged client would: the server holds a part file for it.
    let mut stream = server.plaintext_session("test");
    let mut session = Vec::new();
    for json in [
        r#"{"type":"upload","dest":"inflight.bin"}"#,
        r#"{"type":"entry","id":1,"path":"","kind":"file","size":10485760,"mode":420,"mtime":{"sec":1,"nsec":0}}"#,
    ] {
        session.extend_from_slice(&control_frame(json));
    }
    stream.write_all(&session).unwrap();
    let part = root.join(".inflight.bin.ferry-part");
    let appeared = poll_until(Duration::from_secs(10), || part.exists().then_some(()));
    assert!(
        appeared.is_some(),
        "the server never opened the part file\n{}",
        server.stderr()
    );

    let status = server.stop();
    assert_eq!(
        status.code(),
        Some(0),
        "after SIGTERM: {status}\n{}",
        server.stderr()
    );
    assert!(!part.exists(), "the abandoned part file was left behind");
    assert!(
        !root.join("inflight.bin").exists(),
        "a half file became visible"
    );
    let told = read_until_closed(&mut stream, Duration::from_secs(5))
        .expect("the server closes the session");
    assert!(
        String::from_utf8_lossy(&told).contains("shutting down"),
        "the client is told why: {:?}",
        String::from_utf8_lossy(&told)
    );
}

#[test]
fn interrupted_client_exits_130() {
    let scratch = Scratch::new();
    let file = scratch.join("big.bin");
    write_random_file(&file, 64 * MIB, 77);
    // A fake server that accepts the upload and then stops reading: the
    // client is reliably mid-transfer, blocked on a full socket.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().unwrap().port();
    let (client_gone, wait_for_client) = std::sync::mpsc::channel::<()>();
    let fake = thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut reply = preface(PROTOCOL_VERSION).to_vec();
        reply.extend(control_frame(
            r#"{"type":"welcome","software":"fake","session_id":"00","secret":"11","max_streams":1}"#,
        ));
        reply.extend(control_frame(r#"{"type":"ready"}"#));
        conn.write_all(&reply).expect("answer the client");
        // Hold the connection open, unread, until the client is gone.
        let _ = wait_for_client.recv_timeout(Duration::from_secs(15));
        drop(conn);
    });

    let mut client = std::process::Command::new(ferry_bin())
        .args([
            "up".as_ref(),
            file.as_os_str(),
            "big.bin".as_ref(),
            "--port".as_ref(),
            port.to_string().as_ref(),
            "--no-tls".as_ref(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the client");
    // Give it time to connect and fill the socket buffers; it cannot finish.
    thread::sleep(Duration::from_millis(500));
    let pid = rustix::process::Pid::from_raw(client.id() as i32).unwrap();
    rustix::process::kill_process(pid, Signal::INT).expect("SIGINT the client");
    let status = poll_until(Duration::from_secs(10), || client.try_wait().unwrap());
    let Some(status) = status else {
        let _ = client.kill();
        panic!("the client did not exit within 10 s of SIGINT");
    };
    let mut stderr = String::new();
    client
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "exit status after ^C; stderr: {stderr}"
    );
    assert!(contains_ci(&stderr, "interrupted"), "stderr: {stderr}");
    // What is kept and how to go on, never that it was all thrown away.
    assert!(!contains_ci(&stderr, "discarded"), "stderr: {stderr}");
    assert!(
        contains_ci(&stderr, "run the same command again to resume"),
        "stderr: {stderr}"
    );
    let _ = client_gone.send(());
    fake.join().expect("the fake server thread");
}

/// A client that is not authenticated yet sends a message whose `type`
/// holds a newline and an escape sequence: the server's log quotes it
/// escaped, so no line can be forged in it and no terminal reading it is
/// driven.
#[test]
fn a_malformed_message_cannot_forge_a_log_line() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let mut server = Server::start_with(&root, &[&"--no-tls"]);
    let mut stream = TcpStream::connect(server.addr()).expect("connect to the server");
    stream.write_all(&preface(PROTOCOL_VERSION)).unwrap();
    let forged = r#"{"type":"x\r\nWARN forged: root logged in\u001b[2J"}"#;
    stream.write_all(&control_frame(forged)).unwrap();
    read_until_closed(&mut stream, Duration::from_secs(5))
        .unwrap_or_else(|why| panic!("server did not drop the client: {why}\n{}", server.stderr()));
    let logged = poll_until(Duration::from_secs(5), || {
        let log = server.stderr();
        log.contains("malformed control message").then_some(log)
    })
    .unwrap_or_else(|| {
        panic!(
            "the server did not log the malformed message\n{}",
            server.stderr()
        )
    });
    assert!(
        !logged.lines().any(|l| l.starts_with("WARN forged")),
        "a forged line:\n{logged}"
    );
    assert!(
        !logged.contains('\u{1b}'),
        "an escape sequence:\n{logged:?}"
    );
    assert_server_healthy(&mut server);
}

/// A fake server that answers the client's hello with `error`, whose
/// message and path hold escape sequences and a newline. Returns its port.
fn spawn_server_saying(error_json: &'static str) -> (u16, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().unwrap().port();
    let handle = thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let mut hello = [0u8; 8];
        let _ = conn.read_exact(&mut hello);
        let _ = conn.write_all(&preface(PROTOCOL_VERSION));
        let _ = conn.write_all(&control_frame(error_json));
        let _ = read_until_closed(&mut conn, Duration::from_secs(2));
    });
    (port, handle)
}

#[test]
fn a_servers_error_message_cannot_drive_the_clients_terminal() {
    let scratch = Scratch::new();
    let file = small_file(&scratch, "somefile", 4);
    let (port, fake) = spawn_server_saying(
        r#"{"type":"error","code":"not_found","message":"\u001b]0;owned\u0007\u001b[2Jgone\nferry: all files arrived","path":"x\u001b[31m"}"#,
    );
    let out = upload_to_fake(&file, port);
    fake.join().unwrap();
    out.assert_code(1);
    assert!(
        !out.stderr.contains('\u{1b}') && !out.stderr.contains('\u{7}'),
        "escape sequences reached the terminal: {:?}",
        out.stderr
    );
    assert!(
        !out.stderr
            .lines()
            .any(|l| l.starts_with("ferry: all files arrived")),
        "a line forged by the server: {:?}",
        out.stderr
    );
    out.assert_stderr_contains("server: ");
}

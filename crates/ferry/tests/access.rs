//! Who may do what to a server: `--read-only` and `--write-only` refuse the
//! other direction before touching the filesystem, and a crowd of idle
//! connections cannot lock clients out.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::*;

/// A scratch directory with a small tree at `src`, and a server root
/// holding one file, `served.txt`.
fn setup() -> (Scratch, PathBuf, PathBuf) {
    let scratch = Scratch::new();
    let src = scratch.join("src");
    build_small_tree(&src);
    let root = scratch.mkdir("root");
    write_random_file(&root.join("served.txt"), 3000, 601);
    (scratch, src, root)
}

/// The names directly inside `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Exit status 1 and a single line on stderr that mentions `needle`.
#[track_caller]
fn assert_refused(out: &Output, needle: &str) {
    out.assert_code(1).assert_stderr_contains(needle);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        // Trust on first use says so once; that is not the refusal.
        .filter(|l| !l.starts_with("ferry: new server "))
        .collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr\n{out}");
    assert!(lines[0].starts_with("ferry: "), "{out}");
}

#[track_caller]
fn assert_server_healthy(server: &mut Server) {
    let log = server.stderr();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    assert!(!log.contains("ERROR"), "the server logged an error:\n{log}");
    assert!(server.is_running(), "the server exited:\n{log}");
}

#[test]
fn read_only_server_refuses_uploads_and_serves_downloads() {
    let (scratch, src, root) = setup();
    let mut server = Server::start_with(&root, &[&"--read-only"]);
    let opts = RunOptions::with_timeout(ERROR_TIMEOUT);

    // A tree into missing parents: not even the parents may appear.
    let out = server.run_with(&[&"up", &src, &"a/b/copy"], &opts);
    assert_refused(&out, "read-only");
    // Which side refused, and which path.
    out.assert_stderr_contains("ferry: server: a/b/copy: this server is read-only");
    let file = scratch.join("src/one.txt");
    let out = server.run_with(&[&"up", &file, &"one.txt"], &opts);
    assert_refused(&out, "read-only");
    // A client sends its transfer with its request, before the answer
    // (PROTOCOL.md §8.1): refused mid-flight, it still reports the refusal,
    // not the connection it breaks. With and without TLS.
    let big = scratch.join("big.bin");
    write_random_file(&big, 48 << 20, 3);
    let out = server.run_with(&[&"up", &big, &"big.bin"], &opts);
    assert_refused(&out, "this server is read-only");
    let mut plain = Server::start_with(&root, &[&"--read-only", &"--no-tls"]);
    let out = plain.run_with(&[&"up", &"--no-tls", &big, &"big.bin"], &opts);
    assert_refused(&out, "this server is read-only");
    assert_server_healthy(&mut plain);
    assert_eq!(
        names(&root),
        ["served.txt"],
        "nothing may be written\n{out}"
    );
    assert!(part_files(&root).is_empty());

    let back = scratch.join("back.txt");
    server
        .run(&[&"down", &"served.txt", &back])
        .assert_success();
    assert_files_equal(&root.join("served.txt"), &back);
    assert!(server.wait_for_log("read-only", Duration::from_secs(5)));
    assert_server_healthy(&mut server);
}

#[test]
fn write_only_server_refuses_downloads_and_accepts_uploads() {
    let (scratch, src, root) = setup();
    let mut server = Server::start_with(&root, &[&"--write-only"]);
    let opts = RunOptions::with_timeout(ERROR_TIMEOUT);

    let back = scratch.join("back.txt");
    let out = server.run_with(&[&"down", &"served.txt", &back], &opts);
    assert_refused(&out, "write-only");
    assert!(!back.exists(), "nothing may be created locally\n{out}");
    // Nor for a path that does not exist: the refusal says nothing about it.
    let out = server.run_with(&[&"down", &"missing", &scratch.join("m")], &opts);
    assert_refused(&out, "write-only");

    server.run(&[&"up", &src, &"a/copy"]).assert_success();
    assert_trees_equal(&src, &root.join("a/copy"));
    assert_server_healthy(&mut server);
}

#[test]
fn read_only_and_write_only_together_are_a_usage_error() {
    let (_scratch, _src, root) = setup();
    let out = run_timeout(
        &[
            &"server",
            &"--read-only",
            &"--write-only",
            &"--port",
            &"0",
            &"--root",
            &root,
        ],
        ERROR_TIMEOUT,
    );
    out.assert_code(2)
        .assert_stderr_contains("--read-only")
        .assert_stderr_contains("--write-only");
}

/// How many connections the server has logged accepting.
fn accepted(server: &Server) -> usize {
    server
        .stderr()
        .lines()
        .filter(|line| line.contains(": connection peer="))
        .count()
}

#[test]
fn idle_connections_do_not_lock_clients_out() {
    const IDLE: usize = 300;
    // The server's slots for sessions: before idle connections had a budget
    // of their own, they took all of these and a client waited in the
    // kernel's backlog until their handshake timed out (15 s).
    const SLOTS: usize = 256;
    let (_scratch, src, root) = setup();
    let mut server = Server::start(&root);

    // More silent sockets than the server serves sessions at once. Each
    // would otherwise sit in the handshake for its whole timeout (15 s).
    let idle: Vec<TcpStream> = (0..IDLE)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", server.port()))
                .unwrap_or_else(|e| panic!("idle connection {i}: {e}"))
        })
        .collect();
    // Start the client once the crowd holds at least every slot.
    let crowded = poll_until(Duration::from_secs(10), || {
        (accepted(&server) >= SLOTS).then_some(())
    });
    assert!(
        crowded.is_some(),
        "the server accepted {} of {IDLE} connections\n{}",
        accepted(&server),
        server.stderr()
    );

    let started = Instant::now();
    let out = server.run_with(
        &[&"up", &src, &"copy", &"--streams", &"4"],
        &RunOptions::with_timeout(Duration::from_secs(10)),
    );
    out.assert_success();
    assert_trees_equal(&src, &root.join("copy"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the upload took {:?}\n{out}",
        started.elapsed()
    );

    drop(idle);
    // A second client after the crowd has gone: the server is unharmed.
    let out = server.run_with(
        &[&"up", &src, &"again"],
        &RunOptions::with_timeout(Duration::from_secs(10)),
    );
    out.assert_success();
    assert_trees_equal(&src, &root.join("again"));
    assert_server_healthy(&mut server);
}

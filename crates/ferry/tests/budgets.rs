//! What a server shares among its clients, and what hostile ones cannot
//! take from the others (SECURITY.md, "Limits on state"): file
//! descriptors, memory, session slots, and time. Each test plays hostile
//! clients (or a hostile server) by hand against the real binary, with
//! the limits set small so that it takes seconds, and measures the
//! server's descriptors (/proc/PID/fd) and peak memory (VmHWM).

use std::io::Write;
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

/// How long a hostile peer waits for the other side's answers.
const PEER_TIMEOUT: Duration = Duration::from_secs(20);
const MTIME: &str = r#""mtime":{"sec":1700000000,"nsec":0}"#;

/// A scratch dir with a small tree to upload and an empty server root.
fn setup() -> (Scratch, PathBuf, PathBuf) {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    build_small_tree(&src);
    let root = scratch.mkdir("root");
    (scratch, src, root)
}

/// The `n`th loopback address after 127.0.0.1: a client of its own.
fn address(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + n)
}

/// A hostile client's accepted upload session. What the server answers
/// is read on a thread of its own (so that the server never waits for
/// this client to read), and dropped.
struct Hostile {
    stream: TcpStream,
}

impl Hostile {
    fn upload(server: &Server, source: Ipv4Addr, dest: &str) -> Hostile {
        let mut stream = connect_from(source, server.addr()).expect("connect to the server");
        let request = format!(r#"{{"type":"upload","dest":"{dest}"}}"#);
        let ready = open_session(&mut stream, &request, Instant::now() + PEER_TIMEOUT);
        assert_eq!(ready["type"], "ready", "{ready}\n{}", server.stderr());
        Hostile::reading(stream)
    }

    /// Reads what the server sends on `stream` until it closes.
    fn reading(stream: TcpStream) -> Hostile {
        let mut reader = stream.try_clone().unwrap();
        thread::spawn(move || {
            let far = Instant::now() + Duration::from_secs(600);
            while read_frame(&mut reader, far).is_some() {}
        });
        Hostile { stream }
    }

    /// Sends `bytes`; false once the server has closed the connection.
    fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }
}

fn dir_entry(id: u64, path: &str) -> Vec<u8> {
    control_frame(&format!(
        r#"{{"type":"entry","id":{id},"path":"{path}","kind":"dir","mode":493,{MTIME}}}"#
    ))
}

fn file_entry(id: u64, path: &str, size: u64) -> Vec<u8> {
    control_frame(&format!(
        r#"{{"type":"entry","id":{id},"path":"{path}","kind":"file","size":{size},"mode":420,{MTIME}}}"#
    ))
}

/// Waits until `measure` has not grown for a second (at most `timeout`);
/// returns its largest value.
fn settled_peak(timeout: Duration, mut measure: impl FnMut() -> u64) -> u64 {
    let deadline = Instant::now() + timeout;
    let mut peak = measure();
    let mut still_since = Instant::now();
    while Instant::now() < deadline && still_since.elapsed() < Duration::from_secs(1) {
        thread::sleep(Duration::from_millis(100));
        let now = measure();
        if now > peak {
            peak = now;
            still_since = Instant::now();
        }
    }
    peak
}

fn upload_small_tree(server: &Server, src: &Path, dest: &str) -> Output {
    server.run_with(
        &[&"up", &src, &dest, &"--no-tls", &"--retries", &"20"],
        &RunOptions::with_timeout(Duration::from_secs(40)),
    )
}

// ---------------------------------------------------------------------------
// File descriptors (hardening 3)
// ---------------------------------------------------------------------------

/// Four clients that announce 2000 files each and never send them would
/// have the server hold a part file open for each: under a limit of 2048
/// open files, the server ran out, and a legitimate upload could not even
/// be accepted. Each session now draws from one budget of descriptors
/// with a fair share of its own; a file past it is answered `incomplete`.
#[test]
fn sessions_holding_files_open_do_not_starve_a_legitimate_upload() {
    const NOFILE: u64 = 2048;
    const FILES: u64 = 2000;
    let (_scratch, src, root) = setup();
    let opts = RunOptions {
        nofile: Some(NOFILE),
        ..RunOptions::default()
    };
    let server = Server::start_as(&root, &[&"--no-tls"], &opts);
    let mut hostile = Vec::new();
    for i in 0..4u8 {
        let mut h = Hostile::upload(&server, address(i), &format!("h{i}"));
        let mut bytes = dir_entry(1, "");
        for id in 2..FILES + 2 {
            bytes.extend(file_entry(id, &format!("f{id}"), 5));
        }
        assert!(h.send(&bytes));
        hostile.push(h);
    }
    let peak = settled_peak(Duration::from_secs(20), || server.fd_count() as u64);
    let started = Instant::now();
    let out = upload_small_tree(&server, &src, "copy");
    out.assert_success();
    assert_trees_equal(&src, &root.join("copy"));
    eprintln!(
        "hostile sessions: peak {peak} descriptors of {NOFILE}; legitimate upload in {:?}",
        started.elapsed()
    );
    assert!(
        peak < NOFILE - 64,
        "the server held {peak} descriptors\n{}",
        server.stderr()
    );
    drop(hostile);
}

//! What a server shares among its clients, and what hostile ones cannot
//! take from the others (SECURITY.md, "Limits on state"): file
//! descriptors, memory, session slots, and time. Each test plays hostile
//! clients (or a hostile server) by hand against the real binary, with
//! the limits set small so that it takes seconds, and measures the
//! server's descriptors (/proc/PID/fd) and peak memory (VmHWM).

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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
/// this client to read) and only its last words are kept.
struct Hostile {
    stream: TcpStream,
    last: Arc<Mutex<Vec<serde_json::Value>>>,
    answers: Arc<Mutex<u64>>,
}

impl Hostile {
    fn upload(server: &Server, source: Ipv4Addr, dest: &str) -> Hostile {
        let mut stream = connect_from(source, server.addr()).expect("connect to the server");
        let request = format!(r#"{{"type":"upload","dest":"{dest}"}}"#);
        let ready = open_session(
            &mut stream,
            &server.token(),
            &request,
            Instant::now() + PEER_TIMEOUT,
        );
        assert_eq!(ready["type"], "ready", "{ready}\n{}", server.stderr());
        Hostile::reading(stream)
    }

    /// Reads what the server sends on `stream` until it closes.
    fn reading(stream: TcpStream) -> Hostile {
        let last = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(0));
        let mut reader = stream.try_clone().unwrap();
        let (keep, count) = (last.clone(), answers.clone());
        thread::spawn(move || {
            let far = Instant::now() + Duration::from_secs(600);
            while let Some((kind, body)) = read_frame(&mut reader, far) {
                *count.lock().unwrap() += 1;
                if kind == 1 {
                    let msg = serde_json::from_slice(&body).unwrap_or_default();
                    let mut kept = keep.lock().unwrap();
                    if kept.len() >= 8 {
                        kept.remove(0);
                    }
                    kept.push(msg);
                }
            }
        });
        Hostile {
            stream,
            last,
            answers,
        }
    }

    /// Sends `bytes`; false once the server has closed the connection.
    fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    fn answers(&self) -> u64 {
        *self.answers.lock().unwrap()
    }

    /// The error the server ended the session with, if it did.
    fn error(&self) -> Option<serde_json::Value> {
        let last = self.last.lock().unwrap();
        last.iter().find(|m| m["type"] == "error").cloned()
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

fn keepalive() -> Vec<u8> {
    control_frame(r#"{"type":"keepalive"}"#)
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

const MIB_F: f64 = MIB as f64;

// ---------------------------------------------------------------------------
// Memory (hardening 4)
// ---------------------------------------------------------------------------

/// XXH3-64 of `bytes`, cut to the 32 bits a journal's checks keep.
fn check32(bytes: &[u8]) -> u32 {
    twox_hash::XxHash3_64::oneshot(bytes) as u32
}

/// A journal (journal.rs) for a source of `size` bytes at `MTIME`, holding
/// `records` records of one byte each, every one well-formed.
fn write_journal(path: &Path, size: u64, records: u64) {
    let mut out = Vec::with_capacity(32 + 24 * records as usize);
    out.extend_from_slice(b"FERRYJ1\n");
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&1_700_000_000i64.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let check = check32(&out[..28]);
    out.extend_from_slice(&check.to_le_bytes());
    for offset in 0..records {
        let start = out.len();
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        let check = check32(&out[start..]);
        out.extend_from_slice(&check.to_le_bytes());
    }
    std::fs::write(path, out).unwrap();
}

/// A journal left beside a part file is read when its file is sent again.
/// One holding 4 million records (a receiver writes one per chunk of
/// 1 MiB, so a 64 GiB file has at most 65 536) was read whole into memory
/// and sorted: 150 MB and more. A journal with more records than its file
/// has chunks is now ignored without being read.
#[test]
fn a_journal_with_more_records_than_its_file_has_chunks_is_not_read() {
    const SIZE: u64 = 64 << 30;
    const RECORDS: u64 = 4 << 20;
    let (_scratch, _src, root) = setup();
    let part = std::fs::File::create(root.join(".big.ferry-part")).unwrap();
    part.set_len(SIZE).unwrap();
    write_journal(&root.join(".big.ferry-journal"), SIZE, RECORDS);
    let server = Server::start_with(&root, &[&"--no-tls"]);
    let before = server.peak_rss();
    let deadline = Instant::now() + PEER_TIMEOUT;
    let mut stream = hostile_upload_session(&server, "big", deadline);
    stream.write_all(&file_entry(1, "", SIZE)).unwrap();
    // The plan comes once the journal has been dealt with.
    let planned = (0..8).find_map(|_| {
        let msg = read_message(&mut stream, deadline);
        (msg["type"] == "planned").then_some(msg)
    });
    assert!(planned.is_some(), "no plan\n{}", server.stderr());
    let grown = server.peak_rss().saturating_sub(before);
    eprintln!("peak memory grew by {:.1} MiB", grown as f64 / MIB_F);
    assert!(
        grown < 32 * MIB,
        "the server grew by {} MiB reading the journal",
        grown / MIB
    );
}

/// The data connections of a session that joined `hostile`.
fn join_data_connections(server: &Server, welcome: &serde_json::Value, n: usize) -> Vec<TcpStream> {
    let join = format!(
        r#"{{"type":"join","session_id":{},"secret":{}}}"#,
        welcome["session_id"], welcome["secret"]
    );
    (0..n)
        .map(|_| {
            let mut conn = TcpStream::connect(server.addr()).unwrap();
            let mut hello = preface().to_vec();
            hello.extend(control_frame(&join));
            conn.write_all(&hello).unwrap();
            let deadline = Instant::now() + PEER_TIMEOUT;
            let mut theirs = [0u8; 8];
            std::io::Read::read_exact(&mut conn, &mut theirs).unwrap();
            let _ = read_frame(&mut conn, deadline); // joined
            conn
        })
        .collect()
}

/// A session opened by hand whose `welcome` is kept, for its data
/// connections to join.
fn upload_with_welcome(
    server: &Server,
    source: Ipv4Addr,
    dest: &str,
) -> (TcpStream, serde_json::Value) {
    let mut stream = connect_from(source, server.addr()).unwrap();
    let deadline = Instant::now() + PEER_TIMEOUT;
    let welcome = greet(&mut stream, &server.token(), deadline);
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let request = format!(r#"{{"type":"upload","dest":"{dest}"}}"#);
    stream.write_all(&control_frame(&request)).unwrap();
    let ready = read_message(&mut stream, deadline);
    assert_eq!(ready["type"], "ready", "{ready}");
    (stream, welcome)
}

/// A 4 MiB chunk of a file that was never announced: a receiver parks it
/// until its entry comes. Its codec says zstd (a payload a byte shorter
/// than the chunk), so nothing hashes it on arrival; its bytes are never
/// looked at.
fn parked_chunk(n: u64) -> Vec<u8> {
    const LEN: u32 = 4 << 20;
    let payload = vec![0x5a; LEN as usize - 1];
    data_frame(999, n * u64::from(LEN), LEN, 1, 0, &payload)
}

/// Chunks that overtake their entries are parked, at most 128 per
/// session: but of up to 4 MiB each, and with no bound for the server.
/// Two sessions sending such chunks on 16 connections made the server
/// hold 500 MB. Now every chunk read is charged to one memory budget
/// (`--max-memory`), and a session's data connections wait while its
/// share is spent; a legitimate upload still gets through.
#[test]
fn parked_chunks_stay_within_the_memory_budget() {
    let (scratch, _src, root) = setup();
    let server = Server::start_with(&root, &[&"--no-tls", &"--max-memory", &"64M"]);
    let before = server.peak_rss();
    let mut senders = Vec::new();
    for i in 0..2u8 {
        let (control, welcome) = upload_with_welcome(&server, address(i), &format!("p{i}"));
        let mut conns = join_data_connections(&server, &welcome, 15);
        conns.push(control);
        for (k, mut conn) in conns.into_iter().enumerate() {
            senders.push(thread::spawn(move || {
                for n in 0..8 {
                    if conn.write_all(&parked_chunk(k as u64 * 8 + n)).is_err() {
                        break;
                    }
                }
                thread::sleep(Duration::from_secs(20));
            }));
        }
    }
    let peak = settled_peak(Duration::from_secs(20), || server.peak_rss());
    let big = scratch.join("legit.bin");
    write_random_file(&big, 8 * MIB, 3);
    let started = Instant::now();
    let out = server.run_with(
        &[&"up", &big, &"legit.bin", &"--no-tls"],
        &RunOptions::with_timeout(Duration::from_secs(40)),
    );
    out.assert_success();
    assert_files_equal(&big, &root.join("legit.bin"));
    let grown = peak.saturating_sub(before);
    eprintln!(
        "peak memory grew by {:.1} MiB; legitimate upload in {:?}",
        grown as f64 / MIB_F,
        started.elapsed()
    );
    assert!(grown < 96 * MIB, "the server grew by {} MiB", grown / MIB);
}

/// Every entry that fails or is skipped was remembered, with its path and
/// reason, for the session's summary: 30 000 entries with 4 KiB reasons
/// grew a server by 120 MB and more, without bound. A server now counts
/// them, keeping only the first few.
#[test]
fn skipped_entries_are_counted_not_remembered() {
    const ENTRIES: u64 = 30_000;
    let (_scratch, _src, root) = setup();
    let quiet = RunOptions {
        env: vec![("RUST_LOG".into(), "error".into())],
        ..RunOptions::default()
    };
    let server = Server::start_as(&root, &[&"--no-tls"], &quiet);
    let before = server.peak_rss();
    let mut h = Hostile::upload(&server, address(0), "specials");
    let what = "w".repeat(4000);
    let mut bytes = dir_entry(1, "");
    for id in 2..ENTRIES + 2 {
        bytes.extend(control_frame(&format!(
            r#"{{"type":"entry","id":{id},"path":"s{id}","kind":"special","what":"{what}"}}"#
        )));
    }
    assert!(h.send(&bytes));
    let answered = poll_until(Duration::from_secs(60), || {
        (h.answers() > ENTRIES).then_some(())
    });
    assert!(answered.is_some(), "{} answers", h.answers());
    let grown = server.peak_rss().saturating_sub(before);
    eprintln!("peak memory grew by {:.1} MiB", grown as f64 / MIB_F);
    assert!(grown < 40 * MIB, "the server grew by {} MiB", grown / MIB);
}

/// Hard links whose file is still arriving wait for it, at most 65 536
/// per session: each with its name, up to 4 KiB. One session holding a
/// file open and sending links to it below 15 directories of 250-byte
/// names grew a server by 250 MB with 65 000 of them (95 MB with the
/// 25 000 here). What a session holds for its
/// waiting entries is now charged to the memory budget; a link past its
/// share is answered `incomplete` (the client sends it again).
#[test]
fn waiting_hard_links_stay_within_the_memory_budget() {
    const LINKS: u64 = 25_000;
    let (_scratch, _src, root) = setup();
    let server = Server::start_with(&root, &[&"--no-tls", &"--max-memory", &"64M"]);
    let before = server.peak_rss();
    let mut h = Hostile::upload(&server, address(0), "links");
    let mut bytes = dir_entry(1, "");
    bytes.extend(file_entry(2, "f", 5));
    let mut deep = String::new();
    for id in 3..18u64 {
        if !deep.is_empty() {
            deep.push('/');
        }
        deep.push_str(&"c".repeat(250));
        bytes.extend(dir_entry(id, &deep));
    }
    for id in 18..LINKS + 18 {
        bytes.extend(control_frame(&format!(
            r#"{{"type":"entry","id":{id},"path":"{deep}/{id}","kind":"hardlink","first":2,"target":"f"}}"#
        )));
    }
    assert!(h.send(&bytes));
    let peak = settled_peak(Duration::from_secs(60), || server.peak_rss());
    let grown = peak.saturating_sub(before);
    eprintln!(
        "peak memory grew by {:.1} MiB; {} answers",
        grown as f64 / MIB_F,
        h.answers()
    );
    assert!(grown < 48 * MIB, "the server grew by {} MiB", grown / MIB);
}

// ---------------------------------------------------------------------------
// Time and slots (hardening 10)
// ---------------------------------------------------------------------------

/// Keepalives told the stall watch that the session was alive: a client
/// that sends nothing else held its session (and its slot) for ever. A
/// stall is now measured on progress.
#[test]
fn a_session_that_only_sends_keepalives_is_ended() {
    let (_scratch, _src, root) = setup();
    let server = Server::start_with(&root, &[&"--no-tls", &"--timeout", &"1"]);
    let mut h = Hostile::upload(&server, address(0), "idle");
    assert!(h.send(&file_entry(1, "", 5)));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) && h.send(&keepalive()) {
        if h.error().is_some() {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    let error = h.error();
    assert!(
        error.is_some(),
        "the session lived {:?} on keepalives\n{}",
        started.elapsed(),
        server.stderr()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Each step of the handshake had a timeout of its own, so a client could
/// take one step every few seconds, and hold a pending connection (and,
/// authenticating, an answer) well beyond any of them. The whole
/// handshake, authentication included, now has one deadline.
#[test]
fn the_whole_handshake_has_one_deadline() {
    let (_scratch, _src, root) = setup();
    let opts = RunOptions {
        env: vec![(
            "FERRY_TOKEN".into(),
            "a-token-nobody-guesses-1234567890".into(),
        )],
        ..RunOptions::default()
    };
    let server = Server::start_as(&root, &[&"--no-tls", &"--handshake-timeout", &"2"], &opts);
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    let deadline = Instant::now() + PEER_TIMEOUT;
    stream.write_all(&preface()).unwrap();
    thread::sleep(Duration::from_millis(1200));
    stream
        .write_all(&control_frame(r#"{"type":"hello","software":"slow"}"#))
        .unwrap();
    let mut theirs = [0u8; 8];
    std::io::Read::read_exact(&mut stream, &mut theirs).unwrap();
    let _ = read_frame(&mut stream, deadline); // the challenge
    thread::sleep(Duration::from_millis(1200));
    let answer = control_frame(&format!(r#"{{"type":"auth","mac":"{}"}}"#, "0".repeat(64)));
    let _ = stream.write_all(&answer);
    assert!(
        server.wait_for_log("authentication failed", Duration::from_secs(10)),
        "{}",
        server.stderr()
    );
    let log = server.stderr();
    assert!(
        !contains_ci(&log, "wrong token"),
        "the server read an answer after its deadline\n{log}"
    );
}

/// Sessions opened by hand from `source`, each an upload that sends
/// keepalives only, until the server refuses one or `max` are open: the
/// open sessions.
fn crowd(server: &Server, source: Ipv4Addr, max: usize) -> Vec<TcpStream> {
    let mut open = Vec::new();
    for i in 0..max {
        let Ok(mut stream) = connect_from(source, server.addr()) else {
            break;
        };
        let request = format!(r#"{{"type":"upload","dest":"c{i}"}}"#);
        let answer = open_session(
            &mut stream,
            &server.token(),
            &request,
            Instant::now() + Duration::from_secs(5),
        );
        if answer["type"] != "ready" {
            break;
        }
        open.push(stream);
    }
    open
}

/// One address could take every one of the server's 256 session slots;
/// a client from another address then waited for a slot until it gave
/// up. Sessions per address are now capped.
#[test]
fn one_address_cannot_take_every_session_slot() {
    let (_scratch, src, root) = setup();
    let server = Server::start_with(&root, &[&"--no-tls"]);
    let mut crowd = crowd(&server, address(0), 256);
    let crowded = crowd.len();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keeper = {
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &mut crowd {
                    let _ = s.write_all(&keepalive());
                }
                thread::sleep(Duration::from_millis(300));
            }
        })
    };
    let out = server.run_with(
        &[&"up", &src, &"copy", &"--no-tls"],
        &RunOptions::with_timeout(Duration::from_secs(25)),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    keeper.join().unwrap();
    out.assert_success();
    assert_trees_equal(&src, &root.join("copy"));
    assert!(crowded < 256, "one address opened {crowded} sessions");
}

/// A server that answers an upload with keepalives only: the client
/// waited for ever (keepalives reset its stall watch). It now gives up
/// after its timeout.
#[test]
fn a_server_sending_only_keepalives_cannot_hang_a_client() {
    let scratch = Scratch::new();
    let file = scratch.join("f.txt");
    write_file(&file, b"hello");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut reply = preface().to_vec();
        reply.extend(control_frame(
            r#"{"type":"welcome","software":"keepalives","session_id":"s","secret":"x","max_streams":1}"#,
        ));
        let _ = conn.write_all(&reply);
        let mut theirs = [0u8; 8];
        let _ = std::io::Read::read_exact(&mut conn, &mut theirs);
        let _ = read_frame(&mut conn, deadline); // hello
        let _ = read_frame(&mut conn, deadline); // the request
        let _ = conn.write_all(&control_frame(r#"{"type":"ready"}"#));
        while Instant::now() < deadline && conn.write_all(&keepalive()).is_ok() {
            thread::sleep(Duration::from_millis(200));
        }
    });
    let started = Instant::now();
    let out = run_with(
        &[
            &"up",
            &file,
            &"f.txt",
            &"--no-tls",
            &"--host",
            &"127.0.0.1",
            &"--port",
            &port.to_string(),
            &"--timeout",
            &"2",
            &"--retries",
            &"0",
            &"--streams",
            &"1",
        ],
        &RunOptions::with_timeout(Duration::from_secs(20)),
    );
    assert_ne!(out.code(), Some(0), "{out}");
    out.assert_no_panic();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// All at once: the figures in SECURITY.md
// ---------------------------------------------------------------------------

/// How many hostile sessions the attack runs, each from an address of its
/// own (so that no per-address cap helps).
const ATTACKERS: u8 = 64;

/// What one attacker sends on its control connection to `dest`: 15
/// directories deep of 250-byte names held open, a file never sent, 1000
/// hard links waiting for it (4 KiB names), 1000 files never sent (each a
/// part file open), 1000 entries skipped with 4 KiB reasons, and, for the
/// first four, a file with a crafted journal of 4 million records.
fn attack_script(i: u8) -> Vec<u8> {
    let mut bytes = dir_entry(1, "");
    let mut deep = String::new();
    for id in 2..17u64 {
        if !deep.is_empty() {
            deep.push('/');
        }
        deep.push_str(&"d".repeat(250));
        bytes.extend(dir_entry(id, &deep));
    }
    bytes.extend(file_entry(17, "f", 5));
    let mut id = 17;
    let what = "w".repeat(4000);
    for n in 0..1000 {
        id += 1;
        bytes.extend(control_frame(&format!(
            r#"{{"type":"entry","id":{id},"path":"{deep}/l{n}","kind":"hardlink","first":17,"target":"f"}}"#
        )));
        id += 1;
        bytes.extend(file_entry(id, &format!("x{n}"), 5));
        id += 1;
        bytes.extend(control_frame(&format!(
            r#"{{"type":"entry","id":{id},"path":"s{n}","kind":"special","what":"{what}"}}"#
        )));
    }
    if i < 4 {
        bytes.extend(file_entry(id + 1, "big", 64 << 30));
    }
    bytes
}

/// One attacker: its session from its own address, its control script and
/// two data connections parking 4 MiB chunks, each on a thread that then
/// keeps the session alive (a skipped entry now and then is progress).
/// The streams come back, to be shut down at the end.
fn start_attacker(server: &Server, i: u8) -> Vec<TcpStream> {
    let (control, welcome) = upload_with_welcome(server, address(i), &format!("a{i}"));
    let mut conns = join_data_connections(server, &welcome, 2);
    conns.push(control);
    let mut streams = Vec::new();
    for (k, mut conn) in conns.into_iter().enumerate() {
        streams.push(conn.try_clone().unwrap());
        let is_control = k == 2;
        thread::spawn(move || {
            let script = if is_control {
                attack_script(i)
            } else {
                (0..4)
                    .flat_map(|n| parked_chunk(k as u64 * 4 + n))
                    .collect()
            };
            let drain = conn.try_clone().unwrap();
            thread::spawn(move || Hostile::reading(drain));
            if conn.write_all(&script).is_err() || !is_control {
                return;
            }
            for id in 10_000_000u64.. {
                thread::sleep(Duration::from_secs(5));
                let entry = format!(
                    r#"{{"type":"entry","id":{id},"path":"t{id}","kind":"special","what":"socket"}}"#
                );
                if conn.write_all(&control_frame(&entry)).is_err() {
                    return;
                }
            }
        });
    }
    streams
}

/// The journals the first four attackers resume from: 4 million records
/// each, for a 64 GiB file, beside a sparse part file.
fn plant_journals(root: &Path) {
    for i in 0..4 {
        let dir = root.join(format!("a{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let part = std::fs::File::create(dir.join(".big.ferry-part")).unwrap();
        part.set_len(64 << 30).unwrap();
        write_journal(&dir.join(".big.ferry-journal"), 64 << 30, 4 << 20);
    }
}

/// 64 hostile sessions from 64 addresses run the worst of hardening 3, 4
/// and 10 at once (descriptors held by part files and directories, parked
/// 4 MiB chunks, waiting hard links and skipped entries with 4 KiB names,
/// crafted journals, sessions kept alive by a trickle of entries), and a
/// legitimate 1 GiB upload starts in the middle of it. Prints the
/// Downloads of `amplify.bin` from `source` that claim to hold it as
/// one-byte chunks (hardening 5), one after the other until `stop`: how
/// many the server refused with a protocol error.
fn amplify(
    server: &str,
    token: &str,
    source: Ipv4Addr,
    stop: &std::sync::atomic::AtomicBool,
) -> u64 {
    let mut refused = 0;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let Ok(mut stream) = connect_from(source, server) else {
            thread::sleep(Duration::from_millis(50));
            continue;
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let request = r#"{"type":"download","source":"amplify.bin","compression":{"mode":"off"}}"#;
        if open_session(&mut stream, token, request, deadline)["type"] != "ready" {
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        while read_message(&mut stream, deadline)["type"] != "entry" {}
        let claim = format!(r#"{{"type":"have","id":1,"chunks":[[0,1,{}]]}}"#, 64 * MIB);
        let mut frames = control_frame(&claim);
        frames.extend(control_frame(r#"{"type":"planned","through":1}"#));
        let _ = stream.write_all(&frames);
        let said = read_messages(&mut stream, deadline);
        refused += u64::from(said.last().is_some_and(|m| m["code"] == "protocol"));
    }
    refused
}

/// server's peak memory and descriptors, and the upload's time. Run with
/// a release build: `cargo test --release --test integration attack --
/// --ignored --nocapture`.
#[test]
#[ignore = "a minute of load; the figures are in SECURITY.md"]
fn attack_of_64_hostile_sessions() {
    let (scratch, _src, root) = setup();
    plant_journals(&root);
    write_random_file(&root.join("amplify.bin"), 64 * MIB, 12);
    let big = scratch.join("legit.bin");
    write_random_file(&big, 1 << 30, 11);
    let server = Server::start_with(&root, &[&"--no-tls"]);
    let base = (server.peak_rss(), server.fd_count());
    let peak_fds = Arc::new(Mutex::new(0usize));
    let watching = {
        let (pid, peak) = (server.pid(), peak_fds.clone());
        thread::spawn(move || {
            let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
            while let n @ 1.. = fds() {
                let mut p = peak.lock().unwrap();
                *p = (*p).max(n);
                drop(p);
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let streams: Vec<TcpStream> = (0..ATTACKERS)
        .flat_map(|i| start_attacker(&server, i))
        .collect();
    thread::sleep(Duration::from_secs(5));
    let under_attack = (server.peak_rss(), *peak_fds.lock().unwrap());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (addr, token) = (server.addr().to_string(), server.token());
    let (out, took, refused) = thread::scope(|scope| {
        // Hardening 5 all along: downloads claiming one-byte chunks.
        let amplifiers: Vec<_> = (0..8)
            .map(|k| {
                let (addr, token, stop) = (&addr, &token, &stop);
                scope.spawn(move || amplify(addr, token, address(ATTACKERS + k), stop))
            })
            .collect();
        let started = Instant::now();
        let out = server.run_with(
            &[&"up", &big, &"legit.bin", &"--no-tls", &"--retries", &"50"],
            &RunOptions::with_timeout(Duration::from_secs(600)),
        );
        let took = started.elapsed();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let refused: u64 = amplifiers.into_iter().map(|a| a.join().unwrap()).sum();
        (out, took, refused)
    });
    let retries = out.stderr.matches("retrying in").count();
    out.assert_success();
    assert_files_equal(&big, &root.join("legit.bin"));
    eprintln!(
        "{ATTACKERS} hostile sessions; server before: {:.0} MiB, {} fds; after 5 s of attack: \
         {:.0} MiB, {} fds; peak over the whole run: {:.0} MiB (VmHWM), {} fds; \
         legitimate 1 GiB upload: {took:.1?}, {retries} retries, verified; \
         one-byte held-chunk claims refused meanwhile: {refused}",
        base.0 as f64 / MIB_F,
        base.1,
        under_attack.0 as f64 / MIB_F,
        under_attack.1,
        server.peak_rss() as f64 / MIB_F,
        *peak_fds.lock().unwrap(),
    );
    for s in &streams {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    drop(server);
    let _ = watching.join();
}

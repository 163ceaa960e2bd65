//! Progress that says only what is known: no total before the sender has
//! counted one (`[n]` on `-v` lines, `null` in `--json`), then the true
//! one; counts that never lag behind the events they count and never go
//! back, a retry included.
//!
//! When the totals come is the sender's business, and a real server's
//! count of a small tree wins any race with its data: a hand-written
//! sender that takes its time, and says its totals half way, shows what
//! the client makes of a count still running.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::proxy::{Direction, Fault, FaultProxy};
use crate::util::*;

const SLOW: Duration = Duration::from_secs(120);

/// `hello` (5 bytes) as one raw chunk: its XXH3-64 and the file digest,
/// pinned in PROTOCOL.md §7.2.
const HELLO: &[u8] = b"hello";
const HELLO_HASH: u64 = 0x9555_e855_5c62_dcfd;
const HELLO_DIGEST: &str = "553ac1fdd3cd2fbe408dc8693462f526";
/// The files the slow sender sends, and how many before its totals.
const FILES: u64 = 5;
const BEFORE_TOTALS: u64 = 3;
/// Between two files: more than one `progress` event's interval (500 ms).
const PAUSE: Duration = Duration::from_millis(600);

/// What the slow sender sends for file `id` (`f{id}`, holding `hello`).
fn hello_file(id: u64) -> Vec<u8> {
    let mtime = r#""mtime":{"sec":1700000000,"nsec":0}"#;
    let mut out = control_frame(&format!(
        r#"{{"type":"entry","id":{id},"path":"f{id}","kind":"file","size":5,"mode":420,{mtime}}}"#
    ));
    out.extend(data_frame(id, 0, HELLO.len() as u32, 0, HELLO_HASH, HELLO));
    out.extend(control_frame(&format!(
        r#"{{"type":"file_end","id":{id},"digest":"{HELLO_DIGEST}"}}"#
    )));
    out
}

/// A hand-written server on a free port that answers one download, in
/// plaintext, with a directory of [`FILES`] files, one per [`PAUSE`], and
/// says its totals only after [`BEFORE_TOTALS`] of them (as a server
/// counting a large tree would). Joined: what the client answered.
fn slow_sender() -> (u16, thread::JoinHandle<Vec<Value>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().unwrap().port();
    let sender = thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let accepted = poll_until(ERROR_TIMEOUT, || match listener.accept() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            other => Some(other),
        });
        let (mut conn, _) = accepted.expect("a client within the deadline").unwrap();
        conn.set_nonblocking(false).unwrap();
        let deadline = Instant::now() + SLOW;
        let mut theirs = [0u8; 8];
        conn.read_exact(&mut theirs).unwrap();
        let mut reply = preface().to_vec();
        reply.extend(control_frame(
            r#"{"type":"welcome","software":"slow","session_id":"00","secret":"11","max_streams":1}"#,
        ));
        conn.write_all(&reply).unwrap();
        assert_eq!(read_message(&mut conn, deadline)["type"], "hello");
        assert_eq!(read_message(&mut conn, deadline)["type"], "download");
        let mut start = control_frame(r#"{"type":"ready"}"#);
        start.extend(control_frame(
            r#"{"type":"entry","id":1,"path":"","kind":"dir","mode":493,"mtime":{"sec":1700000000,"nsec":0}}"#,
        ));
        conn.write_all(&start).unwrap();
        for id in 2..FILES + 2 {
            if id == BEFORE_TOTALS + 2 {
                let totals = format!(
                    r#"{{"type":"totals","files":{FILES},"bytes":{}}}"#,
                    FILES * 5
                );
                conn.write_all(&control_frame(&totals)).unwrap();
            }
            conn.write_all(&hello_file(id)).unwrap();
            thread::sleep(PAUSE);
        }
        let mut end = control_frame(r#"{"type":"dir_end","id":1}"#);
        end.extend(control_frame(r#"{"type":"end"}"#));
        conn.write_all(&end).unwrap();
        read_messages(&mut conn, deadline)
    });
    (port, sender)
}

/// `ferry down` from the slow sender into `dst`, shown `how`.
fn download_slowly(dst: &Path, how: &str) -> Output {
    let (port, sender) = slow_sender();
    let port = port.to_string();
    let out = run_timeout(
        &[
            &"down",
            &"tree",
            &dst,
            &how,
            &"--host",
            &"127.0.0.1",
            &"--port",
            &port,
            &"--no-tls",
            &"--retries",
            &"0",
        ],
        SLOW,
    );
    let answers = sender.join().expect("the slow sender");
    out.assert_success();
    let done = answers.iter().filter(|m| m["type"] == "outcome").count();
    assert_eq!(done as u64, FILES + 1, "{answers:?}\n{out}");
    out
}

/// `[n]` or `[n/total]` at the start of a `-v` line.
fn numbered(line: &str) -> Option<(u64, Option<u64>)> {
    let inside = line.strip_prefix('[')?.split_once(']')?.0;
    Some(match inside.split_once('/') {
        Some((n, total)) => (n.parse().ok()?, Some(total.parse().ok()?)),
        None => (inside.parse().ok()?, None),
    })
}

#[test]
fn a_download_numbers_its_files_with_a_total_only_once_it_is_known() {
    let scratch = Scratch::new();
    let out = download_slowly(&scratch.join("copy"), "-v");
    assert!(!out.stdout.contains("/0]"), "{out}");
    let lines: Vec<_> = out.stdout.lines().filter_map(numbered).collect();
    let want: Vec<_> = (1..=FILES)
        .map(|n| (n, (n > BEFORE_TOTALS).then_some(FILES)))
        .collect();
    assert_eq!(lines, want, "{out}");
    out.assert_stdout_contains("5 total, 5 ok");
}

/// The NDJSON events on stdout, in order.
fn events(out: &Output) -> Vec<Value> {
    out.stdout
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Whether `event` settles an entry that counts (every one but a
/// directory): one more `files_done`.
fn settles(event: &Value) -> bool {
    match event["event"].as_str() {
        Some("file_done" | "file_unchanged" | "skipped") => true,
        Some("file_failed" | "file_incomplete") => event["dir"] == false,
        _ => false,
    }
}

/// What a `progress` event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    files: u64,
    files_total: Option<u64>,
    bytes: u64,
    bytes_total: Option<u64>,
}

/// The `progress` events, checked against the events around them: never
/// fewer files done than were settled before (since the last retry, whose
/// next attempt settles again what is in place), never less than the one
/// before nor more than the total, a total once known kept, and equal to
/// `totals` (files, bytes).
#[track_caller]
fn progress(out: &Output, totals: (u64, u64)) -> Vec<Progress> {
    let mut settled = 0;
    let mut seen: Vec<Progress> = Vec::new();
    for event in events(out) {
        settled += u64::from(settles(&event));
        if event["event"] == "retry" {
            settled = 0;
        }
        if event["event"] != "progress" {
            continue;
        }
        let n = |field: &str| event[field].as_u64();
        let now = Progress {
            files: n("files_done").expect("files_done"),
            files_total: n("files_total"),
            bytes: n("bytes").expect("bytes"),
            bytes_total: n("bytes_total"),
        };
        assert!(
            now.files >= settled,
            "lags behind the events: {event}\n{out}"
        );
        if let Some(before) = seen.last() {
            let back = now.files < before.files || now.bytes < before.bytes;
            assert!(!back, "went back: {event} after {before:?}\n{out}");
            let lost = before.files_total.is_some() && now.files_total.is_none();
            assert!(!lost, "the total was lost: {event}\n{out}");
        }
        if now.files_total.is_some() || now.bytes_total.is_some() {
            let (files, bytes) = totals;
            let total = (now.files_total, now.bytes_total);
            assert_eq!(total, (Some(files), Some(bytes)), "{event}\n{out}");
            assert!(now.files <= files && now.bytes <= bytes, "{event}\n{out}");
        }
        seen.push(now);
    }
    seen
}

#[test]
fn json_progress_has_null_totals_until_they_are_known_and_never_goes_back() {
    let scratch = Scratch::new();
    let out = download_slowly(&scratch.join("copy"), "--json");
    let seen = progress(&out, (FILES, FILES * 5));
    // A file every 600 ms, and the totals after the third: a `progress`
    // event for each file before them says so.
    let unknown = seen.iter().take_while(|p| p.files_total.is_none()).count();
    assert!(unknown >= 2, "{seen:?}\n{out}");
    assert!(
        unknown < seen.len(),
        "the totals never came: {seen:?}\n{out}"
    );
    assert!(
        seen[..unknown].iter().all(|p| p.bytes_total.is_none()),
        "{out}"
    );
    assert_eq!(out.json_event("summary")["files_total"], FILES, "{out}");
}

/// 40 files of 64 KiB.
fn forty_files(src: &Path) -> u64 {
    for i in 0..40 {
        write_random_file(&src.join(format!("f{i:02}")), 64 * 1024, 100 + i);
    }
    40 * 64 * 1024
}

#[test]
fn after_a_retry_the_counts_go_on_from_where_they_were_and_count_nothing_twice() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let src = scratch.mkdir("src");
    let size = forty_files(&src);
    let server = Server::start(&root);
    // Cut half way; at 1 MiB/s that is more than a second of events.
    let target = server.addr().parse().expect("the server prints IP:PORT");
    let proxy = FaultProxy::start(
        target,
        Direction::ClientToServer,
        vec![Fault::cut(size / 2)],
    );
    let out = run_through(
        &proxy,
        &server,
        &[
            &"up",
            &src,
            &"copy",
            &"--json",
            &"--bwlimit",
            &"1M",
            &"--compress",
            &"off",
            &"--timeout",
            &"5",
        ],
    );
    out.assert_success();
    assert_eq!(proxy.faults_fired(), 1, "{out}");
    assert_trees_equal(&src, &root.join("copy"));
    let seen = progress(&out, (40, size));
    let retry = events(&out)
        .iter()
        .filter(|e| e["event"] == "retry" || e["event"] == "progress")
        .position(|e| e["event"] == "retry")
        .unwrap_or_else(|| panic!("no retry\n{out}"));
    assert!(
        retry >= 1 && retry < seen.len(),
        "progress on both sides of the retry: {seen:?}"
    );
    // The files the first attempt put in place are unchanged in the second,
    // and still count once.
    let summary = out.json_event("summary");
    assert_eq!(summary["retries"], 1, "{out}");
    assert_eq!(
        (
            &summary["files_total"],
            &summary["files_ok"],
            &summary["files_failed"]
        ),
        (&40.into(), &40.into(), &0.into()),
        "{out}"
    );
    assert!(summary["files_unchanged"].as_u64() > Some(0), "{out}");
}

/// A slow link is not a stall. Over a proxy that forwards 2 MiB/s per
/// connection, an upload whose chunks all fit in the sender's queues long
/// before the link has carried them finishes in one attempt under a
/// 4-second stall timeout. (The sender counted a chunk as progress when it
/// queued it, and the queues and socket buffers behind the last one took
/// longer than that to drain: every attempt ended as stalled.)
#[test]
fn a_slow_link_is_not_a_stall() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let file = scratch.join("big.bin");
    write_random_file(&file, 24 * MIB, 11);
    let server = Server::start(&root);
    let target = server.addr().parse().expect("the server prints IP:PORT");
    let proxy = FaultProxy::throttled(target, Direction::ClientToServer, 2 * MIB);
    let out = run_through(
        &proxy,
        &server,
        &[
            &"up",
            &file,
            &"big.bin",
            &"--json",
            &"--compress",
            &"off",
            &"--timeout",
            &"4",
            &"--streams=2",
        ],
    );
    out.assert_success();
    assert_eq!(out.json_event("summary")["retries"], 0, "{out}");
    assert_files_equal(&file, &root.join("big.bin"));
}

/// `ferry ARGS` through `proxy` to `server`, as a client of the server's
/// user, in the foreground.
fn run_through(
    proxy: &FaultProxy,
    server: &Server,
    args: &[&dyn AsRef<std::ffi::OsStr>],
) -> Output {
    let (via, own) = (proxy.client_args(), server.own_user_args());
    let mut all = args.to_vec();
    all.extend(via.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    all.extend(own.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    run_with(&all, &RunOptions::with_timeout(SLOW))
}

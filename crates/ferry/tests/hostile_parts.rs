//! The receiver's working files: part files, journals and the names under
//! which it makes links and nodes before they take their own. A hostile
//! client (written against the wire format) and a local user (files
//! planted in the server's root) must not make the server adopt, open,
//! read or remove anything it did not make itself for the transfer at
//! hand, nor learn from it anything about content it did not send.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_proto::digest::{DigestBuilder, chunk_hash};
use rustix::fs::inotify;

use crate::util::*;

/// How long a hostile peer waits for the server's answers.
const PEER_TIMEOUT: Duration = Duration::from_secs(20);
/// The chunk size of an honest sender.
const CHUNK: usize = 1 << 20;
/// The mtime every planted and sent file has.
const MTIME: i64 = 1_700_000_000;
/// A file that keeps a journal (4 MiB or more), of five chunks.
const BIG: usize = 4 * CHUNK + 100;

// ---------------------------------------------------------------------------
// A hostile client, frame by frame
// ---------------------------------------------------------------------------

fn control(json: &str) -> Vec<u8> {
    let mut frame = vec![1u8];
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(json.as_bytes());
    frame
}

/// A raw data chunk of file `id` (PROTOCOL.md §6) with its true hash.
fn chunk_frame(id: u64, offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(&offset.to_be_bytes());
    body.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    body.push(0);
    body.extend_from_slice(&chunk_hash(bytes).to_be_bytes());
    body.extend_from_slice(bytes);
    let mut frame = vec![2u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// The whole-file digest an honest sender sends for `content`.
fn digest_of(content: &[u8]) -> String {
    let mut digest = DigestBuilder::new(content.len() as u64);
    for piece in content.chunks(CHUNK) {
        digest.push(chunk_hash(piece));
    }
    digest.finish().to_hex()
}

/// An `entry` of `kind` (the JSON fields after `"kind":`).
fn entry(id: u64, path: &str, kind: &str) -> Vec<u8> {
    control(&format!(
        r#"{{"type":"entry","id":{id},"path":"{path}","kind":{kind}}}"#
    ))
}

fn dir_entry(id: u64, path: &str) -> Vec<u8> {
    let kind = format!(r#""dir","mode":493,"mtime":{{"sec":{MTIME},"nsec":0}}"#);
    entry(id, path, &kind)
}

fn file_entry(id: u64, path: &str, size: usize) -> Vec<u8> {
    let kind = format!(r#""file","size":{size},"mode":420,"mtime":{{"sec":{MTIME},"nsec":0}}"#);
    entry(id, path, &kind)
}

/// The chunks of file `id` and its `file_end`.
fn file_data(id: u64, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, piece) in content.chunks(CHUNK).enumerate() {
        out.extend(chunk_frame(id, (i * CHUNK) as u64, piece));
    }
    let digest = digest_of(content);
    out.extend(control(&format!(
        r#"{{"type":"file_end","id":{id},"digest":"{digest}"}}"#
    )));
    out
}

fn whole_file(id: u64, path: &str, content: &[u8]) -> Vec<u8> {
    let mut out = file_entry(id, path, content.len());
    out.extend(file_data(id, content));
    out
}

fn symlink_entry(id: u64, path: &str, target: &str) -> Vec<u8> {
    let kind = format!(r#""symlink","target":"{target}","mtime":{{"sec":{MTIME},"nsec":0}}"#);
    entry(id, path, &kind)
}

fn hardlink_entry(id: u64, path: &str, first: u64, target: &str) -> Vec<u8> {
    entry(
        id,
        path,
        &format!(r#""hardlink","first":{first},"target":"{target}""#),
    )
}

fn fifo_entry(id: u64, path: &str) -> Vec<u8> {
    entry(
        id,
        path,
        &format!(r#""fifo","mode":420,"mtime":{{"sec":{MTIME},"nsec":0}}"#),
    )
}

/// `/dev/null`'s numbers: a node that is harmless to make.
fn device_entry(id: u64, path: &str) -> Vec<u8> {
    let kind = format!(
        r#""device","block":false,"major":1,"minor":3,"mode":384,"mtime":{{"sec":{MTIME},"nsec":0}}"#
    );
    entry(id, path, &kind)
}

fn dir_end(id: u64) -> Vec<u8> {
    control(&format!(r#"{{"type":"dir_end","id":{id}}}"#))
}

fn end() -> Vec<u8> {
    control(r#"{"type":"end"}"#)
}

/// A hand-written client's upload session (plaintext: the server runs
/// with `--no-tls`), and every control message the server sent it.
struct Peer {
    stream: TcpStream,
    deadline: Instant,
    got: Vec<serde_json::Value>,
}

impl Peer {
    /// An upload to `dest`, accepted (`ready`).
    fn upload(server: &Server, dest: &str) -> Peer {
        // A hostile client that holds the token: the threat that remains.
        let stream = server.plaintext_session("hostile");
        let mut peer = Peer {
            stream,
            deadline: Instant::now() + PEER_TIMEOUT,
            got: Vec::new(),
        };
        assert!(peer.wait_for(|m| m["type"] == "welcome"), "{:?}", peer.got);
        peer.send(&control(&format!(r#"{{"type":"upload","dest":"{dest}"}}"#)));
        let ready = peer.wait_for(|m| m["type"] == "ready");
        assert!(ready, "{:?}\n{}", peer.got, server.stderr());
        peer
    }

    fn send(&mut self, bytes: &[u8]) {
        // The server may close early (a protocol error): what it said
        // still counts, and the test looks at that.
        let _ = self.stream.write_all(bytes);
    }

    /// Reads control messages until one satisfies `what` (true), or the
    /// session ends, or the deadline passes (false).
    fn wait_for(&mut self, what: impl Fn(&serde_json::Value) -> bool) -> bool {
        // Bounded by the deadline and by the count.
        while self.got.len() < 10_000 {
            let Some(msg) = self.next_message() else {
                return false;
            };
            let found = what(&msg);
            let over = msg["type"] == "done" || msg["type"] == "error";
            self.got.push(msg);
            if found {
                return true;
            }
            if over {
                return false;
            }
        }
        false
    }

    /// Waits until the server has planned every file up to `id`: its
    /// entry has been taken in, its part file opened.
    fn wait_planned(&mut self, id: u64) {
        let planned = self.wait_for(|m| {
            (m["type"] == "planned" && m["through"].as_u64() >= Some(id))
                || (m["type"] == "outcome" && m["id"] == id)
        });
        assert!(planned, "entry {id} was never planned: {:?}", self.got);
    }

    /// Sends `end` and reads the rest of the session.
    fn finish(&mut self) {
        self.send(&end());
        let done = self.wait_for(|m| m["type"] == "done");
        assert!(done, "the session did not end with done: {:?}", self.got);
    }

    fn next_message(&mut self) -> Option<serde_json::Value> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut header = [0u8; 5];
            self.stream.read_exact(&mut header).ok()?;
            let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
            // Bounded: no control message is larger (PROTOCOL.md §3).
            if len > 256 * 1024 {
                return None;
            }
            let mut body = vec![0u8; len];
            self.stream.read_exact(&mut body).ok()?;
            if header[0] == 1 {
                return Some(serde_json::from_slice(&body).unwrap());
            }
        }
    }

    /// The outcome of entry `id`, as `status: reason`.
    fn outcome(&self, id: u64) -> Option<String> {
        self.got
            .iter()
            .find(|m| m["type"] == "outcome" && m["id"] == id)
            .map(|m| format!("{}: {}", m["status"], m["reason"]))
    }

    /// The `have` the server sent for entry `id`, if any.
    fn have(&self, id: u64) -> Option<&serde_json::Value> {
        self.got
            .iter()
            .find(|m| m["type"] == "have" && m["id"] == id)
    }
}

// ---------------------------------------------------------------------------
// What a local user or a hostile client plants
// ---------------------------------------------------------------------------

/// A journal as the receiver writes it (journal.rs): a header for a source
/// of `size` bytes with mtime `MTIME`, then one record per `(offset, len,
/// hash)`, each with its check.
fn journal_bytes(size: usize, records: &[(u64, u32, u64)]) -> Vec<u8> {
    let check = |bytes: &[u8]| (chunk_hash(bytes) as u32).to_le_bytes();
    let mut out = b"FERRYJ1\n".to_vec();
    out.extend_from_slice(&(size as u64).to_le_bytes());
    out.extend_from_slice(&MTIME.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let header_check = check(&out);
    out.extend_from_slice(&header_check);
    for &(offset, len, hash) in records {
        let mut record = offset.to_le_bytes().to_vec();
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&hash.to_le_bytes());
        let record_check = check(&record);
        record.extend_from_slice(&record_check);
        out.extend(record);
    }
    out
}

/// The true record of each chunk of `content`.
fn true_records(content: &[u8]) -> Vec<(u64, u32, u64)> {
    content
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, piece)| ((i * CHUNK) as u64, piece.len() as u32, chunk_hash(piece)))
        .collect()
}

/// A source file: `content` with the mtime `MTIME`.
fn plant(path: &Path, content: &[u8], mode: u32) {
    plant_working(path, content, mode);
    set_mtime(path, MTIME, 0);
}

/// A part file or journal: `content` written just now (an old one would
/// be swept as abandoned when the server starts).
fn plant_working(path: &Path, content: &[u8], mode: u32) {
    write_file(path, content);
    set_mode(path, mode);
}

/// Watches `path` for anyone opening it. An `O_PATH` handle is not an
/// open: Linux gives such descriptors no fsnotify events.
struct OpenWatch {
    fd: std::os::fd::OwnedFd,
    path: PathBuf,
}

impl OpenWatch {
    fn new(path: &Path) -> OpenWatch {
        let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)
            .expect("inotify_init");
        inotify::add_watch(&fd, path, inotify::WatchFlags::OPEN)
            .unwrap_or_else(|e| panic!("watch {}: {e}", path.display()));
        OpenWatch {
            fd,
            path: path.to_path_buf(),
        }
    }

    #[track_caller]
    fn assert_never_opened(&self, context: &dyn std::fmt::Display) {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut events = inotify::Reader::new(&self.fd, &mut buf);
        // Bounded: the buffer holds a few hundred events at most.
        while let Ok(event) = events.next() {
            assert!(
                !event.events().contains(inotify::ReadFlags::OPEN),
                "{} was opened\n{context}",
                self.path.display()
            );
        }
    }
}

#[track_caller]
fn assert_server_healthy(server: &mut Server) {
    let log = server.stderr();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    assert!(server.is_running(), "the server exited:\n{log}");
}

fn ino(path: &Path) -> u64 {
    lstat(path).ino()
}

// ---------------------------------------------------------------------------
// Finding 1: a write-only client reads nothing through a planted part
// ---------------------------------------------------------------------------

/// A client of a `--write-only` server links a secret it may not read as
/// a part file, uploads a journal of guessed chunk hashes beside it, and
/// announces the secret's size and mtime: had the server resumed that
/// part, its `have` would tell which guesses match the secret.
#[test]
fn a_write_only_client_cannot_plant_a_part_and_journal_to_probe_a_file() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let dest = scratch.mkdir("root/d");
    let secret = random_bytes(BIG, 1001);
    plant(&dest.join("secret.bin"), &secret, 0o600);
    // Chunks 0 and 2 guessed right, the others wrong.
    let guesses: Vec<_> = true_records(&secret)
        .into_iter()
        .enumerate()
        .map(|(i, (o, l, h))| (o, l, if i % 2 == 0 { h } else { h ^ 1 }))
        .collect();
    let journal = journal_bytes(BIG, &guesses[..4]);
    let mut server = Server::start_with(&root, &[&"--no-tls", &"--write-only"]);

    let mut peer = Peer::upload(&server, "d");
    let mut frames = dir_entry(1, "");
    frames.extend(whole_file(2, "a", b"hello"));
    frames.extend(hardlink_entry(3, ".x.ferry-part", 2, "secret.bin"));
    frames.extend(whole_file(4, ".x.ferry-journal", &journal));
    frames.extend(file_entry(5, "x", BIG));
    peer.send(&frames);
    peer.wait_planned(5);
    let abort = r#"{"type":"abort","id":5,"reason":"enough"}"#;
    peer.send(&[control(abort), dir_end(1)].concat());
    peer.finish();

    let context = format!("the server answered {:?}", peer.got);
    assert!(
        peer.have(5).is_none(),
        "the server told which guessed chunks match a file the client never sent\n{context}"
    );
    for id in [3, 4] {
        let outcome = peer.outcome(id).unwrap_or_default();
        assert!(
            outcome.starts_with("\"failed\"") && contains_ci(&outcome, "ferry"),
            "entry {id} under a working name was not refused\n{context}"
        );
    }
    assert_eq!(fs::read(dest.join("secret.bin")).unwrap(), secret);
    assert_eq!(lstat(&dest.join("secret.bin")).nlink(), 1, "{context}");
    assert!(part_files(&root).is_empty(), "{:?}", part_files(&root));
    assert_server_healthy(&mut server);
}

/// Entries whose names are the receiver's own working names are refused,
/// whatever their kind, and nothing is made under those names; the rest
/// of the tree arrives.
#[test]
fn entries_under_the_receivers_working_names_are_refused() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    scratch.mkdir("root/d");
    let devices = is_root();
    let mut extra: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"--no-tls"];
    if devices {
        extra.push(&"--devices");
    }
    let mut server = Server::start_with(&root, &extra);

    let mut peer = Peer::upload(&server, "d");
    let mut frames = dir_entry(1, "");
    frames.extend(whole_file(2, "fine", b"hello"));
    frames.extend(whole_file(3, ".a.ferry-part", b"hello"));
    frames.extend(whole_file(4, ".a.ferry-journal", b"hello"));
    frames.extend(symlink_entry(5, ".b.ferry-part", "fine"));
    frames.extend(fifo_entry(6, ".c.ferry-part"));
    frames.extend(hardlink_entry(7, ".d.ferry-part", 2, "fine"));
    frames.extend(dir_entry(8, ".e.ferry-journal"));
    frames.extend(dir_end(8));
    frames.extend(whole_file(9, ".ferry-probe.1.2", b"hello"));
    frames.extend(hardlink_entry(10, "link", 2, ".a.ferry-part"));
    frames.extend(symlink_entry(11, ".ferry-new.0123456789abcdef", "fine"));
    let last = if devices {
        frames.extend(device_entry(12, ".f.ferry-part"));
        12
    } else {
        11
    };
    frames.extend(dir_end(1));
    peer.send(&frames);
    peer.finish();

    let context = format!("the server answered {:?}", peer.got);
    assert_eq!(
        peer.outcome(2).as_deref(),
        Some("\"ok\": null"),
        "{context}"
    );
    for id in 3..=last {
        let outcome = peer.outcome(id).unwrap_or_default();
        assert!(
            outcome.starts_with("\"failed\"") && contains_ci(&outcome, "ferry"),
            "entry {id} was not refused: {outcome}\n{context}"
        );
    }
    let names: Vec<_> = fs::read_dir(root.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["fine"], "{context}");
    assert_server_healthy(&mut server);
}

// ---------------------------------------------------------------------------
// Finding 9: a node under a working name is never opened
// ---------------------------------------------------------------------------

/// A local user makes a fifo (or, as root, a device node) under the part
/// file's name, or under the journal's name beside a part the server left:
/// the server looks at them without opening them, replaces them, and the
/// uploads arrive whole.
#[test]
fn a_node_under_a_part_or_journal_name_is_never_opened() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let content = random_bytes(BIG, 1002);
    let src = scratch.join("src.bin");
    plant(&src, &content, 0o644);
    // The part of `j` is one the server left (its user, private), with
    // a fifo where its journal should be.
    plant_working(&root.join(".j.ferry-part"), &content[..CHUNK], 0o600);
    let mut nodes = vec![(".p.ferry-part", "p"), (".j.ferry-journal", "j")];
    mkfifo(&root.join(".p.ferry-part"));
    mkfifo(&root.join(".j.ferry-journal"));
    if is_root() {
        let null = rustix::fs::makedev(1, 3);
        let dev = root.join(".n.ferry-part");
        let kind = rustix::fs::FileType::CharacterDevice;
        rustix::fs::mknodat(rustix::fs::CWD, &dev, kind, 0o600.into(), null).unwrap();
        nodes.push((".n.ferry-part", "n"));
    }
    let watches: Vec<_> = nodes
        .iter()
        .map(|(node, _)| OpenWatch::new(&root.join(node)))
        .collect();
    let mut server = Server::start(&root);

    for ((_, name), watch) in nodes.iter().zip(&watches) {
        let out = server.run(&[&"up", &src, name]);
        watch.assert_never_opened(&out);
        out.assert_success();
        assert_eq!(fs::read(root.join(name)).unwrap(), content);
    }
    assert!(part_files(&root).is_empty(), "{:?}", part_files(&root));
    assert_server_healthy(&mut server);
}

// ---------------------------------------------------------------------------
// Finding 7: an entry replaces only what its own transfer made
// ---------------------------------------------------------------------------

/// While one upload writes a large file's part, other uploads send a
/// symlink, a hard link, a fifo (and, as root, a device node) of the same
/// name: each takes the name, none touches the part, and the file then
/// takes the name with its own content, whole.
#[test]
fn a_link_or_node_entry_leaves_another_transfers_part_alone() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    write_file(&scratch.mkdir("root/d").join("other"), b"other\n");
    let devices = is_root();
    let mut extra: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"--no-tls"];
    if devices {
        extra.push(&"--devices");
    }
    let mut server = Server::start_with(&root, &extra);
    let content = random_bytes(BIG, 1008);
    let mut writer = Peer::upload(&server, "d");
    writer.send(&[dir_entry(1, ""), file_entry(2, "x", BIG)].concat());
    writer.wait_planned(2);
    let part = root.join("d/.x.ferry-part");
    let part_ino = ino(&part);

    let mut kinds = vec![
        symlink_entry(2, "x", "elsewhere"),
        [
            whole_file(2, "b", b"hello"),
            hardlink_entry(3, "x", 2, "other"),
        ]
        .concat(),
        fifo_entry(2, "x"),
    ];
    if devices {
        kinds.push(device_entry(2, "x"));
    }
    for (i, frames) in kinds.into_iter().enumerate() {
        let mut other = Peer::upload(&server, "d");
        other.send(&[dir_entry(1, ""), frames, dir_end(1)].concat());
        other.finish();
        let context = format!("entry kind {i}: {:?}", other.got);
        assert!(
            fs::symlink_metadata(&part).is_ok_and(|m| m.ino() == part_ino),
            "the part file of the upload in flight was removed or replaced\n{context}"
        );
    }

    writer.send(&[file_data(2, &content), dir_end(1)].concat());
    writer.finish();
    let context = format!("the writer was answered {:?}", writer.got);
    assert_eq!(
        writer.outcome(2).as_deref(),
        Some("\"ok\": null"),
        "{context}"
    );
    assert!(lstat(&root.join("d/x")).is_file(), "{context}");
    assert_eq!(fs::read(root.join("d/x")).unwrap(), content, "{context}");
    assert!(part_files(&root).is_empty(), "{:?}", part_files(&root));
    assert_server_healthy(&mut server);
}

// ---------------------------------------------------------------------------
// Finding 6: a part file the server did not make is never adopted
// ---------------------------------------------------------------------------

/// A local user plants a part file, keeps it open, and waits for the
/// server to fill and commit it, to rewrite the committed file later. The
/// server never adopts a part that is not its own, private, and of one
/// name: a large file's it replaces; a small file's it never even looks
/// for (those are written under fresh names). Either way the user's
/// descriptor leads nowhere near the file.
#[test]
fn a_part_planted_by_a_local_user_is_replaced_not_adopted() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let small = random_bytes(3000, 1003);
    let big = random_bytes(BIG, 1004);
    let (small_src, big_src) = (scratch.join("small"), scratch.join("big"));
    plant(&small_src, &small, 0o644);
    plant(&big_src, &big, 0o644);
    // The server's user's own, but readable and writable by others.
    let mut planted = vec![
        ("shared", small_src.clone(), 0o666, false),
        ("shared-big", big_src.clone(), 0o644, false),
    ];
    // Another user's, private: needs root to make.
    if is_root() {
        planted.push(("foreign", small_src.clone(), 0o600, true));
        planted.push(("foreign-big", big_src.clone(), 0o600, true));
    }
    let mut server = Server::start(&root);

    for (name, src, mode, foreign) in planted {
        let content = fs::read(&src).unwrap();
        let part = root.join(format!(".{name}.ferry-part"));
        let journal = root.join(format!(".{name}.ferry-journal"));
        // Its first chunk, and a journal that vouches for it.
        plant_working(&part, &content[..content.len().min(CHUNK)], mode);
        plant_working(
            &journal,
            &journal_bytes(content.len(), &true_records(&content)[..1]),
            mode,
        );
        if foreign {
            for path in [&part, &journal] {
                std::os::unix::fs::chown(path, Some(NOBODY.0), Some(NOBODY.1)).unwrap();
            }
        }
        let mut kept = fs::OpenOptions::new().write(true).open(&part).unwrap();
        let watch = OpenWatch::new(&journal);

        let out = server.run(&[&"up", &src, &name]);
        out.assert_success();
        let placed = root.join(name);
        let context = format!("{name}: {out}");
        assert_ne!(ino(&placed), kept.metadata().unwrap().ino(), "{context}");
        watch.assert_never_opened(&context);
        kept.write_all(b"rewritten by whoever kept it open")
            .unwrap();
        assert_eq!(fs::read(&placed).unwrap(), content, "{context}");
        // A small file's part name is not the server's: left alone.
        let left = content.len() < CHUNK;
        assert_eq!(part.exists(), left, "{context}");
    }
    let mut left = part_files(&root);
    left.sort();
    let small: Vec<_> = [".foreign.ferry-journal", ".foreign.ferry-part"]
        .into_iter()
        .filter(|_| is_root())
        .chain([".shared.ferry-journal", ".shared.ferry-part"])
        .map(PathBuf::from)
        .collect();
    assert_eq!(left, small);
    assert_server_healthy(&mut server);
}

/// A hard link to a file the client may not touch, planted under a part
/// file's name with a journal that vouches for some of that file's
/// chunks: the server neither resumes from it (which would write the rest
/// into the other file) nor reads it.
#[test]
fn a_hard_link_planted_under_a_part_name_is_never_resumed() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let secret = random_bytes(BIG, 1005);
    plant_working(&root.join("secret.bin"), &secret, 0o600);
    fs::hard_link(root.join("secret.bin"), root.join(".x.ferry-part")).unwrap();
    // A journal as the server would have written it: its user's, private.
    let journal = root.join(".x.ferry-journal");
    plant_working(
        &journal,
        &journal_bytes(BIG, &true_records(&secret)[..2]),
        0o600,
    );
    let watch = OpenWatch::new(&journal);
    let src = scratch.join("x");
    plant(&src, &random_bytes(BIG, 1006), 0o644);
    let mut server = Server::start(&root);

    let out = server.run(&[&"up", &src, &"x", &"--json"]);
    out.assert_success();
    watch.assert_never_opened(&out);
    assert_eq!(out.json_event("summary")["bytes_held"], 0, "{out}");
    assert_eq!(fs::read(root.join("secret.bin")).unwrap(), secret);
    assert_eq!(lstat(&root.join("secret.bin")).nlink(), 1);
    assert_files_equal(&src, &root.join("x"));
    assert_server_healthy(&mut server);
}

/// What the server left of its own interrupted upload is still resumed:
/// a private part of one name, owned by its user, with its journal.
#[test]
fn a_part_the_server_left_itself_is_still_resumed() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let content = random_bytes(BIG, 1007);
    let src = scratch.join("r");
    plant(&src, &content, 0o644);
    plant_working(&root.join(".r.ferry-part"), &content[..2 * CHUNK], 0o600);
    let journal = journal_bytes(BIG, &true_records(&content)[..2]);
    plant_working(&root.join(".r.ferry-journal"), &journal, 0o600);
    let server = Server::start(&root);

    let out = server.run(&[&"up", &src, &"r", &"--json"]);
    out.assert_success();
    assert_eq!(out.json_event("summary")["bytes_held"], 2 * CHUNK, "{out}");
    assert_files_equal(&src, &root.join("r"));
    assert!(part_files(&root).is_empty(), "{:?}", part_files(&root));
}

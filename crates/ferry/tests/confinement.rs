//! Confinement against the attack patterns of rsync's 2024-25 CVEs
//! (CVE-2024-12086/12087/12088 and the symlink races): a symlink planted in
//! a root, sent earlier in the same transfer, or swapped in while a transfer
//! runs never leads a write, or a read, outside the root. Both directions,
//! with the real client and with hand-written hostile peers.
//!
//! Every test keeps an `outside` directory next to the root and checks at
//! the end that it is exactly as it was: no file, no directory, no changed
//! byte, mode or mtime.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

/// How long a hostile peer waits for the other side's answers.
const PEER_TIMEOUT: Duration = Duration::from_secs(20);

/// `hello` (5 bytes) as one raw chunk: its XXH3-64 and the file digest,
/// both pinned in PROTOCOL.md §7.2, so a hostile peer needs no hasher.
const HELLO: &[u8] = b"hello";
const HELLO_HASH: u64 = 0x9555_e855_5c62_dcfd;
const HELLO_DIGEST: &str = "553ac1fdd3cd2fbe408dc8693462f526";

/// A scratch dir with an empty server root and an `outside` directory
/// beside it, holding one file worth stealing or overwriting.
fn setup() -> (Scratch, PathBuf, PathBuf) {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let outside = scratch.mkdir("outside");
    write_file(
        &outside.join("victim.txt"),
        b"outside the root: never touch\n",
    );
    set_mtime(&outside.join("victim.txt"), 1_400_000_000, 123);
    (scratch, root, outside)
}

/// Everything about a tree that an escape could change, by lstat: kind,
/// mode, size, mtime, and the bytes of files and link targets.
type Snapshot = BTreeMap<PathBuf, (u32, u64, i64, i64, Vec<u8>)>;

fn snapshot(root: &Path) -> Snapshot {
    let mut out = Snapshot::new();
    let mut stack = vec![PathBuf::new()];
    // Bounded by the tree: links are recorded, never entered.
    while let Some(relative) = stack.pop() {
        let path = root.join(&relative);
        let meta = lstat(&path);
        let bytes = if meta.file_type().is_symlink() {
            fs::read_link(&path)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec()
        } else if meta.is_file() {
            fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        } else {
            Vec::new()
        };
        if meta.is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                stack.push(relative.join(entry.unwrap().file_name()));
            }
        }
        let mtime = if relative.as_os_str().is_empty() {
            // The outside directory's own mtime is checked through its
            // listing: creating and removing a name would leave no trace.
            0
        } else {
            meta.mtime()
        };
        out.insert(
            relative,
            (meta.mode(), meta.len(), mtime, meta.mtime_nsec(), bytes),
        );
    }
    out
}

#[track_caller]
fn assert_unchanged(outside: &Path, before: &Snapshot, context: &dyn std::fmt::Display) {
    let after = snapshot(outside);
    if &after != before {
        let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
        let changed: Vec<_> = before
            .iter()
            .filter(|(k, v)| after.get(*k).is_some_and(|a| a != *v))
            .map(|(k, _)| k)
            .collect();
        let gone: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
        panic!(
            "ESCAPE: {} changed outside the root: added {added:?}, changed {changed:?}, \
             removed {gone:?}\n{context}",
            outside.display()
        );
    }
}

/// Runs a command that must be refused, within the deadline for errors:
/// a refusal is final, so it must come quickly, without retries.
fn run_failing_against(server: &Server, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    server.run_with(args, &RunOptions::with_timeout(ERROR_TIMEOUT))
}

/// The refusal says why: a link on the way (or, as the kernel words
/// `O_DIRECTORY | O_NOFOLLOW` on a link, "not a directory").
#[track_caller]
fn assert_refused_for_the_link(out: &Output) {
    out.assert_code(1);
    assert!(
        contains_ci(&out.stderr, "symlink") || contains_ci(&out.stderr, "not a directory"),
        "stderr should say a link is in the way\n{out}"
    );
}

#[track_caller]
fn assert_server_healthy(server: &mut Server) {
    let log = server.stderr();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    assert!(server.is_running(), "the server exited:\n{log}");
}

// ---------------------------------------------------------------------------
// A symlink planted in the server's root (the real client)
// ---------------------------------------------------------------------------

#[test]
fn upload_through_a_planted_symlink_directory_is_refused() {
    let (scratch, root, outside) = setup();
    fs::create_dir(root.join("dest")).unwrap();
    symlink(&outside, root.join("dest/link")).unwrap();
    // A relative link that climbs out is just as planted.
    symlink("../../outside", root.join("dest/rel")).unwrap();
    let before = snapshot(&outside);
    let mut server = Server::start(&root);

    let file = scratch.join("x");
    write_file(&file, b"would land outside\n");
    for remote in [
        "dest/link/x",
        "dest/rel/x",
        // Parents are created below the link: that mkdir -p must not follow it.
        "dest/link/deeper/x",
        // The victim's own name, as rsync's CVE-2024-12087 aims at.
        "dest/link/victim.txt",
    ] {
        let out = run_failing_against(&server, &[&"up", &file, &remote]);
        assert_refused_for_the_link(&out);
        let parent = remote.rsplit_once('/').unwrap().0;
        let first_link = &remote[..remote[5..].find('/').unwrap() + 5];
        assert!(
            out.stderr.contains(first_link) || out.stderr.contains(parent),
            "stderr should name the path through the link\n{out}"
        );
        assert_unchanged(&outside, &before, &out);
    }

    // A tree whose directory `link` meets the planted link at `dest/link`.
    let src = scratch.join("src");
    fs::create_dir_all(src.join("link/sub")).unwrap();
    fs::create_dir_all(src.join("rel")).unwrap();
    write_file(&src.join("link/file"), b"tree file through the link\n");
    write_file(&src.join("link/victim.txt"), b"overwrite the victim\n");
    write_file(&src.join("link/sub/deep"), b"deeper still\n");
    write_file(&src.join("rel/file"), b"relative link\n");
    write_file(&src.join("fine.txt"), b"this one is fine\n");
    let out = run_failing_against(&server, &[&"up", &src, &"dest"]);
    assert_refused_for_the_link(&out);
    out.assert_stderr_contains("link");
    assert_unchanged(&outside, &before, &out);
    // The planted links stay links (not replaced, not followed), and the
    // rest of the tree still arrives: one bad entry does not stop it.
    assert!(lstat(&root.join("dest/link")).file_type().is_symlink());
    assert!(lstat(&root.join("dest/rel")).file_type().is_symlink());
    assert_files_equal(&src.join("fine.txt"), &root.join("dest/fine.txt"));
    assert_server_healthy(&mut server);
}

#[test]
fn upload_onto_planted_symlinks_replaces_them_and_never_writes_through() {
    let (scratch, root, outside) = setup();
    write_file(&outside.join("part-victim"), b"part victim\n");
    write_file(&outside.join("journal-victim"), b"journal victim\n");
    // The final name, the part file's name and the journal's name, each a
    // link to a file outside: the receiver opens or renames over all three.
    symlink(outside.join("victim.txt"), root.join("f.txt")).unwrap();
    symlink(outside.join("part-victim"), root.join(".g.txt.ferry-part")).unwrap();
    symlink(
        outside.join("part-victim"),
        root.join(".big.bin.ferry-part"),
    )
    .unwrap();
    symlink(
        outside.join("journal-victim"),
        root.join(".big.bin.ferry-journal"),
    )
    .unwrap();
    let before = snapshot(&outside);
    let mut server = Server::start(&root);

    // `g.txt` is large enough to be resumable: only those have a part name.
    for (name, size) in [
        ("f.txt", 3000),
        ("g.txt", 4 * MIB + 3),
        ("big.bin", 5 * MIB + 7),
    ] {
        let file = scratch.join(name);
        write_random_file(&file, size, size);
        let out = server.run(&[&"up", &file, &name]);
        out.assert_no_panic();
        assert_unchanged(&outside, &before, &out);
        out.assert_success();
        assert_files_equal(&file, &root.join(name));
    }
    assert!(
        part_files(&root).is_empty(),
        "the planted part-file links are gone: {:?}",
        part_files(&root)
    );
    assert_server_healthy(&mut server);
}

/// CVE-2024-12086 leaked a file's contents by comparing against it through
/// a link. ferry's quick check (same size and mtime: `unchanged`) must not
/// look through a link either, or a client could probe files outside.
#[test]
fn quick_check_never_looks_through_a_symlink() {
    let (scratch, root, outside) = setup();
    let secret = outside.join("victim.txt");
    // Same size and mtime as the secret, other bytes.
    let probe = scratch.join("probe.txt");
    write_file(&probe, &vec![b'?'; lstat(&secret).len() as usize]);
    set_mtime(&probe, lstat(&secret).mtime(), lstat(&secret).mtime_nsec());
    symlink(&secret, root.join("leak.txt")).unwrap();
    symlink(&outside, root.join("leakdir")).unwrap();
    let before = snapshot(&outside);
    let server = Server::start(&root);

    let out = server.run(&[&"up", &probe, &"leak.txt", &"--json"]);
    out.assert_success();
    assert_unchanged(&outside, &before, &out);
    // Sent and renamed over the link: had the link been followed, the
    // file would have been skipped as `unchanged` and the link kept.
    assert_files_equal(&probe, &root.join("leak.txt"));

    assert!(
        !out.stdout.contains("file_unchanged"),
        "the link was looked through\n{out}"
    );

    let out = run_failing_against(&server, &[&"up", &probe, &"leakdir/victim.txt", &"--json"]);
    out.assert_code(1);
    assert!(
        !out.stdout.contains("file_unchanged"),
        "a file outside the root was reported unchanged\n{out}"
    );
    assert_unchanged(&outside, &before, &out);
}

// ---------------------------------------------------------------------------
// Downloads: the server must not read through a link in its root
// ---------------------------------------------------------------------------

#[test]
fn download_through_a_planted_symlink_is_refused() {
    let (scratch, root, outside) = setup();
    symlink(&outside, root.join("leak")).unwrap();
    symlink("/etc", root.join("etc")).unwrap();
    let before = snapshot(&outside);
    let mut server = Server::start(&root);

    for (i, remote) in ["leak/victim.txt", "etc/passwd", "etc/hostname"]
        .iter()
        .enumerate()
    {
        let dst = scratch.join(format!("got-{i}"));
        let out = run_failing_against(&server, &[&"down", remote, &dst]);
        assert_refused_for_the_link(&out);
        let first = remote.split('/').next().unwrap();
        assert!(
            out.stderr.contains(first),
            "stderr should name the path\n{out}"
        );
        assert!(
            fs::symlink_metadata(&dst).is_err(),
            "nothing may be downloaded\n{out}"
        );
    }
    assert_unchanged(&outside, &before, &"after the downloads");
    assert_server_healthy(&mut server);
}

#[test]
fn download_of_a_symlink_sends_the_link_not_its_target() {
    let (scratch, root, outside) = setup();
    let secret = fs::read(outside.join("victim.txt")).unwrap();
    symlink(&outside, root.join("leak")).unwrap();
    symlink(outside.join("victim.txt"), root.join("leak-file")).unwrap();
    symlink("/etc/passwd", root.join("passwd")).unwrap();
    let tree = root.join("tree");
    fs::create_dir(&tree).unwrap();
    write_file(&tree.join("a.txt"), b"inside\n");
    symlink(&outside, tree.join("dir-link")).unwrap();
    symlink(outside.join("victim.txt"), tree.join("file-link")).unwrap();
    symlink("../../outside/victim.txt", tree.join("relative-link")).unwrap();
    let server = Server::start(&root);

    // A root entry that is a link is sent as a link (PROTOCOL.md §8.2).
    for remote in ["leak", "leak-file", "passwd"] {
        let dst = scratch.join(format!("got-{remote}"));
        let out = server.run(&[&"down", &remote, &dst]);
        out.assert_success();
        let meta = lstat(&dst);
        assert!(
            meta.file_type().is_symlink(),
            "{remote} arrived as {:?}, not as a link\n{out}",
            meta.file_type()
        );
        assert_eq!(
            fs::read_link(&dst).unwrap(),
            fs::read_link(root.join(remote)).unwrap()
        );
    }

    let dst = scratch.join("got-tree");
    let out = server.run(&[&"down", &"tree", &dst]);
    out.assert_success();
    assert_trees_equal(&tree, &dst);
    for (path, (_, _, _, _, bytes)) in snapshot(&dst) {
        assert!(
            !lstat(&dst.join(&path)).is_file() || bytes != secret,
            "{} holds the secret from outside the root",
            path.display()
        );
    }
}

/// The client is a receiver too (CVE-2024-12087 was a server writing
/// through the client's links): a link in the client's destination is not
/// followed by a download that merges into it.
#[test]
fn download_into_a_tree_with_a_planted_symlink_stays_inside() {
    let (scratch, root, outside) = setup();
    fs::create_dir_all(root.join("tree/link/sub")).unwrap();
    write_file(&root.join("tree/link/victim.txt"), b"from the server\n");
    write_file(&root.join("tree/link/sub/deep"), b"deep\n");
    write_file(&root.join("tree/ok.txt"), b"fine\n");
    let local = scratch.mkdir("local");
    symlink(&outside, local.join("link")).unwrap();
    let before = snapshot(&outside);
    let server = Server::start(&root);

    let out = run_failing_against(&server, &[&"down", &"tree", &local]);
    out.assert_code(1)
        .assert_stderr_contains("link")
        .assert_stderr_contains("symlink");
    assert_unchanged(&outside, &before, &out);
    assert!(lstat(&local.join("link")).file_type().is_symlink());
    assert_files_equal(&root.join("tree/ok.txt"), &local.join("ok.txt"));
}

// ---------------------------------------------------------------------------
// Hostile peers: a link sent earlier in the same transfer
// ---------------------------------------------------------------------------

/// A data frame (PROTOCOL.md §6) carrying `hello` at offset 0 of `file_id`.
fn hello_chunk(file_id: u64) -> Vec<u8> {
    data_frame(file_id, 0, HELLO.len() as u32, 0, HELLO_HASH, HELLO)
}

/// What a hostile sender sends, one step at a time.
enum Step<'a> {
    Dir(&'a str),
    DirEnd(u64),
    Link(&'a str, &'a str),
    /// A file holding `hello`, its chunk and `file_end` right behind the
    /// entry (a receiver does not check that the sender waited for a plan).
    Hello(&'a str),
    /// Only the entry of such a file: its data follows later, as
    /// `HelloData` with the entry's id.
    HelloEntry(&'a str),
    HelloData(u64),
}

/// The transfer for `steps`, entry ids from 1 in order, then `end`.
fn transfer(steps: &[Step]) -> Vec<u8> {
    let mut out = frames(steps);
    out.extend(control_frame(r#"{"type":"end"}"#));
    out
}

/// The frames for `steps`, entry ids from 1 in order.
fn frames(steps: &[Step]) -> Vec<u8> {
    let mtime = r#""mtime":{"sec":1700000000,"nsec":0}"#;
    let hello_data = |id: u64| {
        let mut data = hello_chunk(id);
        data.extend(control_frame(&format!(
            r#"{{"type":"file_end","id":{id},"digest":"{HELLO_DIGEST}"}}"#
        )));
        data
    };
    let mut out = Vec::new();
    let mut id = 0u64;
    for step in steps {
        let file_entry = |id: u64, path: &str| {
            format!(
                r#"{{"type":"entry","id":{id},"path":"{path}","kind":"file","size":5,"mode":420,{mtime}}}"#
            )
        };
        let json = match step {
            Step::Dir(path) => {
                id += 1;
                format!(
                    r#"{{"type":"entry","id":{id},"path":"{path}","kind":"dir","mode":493,{mtime}}}"#
                )
            }
            Step::DirEnd(dir) => format!(r#"{{"type":"dir_end","id":{dir}}}"#),
            Step::Link(path, target) => {
                id += 1;
                format!(
                    r#"{{"type":"entry","id":{id},"path":"{path}","kind":"symlink","target":"{target}",{mtime}}}"#
                )
            }
            Step::Hello(path) => {
                id += 1;
                out.extend(control_frame(&file_entry(id, path)));
                out.extend(hello_data(id));
                continue;
            }
            Step::HelloEntry(path) => {
                id += 1;
                file_entry(id, path)
            }
            Step::HelloData(file) => {
                out.extend(hello_data(*file));
                continue;
            }
        };
        out.extend(control_frame(&json));
    }
    out
}

/// Uploads `steps` to `dest` as a hand-written client and returns what the
/// server answered after `ready`. The client speaks plaintext: the server
/// must run with `--no-tls`.
fn hostile_upload(server: &Server, dest: &str, steps: &[Step]) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + PEER_TIMEOUT;
    let mut stream = hostile_upload_session(server, dest, deadline);
    // The server may close early (a protocol error): what it said still counts.
    let _ = stream.write_all(&transfer(steps));
    read_messages(&mut stream, deadline)
}

/// The outcome the receiver gave entry `id`, as `status: reason`.
fn outcome_of(messages: &[serde_json::Value], id: u64) -> Option<String> {
    messages
        .iter()
        .find(|m| m["type"] == "outcome" && m["id"] == id)
        .map(|m| format!("{}: {}", m["status"], m["reason"]))
}

#[test]
fn hostile_upload_cannot_write_through_a_link_it_sent() {
    let (_scratch, root, outside) = setup();
    let before = snapshot(&outside);
    let mut server = Server::start_with(&root, &[&"--no-tls"]);
    let abs = outside.display().to_string();
    // Each dest sits directly in the root, so `../outside` climbs out of it.
    let cases: Vec<(&str, Vec<Step>, u64)> = vec![
        // A link, then a file below it (the heart of CVE-2024-12087).
        (
            "up1",
            vec![
                Step::Dir(""),
                Step::Link("a", &abs),
                Step::Hello("a/victim.txt"),
                Step::DirEnd(1),
            ],
            3,
        ),
        // The same with a relative target.
        (
            "up2",
            vec![
                Step::Dir(""),
                Step::Link("a", "../../outside"),
                Step::Hello("a/evil"),
                Step::DirEnd(1),
            ],
            3,
        ),
        // A link, then a directory of the same name, then a file in it.
        (
            "up3",
            vec![
                Step::Dir(""),
                Step::Link("a", &abs),
                Step::Dir("a"),
                Step::Hello("a/evil"),
                Step::DirEnd(3),
                Step::DirEnd(1),
            ],
            4,
        ),
        // Deeper: a real directory, a link inside it, a directory and a
        // file through the link.
        (
            "up4",
            vec![
                Step::Dir(""),
                Step::Dir("d"),
                Step::Link("d/s", &abs),
                Step::Dir("d/s"),
                Step::Hello("d/s/evil"),
                Step::DirEnd(4),
                Step::DirEnd(2),
                Step::DirEnd(1),
            ],
            5,
        ),
        // The root entry itself a link, then children below it (the
        // grammar forbids them; the receiver need not notice).
        ("up5", vec![Step::Link("", &abs), Step::Hello("evil")], 2),
    ];
    for (dest, steps, evil) in cases {
        let answers = hostile_upload(&server, dest, &steps);
        let context = format!("{dest}: the server answered {answers:?}");
        assert_unchanged(&outside, &before, &context);
        let outcome = outcome_of(&answers, evil);
        let refused = outcome
            .as_deref()
            .is_some_and(|o| o.starts_with("\"failed\""))
            || answers.iter().any(|m| m["type"] == "error");
        assert!(
            refused,
            "{dest}: the file through the link was not refused ({outcome:?})\n{context}"
        );
        assert_server_healthy(&mut server);
    }

    // A directory that arrives first, then a link under its name: the link
    // cannot replace a directory, so the file lands in the real one.
    let steps = [
        Step::Dir(""),
        Step::Dir("a"),
        Step::DirEnd(2),
        Step::Link("a", &abs),
        Step::Hello("a/evil"),
        Step::DirEnd(1),
    ];
    let answers = hostile_upload(&server, "up6", &steps);
    let context = format!("up6: the server answered {answers:?}");
    assert_unchanged(&outside, &before, &context);
    assert!(
        outcome_of(&answers, 3).is_some_and(|o| o.starts_with("\"failed\"")),
        "the link over a directory was not refused\n{context}"
    );
    assert!(lstat(&root.join("up6/a")).is_dir(), "{context}");
    assert_eq!(
        fs::read(root.join("up6/a/evil")).unwrap(),
        HELLO,
        "{context}"
    );
    assert_server_healthy(&mut server);
}

/// In a directory the upload has just made, a small file is written
/// unnamed and linked into place once it verifies (no part file name to
/// plant anything at). A symlink planted at its final name meanwhile is
/// replaced by the file, never written through.
#[test]
fn a_link_planted_in_a_new_directory_during_an_upload_is_replaced() {
    let (_scratch, root, outside) = setup();
    let before = snapshot(&outside);
    let mut server = Server::start_with(&root, &[&"--no-tls"]);
    let deadline = Instant::now() + PEER_TIMEOUT;
    let mut stream = hostile_upload_session(&server, "new", deadline);
    // The new directory and the entry of the file, but not its data yet.
    stream
        .write_all(&frames(&[Step::Dir(""), Step::HelloEntry("victim.txt")]))
        .unwrap();
    let dir = root.join("new");
    // Bounded by the deadline.
    while !dir.is_dir() {
        assert!(Instant::now() < deadline, "the directory was never made");
        thread::sleep(Duration::from_millis(5));
    }
    symlink(outside.join("victim.txt"), dir.join("victim.txt")).unwrap();
    stream
        .write_all(&transfer(&[Step::HelloData(2), Step::DirEnd(1)]))
        .unwrap();
    let answers = read_messages(&mut stream, deadline);

    assert_eq!(
        outcome_of(&answers, 2).as_deref(),
        Some("\"ok\": null"),
        "{answers:?}"
    );
    let arrived = dir.join("victim.txt");
    assert!(
        fs::symlink_metadata(&arrived)
            .unwrap()
            .file_type()
            .is_file(),
        "the link is replaced by the file"
    );
    assert_eq!(fs::read(&arrived).unwrap(), HELLO);
    let names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["victim.txt"], "no part file left");
    assert_unchanged(&outside, &before, &"a link planted during the upload");
    assert_server_healthy(&mut server);
}

/// Entry paths are validated like request paths (PROTOCOL.md §5.2); the
/// request path is covered in errors.rs, the entry path here.
#[test]
fn hostile_upload_entry_paths_that_climb_are_refused() {
    let (_scratch, root, outside) = setup();
    let before = snapshot(&outside);
    let mut server = Server::start_with(&root, &[&"--no-tls"]);
    let abs = outside.join("abs-evil").display().to_string();
    for (i, path) in ["../outside/evil", "a/../../outside/evil", abs.as_str()]
        .into_iter()
        .enumerate()
    {
        let dest = format!("paths{i}");
        let answers = hostile_upload(&server, &dest, &[Step::Dir(""), Step::Hello(path)]);
        let error = answers.iter().find(|m| m["type"] == "error");
        assert!(
            error.is_some_and(|e| e["code"] == "bad_path"),
            "{path:?}: expected error bad_path, got {answers:?}"
        );
        assert_unchanged(&outside, &before, &format!("{path:?}: {answers:?}"));
        assert_server_healthy(&mut server);
    }
}

/// The directories a receiver holds open are bounded (PROTOCOL.md §8.4,
/// `MAX_OPEN_DIRS`): a sender that announces directories and never ends
/// them gets a clear protocol error instead of growing the server's memory,
/// nothing is created for the entry past the limit, and the server goes on
/// serving. The protocol's limit is met first when a session may hold more
/// descriptors than that (an open-files limit above about 9000); under a
/// lower one, directories past a session's share are made but not held
/// open (budgets.rs), and there is nothing to test here.
#[test]
fn hostile_upload_of_more_open_directories_than_the_limit_is_refused() {
    const MAX_OPEN_DIRS: usize = 4096;
    let (scratch, root, _outside) = setup();
    let mut server = Server::start_with(&root, &[&"--no-tls"]);
    let may_hold = descriptors_a_session_may_hold(&server);
    if may_hold <= MAX_OPEN_DIRS + 1 {
        eprintln!("skipped: a session may hold only {may_hold} descriptors here");
        return;
    }
    // The root and MAX_OPEN_DIRS directories below it, none ever ended.
    let names: Vec<String> = (0..MAX_OPEN_DIRS).map(|i| format!("d{i}")).collect();
    let steps: Vec<Step> = std::iter::once(Step::Dir(""))
        .chain(names.iter().map(|n| Step::Dir(n)))
        .collect();
    let answers = hostile_upload(&server, "many", &steps);
    let error = answers.iter().find(|m| m["type"] == "error");
    assert!(
        error.is_some_and(|e| e["code"] == "protocol"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("too many directories open at once (limit 4096)"))),
        "expected the limit's protocol error, got {:?}",
        answers.last()
    );
    let last = &names[MAX_OPEN_DIRS - 1];
    assert!(root.join("many").join(&names[MAX_OPEN_DIRS - 2]).is_dir());
    assert!(
        !root.join("many").join(last).exists(),
        "nothing is created for the entry past the limit"
    );
    assert!(server.wait_for_log("too many directories open at once", ERROR_TIMEOUT));
    assert_server_healthy(&mut server);

    // The server goes on serving: a normal upload, by the real client.
    let file = scratch.join("after.txt");
    write_file(&file, b"still serving\n");
    server
        .run(&[&"up", &"--no-tls", &file, &"after.txt"])
        .assert_success();
    assert_eq!(
        fs::read(root.join("after.txt")).unwrap(),
        b"still serving\n"
    );
    assert_server_healthy(&mut server);
}

/// What a session of `server` may hold open at most, as it logged at start
/// ("... get R each, and may borrow up to S more each ...").
fn descriptors_a_session_may_hold(server: &Server) -> usize {
    server.wait_for_log("file descriptors:", ERROR_TIMEOUT);
    let log = server.stderr();
    let numbers = |line: &str| -> Vec<usize> {
        line.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    let line = log.lines().find(|l| l.contains("file descriptors:"));
    match line.map(numbers).as_deref() {
        // limit, sessions, reserve, share, shared
        Some([_, _, reserve, share, ..]) => reserve + share,
        _ => panic!("no descriptor budget in the log\n{log}"),
    }
}

/// An owner is checked like everything else a peer sends: uid `-1` is no
/// one (chown(2) reads it as "leave as it is"). The server refuses the
/// transfer before creating anything, and goes on serving.
#[test]
fn hostile_upload_of_an_invalid_owner_is_refused() {
    let (_scratch, root, _outside) = setup();
    let mut server = Server::start_with(&root, &[&"--no-tls"]);
    let deadline = Instant::now() + PEER_TIMEOUT;
    let mut stream = hostile_upload_session(&server, "owned", deadline);
    let mut bytes = control_frame(
        r#"{"type":"entry","id":1,"path":"","kind":"dir","mode":493,"mtime":{"sec":0,"nsec":0},"owner":{"uid":4294967295,"gid":0}}"#,
    );
    bytes.extend(control_frame(r#"{"type":"end"}"#));
    // The server may close early: what it said still counts.
    let _ = stream.write_all(&bytes);
    let answers = read_messages(&mut stream, deadline);
    let error = answers.iter().find(|m| m["type"] == "error");
    assert!(
        error.is_some_and(|e| e["code"] == "protocol"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("invalid owner 4294967295:0"))),
        "expected a protocol error naming the owner, got {answers:?}"
    );
    assert!(!root.join("owned").exists(), "nothing is created");
    assert_server_healthy(&mut server);
}

/// Hard links are confined like every other write: a link to a symlink
/// that leads outside links nothing (and never what it points to), a
/// target that climbs out is refused, and a link may only name an entry
/// that came before it.
#[test]
fn hostile_upload_cannot_link_to_files_outside() {
    let (_scratch, root, outside) = setup();
    let before = snapshot(&outside);
    let mut server = Server::start_with(&root, &[&"--no-tls"]);
    let victim = outside.join("victim.txt").display().to_string();
    let mtime = r#""mtime":{"sec":1700000000,"nsec":0}"#;
    let dir = format!(r#"{{"type":"entry","id":1,"path":"","kind":"dir","mode":493,{mtime}}}"#);
    let link = format!(
        r#"{{"type":"entry","id":2,"path":"evil","kind":"symlink","target":"{victim}",{mtime}}}"#
    );
    let cases = [
        // Through a symlink sent in the same transfer.
        (
            "hl1",
            r#"{"type":"entry","id":3,"path":"victim","kind":"hardlink","first":2,"target":"evil"}"#,
            "failed",
        ),
        // A target that climbs out of the transfer.
        (
            "hl2",
            r#"{"type":"entry","id":3,"path":"victim","kind":"hardlink","first":2,"target":"../../outside/victim.txt"}"#,
            "bad_path",
        ),
        // A link that names itself, or what comes after it.
        (
            "hl3",
            r#"{"type":"entry","id":3,"path":"victim","kind":"hardlink","first":3,"target":"evil"}"#,
            "protocol",
        ),
    ];
    for (dest, hardlink, expected) in cases {
        let deadline = Instant::now() + PEER_TIMEOUT;
        let mut stream = hostile_upload_session(&server, dest, deadline);
        let mut bytes = Vec::new();
        for json in [
            dir.as_str(),
            link.as_str(),
            hardlink,
            r#"{"type":"dir_end","id":1}"#,
            r#"{"type":"end"}"#,
        ] {
            bytes.extend(control_frame(json));
        }
        // The server may close early: what it said still counts.
        let _ = stream.write_all(&bytes);
        let answers = read_messages(&mut stream, deadline);
        let refused = match expected {
            "failed" => outcome_of(&answers, 3).is_some_and(|o| o.contains("failed")),
            code => answers
                .iter()
                .any(|m| m["type"] == "error" && m["code"] == code),
        };
        assert!(refused, "{dest}: expected {expected}, got {answers:?}");
        let made = root.join(dest).join("victim");
        assert!(
            fs::symlink_metadata(&made).is_err(),
            "{dest}: {} exists",
            made.display()
        );
        assert_unchanged(&outside, &before, &format!("{dest}: {answers:?}"));
        let names = std::os::unix::fs::MetadataExt::nlink(&lstat(&outside.join("victim.txt")));
        assert_eq!(names, 1, "{dest}: the file outside got another name");
        assert_server_healthy(&mut server);
    }
}

/// A hostile server answers a download with a link and then a file below
/// it: the client, as the receiver, must not follow the link.
#[test]
fn hostile_server_cannot_make_the_client_write_through_a_link() {
    let (scratch, _root, outside) = setup();
    let before = snapshot(&outside);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().unwrap().port();
    let abs = outside.display().to_string();
    let fake = thread::spawn(move || -> Vec<serde_json::Value> {
        listener.set_nonblocking(true).unwrap();
        let accepted = poll_until(PEER_TIMEOUT, || match listener.accept() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            other => Some(other),
        });
        let (mut conn, _) = accepted.expect("a client within the deadline").unwrap();
        conn.set_nonblocking(false).unwrap();
        let deadline = Instant::now() + PEER_TIMEOUT;
        let mut theirs = [0u8; 8];
        conn.read_exact(&mut theirs).unwrap();
        let mut reply = preface().to_vec();
        reply.extend(control_frame(
            r#"{"type":"welcome","software":"hostile","session_id":"00","secret":"11","max_streams":1}"#,
        ));
        conn.write_all(&reply).unwrap();
        let hello = read_message(&mut conn, deadline);
        assert_eq!(hello["type"], "hello");
        let request = read_message(&mut conn, deadline);
        assert_eq!(request["type"], "download");
        conn.write_all(&control_frame(r#"{"type":"ready"}"#))
            .unwrap();
        let steps = [
            Step::Dir(""),
            Step::Link("a", &abs),
            Step::Hello("a/victim.txt"),
            Step::Link("b", "../outside"),
            Step::Dir("b"),
            Step::Hello("b/evil"),
            Step::DirEnd(4),
            Step::DirEnd(1),
        ];
        let _ = conn.write_all(&transfer(&steps));
        read_messages(&mut conn, deadline)
    });

    let dst = scratch.join("got");
    let out = run_timeout(
        &[
            &"down",
            &"anything",
            &dst,
            &"--host",
            &"127.0.0.1",
            &"--port",
            &port.to_string(),
            &"--retries",
            &"0",
            // The fake server speaks plaintext.
            &"--no-tls",
        ],
        ERROR_TIMEOUT,
    );
    let answers = fake.join().expect("the fake server thread");
    let context = format!("{out}\nthe client answered {answers:?}");
    assert_unchanged(&outside, &before, &context);
    out.assert_code(1);
    for id in [3, 5] {
        let outcome = outcome_of(&answers, id);
        assert!(
            outcome
                .as_deref()
                .is_some_and(|o| o.starts_with("\"failed\"")),
            "entry {id} was not refused ({outcome:?})\n{context}"
        );
    }
}

// ---------------------------------------------------------------------------
// A link swapped in while an upload runs
// ---------------------------------------------------------------------------

/// Renames `target` away, puts a link to `outside` in its place, and puts
/// the directory back, again and again while `running`; at most `max`
/// times. Returns how many swaps took place. The test's own paths never
/// pass through a link: each swap is undone before the next begins.
fn swap_loop(
    targets: &[PathBuf],
    outside: &Path,
    running: &AtomicBool,
    max: usize,
    time: Duration,
) -> usize {
    let deadline = Instant::now() + time;
    let mut swaps = 0;
    for i in 0..max {
        if !running.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        let target = &targets[i % targets.len()];
        let away = target.with_extension("away");
        if fs::rename(target, &away).is_err() {
            continue;
        }
        if symlink(outside, target).is_ok() {
            swaps += 1;
            thread::sleep(Duration::from_micros(300));
            let _ = fs::remove_file(target);
        }
        // The receiver cannot create `target` meanwhile (its parent's entry
        // came long ago), but if something is in the way, keep ours aside.
        if fs::rename(&away, target).is_err() {
            let _ = fs::rename(&away, target.with_extension(format!("away{i}")));
        }
        thread::sleep(Duration::from_micros(200));
    }
    swaps
}

#[test]
fn a_symlink_swapped_in_during_an_upload_never_redirects_it() {
    let (scratch, root, outside) = setup();
    // Many small directories: each one is opened anew from the root, so
    // every directory is a fresh chance for the race.
    let src = scratch.join("src");
    for d in 0..150 {
        let dir = src.join(format!("sub/d{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..6 {
            write_random_file(&dir.join(format!("f{f}")), 3000, d * 10 + f);
        }
    }
    // The destination exists already, so files are planned one by one
    // (quick check, part files) rather than as one fresh tree.
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    for d in 0..150 {
        fs::create_dir(root.join(format!("dir/sub/d{d:03}"))).unwrap();
    }
    let before = snapshot(&outside);
    let mut server = Server::start(&root);

    let targets = vec![
        root.join("dir"),
        root.join("dir/sub"),
        root.join("dir/sub/d040"),
        root.join("dir/sub/d100"),
    ];
    let running = Arc::new(AtomicBool::new(true));
    let swapper = {
        let (running, outside) = (running.clone(), outside.clone());
        thread::spawn(move || {
            swap_loop(
                &targets,
                &outside,
                &running,
                50_000,
                Duration::from_secs(30),
            )
        })
    };
    let mut args: Vec<std::ffi::OsString> = vec!["up".into(), src.into(), "dir".into()];
    args.extend(server.client_args());
    args.extend(["--retries".into(), "0".into()]);
    let arg_refs: Vec<&dyn AsRef<std::ffi::OsStr>> = args
        .iter()
        .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
        .collect();
    let mut swaps = 0;
    let mut rounds = 0;
    // Several uploads, so the race is run more than once.
    for _ in 0..5 {
        let client = spawn(&arg_refs, &RunOptions::default());
        let out = client.wait(DEFAULT_TIMEOUT);
        out.assert_no_panic();
        assert_unchanged(&outside, &before, &out);
        rounds += 1;
        if swapper.is_finished() {
            break;
        }
    }
    running.store(false, Ordering::Relaxed);
    swaps += swapper.join().expect("the swapper thread");
    assert!(
        swaps >= 10,
        "the race hardly ran: {swaps} swaps in {rounds} uploads"
    );
    assert_unchanged(&outside, &before, &format!("{swaps} swaps"));
    assert_server_healthy(&mut server);
}

/// A path refused because a symlink is on the way is refused for good: the
/// client exits 1 at once, naming the symlink, and does not retry (found
/// by this suite: it used to be answered as a transient I/O error).
#[test]
fn refusal_through_a_symlink_is_not_retried() {
    let (scratch, root, outside) = setup();
    symlink(&outside, root.join("link")).unwrap();
    let file = scratch.join("x");
    write_file(&file, b"x\n");
    let server = Server::start(&root);
    for args in [
        [&"up" as &dyn AsRef<std::ffi::OsStr>, &file, &"link/x"],
        [&"down", &"link/victim.txt", &scratch.join("got")],
    ] {
        let out = server.run_with(&args, &RunOptions::with_timeout(ERROR_TIMEOUT));
        out.assert_code(1).assert_stderr_contains("symlink");
        assert!(
            !contains_ci(&out.stderr, "retrying"),
            "a permanent refusal was retried\n{out}"
        );
    }
}

/// A receiver that claims to hold a 64 MiB file as 67 million chunks of
/// one byte would have the server read and hash each one (12.5 s of CPU
/// in a release build): held chunks must be whole chunks, and the session
/// ends at once with a protocol error.
#[test]
fn hostile_download_claiming_one_byte_chunks_is_refused_at_once() {
    let (_scratch, root, _outside) = setup();
    write_random_file(&root.join("big"), 64 * MIB, 5);
    let server = Server::start_with(&root, &[&"--no-tls"]);
    let deadline = Instant::now() + PEER_TIMEOUT;
    let mut stream = hostile_download_session(&server, "big", deadline);
    read_root_entry(&mut stream, deadline);
    let claim = format!(r#"{{"type":"have","id":1,"chunks":[[0,1,{}]]}}"#, 64 * MIB);
    let mut answer = control_frame(&claim);
    answer.extend(control_frame(r#"{"type":"planned","through":1}"#));
    stream.write_all(&answer).unwrap();
    let started = Instant::now();
    let said = read_messages(&mut stream, deadline);
    let last = said.last().expect("the server answers");
    assert_eq!(last["type"], "error", "{said:?}");
    assert_eq!(last["code"], "protocol", "{last}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("chunk boundaries"),
        "{last}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

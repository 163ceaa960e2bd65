//! A source that changes while it is sent: never committed as a mix of old
//! and new bytes, and nothing that vanishes is lost without a word. A gate
//! between client and server pauses the transfer at a known point while
//! the test changes the source.

use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::util::*;

const LONG: Duration = Duration::from_secs(120);

/// `ferry ARGS` through `gate` to `server` (as a client of the server's
/// user), in the background, once the gate holds it.
fn spawn_held(gate: &Gate, server: &Server, args: &[&dyn AsRef<OsStr>]) -> Running {
    let gate_args = gate.client_args();
    let own_user = server.own_user_args();
    let mut all: Vec<&dyn AsRef<OsStr>> = args.to_vec();
    all.extend(gate_args.iter().map(|a| a as &dyn AsRef<OsStr>));
    all.extend(own_user.iter().map(|a| a as &dyn AsRef<OsStr>));
    let client = spawn(&all, &RunOptions::with_timeout(LONG));
    let held = poll_until(Duration::from_secs(30), || gate.holding().then_some(()));
    assert!(held.is_some(), "the transfer never reached the gate");
    client
}

/// Delete `victim`, leaving its directory's mtime as the sender read it.
fn delete_behind_the_walk(victim: &Path) {
    let dir = victim.parent().unwrap();
    let mtime = std::fs::metadata(dir).unwrap().modified().unwrap();
    std::fs::remove_file(victim).unwrap();
    std::fs::File::open(dir)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

/// A tree of 2,000 files of 16 KiB, and `zz-victim`, which comes last:
/// more than the sender opens ahead of their data (1,024) plus what fills
/// the buffers before the gate, so the walk has not reached it yet.
fn tree_with_victim(src: &Path) {
    for i in 0..2000u64 {
        write_random_file(&src.join(format!("f{i:04}")), 16 * 1024, i);
    }
    write_file(&src.join("zz-victim"), b"soon gone");
}

#[test]
fn a_file_rewritten_in_place_with_its_mtime_put_back_is_sent_again_whole() {
    let scratch = Scratch::new();
    let src = scratch.join("big.bin");
    write_random_file(&src, 128 * MIB, 1);
    let mtime = std::fs::metadata(&src).unwrap().modified().unwrap();
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    let gate = Gate::upload(server.addr().parse().unwrap(), 16 * MIB);
    let client = spawn_held(
        &gate,
        &server,
        &[&"up", &"--json", &"--compress", &"off", &src, &"big.bin"],
    );
    // Its first megabyte, read and sent already, is rewritten in place,
    // and its mtime put back: size and mtime say nothing changed.
    let file = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    file.write_all_at(&random_bytes(MIB as usize, 2), 0)
        .unwrap();
    file.set_modified(mtime).unwrap();
    drop(file);
    gate.release();
    let out = client.wait(LONG);
    out.assert_success();
    // Not the mix the first attempt read: the file as it is now.
    assert_files_equal(&src, &root.join("big.bin"));
    out.assert_stdout_contains("changed while it was being sent");
}

#[test]
fn an_entry_deleted_during_an_upload_is_reported_and_exits_24() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    tree_with_victim(&src);
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    let gate = Gate::upload(server.addr().parse().unwrap(), MIB);
    let client = spawn_held(&gate, &server, &[&"up", &src, &"tree"]);
    delete_behind_the_walk(&src.join("zz-victim"));
    gate.release();
    let out = client.wait(LONG);
    out.assert_code(24)
        .assert_stderr_contains("zz-victim vanished from the source");
    assert_trees_equal(&src, &root.join("tree"));
}

#[test]
fn an_entry_deleted_during_a_download_is_reported_in_json_and_exits_24() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let src = root.join("tree");
    std::fs::create_dir(&src).unwrap();
    tree_with_victim(&src);
    let server = Server::start(&root);
    let gate = Gate::download(server.addr().parse().unwrap(), MIB);
    let dst = scratch.join("copy");
    let client = spawn_held(&gate, &server, &[&"down", &"--json", &"tree", &dst]);
    delete_behind_the_walk(&src.join("zz-victim"));
    gate.release();
    let out = client.wait(LONG);
    out.assert_code(24);
    let vanished = out.json_event("vanished");
    let named = |v: &serde_json::Value| v.as_str().is_some_and(|p| p.ends_with("/zz-victim"));
    assert!(named(&vanished["path"]), "{out}");
    let summary = out.json_event("summary");
    assert!(named(&summary["vanished"][0]), "{out}");
    // What vanished is not in the copy, and not among its files either:
    // the counts add up without it.
    let counts = ["files_total", "files_ok", "files_failed", "files_skipped"]
        .map(|field| summary[field].as_u64());
    assert_eq!(counts, [Some(2000), Some(2000), Some(0), Some(0)], "{out}");
    assert_trees_equal(&src, &dst);
}

/// Upload `src` as `data.bin` and kill the client once 8 MiB have passed,
/// then wait until the server has seen the session end.
fn broken_off_at_8_mib(server: &Server, src: &Path) {
    let gate = Gate::upload(server.addr().parse().unwrap(), 8 * MIB);
    let client = spawn_held(
        &gate,
        server,
        &[&"up", &"--compress", &"off", &src, &"data.bin"],
    );
    client.kill(rustix::process::Signal::KILL);
    // The server sees the connection end once the gate lets it through.
    gate.release();
    assert!(
        server.wait_for_log("ended early", Duration::from_secs(10)),
        "{}",
        server.stderr()
    );
}

/// An upload of a large file broken off leaves its part and journal for a
/// resume; when a smaller version (which is never resumed) arrives whole
/// instead, they go: nothing of a finished transfer is left behind.
#[test]
fn a_smaller_version_arriving_whole_clears_what_a_broken_off_upload_left() {
    let scratch = Scratch::new();
    let src = scratch.join("data.bin");
    write_random_file(&src, 24 * MIB, 7);
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    broken_off_at_8_mib(&server, &src);
    assert_eq!(
        part_files(&root).len(),
        2,
        "a part and a journal stay for a resume"
    );
    write_random_file(&src, MIB, 8);
    server.run(&[&"up", &src, &"data.bin"]).assert_success();
    assert_files_equal(&src, &root.join("data.bin"));
    assert_eq!(part_files(&root), Vec::<std::path::PathBuf>::new());
}

/// A resumed file whose held chunks no longer match the source (it was
/// rewritten in place and its mtime put back) fails its digest: the
/// chunks received in that attempt were checked against the source as it
/// is, so only the ones held from before come again, not the whole file.
#[test]
fn a_resumed_file_whose_held_chunks_changed_sends_only_those_again() {
    let scratch = Scratch::new();
    let src = scratch.join("data.bin");
    write_random_file(&src, 24 * MIB, 9);
    let mtime = std::fs::metadata(&src).unwrap().modified().unwrap();
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    broken_off_at_8_mib(&server, &src);
    let file = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    file.write_all_at(&random_bytes(MIB as usize, 10), 0)
        .unwrap();
    file.set_modified(mtime).unwrap();
    drop(file);
    let out = server.run(&[&"up", &"--json", &"--compress", &"off", &src, &"data.bin"]);
    out.assert_success();
    assert_files_equal(&src, &root.join("data.bin"));
    out.assert_stdout_contains("no longer match");
    // What was not held, then what was: the file once, not once and a half.
    let sent = out.json_event("summary")["bytes"].as_u64().unwrap();
    assert!(
        sent <= 26 * MIB,
        "{sent} bytes sent for a 24 MiB file\n{out}"
    );
}

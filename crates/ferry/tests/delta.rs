//! Delta transfer: a file the receiver holds in another version crosses
//! the wire as the parts that differ, both ways, from a backup's previous
//! snapshot and an atomic publish's live tree too; `--whole-file` turns it
//! off; a basis that changes meanwhile is caught by the hashes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::util::*;

/// The bytes the run's summary says crossed the connection.
fn wire_bytes(out: &Output) -> u64 {
    out.json_event("summary")["wire_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no wire_bytes in the summary: {out}"))
}

/// Overwrite `len` bytes at each offset with new random ones.
fn overwrite(path: &Path, offsets: &[u64], len: usize, seed: u64) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    for (i, &at) in offsets.iter().enumerate() {
        file.write_all_at(&random_bytes(len, seed + i as u64), at)
            .unwrap();
    }
}

/// Insert `len` new random bytes at `at`, shifting the rest.
fn insert(path: &Path, at: u64, len: usize, seed: u64) {
    let tmp = path.with_extension("new");
    let mut out = File::create(&tmp).unwrap();
    let mut old = File::open(path).unwrap();
    io::copy(&mut (&old).take(at), &mut out).unwrap();
    out.write_all(&random_bytes(len, seed)).unwrap();
    io::copy(&mut old, &mut out).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Append `len` new random bytes.
fn grow(path: &Path, len: u64, seed: u64) {
    let mut file = OpenOptions::new().append(true).open(path).unwrap();
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill(&mut buf[..n]);
        file.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
}

/// The issue's two cases, on the real size: a 1 GiB file with 4 KiB
/// inserted at 1 MiB and 100 scattered 4 KiB overwrites, then the same
/// grown by 10 MB at the end. The bytes on the wire depend on the edits,
/// hardly on the content, so their bars hold in a test: 3% and 2% (0.6%
/// and 0.97% measured).
#[test]
fn a_gigabyte_changed_in_places_or_grown_crosses_as_its_differences() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    let file = src.join("disk.img");
    // From the kernel: the test binary's own generator, unoptimized,
    // would take longer than the transfers.
    let mut urandom = File::open("/dev/urandom").unwrap().take(1 << 30);
    io::copy(&mut urandom, &mut File::create(&file).unwrap()).unwrap();
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    server.run(&[&"up", &file, &"vm/"]).assert_success();

    insert(&file, MIB, 4096, 18);
    let size = lstat(&file).len();
    let offsets: Vec<u64> = (0..100)
        .map(|i| (i * 10_007 + 3) * (size / 1_000_100))
        .collect();
    overwrite(&file, &offsets, 4096, 19);
    let out = server.run(&[&"up", &"--json", &file, &"vm/"]);
    out.assert_success();
    assert_files_equal(&file, &root.join("vm/disk.img"));
    let wire = wire_bytes(&out);
    assert!(
        wire * 100 <= size * 3,
        "{wire} bytes on the wire for {size}"
    );

    grow(&file, 10_000_000, 20);
    let size = lstat(&file).len();
    let out = server.run(&[&"up", &"--json", &file, &"vm/"]);
    out.assert_success();
    assert_files_equal(&file, &root.join("vm/disk.img"));
    let wire = wire_bytes(&out);
    assert!(
        wire * 100 <= size * 2,
        "{wire} bytes on the wire for {size}"
    );
}

#[test]
fn a_download_sends_the_differences_and_whole_file_sends_it_all() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let remote = root.join("dump.sql");
    write_random_file(&remote, 24 * MIB, 21);
    let server = Server::start(&root);
    let local = scratch.join("dump.sql");
    server.run(&[&"down", &"dump.sql", &local]).assert_success();

    overwrite(&remote, &[100, 9 * MIB, 20 * MIB + 7], 4096, 22);
    let out = server.run(&[&"down", &"--json", &"dump.sql", &local]);
    out.assert_success();
    assert_files_equal(&remote, &local);
    let wire = wire_bytes(&out);
    assert!(wire < 2 * MIB, "{wire} bytes on the wire");

    overwrite(&remote, &[5 * MIB], 4096, 23);
    let out = server.run(&[&"down", &"--json", &"-W", &"dump.sql", &local]);
    out.assert_success();
    assert_files_equal(&remote, &local);
    let wire = wire_bytes(&out);
    assert!(wire > 24 * MIB, "--whole-file sent only {wire} bytes");
}

/// A daily backup sends a changed dump as its differences against the
/// previous snapshot, which stays as it was: the new file is built beside
/// it, never in it.
#[test]
fn a_backup_sends_a_changed_file_as_its_differences_against_the_last_snapshot() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("db");
    write_random_file(&src.join("dump.bin"), 16 * MIB, 24);
    write_file(&src.join("notes.txt"), b"day one");
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    let target = "127.0.0.1:backups/db";
    let backup = |json: bool| {
        let mut args: Vec<std::ffi::OsString> = vec!["backup".into(), "-p".into()];
        args.push(server.port().to_string().into());
        args.extend(json.then(|| "--json".into()));
        args.extend([src.clone().into_os_string(), target.into()]);
        args.extend(server.own_user_args());
        run_os(&args, &RunOptions::default())
    };
    backup(false).assert_success();
    let day1 = scratch.join("day1");
    copy_into(&src, &day1);
    std::thread::sleep(Duration::from_millis(1100));
    overwrite(&src.join("dump.bin"), &[3 * MIB, 11 * MIB], 4096, 25);
    let out = backup(true);
    out.assert_success();
    let wire = wire_bytes(&out);
    assert!(wire < MIB, "{wire} bytes on the wire for a 16 MiB file");
    let dir = root.join("backups/db");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with('Z'))
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_trees_equal(&day1, &dir.join(&names[0]));
    assert_trees_equal(&src, &dir.join(&names[1]));
}

/// An atomic publish builds the changed file from the live one, and the
/// live tree is never touched before the switch.
#[test]
fn an_atomic_publish_builds_a_changed_file_from_the_live_one() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("site");
    write_random_file(&src.join("bundle.js"), 8 * MIB, 26);
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    server
        .run(&[&"up", &"--atomic", &src, &"www"])
        .assert_success();
    let before = scratch.join("before");
    copy_into(&src, &before);
    overwrite(&src.join("bundle.js"), &[MIB / 2], 100, 27);
    let out = server.run(&[&"up", &"--atomic", &"--json", &src, &"www"]);
    out.assert_success();
    assert!(wire_bytes(&out) < MIB, "{out}");
    assert_trees_equal(&src, &root.join("www"));
    // The previous version, kept for a rollback, is the old one whole.
    server.run(&[&"rollback", &"www"]).assert_success();
    assert_trees_equal(&before, &root.join("www"));
}

/// The basis changes after its signature was sent: the chunks rebuilt
/// from it fail their hashes, and the retry sends what is needed.
#[test]
fn a_basis_changed_during_the_transfer_is_caught_and_the_file_arrives() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    let file = src.join("data.bin");
    write_random_file(&file, 24 * MIB, 28);
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    server.run(&[&"up", &file, &"d/"]).assert_success();
    // Every even MiB new: 12 MiB of literals, 3 s at the rate below,
    // while the odd ones come from the basis.
    let evens: Vec<u64> = (0..12).map(|i| 2 * i * MIB).collect();
    overwrite(&file, &evens, MIB as usize, 29);
    let basis = root.join("d/data.bin");
    let mut args: Vec<std::ffi::OsString> =
        ["up", "--json", "--bwlimit", "4M"].map(Into::into).to_vec();
    args.extend([file.clone().into_os_string(), "d/".into()]);
    args.extend(server.client_args());
    let client = spawn_os(&args, &RunOptions::default());
    // Once the part file holds data (not its journal, written at once),
    // the signature is out.
    let part = root.join("d/.data.bin.ferry-part");
    let started = poll_until(Duration::from_secs(20), || {
        fs::metadata(&part).is_ok_and(|m| m.len() > 0).then_some(())
    });
    if started.is_none() {
        panic!(
            "no part file grew: {}",
            client.kill(rustix::process::Signal::KILL)
        );
    }
    let last_mib = random_bytes(MIB as usize, 30);
    let held = OpenOptions::new().write(true).open(&basis).unwrap();
    held.write_all_at(&last_mib, 23 * MIB).unwrap();
    let out = client.wait(Duration::from_secs(60));
    out.assert_success();
    assert_files_equal(&file, &basis);
    let summary = out.json_event("summary");
    assert!(summary["retries"].as_u64() >= Some(1), "{out}");
}

/// A write-only server never describes what it holds: a client that may
/// not read a file must learn nothing of it, not even block hashes.
#[test]
fn a_write_only_server_describes_nothing_it_holds() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    let file = src.join("data.bin");
    write_random_file(&file, 4 * MIB, 31);
    let root = scratch.mkdir("root");
    let server = Server::start_with(&root, &[&"--write-only"]);
    server.run(&[&"up", &file, &"in/"]).assert_success();
    overwrite(&file, &[MIB], 4096, 32);
    let out = server.run(&[&"up", &"--json", &file, &"in/"]);
    out.assert_success();
    assert!(wire_bytes(&out) > 4 * MIB, "{out}");
    assert_files_equal(&file, &root.join("in/data.bin"));
}

/// A downloading client that describes more than a signature may hold,
/// or blocks that cannot be, ends its session with a protocol error; the
/// server goes on serving.
#[test]
fn a_hostile_signature_ends_the_session_at_once() {
    use ferry_proto::delta::{Block, encode_blocks};
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    write_random_file(&root.join("big"), 4 * MIB, 33);
    let server = Server::start_with(&root, &[&"--no-tls"]);
    let blocks = |len: u32, n: usize| encode_blocks(&vec![Block { len, hash: 7 }; n]);
    let cases = [
        // An average that is no power of two.
        (1000, blocks(100, 1), "power of two"),
        // A block longer than four averages.
        (8192, blocks(40_000, 1), "longer than its maximum"),
        // More blocks in one message than a message may have.
        (8192, blocks(100, 8193), "more than 8192 blocks"),
    ];
    for (avg, blocks, why) in cases {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut stream = hostile_download_session(&server, "big", deadline);
        read_root_entry(&mut stream, deadline);
        let sig = format!(r#"{{"type":"signature","id":1,"avg":{avg},"blocks":"{blocks}"}}"#);
        let mut answer = control_frame(&sig);
        answer.extend(control_frame(r#"{"type":"planned","through":1}"#));
        stream.write_all(&answer).unwrap();
        let said = read_messages(&mut stream, deadline);
        let last = said.last().expect("the server answers");
        assert_eq!(last["type"], "error", "{why}: {said:?}");
        assert_eq!(last["code"], "protocol", "{why}: {last}");
        let message = last["message"].as_str().unwrap();
        assert!(message.contains(why), "{why}: {last}");
    }
    // And an honest download still works.
    let local = scratch.join("big");
    server
        .run(&[&"down", &"--no-tls", &"big", &local])
        .assert_success();
    assert_files_equal(&root.join("big"), &local);
}

//! Retry and resume, proven by fault injection: transfers survive cut
//! connections, stalls, killed processes and damaged bytes, and send again
//! only what is missing. A fault-injecting proxy (`proxy.rs`) sits between
//! client and server; the bytes it forwards are what crossed the "network".

use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::Path;
use std::time::Duration;

use rustix::process::Signal;

use crate::proxy::{Direction, Fault, FaultProxy};
use crate::util::*;

/// Long enough for a transfer that is cut several times.
const RETRYING: Duration = Duration::from_secs(120);

/// `--host/--port` of the proxy, plus options that make faults quick to
/// notice (a stalled connection is given up after 2 s), for a client of
/// `server`'s own user.
fn via(proxy: &FaultProxy, server: &Server) -> Vec<OsString> {
    proxy
        .client_args()
        .into_iter()
        .chain(["--timeout", "2", "--json"].map(String::from))
        .map(OsString::from)
        .chain(server.own_user_args())
        .collect()
}

/// `ferry ARGS` through the proxy, in the foreground.
fn run_via(proxy: &FaultProxy, server: &Server, args: &[&dyn AsRef<OsStr>]) -> Output {
    let mut all: Vec<OsString> = args.iter().map(|a| a.as_ref().to_os_string()).collect();
    all.extend(via(proxy, server));
    run_with(&os_refs(&all), &RunOptions::with_timeout(RETRYING))
}

/// `ferry ARGS` through the proxy, in the background, once the proxy's
/// single fault (a stall) has fired: the transfer hangs mid-way.
fn spawn_until_stalled(proxy: &FaultProxy, server: &Server, args: &[&dyn AsRef<OsStr>]) -> Running {
    let mut all: Vec<OsString> = args.iter().map(|a| a.as_ref().to_os_string()).collect();
    all.extend(via(proxy, server));
    let client = spawn(&os_refs(&all), &RunOptions::with_timeout(RETRYING));
    let stalled = poll_until(Duration::from_secs(30), || {
        (proxy.faults_fired() == 1).then_some(())
    });
    assert!(stalled.is_some(), "the transfer never reached the stall");
    client
}

fn os_refs(args: &[OsString]) -> Vec<&dyn AsRef<OsStr>> {
    args.iter().map(|a| a as &dyn AsRef<OsStr>).collect()
}

/// A server with TLS (the default) or with `--no-tls`.
fn start_server(root: &Path, tls: bool) -> Server {
    if tls {
        Server::start(root)
    } else {
        Server::start_with(root, &[&"--no-tls"])
    }
}

/// Client arguments, with `--no-tls` added when TLS is off.
fn with_tls<'a>(
    args: &[&'a dyn AsRef<std::ffi::OsStr>],
    tls: bool,
) -> Vec<&'a dyn AsRef<std::ffi::OsStr>> {
    let mut all = args.to_vec();
    if !tls {
        all.push(&"--no-tls");
    }
    all
}

fn proxy_to(server: &Server, direction: Direction, faults: Vec<Fault>) -> FaultProxy {
    let target = server.addr().parse().expect("the server prints IP:PORT");
    FaultProxy::start(target, direction, faults)
}

fn summary_u64(out: &Output, field: &str) -> u64 {
    out.json_event("summary")[field]
        .as_u64()
        .unwrap_or_else(|| panic!("summary has no {field}\n{out}"))
}

/// Bytes forwarded in the direction of the data.
fn data_bytes(proxy: &FaultProxy, direction: Direction) -> u64 {
    let (up, down) = proxy.forwarded();
    match direction {
        Direction::ClientToServer => up,
        Direction::ServerToClient => down,
    }
}

/// What a transfer that starts from zero after every cut would have sent:
/// each cut position again, then the whole.
fn from_zero(size: u64, cuts: &[u64]) -> u64 {
    cuts.iter().sum::<u64>() + size
}

#[test]
fn an_upload_survives_repeated_cuts_and_resends_only_what_is_missing() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let big = scratch.join("big.bin");
    let size = 96 * MIB;
    write_random_file(&big, size, 4001);
    let server = Server::start(&root);
    let cuts = [24 * MIB, 48 * MIB, 72 * MIB];
    let dir = Direction::ClientToServer;
    let proxy = proxy_to(
        &server,
        dir,
        cuts.iter().map(|&at| Fault::cut(at)).collect(),
    );

    let out = run_via(
        &proxy,
        &server,
        &[&"up", &big, &"big.bin", &"--compress", &"off"],
    );
    out.assert_success();
    assert_files_equal(&big, &root.join("big.bin"));
    assert!(part_files(&root).is_empty(), "{:?}", part_files(&root));
    assert_eq!(
        proxy.faults_fired(),
        cuts.len(),
        "every cut happened\n{out}"
    );
    assert_eq!(summary_u64(&out, "retries"), cuts.len() as u64, "{out}");
    let sent = data_bytes(&proxy, dir);
    let restart = from_zero(size, &cuts);
    eprintln!(
        "cuts survived: {}; bytes on the wire {sent} for a {size}-byte file (from zero: {restart})",
        cuts.len()
    );
    assert!(
        sent < size + size / 3 && sent < restart * 6 / 10,
        "re-sent too much: {sent} bytes for {size} (from zero: {restart})\n{out}"
    );
}

#[test]
fn a_download_survives_repeated_cuts_and_resends_only_what_is_missing() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let size = 64 * MIB;
    write_random_file(&root.join("big.bin"), size, 4002);
    let server = Server::start(&root);
    let cuts = [16 * MIB, 40 * MIB];
    let dir = Direction::ServerToClient;
    let proxy = proxy_to(
        &server,
        dir,
        cuts.iter().map(|&at| Fault::cut(at)).collect(),
    );

    let local = scratch.join("big.bin");
    let out = run_via(
        &proxy,
        &server,
        &[&"down", &"big.bin", &local, &"--compress", &"off"],
    );
    out.assert_success();
    assert_files_equal(&root.join("big.bin"), &local);
    assert!(
        part_files(scratch.path()).is_empty(),
        "{:?}",
        part_files(scratch.path())
    );
    assert_eq!(summary_u64(&out, "retries"), cuts.len() as u64, "{out}");
    let sent = data_bytes(&proxy, dir);
    let restart = from_zero(size, &cuts);
    eprintln!(
        "download: {} cuts; {sent} bytes on the wire for {size} (from zero: {restart})",
        cuts.len()
    );
    assert!(
        sent < size + size / 3 && sent < restart * 7 / 10,
        "re-sent too much: {sent} for {size} (from zero: {restart})\n{out}"
    );
}

/// 5,000 files of 1 to 16 KiB in 50 directories, with fixed mtimes.
fn build_5k_tree(root: &Path) -> u64 {
    let mut total = 0;
    let mut rng = Rng::new(4003);
    for d in 0..50 {
        let dir = root.join(format!("d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            let size = 1024 + rng.next_u64() % (15 * 1024);
            let path = dir.join(format!("f{f:03}.dat"));
            write_random_file(&path, size, rng.next_u64());
            set_mtime(&path, 1_600_000_000 + f, 0);
            total += size;
        }
    }
    total
}

#[test]
fn a_tree_of_5k_files_survives_cuts_and_resends_only_what_is_missing() {
    five_k_tree_through_cuts(true);
}

#[test]
fn a_tree_of_5k_files_survives_cuts_without_tls() {
    five_k_tree_through_cuts(false);
}

fn five_k_tree_through_cuts(tls: bool) {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let tree = scratch.mkdir("tree");
    let size = build_5k_tree(&tree);
    let server = start_server(&root, tls);
    let cuts = [size * 3 / 10, size * 6 / 10];
    let dir = Direction::ClientToServer;
    let proxy = proxy_to(
        &server,
        dir,
        cuts.iter().map(|&at| Fault::cut(at)).collect(),
    );

    let out = run_via(
        &proxy,
        &server,
        &with_tls(&[&"up", &tree, &"tree", &"--compress", &"off"], tls),
    );
    out.assert_success();
    assert_trees_equal(&tree, &root.join("tree"));
    assert_eq!(summary_u64(&out, "retries"), cuts.len() as u64, "{out}");
    assert!(summary_u64(&out, "files_unchanged") > 0, "{out}");
    let sent = data_bytes(&proxy, dir);
    let restart = from_zero(size, &cuts);
    eprintln!(
        "5k tree (tls: {tls}): {} cuts; {sent} bytes on the wire for {size} (from zero: {restart})",
        cuts.len()
    );
    // Entries and digests cost some bytes per file on top of the data.
    // What a cut loses also counts: bytes the proxy had forwarded that the
    // server had not yet made durable when the session went down. Under
    // TLS the server decrypts as well, lags a little further behind its
    // sockets, and more is lost at each cut (measured over eight runs:
    // 57-63 MB on the wire with TLS, 50-53 MB without, for 44 MB of files
    // and two cuts), so the bound is looser there, with room for a loaded
    // machine; it still says that less than a restart from zero went again.
    let (over, of_restart) = if tls {
        (size * 2 / 3, 90)
    } else {
        (size / 3, 70)
    };
    assert!(
        sent < size + over && sent < restart * of_restart / 100,
        "re-sent too much: {sent} for {size} (from zero: {restart})\n{out}"
    );
}

#[test]
fn a_stalled_connection_is_given_up_and_the_transfer_resumes() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let big = scratch.join("big.bin");
    let size = 32 * MIB;
    write_random_file(&big, size, 4004);
    // The server gives up on the stalled session (and its part file) as
    // quickly as the client does.
    let server = Server::start_with(&root, &[&"--timeout", &"2"]);
    let dir = Direction::ClientToServer;
    let proxy = proxy_to(&server, dir, vec![Fault::stall(10 * MIB)]);

    let out = run_via(
        &proxy,
        &server,
        &[&"up", &big, &"big.bin", &"--compress", &"off"],
    );
    out.assert_success().assert_stdout_contains("stalled");
    assert_files_equal(&big, &root.join("big.bin"));
    assert!(summary_u64(&out, "retries") >= 1, "{out}");
    assert!(
        summary_u64(&out, "bytes_held") > 0,
        "resumed, not restarted\n{out}"
    );
}

#[test]
fn without_retries_a_cut_fails_at_once_with_its_cause() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let big = scratch.join("big.bin");
    write_random_file(&big, 16 * MIB, 4005);
    let server = Server::start(&root);
    let proxy = proxy_to(
        &server,
        Direction::ClientToServer,
        vec![Fault::cut(4 * MIB)],
    );

    let out = run_via(
        &proxy,
        &server,
        &[&"up", &big, &"big.bin", &"--retries", &"0"],
    );
    out.assert_code(1).assert_stderr_contains("connection");
    assert!(!root.join("big.bin").exists(), "no half file in place");
}

#[test]
fn flipped_bits_are_caught_and_only_the_damaged_chunks_are_sent_again() {
    flipped_bits(false);
}

#[test]
fn flipped_bits_under_tls_end_the_connection_and_the_transfer_resumes() {
    flipped_bits(true);
}

fn flipped_bits(tls: bool) {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let big = scratch.join("big.bin");
    let size = 24 * MIB;
    write_random_file(&big, size, 4006);
    let server = start_server(&root, tls);
    // One connection, raw chunks: these positions fall inside the payloads
    // of the 6th and 14th chunks (each frame adds only 34 bytes of header).
    let flips = vec![
        Fault::flip(5 * MIB + 12_345, 0x10),
        Fault::flip(13 * MIB + 999, 0x01),
    ];
    let dir = Direction::ClientToServer;
    let proxy = proxy_to(&server, dir, flips);

    let out = run_via(
        &proxy,
        &server,
        &with_tls(
            &[
                &"up",
                &big,
                &"big.bin",
                &"--compress",
                &"off",
                &"--streams",
                &"1",
            ],
            tls,
        ),
    );
    out.assert_success();
    assert_files_equal(&big, &root.join("big.bin"));
    assert_eq!(proxy.faults_fired(), 2, "{out}");
    assert!(summary_u64(&out, "retries") >= 1, "{out}");
    if tls {
        // Under TLS a flipped bit breaks the record's authentication tag:
        // the server drops the connection (bad_record_mac) before ferry's
        // own chunk hash sees anything, and the retry resumes from the
        // journal. The client hears either the server's alert or, if the
        // server closed first, a broken connection.
        let retry = out.json_event("retry");
        let why = retry["reason"].as_str().unwrap_or_default();
        assert!(
            ["BadRecordMac", "connection lost", "closed"]
                .iter()
                .any(|cause| contains_ci(why, cause)),
            "a retry after a connection failure, not {why:?}\n{out}"
        );
        assert!(!contains_ci(&out.stdout, "corrupted in transit"), "{out}");
    } else {
        out.assert_stdout_contains("corrupted in transit");
    }
    let sent = data_bytes(&proxy, dir);
    eprintln!("bit flips (tls: {tls}): 2 caught; {sent} bytes on the wire for {size}");
    // Without TLS only the two damaged chunks go again. With TLS the whole
    // connection goes down at each flip, and the resume starts from the
    // last chunk the receiver had made durable, a little before the flip.
    let allowance = if tls { 12 * MIB } else { 4 * MIB };
    assert!(
        sent < size + allowance,
        "more than the damaged chunks went again: {sent} for {size}\n{out}"
    );
}

#[test]
fn a_server_killed_mid_file_and_restarted_resumes_from_its_journal() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let big = scratch.join("big.bin");
    let size = 64 * MIB;
    write_random_file(&big, size, 4007);
    let mut server = Server::start(&root);
    let port = server.port();
    let dir = Direction::ClientToServer;
    let proxy = proxy_to(&server, dir, vec![Fault::stall(24 * MIB)]);

    let client = spawn_until_stalled(
        &proxy,
        &server,
        &[&"up", &"--compress", &"off", &big, &"big.bin"],
    );
    // Let the server write what it received, then kill it without warning.
    let journal = root.join(".big.bin.ferry-journal");
    poll_until(Duration::from_secs(5), || {
        (fs::metadata(&journal).map_or(0, |m| m.len()) > 32 + 24 * 8).then_some(())
    });
    server.stop_with(Signal::KILL);
    assert!(journal.exists(), "the journal survives SIGKILL");
    let _restarted = Server::start_on(&root, port, &[], &RunOptions::default());

    let out = client.wait(RETRYING);
    out.assert_success();
    assert_files_equal(&big, &root.join("big.bin"));
    assert!(part_files(&root).is_empty(), "{:?}", part_files(&root));
    let held = summary_u64(&out, "bytes_held");
    let sent = data_bytes(&proxy, dir);
    eprintln!(
        "server SIGKILL: resumed with {held} bytes held; {sent} bytes on the wire for {size}"
    );
    assert!(held >= 8 * MIB, "resumed from the journal\n{out}");
    assert!(sent < size + 24 * MIB, "{sent} bytes for {size}\n{out}");
}

#[test]
fn a_client_killed_mid_upload_and_run_again_resumes() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let big = scratch.join("big.bin");
    let size = 64 * MIB;
    write_random_file(&big, size, 4008);
    // The abandoned session ends (and unlocks its part file) after 2 s.
    let server = Server::start_with(&root, &[&"--timeout", &"2"]);
    let proxy = proxy_to(
        &server,
        Direction::ClientToServer,
        vec![Fault::stall(24 * MIB)],
    );

    let client = spawn_until_stalled(
        &proxy,
        &server,
        &[&"up", &"--compress", &"off", &big, &"big.bin"],
    );
    client.kill(Signal::KILL);

    // The same command again (straight to the server this time).
    let out = server.run_with(
        &[&"up", &big, &"big.bin", &"--compress", &"off", &"--json"],
        &RunOptions::with_timeout(RETRYING),
    );
    out.assert_success();
    assert_files_equal(&big, &root.join("big.bin"));
    let sent = summary_u64(&out, "bytes");
    eprintln!("client SIGKILL: run again sent {sent} of {size} bytes");
    assert!(
        sent <= size - 8 * MIB,
        "resumed, not restarted: sent {sent}\n{out}"
    );
}

#[test]
fn a_download_killed_and_run_again_resumes_from_the_local_part() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let size = 64 * MIB;
    write_random_file(&root.join("big.bin"), size, 4009);
    let server = Server::start_with(&root, &[&"--timeout", &"2"]);
    let proxy = proxy_to(
        &server,
        Direction::ServerToClient,
        vec![Fault::stall(24 * MIB)],
    );
    let local = scratch.join("got.bin");

    let client = spawn_until_stalled(
        &proxy,
        &server,
        &[&"down", &"big.bin", &"--compress", &"off", &local],
    );
    // Let the client write what it has, then kill it without warning.
    poll_until(Duration::from_secs(5), || {
        (fs::metadata(scratch.join(".got.bin.ferry-journal")).map_or(0, |m| m.len()) > 32 + 24 * 8)
            .then_some(())
    });
    client.kill(Signal::KILL);
    assert!(
        !part_files(scratch.path()).is_empty(),
        "the part stays for a resume"
    );

    let out = server.run_with(
        &[
            &"down",
            &"big.bin",
            &local,
            &"--compress",
            &"off",
            &"--json",
        ],
        &RunOptions::with_timeout(RETRYING),
    );
    out.assert_success();
    assert_files_equal(&root.join("big.bin"), &local);
    assert!(
        part_files(scratch.path()).is_empty(),
        "{:?}",
        part_files(scratch.path())
    );
    let sent = summary_u64(&out, "bytes");
    eprintln!("download SIGKILL: run again received {sent} of {size} bytes");
    assert!(
        sent <= size - 8 * MIB,
        "resumed, not restarted: received {sent}\n{out}"
    );
}

#[test]
fn simultaneous_uploads_to_one_path_leave_one_whole_version() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let (a, b) = (scratch.join("a.bin"), scratch.join("b.bin"));
    write_random_file(&a, 32 * MIB, 4010);
    write_random_file(&b, 32 * MIB, 4011);
    set_mtime(&a, 1_700_000_000, 0);
    set_mtime(&b, 1_700_000_100, 0);
    let server = Server::start(&root);

    let start = |src: &Path| {
        let mut args: Vec<OsString> = vec!["up".into(), src.into(), "same.bin".into()];
        args.extend(server.client_args());
        spawn(&os_refs(&args), &RunOptions::with_timeout(RETRYING))
    };
    let (first, second) = (start(&a), start(&b));
    first.wait(RETRYING).assert_success();
    second.wait(RETRYING).assert_success();

    let got = fs::read(root.join("same.bin")).unwrap();
    assert!(
        got == fs::read(&a).unwrap() || got == fs::read(&b).unwrap(),
        "the file is a mix of the two uploads"
    );
    assert!(part_files(&root).is_empty(), "{:?}", part_files(&root));
}

#[test]
fn a_download_of_a_file_being_replaced_gets_one_whole_version() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let (a, b) = (scratch.join("a.bin"), scratch.join("b.bin"));
    write_random_file(&a, 16 * MIB, 4012);
    write_random_file(&b, 16 * MIB, 4013);
    set_mtime(&b, 1_700_000_100, 0);
    let server = Server::start(&root);
    let (old, new) = (fs::read(&a).unwrap(), fs::read(&b).unwrap());
    for round in 0..3 {
        fs::copy(&a, root.join("x.bin")).unwrap();
        let local = scratch.join(format!("got{round}.bin"));
        let mut args: Vec<OsString> = vec!["down".into(), "x.bin".into(), local.clone().into()];
        args.extend(server.client_args());
        let download = spawn(&os_refs(&args), &RunOptions::with_timeout(RETRYING));
        server.run(&[&"up", &b, &"x.bin"]).assert_success();
        download.wait(RETRYING).assert_success();
        let got = fs::read(&local).unwrap();
        assert!(
            got == old || got == new,
            "round {round}: a mix of two versions"
        );
    }
}

#[test]
fn the_server_sweeps_abandoned_part_files_by_age() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    fs::create_dir_all(root.join("deep/er")).unwrap();
    let old_part = root.join("deep/er/.old.bin.ferry-part");
    let old_journal = root.join("deep/er/.old.bin.ferry-journal");
    let young_part = root.join(".young.bin.ferry-part");
    for path in [&old_part, &old_journal, &young_part] {
        write_random_file(path, 1000, 4014);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let two_days_ago = now - 2 * 86_400;
    set_mtime(&old_part, two_days_ago, 0);
    set_mtime(&old_journal, two_days_ago, 0);

    let server = Server::start_with(&root, &[&"--keep-parts", &"1d"]);
    let swept = poll_until(Duration::from_secs(10), || {
        (!old_part.exists() && !old_journal.exists()).then_some(())
    });
    assert!(
        swept.is_some(),
        "old part and journal removed\n{}",
        server.stderr()
    );
    assert!(young_part.exists(), "a recent part stays for its resume");
    assert!(
        server.wait_for_log("abandoned", Duration::from_secs(5)),
        "{}",
        server.stderr()
    );
}

#[test]
fn a_source_changed_between_attempts_arrives_whole_in_its_new_version() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let big = scratch.join("big.bin");
    let size = 32 * MIB;
    write_random_file(&big, size, 4015);
    set_mtime(&big, 1_700_000_000, 0);
    let server = Server::start_with(&root, &[&"--timeout", &"2"]);
    let proxy = proxy_to(
        &server,
        Direction::ClientToServer,
        vec![Fault::stall(12 * MIB)],
    );

    let client = spawn_until_stalled(
        &proxy,
        &server,
        &[&"up", &"--compress", &"off", &big, &"big.bin"],
    );
    // While the first attempt hangs, the source gets new content (same
    // size): what the server holds of the old one must not be mixed in.
    write_random_file(&big, size, 4016);
    set_mtime(&big, 1_700_000_500, 0);

    let out = client.wait(RETRYING);
    out.assert_success();
    assert!(summary_u64(&out, "retries") >= 1, "{out}");
    assert_files_equal(&big, &root.join("big.bin"));
    assert!(part_files(&root).is_empty(), "{:?}", part_files(&root));
}

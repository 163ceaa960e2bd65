//! Trees and single files moved up, down and across; every result is
//! compared with its source byte for byte, mode for mode, mtime for mtime.

use std::fs;
use std::path::PathBuf;

use crate::util::*;

/// A scratch directory with the full tree at `src` and an empty server root.
fn full_tree() -> (Scratch, PathBuf, PathBuf) {
    let scratch = Scratch::new();
    let src = scratch.join("src");
    build_full_tree(&src);
    let root = scratch.mkdir("root");
    (scratch, src, root)
}

#[test]
fn upload_tree_creates_missing_parents_and_downloads_back() {
    let (scratch, src, root) = full_tree();
    let server = Server::start(&root);

    let up = server.run(&[&"up", &src, &"a/b/copy"]);
    up.assert_success();
    // The closing summary is printed even without a terminal.
    for word in ["files", "ok", "failed"] {
        up.assert_stdout_contains(word);
    }
    assert_trees_equal(&src, &root.join("a/b/copy"));

    let back = scratch.join("back");
    server.run(&[&"down", &"a/b/copy", &back]).assert_success();
    assert_trees_equal(&src, &back);
}

#[test]
fn fifos_arrive_and_sockets_are_skipped_with_a_warning() {
    let (_scratch, src, root) = full_tree();
    let socket = src.join("a/socket");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let server = Server::start(&root);

    let out = server.run(&[&"up", &src, &"copy"]);
    // A skipped socket is a warning, not a failure.
    out.assert_success().assert_stderr_contains("socket");
    assert!(
        fs::symlink_metadata(root.join("copy/a/socket")).is_err(),
        "the socket must not be recreated as anything\n{out}"
    );
    // The fifo arrives as a fifo, with its mode and mtime.
    assert_trees_equal(&src, &root.join("copy"));
}

/// A fifo named as what to send arrives as a fifo, as `cp -a` and
/// `rsync -a` make it: both ways, with its mode and mtime.
#[test]
fn a_fifo_named_as_the_root_arrives_as_a_fifo() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let pipe = scratch.join("pipe");
    mkfifo(&pipe);
    set_mode(&pipe, 0o640);
    set_mtime(&pipe, 1_234_567_890, 5);
    let server = Server::start(&root);

    server.run(&[&"up", &pipe, &"remote-pipe"]).assert_success();
    assert_files_equal(&pipe, &root.join("remote-pipe"));

    let back = scratch.join("back");
    server
        .run(&[&"down", &"remote-pipe", &back])
        .assert_success();
    assert_files_equal(&pipe, &back);
}

#[test]
fn copy_between_two_local_paths_runs_in_process() {
    let (scratch, src, _root) = full_tree();
    let dst = scratch.join("dst");

    run(&[&"cp", &src, &dst]).assert_success();
    assert_trees_equal(&src, &dst);
}

#[test]
fn copy_with_host_prefix_uploads_and_downloads() {
    let (scratch, src, root) = full_tree();
    let server = Server::start(&root);
    let port = server.port().to_string();

    // A client of the server's user, sharing its state directory.
    let state = server.state_dir();
    run(&[
        &"cp",
        &src,
        &"127.0.0.1:remote/copy",
        &"--port",
        &port,
        &"--state-dir",
        &state,
    ])
    .assert_success();
    assert_trees_equal(&src, &root.join("remote/copy"));

    let dst = scratch.join("dst");
    run(&[
        &"cp",
        &"127.0.0.1:remote/copy",
        &dst,
        &"--port",
        &port,
        &"--state-dir",
        &state,
    ])
    .assert_success();
    assert_trees_equal(&src, &dst);
}

/// Uploads one file of `size` bytes and downloads it again, checking bytes,
/// mode and mtime both ways.
fn round_trip_single_file(size: u64, seed: u64) {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let local = scratch.join("local.bin");
    write_random_file(&local, size, seed);
    set_mode(&local, 0o640);
    set_mtime(&local, 1_234_567_890, 987_654_321);
    let server = Server::start(&root);

    server
        .run(&[&"up", &local, &"files/remote.bin"])
        .assert_success();
    assert_files_equal(&local, &root.join("files/remote.bin"));

    let back = scratch.join("back.bin");
    server
        .run(&[&"down", &"files/remote.bin", &back])
        .assert_success();
    assert_files_equal(&local, &back);
}

#[test]
fn single_empty_file_round_trips() {
    round_trip_single_file(0, 101);
}

#[test]
fn single_file_one_mib_plus_one_round_trips() {
    round_trip_single_file(MIB + 1, 102);
}

#[test]
fn single_file_five_mib_round_trips() {
    round_trip_single_file(5 * MIB, 103);
}

#[test]
fn upload_replaces_an_existing_file() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    // The old file is longer than the new one, so a receiver that writes in
    // place without truncating leaves a tail behind.
    let existing = root.join("target.bin");
    write_random_file(&existing, 3 * MIB, 201);
    set_mode(&existing, 0o600);
    let local = scratch.join("new.bin");
    write_random_file(&local, 1000, 202);
    set_mtime(&local, 1_300_000_000, 5);
    let server = Server::start(&root);

    server.run(&[&"up", &local, &"target.bin"]).assert_success();
    assert_files_equal(&local, &existing);
}

#[test]
fn uploading_the_same_tree_twice_is_fine() {
    let (_scratch, src, root) = full_tree();
    let server = Server::start(&root);

    server.run(&[&"up", &src, &"copy"]).assert_success();
    assert_trees_equal(&src, &root.join("copy"));
    // The destination now exists: it still names the copy itself, so the
    // tree is refreshed in place, not nested as copy/src.
    server.run(&[&"up", &src, &"copy"]).assert_success();
    assert_trees_equal(&src, &root.join("copy"));
}

#[test]
fn compression_off_and_level_3_give_identical_trees() {
    let (_scratch, src, root) = full_tree();
    let server = Server::start(&root);

    server
        .run(&[&"up", &src, &"off", &"--compress", &"off"])
        .assert_success();
    server
        .run(&[&"up", &src, &"level3", &"--compress", &"3"])
        .assert_success();
    assert_trees_equal(&src, &root.join("off"));
    assert_trees_equal(&src, &root.join("level3"));
}

/// The value of the `"event"` field of one NDJSON line, found without a
/// JSON parser (the test crate stays free of serde).
fn json_event(line: &str) -> Option<&str> {
    let key = "\"event\"";
    let rest = &line[line.find(key)? + key.len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}

#[test]
fn json_output_is_one_object_per_line_ending_with_a_summary() {
    let (_scratch, src, root) = full_tree();
    let server = Server::start(&root);

    let out = server.run(&[&"up", &src, &"copy", &"--json"]);
    out.assert_success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(!lines.is_empty(), "--json printed nothing\n{out}");
    let mut events = Vec::new();
    for line in &lines {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not a JSON object line: {line:?}\n{out}"
        );
        let event =
            json_event(line).unwrap_or_else(|| panic!("no \"event\" field in {line:?}\n{out}"));
        events.push(event);
    }
    assert_eq!(
        events.last(),
        Some(&"summary"),
        "the last event must be the summary\n{out}"
    );
    assert!(
        events.contains(&"file_done"),
        "a tree upload reports file_done events\n{out}"
    );
    assert_trees_equal(&src, &root.join("copy"));
}

#[test]
fn verbose_prints_the_name_of_each_file() {
    let (_scratch, src, root) = full_tree();
    let server = Server::start(&root);

    let out = server.run(&[&"up", &src, &"copy", &"-v"]);
    out.assert_success();
    // Plain ASCII names: how odd names are escaped is the UI's choice.
    for name in [
        "deep.txt",
        BIG_FILE,
        SPACED_FILE,
        "zero.bin",
        "readonly.txt",
    ] {
        out.assert_stdout_contains(name);
    }
}

#[test]
fn quiet_prints_nothing_on_stdout() {
    let (_scratch, src, root) = full_tree();
    let server = Server::start(&root);

    let out = server.run(&[&"up", &src, &"copy", &"--quiet"]);
    out.assert_success();
    assert!(
        out.stdout.is_empty(),
        "--quiet must print nothing on stdout\n{out}"
    );
    assert_trees_equal(&src, &root.join("copy"));
}

/// A scratch dir with `file.txt`, and a server root.
fn one_file() -> (Scratch, PathBuf, PathBuf) {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let file = scratch.join("file.txt");
    write_random_file(&file, 5000, 301);
    set_mtime(&file, 1_400_000_000, 42);
    (scratch, file, root)
}

#[test]
fn upload_to_a_trailing_slash_puts_the_file_inside() {
    let (_scratch, file, root) = one_file();
    fs::create_dir(root.join("dir")).unwrap();
    let server = Server::start(&root);

    server.run(&[&"up", &file, &"dir/"]).assert_success();
    assert_files_equal(&file, &root.join("dir/file.txt"));
}

#[test]
fn upload_to_dot_puts_the_file_in_the_root() {
    let (_scratch, file, root) = one_file();
    let server = Server::start(&root);

    server.run(&[&"up", &file, &"."]).assert_success();
    assert_files_equal(&file, &root.join("file.txt"));
}

#[test]
fn upload_of_a_directory_to_a_trailing_slash_nests_it_under_its_name() {
    let scratch = Scratch::new();
    let src = scratch.join("site");
    build_small_tree(&src);
    let root = scratch.mkdir("root");
    fs::create_dir(root.join("production")).unwrap();
    let server = Server::start(&root);

    server.run(&[&"up", &src, &"production/"]).assert_success();
    assert_trees_equal(&src, &root.join("production/site"));
}

#[test]
fn download_to_a_trailing_slash_puts_the_file_inside() {
    let (scratch, file, root) = one_file();
    // Put the file on the server side directly: this test is about naming.
    fs::create_dir(root.join("remote")).unwrap();
    let remote = root.join("remote/file.txt");
    fs::copy(&file, &remote).unwrap();
    set_mtime(&remote, 1_400_000_000, 42);
    let local_dir = scratch.mkdir("localdir");
    let server = Server::start(&root);

    let mut dest = local_dir.clone().into_os_string();
    dest.push("/");
    server
        .run(&[&"down", &"remote/file.txt", &dest])
        .assert_success();
    assert_files_equal(&remote, &local_dir.join("file.txt"));
}

#[test]
fn default_host_is_localhost() {
    // The seed's one-line usage: no --host, the server on loopback.
    let (_scratch, file, root) = one_file();
    let server = Server::start(&root);

    // A client of the server's user, sharing its state directory.
    run(&[
        &"up",
        &file,
        &"file.txt",
        &"--port",
        &server.port().to_string(),
        &"--state-dir",
        &server.state_dir(),
    ])
    .assert_success();
    assert_files_equal(&file, &root.join("file.txt"));
}

/// Over loopback the link is faster than any compressor: `auto` sends even
/// very compressible text raw, while a fixed level still compresses it.
#[test]
fn auto_compression_sends_raw_to_a_server_on_this_host() {
    let scratch = Scratch::new();
    let src = scratch.join("text.txt");
    let text = "a line of text, the same again and again\n".repeat(400_000);
    write_file(&src, text.as_bytes());
    let root = scratch.mkdir("root");
    let server = Server::start(&root);

    let auto = wire_bytes(server.run(&[&"up", &src, &"auto.txt", &"--json"]));
    let level_1 =
        wire_bytes(server.run(&[&"up", &src, &"level-1.txt", &"--json", &"--compress", &"1"]));
    let size = text.len() as u64;
    assert!(
        auto >= size,
        "auto sent {auto} bytes for {size}: compressed"
    );
    assert!(
        level_1 < size / 4,
        "level 1 sent {level_1} bytes for {size}"
    );
    assert_eq!(fs::read(root.join("auto.txt")).unwrap(), text.as_bytes());
    assert_eq!(fs::read(root.join("level-1.txt")).unwrap(), text.as_bytes());
}

/// The chunks of a large file are compressed by lanes, one thread per core:
/// over several streams, each way, every chunk arrives and the file is
/// whole, in far fewer bytes than it holds.
#[test]
fn a_large_file_compressed_over_several_streams_arrives_whole_both_ways() {
    let scratch = Scratch::new();
    let src = scratch.join("text.txt");
    // 12 MiB of lines that differ, so each chunk compresses on its own.
    let text: String = (0..300_000)
        .map(|i| format!("line {i:07} of a file that compresses well\n"))
        .collect();
    write_file(&src, text.as_bytes());
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    let size = text.len() as u64;

    let sent = wire_bytes(server.run(&[
        &"up",
        &src,
        &"copy.txt",
        &"--json",
        &"--compress",
        &"6",
        &"--streams",
        &"3",
    ]));
    assert!(sent < size / 3, "up: {sent} bytes on the wire for {size}");
    assert_files_equal(&src, &root.join("copy.txt"));

    let back = scratch.join("back.txt");
    let got = wire_bytes(server.run(&[
        &"down",
        &"copy.txt",
        &back,
        &"--json",
        &"--compress",
        &"6",
        &"--streams",
        &"3",
    ]));
    assert!(got < size / 3, "down: {got} bytes on the wire for {size}");
    assert_files_equal(&src, &back);

    // Under --bwlimit there are no lanes: the producer compresses.
    let paced = wire_bytes(server.run(&[
        &"up",
        &src,
        &"paced.txt",
        &"--json",
        &"--compress",
        &"6",
        &"--bwlimit",
        &"256M",
    ]));
    assert!(
        paced < size / 3,
        "paced: {paced} bytes on the wire for {size}"
    );
    assert_files_equal(&src, &root.join("paced.txt"));
}

/// More directories than a receiver may hold open at once (4096,
/// PROTOCOL.md §8.4) and a chain 300 deep: an honest sender stays within
/// the limit, waiting for outcomes when it must, and the tree arrives whole.
#[test]
fn a_tree_of_more_directories_than_may_be_open_at_once_arrives_whole() {
    let scratch = Scratch::new();
    let src = scratch.join("src");
    for i in 0..4500 {
        let dir = src.join(format!("wide/{i:04}"));
        fs::create_dir_all(&dir).unwrap();
        if i % 100 == 0 {
            write_file(&dir.join("f.txt"), format!("{i}\n").as_bytes());
        }
    }
    let deep: PathBuf = std::iter::once(src.join("deep"))
        .chain((0..300).map(|_| PathBuf::from("d")))
        .collect();
    fs::create_dir_all(&deep).unwrap();
    write_file(&deep.join("bottom.txt"), b"at the bottom\n");
    let root = scratch.mkdir("root");
    let server = Server::start(&root);

    server.run(&[&"up", &src, &"copy"]).assert_success();
    assert_trees_equal(&src, &root.join("copy"));
}

/// The bytes a successful `--json` transfer put on the wire.
fn wire_bytes(out: Output) -> u64 {
    out.assert_success();
    out.json_event("summary")["wire_bytes"]
        .as_u64()
        .expect("wire_bytes in the summary")
}

/// Writes `data` at each offset of a file of `size` bytes that is
/// otherwise a hole.
fn write_sparse(path: &std::path::Path, size: u64, data: &[(u64, &[u8])]) {
    use std::os::unix::fs::FileExt;
    let file = fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    for (offset, bytes) in data {
        file.write_all_at(bytes, *offset).unwrap();
    }
}

/// Bytes the filesystem holds for `path` (its blocks, not its size).
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

/// Holes of a sparse file are neither read, sent nor written: a whole
/// chunk inside a hole travels as a header, and the copy is as sparse,
/// up and down. A hole at the very end (no data to extend the file) still
/// ends at the right size.
#[test]
fn sparse_files_travel_as_their_data_and_stay_sparse() {
    const MIB: u64 = 1 << 20;
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    write_sparse(
        &src.join("disk.img"),
        40 * MIB + 123,
        &[
            (0, b"boot sector"),
            (20 * MIB + 100, b"middle"),
            (40 * MIB, b"tail"),
        ],
    );
    write_sparse(
        &src.join("trailing-hole.img"),
        16 * MIB,
        &[(5, b"head only")],
    );
    if allocated(&src.join("disk.img")) >= MIB {
        eprintln!(
            "note: sparse_files_… skipped: the filesystem of the scratch directory keeps no holes"
        );
        return;
    }
    let root = scratch.mkdir("root");
    let server = Server::start(&root);

    let up = wire_bytes(server.run(&[&"up", &src, &"copy", &"--json"]));
    assert_trees_equal(&src, &root.join("copy"));
    let back = scratch.join("back");
    let down = wire_bytes(server.run(&[&"down", &"copy", &back, &"--json"]));
    assert_trees_equal(&src, &back);

    // The chunks holding data (at most four of 1 MiB) and a header per hole.
    for (way, wire) in [("up", up), ("down", down)] {
        assert!(
            wire < 5 * MIB,
            "{way}: {wire} bytes on the wire for 56 MiB of mostly holes"
        );
    }
    for copy in [root.join("copy"), back] {
        for name in ["disk.img", "trailing-hole.img"] {
            let held = allocated(&copy.join(name));
            assert!(
                held <= 4 * MIB,
                "{}/{name}: {held} bytes allocated",
                copy.display()
            );
        }
    }
}

/// The device and inode of `path`, not following a symlink.
fn inode(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(path).unwrap();
    (meta.dev(), meta.ino())
}

/// Hard links arrive as links, as with tar or `rsync -H`: every name of a
/// file in the tree names one file at the receiver, whether its data has
/// arrived when the link does (a large file still in flight) or not, up
/// and down, and again when nothing changed. A file whose other name is
/// outside the tree is a plain file.
#[test]
fn hard_links_arrive_as_links() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    fs::create_dir_all(src.join("a/deep")).unwrap();
    fs::create_dir_all(src.join("b")).unwrap();
    write_random_file(&src.join("a/small.txt"), 3000, 91);
    fs::hard_link(src.join("a/small.txt"), src.join("b/small-again.txt")).unwrap();
    fs::hard_link(src.join("a/small.txt"), src.join("a/deep/third.txt")).unwrap();
    write_random_file(&src.join("a/large.bin"), 9 * MIB, 92);
    fs::hard_link(src.join("a/large.bin"), src.join("b/large-again.bin")).unwrap();
    write_random_file(&scratch.join("outside.txt"), 100, 93);
    fs::hard_link(scratch.join("outside.txt"), src.join("b/alone.txt")).unwrap();
    let root = scratch.mkdir("root");
    let server = Server::start(&root);

    let groups: [&[&str]; 2] = [
        &["a/small.txt", "b/small-again.txt", "a/deep/third.txt"],
        &["a/large.bin", "b/large-again.bin"],
    ];
    let assert_linked = |tree: &std::path::Path| {
        for names in groups {
            let first = inode(&tree.join(names[0]));
            for name in &names[1..] {
                assert_eq!(
                    inode(&tree.join(name)),
                    first,
                    "{} is not a link of {} in {}",
                    name,
                    names[0],
                    tree.display()
                );
            }
        }
        let alone = tree.join("b/alone.txt");
        assert_eq!(fs::symlink_metadata(&alone).unwrap().len(), 100);
    };

    let up = server.run(&[&"up", &src, &"copy", &"--json"]);
    up.assert_success();
    assert_eq!(up.json_event("summary")["files_ok"], 6, "{up}");
    assert_trees_equal(&src, &root.join("copy"));
    assert_linked(&root.join("copy"));

    // Nothing changed: the files are unchanged and the links stay links.
    server.run(&[&"up", &src, &"copy"]).assert_success();
    assert_linked(&root.join("copy"));

    // A name that became a separate file is made a link again.
    fs::remove_file(root.join("copy/b/small-again.txt")).unwrap();
    fs::copy(
        root.join("copy/a/small.txt"),
        root.join("copy/b/small-again.txt"),
    )
    .unwrap();
    server.run(&[&"up", &src, &"copy"]).assert_success();
    assert_linked(&root.join("copy"));

    let back = scratch.join("back");
    server.run(&[&"down", &"copy", &back]).assert_success();
    assert_trees_equal(&src, &back);
    assert_linked(&back);
}

/// Device nodes are made only by a receiver running as root that was
/// started with --devices (a node opens whatever device it names), and are
/// skipped with a warning otherwise; both ways.
#[test]
fn device_nodes_are_made_only_when_allowed() {
    if !is_root() {
        eprintln!(
            "note: device_nodes_are_made_only_when_allowed skipped: only root makes device nodes"
        );
        return;
    }
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    let node = |name: &str, file_type, mode, major, minor| {
        let path = src.join(name);
        let device = rustix::fs::makedev(major, minor);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            file_type,
            rustix::fs::Mode::from_raw_mode(0),
            device,
        )
        .unwrap();
        set_mode(&path, mode);
        set_mtime(&path, 1_600_000_000 + i64::from(minor), 5);
    };
    node("null", rustix::fs::FileType::CharacterDevice, 0o666, 1, 3);
    node("loop", rustix::fs::FileType::BlockDevice, 0o600, 7, 201);
    set_mtime(&src, 1_600_000_000, 7);

    let refused = scratch.mkdir("refused");
    let plain = Server::start(&refused);
    let out = plain.run(&[&"up", &src, &"copy"]);
    out.assert_success().assert_stderr_contains("--devices");
    assert!(
        fs::symlink_metadata(refused.join("copy/null")).is_err(),
        "{out}"
    );
    assert!(
        fs::symlink_metadata(refused.join("copy/loop")).is_err(),
        "{out}"
    );

    let root = scratch.mkdir("root");
    let server = Server::start_with(&root, &[&"--devices"]);
    server.run(&[&"up", &src, &"copy"]).assert_success();
    assert_trees_equal(&src, &root.join("copy"));
    // A device named as what to send, not only one met in a tree.
    let alone = src.join("loop");
    server.run(&[&"up", &alone, &"alone"]).assert_success();
    assert_files_equal(&alone, &root.join("alone"));

    let back = scratch.join("back");
    server
        .run(&[&"down", &"copy", &back, &"--devices"])
        .assert_success();
    assert_trees_equal(&src, &back);
    let unasked = scratch.join("unasked");
    let out = server.run(&[&"down", &"copy", &unasked]);
    out.assert_success().assert_stderr_contains("--devices");
    assert!(fs::symlink_metadata(unasked.join("null")).is_err(), "{out}");
}

/// A directory where a file, a symlink or a fifo should land is left as
/// it is, and each is reported by name: nothing is replaced by a rename
/// over a directory.
#[test]
fn a_directory_in_the_way_is_kept_and_reported() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    write_file(&src.join("file"), b"data");
    std::os::unix::fs::symlink("file", src.join("link")).unwrap();
    mkfifo(&src.join("pipe"));
    let root = scratch.mkdir("root");
    for name in ["file", "link", "pipe"] {
        fs::create_dir_all(root.join("copy").join(name)).unwrap();
        write_file(&root.join("copy").join(name).join("kept.txt"), b"kept");
    }
    let server = Server::start(&root);

    let out = server.run(&[&"up", &src, &"copy"]);
    out.assert_code(1);
    for name in ["file", "link", "pipe"] {
        assert!(
            out.stderr
                .contains(&format!("/{name}: a directory is in the way")),
            "{name}\n{out}"
        );
        let kept = root.join("copy").join(name).join("kept.txt");
        assert_eq!(fs::read(&kept).unwrap(), b"kept", "{}", kept.display());
    }
}

/// A tree holding what an interrupted transfer left (a part file and its
/// journal) goes without them: they are ferry's working files, not data,
/// and a receiver refuses their names.
#[test]
fn working_files_left_in_a_tree_are_not_sent() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let tree = root.join("tree");
    fs::create_dir(&tree).unwrap();
    write_file(&tree.join("a.txt"), b"data\n");
    write_file(&tree.join(".big.bin.ferry-part"), b"half a file");
    write_file(&tree.join(".big.bin.ferry-journal"), b"its journal");
    let server = Server::start(&root);
    let dst = scratch.join("copy");
    server.run(&[&"down", &"tree", &dst]).assert_success();
    assert_eq!(fs::read(dst.join("a.txt")).unwrap(), b"data\n");
    assert_eq!(part_files(&dst), Vec::<PathBuf>::new());
}

/// Move 16 MiB at `--bwlimit 4M` through a counting forwarder, up or down:
/// how long it took and the most bytes seen in any one second.
fn paced(direction: &str) -> (std::time::Duration, u64) {
    use std::time::{Duration, Instant};
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let local = scratch.join("local.bin");
    let server = Server::start(&root);
    let addr = server.addr().parse().unwrap();
    let gate = if direction == "up" {
        write_random_file(&local, 16 * MIB, 40);
        Gate::upload(addr, u64::MAX)
    } else {
        write_random_file(&root.join("remote.bin"), 16 * MIB, 40);
        Gate::download(addr, u64::MAX)
    };
    let (from, to): (&dyn AsRef<std::ffi::OsStr>, &dyn AsRef<std::ffi::OsStr>) =
        if direction == "up" {
            (&local, &"remote.bin")
        } else {
            (&"remote.bin", &local)
        };
    let gate_args = gate.client_args();
    let own_user = server.own_user_args();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &direction,
        &"--bwlimit",
        &"4M",
        &"--compress",
        &"off",
        from,
        to,
    ];
    args.extend(gate_args.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    args.extend(own_user.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    let started = Instant::now();
    let client = spawn(&args, &RunOptions::with_timeout(Duration::from_secs(60)));
    let mut samples = vec![(Duration::ZERO, 0u64)];
    while gate.passed() < 16 * MIB && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
        samples.push((started.elapsed(), gate.passed()));
    }
    client.wait(Duration::from_secs(60)).assert_success();
    let took = started.elapsed();
    assert_files_equal(&local, &root.join("remote.bin"));
    let most_in_a_second = samples
        .iter()
        .map(|&(t, at)| {
            let later = samples
                .iter()
                .take_while(|&&(u, _)| u <= t + Duration::from_secs(1));
            later.last().map_or(0, |&(_, b)| b) - at
        })
        .max()
        .unwrap_or(0);
    (took, most_in_a_second)
}

/// `--bwlimit` keeps a transfer under its rate, all streams together, and
/// smoothly: no second sees much more than the rate (full speed here is
/// about a hundred times more). Times only bound it from below, which a
/// busy machine cannot break.
#[test]
fn bwlimit_keeps_uploads_and_downloads_under_the_rate_smoothly() {
    for direction in ["up", "down"] {
        let (took, most) = paced(direction);
        assert!(
            took.as_secs_f64() >= 3.4,
            "{direction}: 16 MiB at 4 MiB/s in {took:?}"
        );
        assert!(most <= 6 * MIB, "{direction}: {most} bytes in one second");
    }
}

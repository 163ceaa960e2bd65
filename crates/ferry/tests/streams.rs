//! Parallel connections: whatever the stream count, trees arrive whole.
//! Chunks of large files are spread over all connections of a session and
//! arrive in any order; these tests are what proves the receiver's
//! reassembly (parked chunks, deferred commits, directory metadata applied
//! only after every child).

use std::path::Path;
use std::time::Duration;

use crate::util::*;

/// 10,000 small files of varied sizes in 100 directories, plus large files
/// whose chunks spread over the connections.
fn build_wide_tree(root: &Path) {
    for d in 0..100u64 {
        let dir = root.join(format!("d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100u64 {
            let seed = d * 100 + f;
            write_random_file(&dir.join(format!("f{f:03}")), (seed * 37) % 8192, seed);
        }
        set_mtime(&dir, 1_600_000_000 + d as i64, 5);
    }
    write_random_file(&root.join("big.bin"), 100 * MIB, 7);
    write_random_file(&root.join("d050/mid.bin"), 3 * MIB + 17, 8);
    set_mtime(&root.join("d050"), 1_600_000_050, 5);
    set_mtime(root, 1_600_000_999, 9);
}

/// Upload and download `src` with `streams` connections; both copies must
/// equal the source.
fn round_trip(src: &Path, streams: u32) {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    let n = streams.to_string();

    server
        .run(&[&"up", &src, &"copy", &"--streams", &n, &"-q"])
        .assert_success();
    assert_trees_equal(src, &root.join("copy"));
    if streams > 1 {
        // The extra connections really joined (the server logs each one).
        let joined = poll_until(Duration::from_secs(5), || {
            let count = server.stderr().matches("data connection joined").count();
            (count >= streams as usize - 1).then_some(count)
        });
        assert!(
            joined.is_some(),
            "expected {} joins\n{}",
            streams - 1,
            server.stderr()
        );
    }

    let back = scratch.join("back");
    server
        .run(&[&"down", &"copy", &back, &"--streams", &n, &"-q"])
        .assert_success();
    assert_trees_equal(src, &back);
}

#[test]
fn ten_thousand_files_and_a_big_one_with_1_4_and_8_streams() {
    let scratch = Scratch::new();
    let src = scratch.join("src");
    build_wide_tree(&src);
    for streams in [1, 4, 8] {
        round_trip(&src, streams);
    }
}

#[test]
fn the_full_tree_with_1_and_8_streams() {
    let scratch = Scratch::new();
    let src = scratch.join("src");
    build_full_tree(&src);
    for streams in [1, 8] {
        round_trip(&src, streams);
    }
}

#[test]
fn stream_count_is_validated() {
    let scratch = Scratch::new();
    let file = scratch.join("f");
    write_random_file(&file, 10, 1);
    for bad in ["0", "17", "many"] {
        run(&[&"up", &file, &"x", &"--streams", &bad]).assert_code(2);
    }
}

/// Widening (doubling the connections while that pays, over a loss-based
/// congestion control) never reaches a server on this host, where the
/// cores, not the path, are what limit: an upload held to 4 MiB/s for six
/// seconds over Reno, whose rate settles at once, keeps the default count.
#[test]
fn a_server_on_this_host_is_never_widened_to() {
    let scratch = Scratch::new();
    let file = scratch.join("f");
    write_random_file(&file, 24 << 20, 7);
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    let mut opts = RunOptions::with_timeout(Duration::from_secs(120));
    opts.env
        .push(("FERRY_TCP_CONGESTION".into(), "reno".into()));
    server
        .run_with(&[&"up", &file, &"f", &"--bwlimit", &"4M", &"-q"], &opts)
        .assert_success();
    assert_files_equal(&file, &root.join("f"));
    let default = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8));
    let joined = server.stderr().matches("data connection joined").count();
    assert!(
        joined < default,
        "{joined} data connections joined, the default is {default} in all\n{}",
        server.stderr()
    );
}

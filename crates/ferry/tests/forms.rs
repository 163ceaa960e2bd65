//! Where each side of `ferry cp` is: HOST:PATH, [IPV6]:PATH and ferry://
//! URLs reach the server; forms that could be read two ways are usage
//! errors, and never a local copy.

use std::fs;
use std::path::Path;

use crate::util::*;

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Runs `ferry ARGS` in `dir`, as a command that must fail fast.
fn run_in(dir: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let opts = RunOptions {
        current_dir: Some(dir.to_path_buf()),
        ..RunOptions::with_timeout(ERROR_TIMEOUT)
    };
    run_with(args, &opts)
}

/// Each refused form, as source and as destination: exit 2, one line that
/// says why and shows the forms, and nothing made here (on main, `::1:v6/x`
/// was a local copy into `./::1:v6/x`). No server listens on the default
/// port here, so a form taken for remote would fail with 1, not 2.
#[test]
fn ambiguous_and_foreign_forms_are_usage_errors_that_copy_nothing() {
    let scratch = Scratch::new();
    let work = scratch.mkdir("work");
    write_file(&work.join("f"), b"data");
    let refused = [
        ("::1:v6/x", "[::1]:v6/x"),
        ("fe80::1:x", "[fe80::1]:x"),
        ("user@127.0.0.1:x", "no users"),
        ("ferry://user@127.0.0.1/x", "no users"),
        ("127.0.0.1:~/x", "relative to the server's root"),
        ("127.0.0.1:8834:x", "ferry://127.0.0.1:8834/x"),
        ("[::1]:8834:x", "ferry://[::1]:8834/x"),
        ("127.0.0.1::x", "rsync"),
        ("scp://127.0.0.1/x", "scp://"),
        ("my host:x", "not a host name"),
        (":x", "no host name"),
        ("[localhost]:x", "not an IPv6 address"),
        ("ferry://127.0.0.1:0/x", "from 1 to 65535"),
        ("ferry://127.0.0.1/a%20b", "escapes"),
    ];
    for (form, says) in refused {
        for args in [["cp", "f", form], ["cp", form, "back"]] {
            let out = run_in(&work, &[&args[0], &args[1], &args[2]]);
            out.assert_code(2)
                .assert_stderr_contains(says)
                .assert_stderr_contains("accepted forms: HOST:PATH");
            assert_eq!(out.stderr.lines().count(), 1, "one line\n{out}");
            assert_eq!(names(&work), ["f"], "nothing made here\n{out}");
        }
    }
}

#[test]
fn a_url_port_and_a_different_port_flag_are_refused() {
    let scratch = Scratch::new();
    let work = scratch.mkdir("work");
    write_file(&work.join("f"), b"data");
    let out = run_in(
        &work,
        &[&"cp", &"f", &"ferry://127.0.0.1:9001/x", &"--port", &"9002"],
    );
    out.assert_code(2)
        .assert_stderr_contains("two ports: 9001 in the URL and --port 9002");
    assert_eq!(names(&work), ["f"]);
}

/// `upload` and `download` take the remote path alone: `~` there is
/// explained too, before anything connects.
#[test]
fn a_home_in_an_upload_or_download_path_is_explained() {
    let scratch = Scratch::new();
    let work = scratch.mkdir("work");
    write_file(&work.join("f"), b"data");
    for args in [["up", "f", "~/x"], ["down", "~/x", "back"]] {
        let out = run_in(&work, &[&args[0], &args[1], &args[2]]);
        out.assert_code(2)
            .assert_stderr_contains("relative to the server's root");
        assert_eq!(names(&work), ["f"], "{out}");
    }
}

/// Up to `spec` and back to `scratch/back_NAME`, through `ferry cp` as a
/// client of the server's user; both copies compared with `src`.
fn round_trip(server: &Server, src: &Path, up: &str, down: &str, extra: &[&str]) {
    let state = server.state_dir();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"cp", &src, &up, &"--state-dir", &state];
    args.extend(extra.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    run(&args).assert_success();
    let remote_copy = server
        .root()
        .join("remote")
        .join(Path::new(up).file_name().unwrap());
    assert_trees_equal(src, &remote_copy);

    let back = src.with_file_name(format!(
        "back_{}",
        remote_copy.file_name().unwrap().display()
    ));
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"cp", &down, &back, &"--state-dir", &state];
    args.extend(extra.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    run(&args).assert_success();
    assert_trees_equal(src, &back);
}

#[test]
fn ferry_urls_carry_the_port_both_ways() {
    let scratch = Scratch::new();
    let src = scratch.join("site");
    build_small_tree(&src);
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    let url = format!("ferry://127.0.0.1:{}/remote/by_url", server.port());
    round_trip(&server, &src, &url, &url, &[]);
    // The same port given twice is no conflict.
    let port = server.port().to_string();
    let url = format!("ferry://127.0.0.1:{port}/remote/by_url_and_flag");
    round_trip(&server, &src, &url, &url, &["--port", &port]);
}

/// `[::1]:PATH` and `ferry://[::1]:PORT/PATH` reach a server listening on
/// ::1 only (skipped where this machine has no ::1).
#[test]
fn bracketed_ipv6_addresses_reach_a_server_on_ipv6() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        eprintln!("skipped: this machine has no ::1 to listen on ({e})");
        return;
    }
    let scratch = Scratch::new();
    let src = scratch.join("site");
    build_small_tree(&src);
    let root = scratch.mkdir("root");
    let server = Server::start_at(&root, "::1", 0, &[], &RunOptions::default());
    assert!(server.addr().starts_with("[::1]:"), "{}", server.addr());
    let port = server.port().to_string();
    round_trip(
        &server,
        &src,
        "[::1]:remote/v6",
        "[::1]:remote/v6",
        &["--port", &port],
    );
    let url = format!("ferry://[::1]:{port}/remote/v6_url");
    round_trip(&server, &src, &url, &url, &[]);
}

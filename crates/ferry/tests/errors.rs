//! Every failure exits non-zero within seconds, never panics, and says what
//! went wrong in one line that names the path and the cause.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::util::*;

/// Runs a command expected to fail, with the short error deadline.
fn run_failing(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    run_timeout(args, ERROR_TIMEOUT)
}

fn run_failing_against(server: &Server, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    server.run_with(args, &RunOptions::with_timeout(ERROR_TIMEOUT))
}

/// A scratch dir holding `f.txt` and an empty server root.
fn setup() -> (Scratch, PathBuf, PathBuf) {
    let scratch = Scratch::new();
    let file = scratch.join("f.txt");
    write_random_file(&file, 1000, 501);
    let root = scratch.mkdir("root");
    (scratch, file, root)
}

#[test]
fn no_server_listening_is_a_connect_error() {
    let (_scratch, file, _root) = setup();
    let port = unused_port();

    let out = run_failing(&[&"up", &file, &"x", &"--port", &port.to_string()]);
    out.assert_code(1).assert_stderr_contains("connect");
    let named = ["127.0.0.1", "localhost", "[::1]"]
        .iter()
        .any(|host| out.stderr.contains(&format!("{host}:{port}")));
    assert!(named, "stderr should name the address it tried\n{out}");
}

#[test]
fn missing_local_path_is_reported() {
    let (_scratch, _file, root) = setup();
    let server = Server::start(&root);

    let out = run_failing_against(&server, &[&"up", &"/nonexistent/xyz", &"r"]);
    out.assert_code(1)
        .assert_stderr_contains("/nonexistent/xyz")
        .assert_stderr_contains("no such file");
    assert!(!root.join("r").exists(), "nothing may be created\n{out}");
}

#[test]
fn missing_remote_path_is_reported() {
    let (scratch, _file, root) = setup();
    let server = Server::start(&root);
    let out_path = scratch.join("out");

    let out = run_failing_against(&server, &[&"down", &"missing/thing", &out_path]);
    out.assert_code(1).assert_stderr_contains("missing/thing");
    assert!(
        contains_ci(&out.stderr, "no such file") || contains_ci(&out.stderr, "not found"),
        "stderr should say the remote path does not exist\n{out}"
    );
    assert!(!out_path.exists(), "nothing may be created locally\n{out}");
    // The server said so, about the path it could not open.
    out.assert_stderr_contains("ferry: server: missing/thing: no such file or directory");
}

/// Asserts nothing named `escape` appeared next to the server root, nor at
/// `also` (an absolute target).
#[track_caller]
fn assert_nothing_escaped(root: &Path, also: Option<&Path>, out: &Output) {
    let parent = root.parent().unwrap();
    assert!(
        fs::symlink_metadata(parent.join("escape")).is_err(),
        "a file was written outside the server root\n{out}"
    );
    if let Some(path) = also {
        assert!(
            fs::symlink_metadata(path).is_err(),
            "{} was written\n{out}",
            path.display()
        );
    }
}

#[test]
fn upload_to_an_absolute_remote_path_is_refused() {
    let (scratch, file, root) = setup();
    let server = Server::start(&root);
    // Not /etc/passwd: a broken server running as root would overwrite it.
    // An absolute path into scratch is just as absolute and can be checked.
    let target = scratch.join("outside/abs-escape");
    fs::create_dir(scratch.join("outside")).unwrap();

    let out = run_failing_against(&server, &[&"up", &file, &target]);
    out.assert_code(1).assert_stderr_contains("absolute");
    assert_nothing_escaped(&root, Some(&target), &out);
}

#[test]
fn upload_climbing_out_of_the_root_is_refused() {
    for remote in ["../escape", "a/../../escape"] {
        let (_scratch, file, root) = setup();
        let server = Server::start(&root);

        let out = run_failing_against(&server, &[&"up", &file, &remote]);
        out.assert_code(1).assert_stderr_contains("..");
        assert_nothing_escaped(&root, None, &out);
    }
}

#[test]
fn download_of_an_absolute_remote_path_is_refused() {
    let (scratch, _file, root) = setup();
    let server = Server::start(&root);
    let out_path = scratch.join("out");

    let out = run_failing_against(&server, &[&"down", &"/etc/passwd", &out_path]);
    out.assert_code(1).assert_stderr_contains("absolute");
    assert!(!out_path.exists(), "nothing may be downloaded\n{out}");
}

#[test]
fn download_climbing_out_of_the_root_is_refused() {
    for remote in ["../escape", "a/../../escape"] {
        let (scratch, _file, root) = setup();
        // Something worth stealing just outside the root.
        write_file(&scratch.join("escape"), b"secret outside the root\n");
        let server = Server::start(&root);
        let out_path = scratch.join("out");

        let out = run_failing_against(&server, &[&"down", &remote, &out_path]);
        out.assert_code(1).assert_stderr_contains("..");
        assert!(!out_path.exists(), "nothing may be downloaded\n{out}");
    }
}

#[test]
fn invalid_port_is_a_usage_error() {
    let (_scratch, file, root) = setup();
    for port in ["70000", "abc"] {
        run_failing(&[&"up", &file, &"x", &"--port", &port]).assert_code(2);
        run_failing(&[&"server", &"--root", &root, &"--port", &port]).assert_code(2);
    }
}

#[test]
fn missing_or_unknown_arguments_are_usage_errors() {
    let none: [&dyn AsRef<std::ffi::OsStr>; 0] = [];
    run_failing(&none).assert_code(2);
    run_failing(&[&"frobnicate"]).assert_code(2);
    run_failing(&[&"up", &"only-one-path"]).assert_code(2);
}

#[test]
fn unreadable_file_fails_alone_and_the_rest_arrives() {
    let scratch = Scratch::new();
    // As root the client runs as `nobody`, who must be able to read the tree.
    let client = unprivileged(&scratch);
    let src = scratch.join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    set_mode(&src, 0o755);
    set_mode(&src.join("sub"), 0o755);
    write_random_file(&src.join("ok.txt"), 10_000, 601);
    write_random_file(&src.join("sub/also-ok.txt"), 2_000, 602);
    write_random_file(&src.join("locked.txt"), 1_000, 603);
    set_mode(&src.join("locked.txt"), 0o000);
    let root = scratch.mkdir("root");
    let server = Server::start(&root);

    // Another user than the server's: handed its token.
    let out = server.run_with(
        &[&"up", &src, &"dest"],
        &server.handed_token(RunOptions {
            timeout: ERROR_TIMEOUT,
            ..client
        }),
    );
    out.assert_code(1)
        .assert_stderr_contains("locked.txt")
        .assert_stderr_contains("permission denied")
        // One failing file is reported in the summary, not a fatal error.
        .assert_stdout_contains("failed");
    assert_files_equal(&src.join("ok.txt"), &root.join("dest/ok.txt"));
    assert_files_equal(
        &src.join("sub/also-ok.txt"),
        &root.join("dest/sub/also-ok.txt"),
    );
    assert!(
        fs::symlink_metadata(root.join("dest/locked.txt")).is_err(),
        "the unreadable file must not arrive\n{out}"
    );
    assert_eq!(part_files(&root), Vec::<PathBuf>::new(), "leftovers\n{out}");
}

#[test]
fn unwritable_server_root_is_permission_denied() {
    let scratch = Scratch::new();
    let file = scratch.join("hello.txt");
    write_random_file(&file, 1000, 701);
    let root = scratch.mkdir("root");
    let server = if is_root() {
        // Root writes anywhere: run the server as `nobody` on a root-owned 0o755 root.
        Server::start_as(&root, &[], &unprivileged(&scratch))
    } else {
        set_mode(&root, 0o555);
        Server::start(&root)
    };

    // As root, the client is another user than the server's: handed its token.
    let opts = server.handed_token(RunOptions::with_timeout(ERROR_TIMEOUT));
    let out = server.run_with(&[&"up", &file, &"hello.txt"], &opts);
    out.assert_code(1)
        .assert_stderr_contains("permission denied");
    assert!(
        !root.join("hello.txt").exists(),
        "nothing may arrive\n{out}"
    );
}

/// A tmpfs mounted for the life of the guard; lazily unmounted on drop so a
/// still-open file cannot keep it (and the test's tempdir) busy.
struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    fn new(path: &Path, size: &str) -> Result<TmpfsMount, String> {
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(TmpfsMount {
            path: path.to_path_buf(),
        })
    }
}

impl TmpfsMount {
    fn resize(&self, size: &str) -> Result<(), String> {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        status
            .success()
            .then_some(())
            .ok_or_else(|| format!("remount failed: {status}"))
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
fn disk_full_fails_cleanly_keeps_the_part_and_resumes_once_space_is_freed() {
    if !is_root() {
        eprintln!("skipping disk-full test: mounting a small tmpfs needs root");
        return;
    }
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let mount = match TmpfsMount::new(&root, "6m") {
        Ok(mount) => mount,
        Err(reason) => {
            eprintln!("skipping disk-full test: {reason}");
            return;
        }
    };
    set_mode(&root, 0o755);
    // Random, so compression cannot squeeze 12 MiB into 6.
    let big = scratch.join("big.bin");
    write_random_file(&big, 12 * MIB, 801);
    let small = root.join("small.bin");
    write_random_file(&small, 10 * 1024, 802);
    // Declared after the mount, so it is stopped before the unmount.
    let server = Server::start(&root);

    let out = run_failing_against(&server, &[&"up", &big, &"big.bin"]);
    out.assert_code(1)
        .assert_stderr_contains("big.bin")
        .assert_stderr_contains("no space");
    assert!(
        fs::symlink_metadata(root.join("big.bin")).is_err(),
        "a failed file must not be renamed into place\n{out}"
    );
    // What arrived verified stays, with its journal, for the same command.
    let kept = poll_until(Duration::from_secs(5), || {
        (part_files(&root).len() == 2).then_some(())
    });
    assert!(
        kept.is_some(),
        "part and journal: {:?}\n{out}",
        part_files(&root)
    );

    // The server keeps serving (the kept part fills the disk, so a read).
    let fetched = scratch.join("fetched.bin");
    server
        .run(&[&"down", &"small.bin", &fetched])
        .assert_success();
    assert_files_equal(&small, &fetched);

    // Space is freed: the same command finishes, sending only the rest.
    mount.resize("32m").expect("grow the tmpfs");
    let out = server.run(&[&"up", &big, &"big.bin", &"--json"]);
    out.assert_success();
    assert_files_equal(&big, &root.join("big.bin"));
    let summary = out.json_event("summary");
    let sent = summary["bytes"].as_u64().unwrap();
    assert!(
        sent < 10 * MIB && summary["bytes_held"].as_u64().unwrap() >= 2 * MIB,
        "the resume sent {sent} bytes of 12 MiB\n{out}"
    );
    assert!(part_files(&root).is_empty(), "{:?}", part_files(&root));
}

/// `ferry up --help` names every kind of NDJSON event the binary prints
/// (the list is read off the source, so a new kind cannot go unlisted).
/// The exit statuses are checked in `command_line.rs`.
#[test]
fn help_lists_every_json_event() {
    // Help text is wrapped to the terminal: compare words, not lines.
    let words = |out: &Output| out.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    let up = run(&[&"up", &"--help"]);
    up.assert_success();
    let text = words(&up);
    let ui = include_str!("../src/ui.rs");
    let kinds: std::collections::BTreeSet<&str> = ui
        .split("\"event\": \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert!(kinds.len() >= 10, "{kinds:?}");
    for kind in kinds {
        assert!(
            text.contains(kind),
            "event {kind:?} not in up --help:\n{up}"
        );
    }
}

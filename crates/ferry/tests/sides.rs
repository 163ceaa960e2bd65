//! Which side failed, and where: what fails on the server is named there
//! (`server: PATH: why`, the server's path), what fails here under the
//! local path; and the summary's counts add up, in words and in JSON: every
//! entry but a directory counts once, as ok, failed or skipped, and a
//! directory that fails counts apart.
//!
//! Permissions are what fails, so these run the server (and the client) as
//! `nobody`: root writes anywhere.

use std::fs;
use std::os::unix::fs::lchown;
use std::path::Path;

use crate::util::*;

fn chown(path: &Path, (uid, gid): (u32, u32)) {
    lchown(path, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("lchown {}: {e}", path.display()));
}

fn root_or_skip(test: &str) -> bool {
    if !is_root() {
        eprintln!("note: {test} skipped: only root can run the server as another user");
    }
    is_root()
}

/// The summary's counts: (total, ok, failed, skipped, directories failed),
/// checked to add up.
#[track_caller]
fn counts(out: &Output) -> (u64, u64, u64, u64, u64) {
    let summary = out.json_event("summary");
    let n = |field: &str| {
        summary[field]
            .as_u64()
            .unwrap_or_else(|| panic!("summary has no {field}\n{out}"))
    };
    let counts = (
        n("files_total"),
        n("files_ok"),
        n("files_failed"),
        n("files_skipped"),
        n("dirs_failed"),
    );
    assert_eq!(counts.0, counts.1 + counts.2 + counts.3, "{out}");
    counts
}

/// The failures the summary lists, as (side, path, directory), sorted;
/// each also had its own `file_failed` event.
#[track_caller]
fn failures(out: &Output) -> Vec<(String, String, bool)> {
    let of = |f: &serde_json::Value| {
        let text = |field: &str| f[field].as_str().unwrap_or_default().to_string();
        (text("side"), text("path"), f["dir"] == true)
    };
    let summary = out.json_event("summary");
    let mut listed: Vec<_> = summary["failed"]
        .as_array()
        .unwrap_or_else(|| panic!("no failures listed\n{out}"))
        .iter()
        .map(of)
        .collect();
    listed.sort();
    let mut events: Vec<_> = out
        .stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|e| e["event"] == "file_failed")
        .map(|e| of(&e))
        .collect();
    events.sort();
    assert_eq!(listed, events, "{out}");
    listed
}

fn failure(side: &str, path: &str, dir: bool) -> (String, String, bool) {
    (side.to_string(), path.to_string(), dir)
}

/// Each `ferry: ` line on stderr, without it (but the one that says a
/// server's key is remembered).
fn error_lines(out: &Output) -> Vec<&str> {
    out.stderr
        .lines()
        .filter_map(|line| line.strip_prefix("ferry: "))
        .filter(|line| !line.starts_with("new server "))
        .collect()
}

#[test]
fn an_upload_names_the_server_and_its_path_for_what_the_server_cannot_write() {
    if !root_or_skip("an_upload_names_the_server_...") {
        return;
    }
    let scratch = Scratch::new();
    // The server, as nobody, may write in backup/ but not in backup/locked/.
    let root = scratch.mkdir("root");
    chown(&scratch.mkdir("root/backup"), NOBODY);
    scratch.mkdir("root/backup/locked");
    let src = scratch.mkdir("src");
    for (i, name) in ["a", "b", "locked/c", "locked/d", "sub/e"]
        .iter()
        .enumerate()
    {
        fs::create_dir_all(src.join(name).parent().unwrap()).unwrap();
        write_random_file(&src.join(name), 100 + i as u64, 90 + i as u64);
    }
    let server = Server::start_as(&root, &[], &unprivileged(&scratch));
    let opts = server.handed_token(RunOptions::with_timeout(ERROR_TIMEOUT));

    let out = server.run_with(&[&"up", &src, &"backup", &"--json"], &opts);
    out.assert_code(1);
    // Five files, three of them in place; the directory counts apart.
    assert_eq!(counts(&out), (5, 3, 2, 0, 1), "{out}");
    assert_eq!(
        failures(&out),
        [
            failure("server", "backup/locked", true),
            failure("server", "backup/locked/c", false),
            failure("server", "backup/locked/d", false),
        ],
        "{out}"
    );

    // In words: the same counts, each failure on the server, under its path.
    let out = server.run_with(&[&"up", &src, &"backup"], &opts);
    out.assert_code(1)
        .assert_stdout_contains("5 total, 3 ok (60.0%), 2 failed, 0 skipped")
        .assert_stdout_contains("dirs:     1 failed")
        .assert_stdout_contains("  - server: backup/locked/c: permission denied");
    let errors = error_lines(&out);
    assert_eq!(errors.len(), 3, "{out}");
    for line in errors {
        assert!(line.starts_with("server: backup/locked"), "{line}\n{out}");
    }
    assert!(
        !out.stdout.contains(&format!("{}/locked", src.display())),
        "{out}"
    );
    assert_files_equal(&src.join("sub/e"), &root.join("backup/sub/e"));
}

/// The server's tree for the download: `a` and `b` it can read, `secret`
/// and `closed/` it cannot (root's, private), `sub/e`.
fn serverside_tree(scratch: &Scratch) {
    let tree = scratch.mkdir("root/backup");
    for name in ["a", "b", "secret", "closed/z", "sub/e"] {
        fs::create_dir_all(tree.join(name).parent().unwrap()).unwrap();
        write_random_file(&tree.join(name), 64, name.len() as u64);
        set_mode(&tree.join(name), 0o644);
    }
    set_mode(&tree.join("sub"), 0o755);
    set_mode(&tree.join("secret"), 0o600);
    set_mode(&tree.join("closed"), 0o700);
}

#[test]
fn a_download_names_the_server_for_what_it_cannot_read_and_the_local_path_for_the_rest() {
    if !root_or_skip("a_download_names_the_server_...") {
        return;
    }
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    serverside_tree(&scratch);
    // Here, as nobody too: out/x/ is ours, out/x/sub/ root's.
    chown(&scratch.mkdir("out"), NOBODY);
    chown(&scratch.mkdir("out/x"), NOBODY);
    scratch.mkdir("out/x/sub");
    let nobody = unprivileged(&scratch);
    let server = Server::start_as(&root, &[], &nobody);
    let client = RunOptions {
        timeout: ERROR_TIMEOUT,
        ..nobody
    };

    // From the scratch directory: the local path is out/x.
    let out = server.run_with(&[&"down", &"backup", &"out/x", &"--json"], &client);
    out.assert_code(1);
    // a, b, secret and sub/e (closed/z was never seen); a and b arrive.
    assert_eq!(counts(&out), (4, 2, 2, 0, 2), "{out}");
    assert_eq!(
        failures(&out),
        [
            failure("local", "out/x/sub", true),
            failure("local", "out/x/sub/e", false),
            failure("server", "backup/closed", true),
            failure("server", "backup/secret", false),
        ],
        "{out}"
    );

    let out = server.run_with(&[&"down", &"backup", &"out/x"], &client);
    out.assert_code(1)
        .assert_stdout_contains("4 total, 2 ok (50.0%), 2 failed, 0 skipped")
        .assert_stdout_contains("dirs:     2 failed");
    let mut errors = error_lines(&out);
    errors.sort();
    assert_eq!(
        errors,
        [
            "out/x/sub/e: permission denied",
            "out/x/sub: cannot set directory metadata: operation not permitted",
            "server: backup/closed: cannot open directory: permission denied",
            "server: backup/secret: permission denied",
        ],
        "{out}"
    );
    assert_files_equal(&root.join("backup/a"), &scratch.join("out/x/a"));
}

#[test]
fn a_local_copy_names_its_destination_here_not_a_server() {
    if !root_or_skip("a_local_copy_names_its_destination_here_not_a_server") {
        return;
    }
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    for name in ["a", "locked/c"] {
        fs::create_dir_all(src.join(name).parent().unwrap()).unwrap();
        write_random_file(&src.join(name), 64, 5);
        set_mode(&src.join(name), 0o644);
    }
    set_mode(&src.join("locked"), 0o755);
    // As nobody, into out/copy/, whose locked/ is root's.
    chown(&scratch.mkdir("out"), NOBODY);
    chown(&scratch.mkdir("out/copy"), NOBODY);
    scratch.mkdir("out/copy/locked");
    let opts = RunOptions {
        timeout: ERROR_TIMEOUT,
        ..unprivileged(&scratch)
    };
    // The copy's server is this process's own: what it cannot write is
    // named where it is, out/copy/...
    let out = run_with(&[&"cp", &"src", &"out/copy", &"--json"], &opts);
    out.assert_code(1);
    assert_eq!(counts(&out), (2, 1, 1, 0, 1), "{out}");
    assert_eq!(
        failures(&out),
        [
            failure("local", "out/copy/locked", true),
            failure("local", "out/copy/locked/c", false),
        ],
        "{out}"
    );
    let out = run_with(&[&"cp", &"src", &"out/copy"], &opts);
    out.assert_code(1);
    assert!(
        error_lines(&out).contains(&"out/copy/locked/c: permission denied"),
        "{out}"
    );
}

//! Authentication: a server with a token serves only clients that prove
//! it, refuses the others clearly (and slowly, in its log), and the token
//! itself never crosses the wire.

use std::ffi::OsString;
use std::fs;

use crate::tls::Capture;
use crate::util::*;

const TOKEN: &str = "c0ffee-test-token-5e1f";

fn with_token(token: Option<&str>) -> RunOptions {
    let mut opts = RunOptions::with_timeout(ERROR_TIMEOUT);
    if let Some(t) = token {
        opts.env.push(("FERRY_TOKEN".into(), t.into()));
    }
    opts
}

#[test]
fn a_server_with_a_token_serves_only_clients_that_prove_it() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let file = scratch.join("a.txt");
    write_file(&file, b"authenticated\n");
    let server = Server::start_as(&root, &[], &with_token(Some(TOKEN)));
    assert!(
        server.wait_for_log("clients must prove the token", ERROR_TIMEOUT),
        "{}",
        server.stderr()
    );

    let none = server.run_with(&[&"up", &file, &"none.txt"], &with_token(None));
    none.assert_code(1)
        .assert_no_panic()
        .assert_stderr_contains(
            "the server requires a token: set FERRY_TOKEN or pass --token-file",
        );
    assert!(!root.join("none.txt").exists());

    let wrong = server.run_with(&[&"up", &file, &"wrong.txt"], &with_token(Some("guess")));
    wrong
        .assert_code(1)
        .assert_no_panic()
        .assert_stderr_contains("authentication failed");
    assert!(!root.join("wrong.txt").exists());
    assert!(
        server.wait_for_log("authentication failed", ERROR_TIMEOUT),
        "the failed attempt is logged: {}",
        server.stderr()
    );

    server
        .run_with(&[&"up", &file, &"env.txt"], &with_token(Some(TOKEN)))
        .assert_success();
    assert_eq!(fs::read(root.join("env.txt")).unwrap(), b"authenticated\n");

    let token_file = scratch.join("token");
    write_file(&token_file, format!("{TOKEN}\n").as_bytes());
    server
        .run_with(
            &[&"up", &"--token-file", &token_file, &file, &"file.txt"],
            &with_token(None),
        )
        .assert_success();
    assert_eq!(fs::read(root.join("file.txt")).unwrap(), b"authenticated\n");
}

#[test]
fn a_loopback_server_without_a_token_needs_none() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let file = scratch.join("a.txt");
    write_file(&file, b"local\n");
    let server = Server::start(&root);
    // A client with a token it is never asked for is served as well.
    server
        .run_with(&[&"up", &file, &"a.txt"], &with_token(Some(TOKEN)))
        .assert_success();
    assert!(root.join("a.txt").exists());
}

#[test]
fn the_token_never_crosses_the_wire() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let file = scratch.join("a.txt");
    write_file(&file, b"plaintext on purpose\n");
    let server = Server::start_as(&root, &[&"--no-tls"], &with_token(Some(TOKEN)));
    let capture = Capture::start(server.addr());
    let port = capture.port.to_string();
    let args: Vec<OsString> = ["up", "--no-tls", "--host", "127.0.0.1", "--port", &port]
        .iter()
        .map(OsString::from)
        .chain([file.clone().into(), "a.txt".into()])
        .collect();
    let refs: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as _).collect();
    run_with(&refs, &with_token(Some(TOKEN))).assert_success();
    let wire = capture.captured();
    assert!(
        wire.windows(b"plaintext on purpose".len())
            .any(|w| w == b"plaintext on purpose"),
        "the capture sees the plaintext session"
    );
    assert!(
        !wire.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
        "the token crossed the wire"
    );
}

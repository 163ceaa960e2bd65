//! The server as a service: a configuration file that gives each token its
//! own root and mode, reloaded on SIGHUP without touching the sessions in
//! flight, and a state directory for a service user without a home.

use std::fs;
use std::path::{Path, PathBuf};

use rustix::process::Signal;

use crate::util::*;

/// Two roots with a file each, and two private token files.
struct Site {
    scratch: Scratch,
    /// Holds `a.txt`.
    a: PathBuf,
    /// Holds `b.txt`.
    b: PathBuf,
    config: PathBuf,
    state: PathBuf,
}

const READER: &str = "reader-token-4f1d9e";
const WRITER: &str = "writer-token-a83c02";

impl Site {
    fn new() -> Site {
        let scratch = Scratch::new();
        let a = scratch.mkdir("a");
        let b = scratch.mkdir("b");
        write_file(&a.join("a.txt"), b"in root a\n");
        write_file(&b.join("b.txt"), b"in root b\n");
        for (name, token) in [("reader", READER), ("writer", WRITER)] {
            let file = scratch.join(format!("{name}.token"));
            write_file(&file, format!("{token}\n").as_bytes());
            set_mode(&file, 0o600);
        }
        let config = scratch.join("ferry.toml");
        let state = scratch.join("state");
        Site {
            scratch,
            a,
            b,
            config,
            state,
        }
    }

    fn token_file(&self, name: &str) -> PathBuf {
        self.scratch.join(format!("{name}.token"))
    }

    /// Writes the configuration file (0600): roots `a` and `b`, and each
    /// of `tokens` as (name, root, mode), its file `NAME.token`.
    fn configure(&self, tokens: &[(&str, &str, &str)]) {
        let mut text = format!("[roots]\na = {:?}\nb = {:?}\n", self.a, self.b);
        for (name, root, mode) in tokens {
            text.push_str(&format!(
                "\n[[token]]\nname = {name:?}\ntoken_file = {:?}\nroot = {root:?}\nmode = {mode:?}\n",
                self.token_file(name)
            ));
        }
        self.write_config(&text);
    }

    fn write_config(&self, text: &str) {
        write_file(&self.config, text.as_bytes());
        set_mode(&self.config, 0o600);
    }

    fn start(&self) -> Server {
        Server::start_config(
            &self.config,
            &[&"--state-dir", &self.state],
            &RunOptions::default(),
        )
    }

    /// Names directly inside `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn with_token(token: &str) -> RunOptions {
    let mut opts = RunOptions::with_timeout(ERROR_TIMEOUT);
    opts.env.push(("FERRY_TOKEN".into(), token.into()));
    opts
}

#[test]
fn each_token_sees_only_its_own_root_and_mode() {
    let site = Site::new();
    site.configure(&[("reader", "a", "read-only"), ("writer", "b", "write-only")]);
    let server = site.start();
    let (reader, writer) = (with_token(READER), with_token(WRITER));
    let got = site.scratch.join("got");

    // The reader downloads from root a, and only from it.
    server
        .run_with(&[&"down", &"a.txt", &got], &reader)
        .assert_success();
    assert_eq!(fs::read(&got).unwrap(), b"in root a\n");
    server
        .run_with(&[&"down", &"b.txt", &site.scratch.join("b")], &reader)
        .assert_code(1)
        .assert_stderr_contains("server: b.txt: no such file or directory");
    server
        .run_with(&[&"up", &got, &"new.txt"], &reader)
        .assert_code(1)
        .assert_stderr_contains("read-only");

    // The writer uploads into root b, and downloads nothing, not even
    // what it just sent.
    server
        .run_with(&[&"up", &got, &"sent.txt"], &writer)
        .assert_success();
    assert_eq!(fs::read(site.b.join("sent.txt")).unwrap(), b"in root a\n");
    for path in ["b.txt", "sent.txt", "a.txt"] {
        server
            .run_with(&[&"down", &path, &site.scratch.join("w")], &writer)
            .assert_code(1)
            .assert_stderr_contains("write-only");
    }
    assert_eq!(Site::names(&site.a), ["a.txt"]);
    assert_eq!(Site::names(&site.b), ["b.txt", "sent.txt"]);

    server
        .run_with(&[&"down", &"a.txt", &got], &with_token("neither"))
        .assert_code(1)
        .assert_stderr_contains("authentication failed");
    // The log says which token each session proved.
    assert!(server.wait_for_log("token=reader", ERROR_TIMEOUT));
    assert!(server.wait_for_log("token=writer", ERROR_TIMEOUT));
    let out = server.stdout();
    assert!(
        out.contains(&format!(
            "token reader: root a ({}), read-only",
            site.a.canonicalize().unwrap().display()
        )),
        "{out}"
    );
}

/// `ferry server --config FILE` that is expected not to start.
fn refused_start(site: &Site) -> Output {
    run_timeout(
        &[
            &"server",
            &"--port",
            &"0",
            &"--state-dir",
            &site.state,
            &"--config",
            &site.config,
        ],
        ERROR_TIMEOUT,
    )
}

/// The one line on stderr.
#[track_caller]
fn one_line(out: &Output) -> &str {
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr\n{out}");
    lines[0]
}

#[test]
fn unknown_keys_are_refused_naming_the_file_and_the_key() {
    let site = Site::new();
    let file = site.config.display().to_string();
    for (text, key, line) in [
        ("[server]\ncolour = \"blue\"\n", "colour", 2),
        (
            "[roots]\na = \"/srv\"\n[[token]]\nname = \"t\"\ntoken = \"inline\"\n",
            "token",
            5,
        ),
        ("[rots]\na = \"/srv\"\n", "rots", 1),
    ] {
        site.write_config(text);
        let out = refused_start(&site);
        out.assert_code(2);
        let line_text = one_line(&out);
        for needle in [
            &file,
            &format!("line {line}"),
            &format!("unknown field `{key}`"),
        ] {
            assert!(line_text.contains(needle.as_str()), "{needle:?}\n{out}");
        }
    }
    // Per-token options and a configuration file do not mix.
    site.configure(&[("reader", "a", "read-only")]);
    let out = run_timeout(
        &[
            &"server",
            &"--config",
            &site.config,
            &"--read-only",
            &"--port",
            &"0",
        ],
        ERROR_TIMEOUT,
    );
    out.assert_code(2).assert_stderr_contains("--read-only");
}

#[test]
fn token_files_others_may_read_and_configurations_others_may_change_are_refused() {
    let site = Site::new();
    site.configure(&[("reader", "a", "read-only"), ("writer", "b", "write-only")]);
    let loose = site.token_file("writer");
    set_mode(&loose, 0o644);
    let out = refused_start(&site);
    out.assert_code(1);
    let line = one_line(&out);
    assert!(line.contains("token writer"), "{out}");
    assert!(
        line.contains(&format!("chmod 600 {}", loose.display())),
        "{out}"
    );
    assert!(!site.state.join("server-key.pem").exists(), "not started");

    set_mode(&loose, 0o600);
    set_mode(&site.config, 0o666);
    let out = refused_start(&site);
    out.assert_code(1);
    assert!(one_line(&out).contains("chmod go-w"), "{out}");
}

#[test]
fn sighup_gives_new_sessions_the_new_policy_while_a_running_one_completes() {
    let site = Site::new();
    site.configure(&[("writer", "a", "read-write")]);
    let server = site.start();
    let token = with_token(WRITER);

    // An upload paced to take about 4 s, under the first policy.
    let big = site.scratch.join("big.bin");
    write_random_file(&big, MIB, 71);
    let mut args = vec![
        "up".into(),
        big.clone().into_os_string(),
        "slow.bin".into(),
        "--bwlimit".into(),
        "256K".into(),
    ];
    args.extend(server.client_args());
    let args: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as _).collect();
    let slow = spawn(&args, &token);
    assert!(
        server.wait_for_log("upload to slow.bin", ERROR_TIMEOUT),
        "{}",
        server.stderr()
    );

    // The same token now reads root b, and only reads.
    site.configure(&[("writer", "b", "read-only")]);
    server.signal(Signal::HUP);
    assert!(
        server.wait_for_log("reloaded", ERROR_TIMEOUT),
        "{}",
        server.stderr()
    );
    let got = site.scratch.join("got");
    server
        .run_with(&[&"down", &"b.txt", &got], &token)
        .assert_success();
    assert_eq!(fs::read(&got).unwrap(), b"in root b\n");
    server
        .run_with(&[&"up", &got, &"after.txt"], &token)
        .assert_code(1)
        .assert_stderr_contains("read-only");
    server
        .run_with(&[&"down", &"a.txt", &site.scratch.join("x")], &token)
        .assert_code(1)
        .assert_stderr_contains("no such file or directory");

    // The upload that started before goes on where and as it started.
    slow.wait(DEFAULT_TIMEOUT).assert_success();
    assert_files_equal(&big, &site.a.join("slow.bin"));
    assert!(!site.b.join("slow.bin").exists());
    // The server logs its summary a moment after the client has exited.
    assert!(
        server.wait_for_log("upload complete: 1 ok", ERROR_TIMEOUT),
        "{}",
        server.stderr()
    );
    let log = server.stderr();
    let reloaded = log.find("reloaded").unwrap();
    let completed = log.find("upload complete: 1 ok").unwrap();
    assert!(reloaded < completed, "the upload spanned the reload\n{log}");
}

#[test]
fn a_configuration_that_fails_on_reload_leaves_the_one_in_force() {
    let site = Site::new();
    site.configure(&[("writer", "a", "read-write")]);
    let server = site.start();
    let token = with_token(WRITER);
    let file = site.scratch.join("file.txt");
    write_file(&file, b"kept policy\n");

    // Each failure: the file as it now is, and what the log line says.
    let loose = site.token_file("writer");
    let failures: [(&dyn Fn(), &str); 3] = [
        (
            &|| site.write_config("[server]\nport = 1\nmode = \"write-only\"\n"),
            "line 3: unknown field `mode`",
        ),
        (
            &|| {
                site.configure(&[("writer", "b", "read-only")]);
                set_mode(&loose, 0o640);
            },
            "token writer",
        ),
        (
            &|| {
                set_mode(&loose, 0o600);
                let text = fs::read_to_string(&site.config).unwrap();
                site.write_config(&text.replace(&format!("{:?}", site.b), "\"/nonexistent/b\""));
            },
            "root b: /nonexistent/b: no such file or directory",
        ),
    ];
    for (n, (break_it, cause)) in failures.iter().enumerate() {
        break_it();
        server.signal(Signal::HUP);
        let failed = poll_until(ERROR_TIMEOUT, || {
            let log = server.stderr();
            let lines: Vec<String> = log
                .lines()
                .filter(|l| l.contains("reload failed"))
                .map(str::to_string)
                .collect();
            (lines.len() > n).then(|| lines[n].clone())
        });
        let line = failed.unwrap_or_else(|| panic!("no reload failure {n}\n{}", server.stderr()));
        assert!(line.contains(&site.config.display().to_string()), "{line}");
        assert!(line.contains(cause), "{cause:?} in {line}");
        assert!(line.contains("stays in force"), "{line}");

        // The policy from the start still holds: read-write in root a.
        let name = format!("kept-{n}.txt");
        server
            .run_with(&[&"up", &file, &name], &token)
            .assert_success();
        assert_eq!(fs::read(site.a.join(&name)).unwrap(), b"kept policy\n");
    }

    // Once the file is right again, a reload applies it.
    site.configure(&[("writer", "b", "read-only")]);
    server.signal(Signal::HUP);
    assert!(
        server.wait_for_log("reloaded", ERROR_TIMEOUT),
        "{}",
        server.stderr()
    );
    server
        .run_with(&[&"up", &file, &"late.txt"], &token)
        .assert_code(1)
        .assert_stderr_contains("read-only");
    assert!(!site.a.join("late.txt").exists() && !site.b.join("late.txt").exists());
}

#[test]
fn command_line_options_override_the_file() {
    let site = Site::new();
    site.configure(&[("writer", "a", "read-write")]);
    let (from_file, from_flag) = (
        site.scratch.join("file-state"),
        site.scratch.join("flag-state"),
    );
    let log = site.scratch.join("server.log");
    let text = fs::read_to_string(&site.config).unwrap();
    site.write_config(&format!(
        "[server]\nstate_dir = {from_file:?}\nlog_file = {log:?}\n\n{text}"
    ));
    let server = Server::start_config(
        &site.config,
        &[&"--state-dir", &from_flag],
        &RunOptions::default(),
    );
    assert!(
        from_flag.join("server-key.pem").exists(),
        "--state-dir wins"
    );
    assert!(!from_file.exists(), "the file's state_dir is overridden");
    // What no option says, the file does.
    assert!(
        poll_until(ERROR_TIMEOUT, || fs::read_to_string(&log)
            .ok()
            .filter(|l| l.contains("listening on"))
            .map(drop))
        .is_some(),
        "the file's log_file"
    );
    drop(server);
    let help = run(&[&"server", &"--help"]);
    help.assert_success();
    // However --help wraps it, it says which wins.
    let words = help.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        words.contains("Options given here override the file's [server] settings"),
        "{help}"
    );
}

#[test]
fn a_service_without_a_home_keeps_its_state_in_state_directory() {
    let site = Site::new();
    let root = site.scratch.mkdir("served");
    let homeless = |opts: RunOptions| RunOptions {
        unset: vec![
            "HOME".into(),
            "XDG_CONFIG_HOME".into(),
            "STATE_DIRECTORY".into(),
        ],
        ..opts
    };
    // As systemd starts it with StateDirectory=ferry.
    let mut opts = homeless(RunOptions::default());
    opts.env
        .push(("STATE_DIRECTORY".into(), site.state.clone().into()));
    let server = Server::start_as(&root, &[], &opts);
    for made in ["server-key.pem", "server-cert.pem", "token"] {
        assert!(site.state.join(made).exists(), "{made} in $STATE_DIRECTORY");
    }
    assert!(
        server
            .stdout()
            .contains(&site.state.join("token").display().to_string())
    );
    // A client of the same user finds the token there.
    let file = site.scratch.join("f.txt");
    write_file(&file, b"homeless\n");
    server
        .run(&[&"up", &file, &"f.txt", &"--state-dir", &site.state])
        .assert_success();
    assert_eq!(fs::read(root.join("f.txt")).unwrap(), b"homeless\n");
    drop(server);

    // Not root, and nothing to go by: the message names the option.
    let opts = homeless(unprivileged(&site.scratch));
    let out = run_with(
        &[&"server", &"--port", &"0", &"--root", &root],
        &RunOptions {
            timeout: ERROR_TIMEOUT,
            ..opts
        },
    );
    out.assert_code(1);
    assert!(one_line(&out).contains("pass --state-dir DIR"), "{out}");
}

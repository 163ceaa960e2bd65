//! The command line itself: usage errors, the one table of exit statuses
//! (the code, `--help`, the man page and the README agree), options shown
//! only where they act, and the generated completion scripts and man page.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::*;

/// Each exit status and what it means.
type Statuses = BTreeMap<u8, String>;

/// The subcommands, with their aliases: completions and the man page name them all.
const SUBCOMMANDS: [&str; 9] = [
    "server",
    "upload",
    "up",
    "download",
    "down",
    "copy",
    "cp",
    "completions",
    "man",
];

#[track_caller]
fn assert_usage_error(args: &[&dyn AsRef<std::ffi::OsStr>], clap_says: &str) {
    let out = run_timeout(args, ERROR_TIMEOUT);
    out.assert_code(2).assert_stderr_contains(clap_says);
    assert!(
        out.stdout.is_empty(),
        "a usage error prints on stderr\n{out}"
    );
}

#[test]
fn usage_errors_exit_2_with_claps_message() {
    let scratch = Scratch::new();
    let file = scratch.path().join("file.txt");
    write_file(&file, b"x\n");
    assert_usage_error(
        &[&"up", &file, &"x", &"--bogus"],
        "error: unexpected argument '--bogus' found",
    );
    assert_usage_error(
        &[&"up", &file],
        "error: the following required arguments were not provided",
    );
    assert_usage_error(
        &[&"up", &file, &"x", &"--streams", &"99"],
        "error: invalid value '99' for '--streams <N>'",
    );
    assert_usage_error(
        &[&"server", &"--keep-parts", &"7w"],
        "error: invalid value '7w' for '--keep-parts <AGE>'",
    );
    assert_usage_error(
        &[&"completions", &"tcsh"],
        "error: invalid value 'tcsh' for '<SHELL>'",
    );
    assert_usage_error(&[], "Usage: ferry <COMMAND>");
}

/// `--devices` acts only where this process receives: a download, or `cp`
/// to a local destination. An upload has no such option, and `cp` to
/// HOST:PATH refuses it before it connects anywhere.
#[test]
fn devices_is_offered_only_where_this_side_receives() {
    for (command, offered) in [
        ("up", false),
        ("down", true),
        ("cp", true),
        ("server", true),
    ] {
        let help = run(&[&command, &"--help"]);
        help.assert_success();
        assert_eq!(
            help.stdout.contains("--devices"),
            offered,
            "ferry {command} --help\n{help}"
        );
    }
    let scratch = Scratch::new();
    let file = scratch.path().join("file.txt");
    write_file(&file, b"x\n");
    assert_usage_error(
        &[&"up", &file, &"x", &"--devices"],
        "unexpected argument '--devices'",
    );
    // A name that cannot resolve: had it tried to connect, the error would
    // be a failure (1), not this.
    let remote = "ferry-no-such-host.invalid:x";
    assert_usage_error(
        &[&"cp", &file, &remote, &"--devices", &"--retries", &"0"],
        "the server decides (`ferry server --devices`)",
    );
}

/// The statuses `ferry --help` lists, and that every one the source
/// returns is among them, and none else; the README's table says the same.
#[test]
fn help_and_readme_list_every_exit_status_the_code_returns() {
    let returned = statuses_in_source();
    assert!(returned.len() >= 5, "{returned:?}");
    let help = help_statuses();
    let documented: BTreeSet<u8> = help.keys().copied().collect();
    assert_eq!(
        documented, returned,
        "`ferry --help` lists these exit statuses, the source returns those"
    );
    assert_eq!(
        readme_statuses(),
        help,
        "the README's exit status table and `ferry --help` differ"
    );
}

/// The exit statuses `ferry --help` lists: rows that start at column 2
/// with the code, each continued on the lines indented under it.
fn help_statuses() -> Statuses {
    // Not a terminal: clap wraps to COLUMNS, which the table already fits.
    let opts = RunOptions {
        env: vec![("COLUMNS".into(), "100".into())],
        ..RunOptions::default()
    };
    let out = run_with(&[&"--help"], &opts);
    out.assert_success();
    let table = out
        .stdout
        .split_once("\nExit status:\n")
        .unwrap_or_else(|| panic!("no 'Exit status:' in --help\n{out}"))
        .1;
    let mut statuses = Statuses::new();
    let mut last = None;
    for line in table.lines().take_while(|l| !l.trim().is_empty()) {
        let row = line.strip_prefix("  ").filter(|r| !r.starts_with(' '));
        match row.and_then(|r| r.split_once(' ')) {
            Some((code, meaning)) => {
                let code: u8 = code.parse().unwrap_or_else(|_| panic!("row {line:?}"));
                statuses.insert(code, meaning.to_string());
                last = Some(code);
            }
            None => {
                let code = last.unwrap_or_else(|| panic!("continued row first: {line:?}"));
                let meaning = statuses.get_mut(&code).unwrap();
                meaning.push(' ');
                meaning.push_str(line);
            }
        }
    }
    normalized(statuses)
}

/// The rows of the table under the README's "### Exit status".
fn readme_statuses() -> Statuses {
    let readme = fs::read_to_string(workspace().join("README.md")).unwrap();
    let section = readme
        .split_once("### Exit status\n")
        .expect("README.md has an '### Exit status' section")
        .1;
    let mut statuses = Statuses::new();
    for line in section.lines().take_while(|l| !l.starts_with('#')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if let [_, code, meaning, _] = cells.as_slice()
            && let Ok(code) = code.parse::<u8>()
        {
            statuses.insert(code, meaning.to_string());
        }
    }
    normalized(statuses)
}

fn normalized(statuses: Statuses) -> Statuses {
    let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    statuses.into_iter().map(|(c, m)| (c, words(&m))).collect()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every exit status the binary's source can return, read off it the way
/// a reviewer would: `ExitCode::SUCCESS` and `ExitCode::FAILURE`, and the
/// `exit::` constant in each `ExitCode::from(..)` and `process::exit(..)`,
/// its value looked up in `exit.rs`. A status written as a bare number
/// fails the test: it would escape the table.
fn statuses_in_source() -> BTreeSet<u8> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let constants = exit_constants(&fs::read_to_string(src.join("exit.rs")).unwrap());
    let mut statuses = BTreeSet::new();
    for file in fs::read_dir(&src).unwrap() {
        let path = file.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        let code = text.lines().filter(|l| !l.trim_start().starts_with("//"));
        for line in code {
            for (at, _) in line.match_indices("ExitCode::") {
                let rest = &line[at + "ExitCode::".len()..];
                let status = match rest.split_once('(') {
                    _ if rest.starts_with("SUCCESS") => 0,
                    _ if rest.starts_with("FAILURE") => 1,
                    Some(("from", arg)) => named(arg, &constants, line),
                    _ => panic!("{}: {line:?}: not a status", path.display()),
                };
                statuses.insert(status);
            }
            for (at, _) in line.match_indices("process::exit(") {
                let arg = &line[at + "process::exit(".len()..];
                statuses.insert(named(arg, &constants, line));
            }
        }
    }
    statuses
}

/// The value of the `exit::NAME` that `arg` starts with (perhaps inside
/// `i32::from(..)`).
fn named(arg: &str, constants: &BTreeMap<String, u8>, line: &str) -> u8 {
    let arg = arg.strip_prefix("i32::from(").unwrap_or(arg);
    let name: String = arg
        .strip_prefix("exit::")
        .unwrap_or_else(|| panic!("{line:?}: name the status in exit.rs (exit::NAME)"))
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    *constants
        .get(&name)
        .unwrap_or_else(|| panic!("{line:?}: no exit::{name} in exit.rs"))
}

/// `pub const NAME: u8 = N;` in exit.rs.
fn exit_constants(exit_rs: &str) -> BTreeMap<String, u8> {
    let constants: BTreeMap<String, u8> = exit_rs
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split_once(": u8 = "))
        .map(|(name, value)| {
            let value = value.trim_end_matches(';').parse().expect("a u8 literal");
            (name.to_string(), value)
        })
        .collect();
    assert!(constants.len() >= 4, "{constants:?}");
    constants
}

/// Runs `program ARGS`; `None` if it is not installed.
fn try_tool(program: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Option<std::process::Output> {
    match Command::new(program).args(args).output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("note: {program} is not installed; its check is skipped");
            None
        }
        Err(e) => panic!("{program}: {e}"),
    }
}

#[test]
fn completion_scripts_name_every_command_and_option() {
    let scratch = Scratch::new();
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&[&"completions", &shell]);
        out.assert_success();
        let script = &out.stdout;
        assert!(script.len() > 1000, "{shell}: {script}");
        for command in SUBCOMMANDS {
            assert!(script.contains(command), "{shell} script lacks {command}");
        }
        for option in ["exclude", "bwlimit", "read-only"] {
            // fish: `complete ... -l exclude`
            let named = match shell {
                "fish" => format!("-l {option} "),
                _ => format!("--{option}"),
            };
            assert!(script.contains(&named), "{shell} script lacks {named}");
        }
        let file = scratch.path().join(format!("ferry.{shell}"));
        write_file(&file, script.as_bytes());
        // Each shell checks its syntax without running it, where installed.
        if let Some(check) = try_tool(shell, &[&"-n", &file]) {
            assert!(check.status.success(), "{shell} -n: {check:?}");
        }
        if shell == "fish" {
            fish_completes_options(&file);
        }
    }
}

/// Loaded in fish, the script completes an upload's options (fish asked
/// as if the user pressed Tab), where fish is installed.
fn fish_completes_options(script: &Path) {
    let line = format!(
        "source '{}'; complete -C 'ferry up --exc'",
        script.display()
    );
    let Some(out) = try_tool("fish", &[&"-c", &line]) else {
        return;
    };
    assert!(out.status.success(), "{out:?}");
    let offered: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(offered, ["--exclude", "--exclude-from"], "{out:?}");
}

/// What the bash script completes for `ferry WORDS...` (the last word is
/// the one being typed).
fn bash_completes(script: &Path, words: &[&str]) -> Vec<String> {
    let line = format!(
        "source {script}; COMP_WORDS=({words}); COMP_CWORD={cword}; \
         _ferry ferry '{current}' '{previous}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script = script.display(),
        words = words
            .iter()
            .map(|w| format!("'{w}'"))
            .collect::<Vec<_>>()
            .join(" "),
        cword = words.len() - 1,
        current = words[words.len() - 1],
        previous = words[words.len() - 2],
    );
    let out = Command::new("bash").arg("-c").arg(&line).output().unwrap();
    assert!(out.status.success(), "{line}\n{out:?}");
    // No completion prints one empty line.
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Sourced in bash, the script completes commands and each command's own
/// options: `--devices` for a download, never for an upload.
#[test]
fn the_bash_script_completes_commands_and_their_options() {
    let scratch = Scratch::new();
    let out = run(&[&"completions", &"bash"]);
    out.assert_success();
    let script = scratch.path().join("ferry.bash");
    write_file(&script, out.stdout.as_bytes());
    let commands = bash_completes(&script, &["ferry", ""]);
    for command in SUBCOMMANDS {
        assert!(commands.iter().any(|c| c == command), "{commands:?}");
    }
    assert_eq!(
        bash_completes(&script, &["ferry", "up", "--exc"]),
        ["--exclude", "--exclude-from"]
    );
    assert_eq!(
        bash_completes(&script, &["ferry", "down", "--dev"]),
        ["--devices"]
    );
    assert_eq!(
        bash_completes(&script, &["ferry", "up", "--dev"]),
        [] as [&str; 0]
    );
    assert_eq!(
        bash_completes(&script, &["ferry", "completions", "z"]),
        ["zsh"]
    );
}

#[test]
fn the_man_page_has_every_command_and_the_exit_statuses() {
    let out = run(&[&"man"]);
    out.assert_success();
    let page = &out.stdout;
    // roff's preamble (defining the apostrophe) may come first, then the title.
    let first = page
        .lines()
        .find(|l| !l.starts_with(".ie") && !l.starts_with(".el"));
    assert!(
        first.is_some_and(|l| l.starts_with(".TH FERRY 1 ")),
        "{first:?}"
    );
    for command in ["server", "upload", "download", "copy", "completions", "man"] {
        let heading = format!("\n.SS \"ferry {command}");
        assert!(page.contains(&heading), "no {heading:?} in the man page");
    }
    for option in ["--exclude", "--read-only", "--bwlimit", "--devices"] {
        assert!(page.contains(&option.replace('-', "\\-")), "{option}");
    }
    assert_eq!(man_statuses(page), readme_statuses());
    let scratch = Scratch::new();
    let file = scratch.path().join("ferry.1");
    write_file(&file, page.as_bytes());
    // groff reads it as a man page, with every warning on.
    let Some(check) = try_tool("groff", &[&"-man", &"-Tutf8", &"-ww", &"-z", &file]) else {
        return;
    };
    assert!(
        check.status.success() && check.stderr.is_empty(),
        "groff: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// The `.TP` entries under `.SH "EXIT STATUS"`: the code in bold, then
/// what it means.
fn man_statuses(page: &str) -> Statuses {
    let section = page
        .split_once(".SH \"EXIT STATUS\"\n")
        .expect("an EXIT STATUS section")
        .1;
    let section = section.split("\n.SH").next().unwrap();
    let mut statuses = Statuses::new();
    for entry in section.split(".TP\n").skip(1) {
        let (code, meaning) = entry.split_once('\n').unwrap();
        let code = code
            .strip_prefix("\\fB")
            .and_then(|c| c.strip_suffix("\\fR"))
            .unwrap_or_else(|| panic!("{code:?}"));
        statuses.insert(code.parse().unwrap(), meaning.replace("\\-", "-"));
    }
    normalized(statuses)
}

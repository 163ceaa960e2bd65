//! The man page and the shell completion scripts, generated from the clap
//! definition (clap_mangen, clap_complete) so that they cannot drift from
//! `--help`: `ferry man` and `ferry completions SHELL` print them.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, roman};

use crate::cli::{Cli, CompletionShell, EXAMPLES};
use crate::exit;

/// One of clap_mangen's sections, rendered on its own.
type Section = fn(&Man, &mut dyn Write) -> io::Result<()>;

/// The completion script for `shell`.
pub fn completions(shell: CompletionShell) -> Vec<u8> {
    use clap_complete::Shell;
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "ferry", &mut script);
    script
}

/// One page, ferry(1): what `ferry --help` says, then each command with
/// its synopsis and options (as `ferry COMMAND --help` says them), the
/// examples and the exit statuses.
pub fn man_page() -> Vec<u8> {
    // The help subcommand is for the terminal; bin names ("ferry upload")
    // are set by building the whole tree.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    // No date: a generated page would have the day it was printed. An
    // empty argument must be written `""`, or the next one takes its place.
    let man = Man::new(cmd.clone()).title("FERRY").date("\"\"");
    let mut page = Vec::new();
    let top: [Section; 5] = [
        Man::render_title,
        Man::render_name_section,
        Man::render_synopsis_section,
        Man::render_description_section,
        Man::render_options_section,
    ];
    for (i, section) in top.into_iter().enumerate() {
        append(&mut page, &man, section, i == 0, true);
    }
    page.extend_from_slice(b".SH COMMANDS\n");
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        page.extend(command_section(sub));
    }
    page.extend(examples_and_exit_statuses().to_roff().into_bytes());
    append(&mut page, &man, Man::render_version_section, false, true);
    page
}

/// A section of `man` rendered by clap_mangen, added to `page`. Each comes
/// with the roff preamble (which defines the apostrophe): only the first
/// one keeps it. Without `headings`, its `.SH` lines are left out, for the
/// parts of a command's own subsection.
fn append(page: &mut Vec<u8>, man: &Man, section: Section, preamble: bool, headings: bool) {
    let mut out = Vec::new();
    section(man, &mut out).expect("writing to memory does not fail");
    let text = String::from_utf8_lossy(&out);
    let mut lines: Vec<&str> = text.lines().collect();
    if !preamble {
        lines.retain(|l| !l.starts_with(".ie \\n(.g .ds Aq") && !l.starts_with(".el .ds Aq"));
    }
    if !headings {
        lines.retain(|l| !l.starts_with(".SH "));
    }
    for line in lines {
        page.extend_from_slice(line.as_bytes());
        page.push(b'\n');
    }
}

/// `ferry COMMAND`: a subsection with its synopsis, description and
/// options.
fn command_section(sub: &clap::Command) -> Vec<u8> {
    let name = sub.get_bin_name().unwrap_or_else(|| sub.get_name());
    let aliases: Vec<&str> = sub.get_visible_aliases().collect();
    let heading = match aliases.as_slice() {
        [] => name.to_string(),
        _ => format!("{name} (alias: {})", aliases.join(", ")),
    };
    let mut out = Roff::new()
        .control("SS", [heading.as_str()])
        .to_roff()
        .into_bytes();
    let man = Man::new(sub.clone());
    append(&mut out, &man, Man::render_synopsis_section, false, false);
    out.extend_from_slice(b".PP\n");
    append(
        &mut out,
        &man,
        Man::render_description_section,
        false,
        false,
    );
    append(&mut out, &man, Man::render_options_section, false, false);
    out
}

/// EXAMPLES and EXIT STATUS, from the tables `--help` shows.
fn examples_and_exit_statuses() -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["EXAMPLES"]).control("nf", []);
    for example in EXAMPLES {
        roff.text([roman(example)]);
    }
    roff.control("fi", []).control("SH", ["EXIT STATUS"]);
    for (code, meaning) in exit::TABLE {
        roff.control("TP", [])
            .text([bold(code.to_string())])
            .text([roman(meaning)]);
    }
    roff
}

/// Write what was generated to stdout. A reader that stops early (`| head`)
/// is not an error.
pub fn print(bytes: &[u8]) -> ExitCode {
    let mut stdout = io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: cannot write to stdout: {e}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

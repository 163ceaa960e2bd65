//! The exit statuses, and the one table that says what they mean: `--help`,
//! the man page and the README's "Exit status" show it, and a test checks
//! that the four agree with the statuses the code returns (every
//! `ExitCode::from` and `process::exit` names one of these constants).

/// Some file failed, or the command could not run or finish.
pub const FAILURE: u8 = 1;
/// What was typed cannot be run (clap's convention).
pub const USAGE: u8 = 2;
/// Some source entries vanished while the tree was read (as rsync's 24).
pub const VANISHED: u8 = 24;
/// `--delete` (or `--atomic`) held back by `--max-delete` (as rsync's 25).
pub const MAX_DELETE: u8 = 25;
/// Interrupted (^C): 128 + SIGINT, as shells report it.
pub const INTERRUPTED: u8 = 130;

/// Each status and what it means, as `--help`, the man page and the README
/// say it. 0 is `ExitCode::SUCCESS`.
pub const TABLE: [(u8, &str); 6] = [
    (
        0,
        "success: everything arrived (a server stopped by SIGINT or SIGTERM exits 0 too)",
    ),
    (
        FAILURE,
        "some file failed, or the transfer could not run or finish (no server, refused path, \
         retries spent) or the server could not start; the cause is printed",
    ),
    (
        USAGE,
        "usage error: an unknown option, a missing argument or an invalid value",
    ),
    (
        VANISHED,
        "some source entries vanished while the tree was read; everything else arrived",
    ),
    (
        MAX_DELETE,
        "--delete deleted nothing (or --atomic published nothing) because more than \
         --max-delete entries would have gone; everything else arrived",
    ),
    (
        INTERRUPTED,
        "interrupted (Ctrl-C): files in place stay, large ones keep their verified part; run \
         the same command again to resume",
    ),
];

/// The table as `--help` shows it: one row per status, the meaning
/// wrapped under itself to fit 80 columns (clap leaves lines that fit as
/// they are).
pub fn help_table() -> String {
    const WIDTH: usize = 78;
    const INDENT: usize = 7;
    let mut out = String::new();
    for (code, meaning) in TABLE {
        let mut line = format!("  {code:<4} ");
        for word in meaning.split_whitespace() {
            if line.len() > INDENT && line.len() + 1 + word.len() > WIDTH {
                out.push_str(line.trim_end());
                out.push('\n');
                line = " ".repeat(INDENT);
            } else if !line.ends_with(' ') {
                line.push(' ');
            }
            line.push_str(word);
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_help_table_fits_80_columns_and_keeps_every_word() {
        let table = help_table();
        assert!(table.lines().all(|l| l.len() <= 78), "{table}");
        let words: Vec<&str> = table.split_whitespace().collect();
        let expected: Vec<String> = TABLE
            .iter()
            .flat_map(|(code, meaning)| {
                std::iter::once(code.to_string())
                    .chain(meaning.split_whitespace().map(str::to_string))
            })
            .collect();
        assert_eq!(words, expected);
        // A row starts at column 2; its continuation is indented further.
        let rows = table.lines().filter(|l| !l.starts_with("   ")).count();
        assert_eq!(rows, TABLE.len(), "{table}");
    }
}

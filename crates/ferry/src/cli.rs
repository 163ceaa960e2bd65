//! Command-line arguments as typed (clap). They are turned into validated
//! operations in `main.rs`; nothing below the binary sees clap.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgMatches, Args, Parser, Subcommand, ValueHint};
use ferry_engine::{Compression, FilterRule, RuleKind};

pub const DEFAULT_PORT: u16 = 8834;

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    subcommand_value_name = "COMMAND",
    about = "Move files and directory trees between Linux servers: fast, verified, safe.",
    long_about = "Move files and directory trees between Linux servers: fast, verified, safe.\n\n\
        Run `ferry server` on one machine, then `ferry upload` or `ferry download` from another. \
        Directories are copied recursively with their structure, modes, mtimes and symlinks; \
        every chunk is checked with XXH3 and every file with a whole-file digest before it \
        appears under its name.",
    after_help = after_help()
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve uploads and downloads below a root directory.
    Server(ServerArgs),
    /// Send a local file or directory to a server.
    #[command(visible_alias = "up")]
    Upload(UploadArgs),
    /// Fetch a file or directory from a server.
    #[command(visible_alias = "down")]
    Download(DownloadArgs),
    /// Copy like scp: either side may be HOST:PATH; both local copies through an in-process server.
    #[command(visible_alias = "cp")]
    Copy(CopyArgs),
    /// Print a shell completion script: `ferry completions bash > /etc/bash_completion.d/ferry`.
    Completions(CompletionsArgs),
    /// Print the man page (roff): `ferry man > /usr/local/share/man/man1/ferry.1`.
    Man,
}

/// The examples `--help` and the man page show.
pub const EXAMPLES: [&str; 5] = [
    "ferry server --host 0.0.0.0 --port 8834",
    "ferry upload ./website production/website --host deploy.example.com",
    "ferry download backup/www_20260101 ./restore --host backup.example.com",
    "ferry cp ./data 10.0.1.100:datasets/data",
    "ferry cp ./a ./b                      # local copy through the same pipeline",
];

/// What `ferry --help` shows after the commands: the examples and the
/// exit statuses.
fn after_help() -> String {
    let mut text = String::from("Examples:\n");
    for example in EXAMPLES {
        text.push_str(&format!("  {example}\n"));
    }
    text.push_str("\nExit status:\n");
    text.push_str(&crate::exit::help_table());
    text
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on. Use 0.0.0.0 to accept connections from the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free port (the address is printed).
    #[arg(long, short = 'p', default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Directory served: every remote path is relative to it and confined to it [default: current directory].
    #[arg(long, value_hint = ValueHint::DirPath)]
    pub root: Option<PathBuf>,
    /// Also append the log to this file.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// End a session that makes no progress (no file data verified, no entry settled) for this many seconds; its resumable part files stay.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
    /// Drop a connection that has not finished its handshake (TLS and authentication included) within this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub handshake_timeout: u64,
    /// Remove part files of interrupted uploads once untouched for this long (e.g. 36h, 7d, 0 = never); checked at start and hourly.
    #[arg(long, value_name = "AGE", default_value = "7d", value_parser = parse_age)]
    pub keep_parts: std::time::Duration,
    /// Serve downloads only: uploads are refused, nothing below the root is changed.
    #[arg(long, conflicts_with = "write_only")]
    pub read_only: bool,
    /// Accept uploads only: downloads are refused, nothing below the root is sent out.
    #[arg(long)]
    pub write_only: bool,
    /// Recreate the device nodes clients upload (when running as root). Off by default: a node
    /// opens whatever device it names (a disk, say) to anyone its mode lets in, so any client
    /// allowed to upload could hand local users raw access to this machine's disks.
    #[arg(long)]
    pub devices: bool,
    /// Where the server keeps its TLS key and certificate and its client token (made on first start; clients of the same user find the token there) [default: $XDG_CONFIG_HOME/ferry or ~/.config/ferry].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Serve plain TCP, without TLS: only on a network you trust; clients must use --no-tls too.
    #[arg(long)]
    pub no_tls: bool,
    /// Read the token clients must prove from FILE, which only its owner may read (FERRY_TOKEN, if set, wins). Without either, the server makes one in its state directory, where clients of the same user on this machine find it; others must be handed it.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Serve every client without a token: every local user (on loopback too) and anyone who can connect gets this server's access to its root. Only on a machine and network you trust.
    #[arg(long, conflicts_with = "token_file")]
    pub no_auth: bool,
    /// Memory the sessions may hold at once (e.g. 256M, 2G; at least 32M). A session that would
    /// need more waits (its data connections pause) or is refused as busy until others end.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_size)]
    pub max_memory: u64,
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// Local file or directory to send.
    #[arg(value_hint = ValueHint::AnyPath)]
    pub local: OsString,
    /// Path of the copy on the server, relative to its root. Ending in `/` (or `.`) puts the copy inside that directory.
    pub remote: OsString,
    #[command(flatten)]
    pub remote_opts: RemoteOpts,
    #[command(flatten)]
    pub transfer: TransferOpts,
}

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// Path on the server, relative to its root.
    pub remote: OsString,
    /// Local path of the copy. Ending in `/` (or `.`) puts the copy inside that directory.
    #[arg(value_hint = ValueHint::AnyPath)]
    pub local: OsString,
    #[command(flatten)]
    pub remote_opts: RemoteOpts,
    #[command(flatten)]
    pub transfer: TransferOpts,
    #[command(flatten)]
    pub receive: ReceiveOpts,
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Source: a local path or HOST:PATH.
    #[arg(value_hint = ValueHint::AnyPath)]
    pub src: OsString,
    /// Destination: a local path or HOST:PATH.
    #[arg(value_hint = ValueHint::AnyPath)]
    pub dst: OsString,
    /// Server port for a HOST:PATH side.
    #[arg(long, short = 'p', default_value_t = DEFAULT_PORT)]
    pub port: u16,
    #[command(flatten)]
    pub transfer: TransferOpts,
    #[command(flatten)]
    pub receive: ReceiveOpts,
}

/// Options for the side that receives, where this client is it: a
/// download, or `cp` to a local destination. An upload has none: the
/// server decides (`ferry server --devices`).
#[derive(Debug, Args)]
pub struct ReceiveOpts {
    /// Recreate device nodes when the copy is received here, as root: a download, or `cp` to a
    /// local destination (for `cp` to HOST:PATH the server decides, with `ferry server
    /// --devices`). Without it they are skipped with a warning; fifos are always recreated.
    #[arg(long)]
    pub devices: bool,
}

#[derive(Debug, Args)]
pub struct RemoteOpts {
    /// Server host name or address.
    #[arg(long, default_value = "localhost", value_hint = ValueHint::Hostname)]
    pub host: String,
    /// Server port.
    #[arg(long, short = 'p', default_value_t = DEFAULT_PORT)]
    pub port: u16,
}

#[derive(Debug, Args)]
pub struct TransferOpts {
    /// Print only errors.
    #[arg(long, short = 'q', conflicts_with_all = ["verbose", "json"])]
    pub quiet: bool,
    /// Print a line for each file.
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// Print NDJSON events on stdout, one object per line: start, file_done, file_unchanged,
    /// resumed, file_incomplete, file_failed, skipped, vanished, retry, progress, summary, error.
    #[arg(long)]
    pub json: bool,
    /// Parallel connections for the transfer (1-16) [default: one per core, at most 8].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16))]
    pub streams: Option<u32>,
    /// Compression: auto (zstd when the link is the bottleneck, raw on loopback and for data that
    /// does not shrink), off, or a zstd level 1-19.
    #[arg(long, default_value = "auto", value_parser = parse_compression, value_name = "auto|off|LEVEL")]
    pub compress: Compression,
    /// Send every file, even those the receiver already has with the same size and mtime.
    #[arg(long, short = 'I')]
    pub ignore_times: bool,
    /// Do not preserve owners. By default a receiver running as root (the server for an upload,
    /// this client for a download) gives each file the user and group ids it has on the sending
    /// side, by number, as `rsync -a --numeric-ids` does; other receivers keep their own.
    #[arg(long)]
    pub no_owner: bool,
    /// After a broken connection, stall or damaged data, try again up to N times in a row without progress (0 = never) [default: 12, about 3 minutes].
    #[arg(long, value_name = "N")]
    pub retries: Option<u32>,
    /// Consider the transfer stalled after this many seconds without progress (no file data sent or verified, no entry settled).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
    /// Trust only the server whose certificate has this fingerprint (as `ferry server` prints it), instead of known_hosts.
    #[arg(long, value_name = "SHA256:...", conflicts_with = "no_tls")]
    pub fingerprint: Option<String>,
    /// Where known_hosts (the fingerprints of servers seen before) is kept, and where this user's own `ferry server` keeps the token this client proves to it [default: $XDG_CONFIG_HOME/ferry or ~/.config/ferry].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Talk plain TCP, without TLS, to a server run with --no-tls: only on a network you trust.
    #[arg(long)]
    pub no_tls: bool,
    /// Read the server's token from FILE, which only its owner may read (FERRY_TOKEN, if set, wins). Without either, this user's own server on this machine is proven the token in the state directory. The token itself never crosses the wire.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Leave out what PATTERN matches: a gitignore-style glob (`*.log` at any depth, `/build/`
    /// anchored to the source's top, a trailing `/` for directories only, `**/node_modules/`,
    /// `!PATTERN` to keep). May be given many times; with --include and --exclude-from, the
    /// first rule that matches an entry decides, as with rsync. A directory left out is not walked.
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// Send what PATTERN matches even if a later --exclude matches it too (see --exclude).
    #[arg(long, value_name = "PATTERN")]
    pub include: Vec<String>,
    /// Read --exclude patterns from FILE, one per line, in gitignore style (`#` comments, blank lines
    /// ignored, `!PATTERN` to keep); they take their place among the other rules where the option stands.
    #[arg(long, value_name = "FILE")]
    pub exclude_from: Vec<PathBuf>,
    /// Also leave out what the .gitignore files of the source tree ignore (each applies below its
    /// directory, the deepest first; --include/--exclude rules come first), as ripgrep and fd do.
    #[arg(long)]
    pub gitignore: bool,
    /// Keep the transfer under RATE bytes per second, all connections together, smoothly (no more
    /// than 50 ms at full speed at a time): e.g. 500K, 50M, 1G (powers of 1024). The sender paces
    /// itself: the server, for a download.
    #[arg(long, value_name = "RATE", value_parser = ferry_engine::pace::parse_rate)]
    pub bwlimit: Option<u64>,
    /// The --include, --exclude and --exclude-from rules in command-line order (see `order_filters`).
    #[arg(skip)]
    pub filters: Vec<FilterRule>,
}

/// Put the filter rules of a transfer command in the order they stand on
/// the command line: the first one that matches decides, so the order
/// between --include and --exclude matters, and clap gives each option's
/// values apart.
pub fn order_filters(cli: &mut Cli, matches: &ArgMatches) -> Result<(), String> {
    let Some((_, sub)) = matches.subcommand() else {
        return Ok(());
    };
    let opts = match &mut cli.command {
        Command::Upload(a) => &mut a.transfer,
        Command::Download(a) => &mut a.transfer,
        Command::Copy(a) => &mut a.transfer,
        Command::Server(_) | Command::Completions(_) | Command::Man => return Ok(()),
    };
    opts.filters = ordered_rules(sub)?;
    Ok(())
}

fn ordered_rules(m: &ArgMatches) -> Result<Vec<FilterRule>, String> {
    // (position on the command line, line in a file, rule)
    let mut rules: Vec<(usize, usize, FilterRule)> = Vec::new();
    for (id, rule) in [
        ("include", RuleKind::Include),
        ("exclude", RuleKind::Exclude),
    ] {
        if let (Some(values), Some(at)) = (m.get_many::<String>(id), m.indices_of(id)) {
            for (pattern, i) in values.zip(at) {
                let pattern = pattern.clone();
                rules.push((i, 0, FilterRule { rule, pattern }));
            }
        }
    }
    if let (Some(files), Some(at)) = (
        m.get_many::<PathBuf>("exclude_from"),
        m.indices_of("exclude_from"),
    ) {
        for (file, i) in files.zip(at) {
            let text = std::fs::read_to_string(file).map_err(|e| {
                format!(
                    "--exclude-from {}: {}",
                    file.display(),
                    ferry_engine::error::reason(&e)
                )
            })?;
            let lines = text.lines().map(str::trim_end).enumerate();
            for (n, line) in lines.filter(|(_, l)| !l.is_empty() && !l.starts_with('#')) {
                let rule = FilterRule {
                    rule: RuleKind::Exclude,
                    pattern: line.to_string(),
                };
                rules.push((i, n + 1, rule));
            }
        }
    }
    rules.sort_by_key(|&(i, n, _)| (i, n));
    Ok(rules.into_iter().map(|(_, _, rule)| rule).collect())
}

/// An age like `90s`, `30m`, `36h`, `7d` (a bare number is seconds); zero
/// means never.
fn parse_age(s: &str) -> Result<std::time::Duration, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| "expected a number with an optional unit: s, m, h or d".to_string())?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err("the unit must be s, m, h or d".into()),
    };
    Ok(std::time::Duration::from_secs(n.saturating_mul(secs)))
}

/// A size like `512M`, `2G`, `65536K` or a bare number of bytes (binary
/// units), at least `MIN_MAX_MEMORY`.
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| "expected a number with an optional unit: K, M or G".to_string())?;
    let shift = match unit {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        _ => return Err("the unit must be K, M or G".into()),
    };
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| "too large".to_string())?;
    let min = ferry_engine::budget::MIN_MAX_MEMORY;
    if bytes < min {
        return Err(format!("at least {}M", min >> 20));
    }
    Ok(bytes)
}

fn parse_compression(s: &str) -> Result<Compression, String> {
    match s {
        "auto" => Ok(Compression::Auto),
        "off" | "none" | "0" => Ok(Compression::Off),
        level => match level.parse::<i32>() {
            Ok(l) if (1..=19).contains(&l) => Ok(Compression::Level(l)),
            _ => Err("expected auto, off, or a level from 1 to 19".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_values() {
        assert_eq!(parse_compression("auto"), Ok(Compression::Auto));
        assert_eq!(parse_compression("off"), Ok(Compression::Off));
        assert_eq!(parse_compression("7"), Ok(Compression::Level(7)));
        assert!(parse_compression("20").is_err());
        assert!(parse_compression("fast").is_err());
    }

    #[test]
    fn ages() {
        use std::time::Duration;
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_age("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_age("0"), Ok(Duration::ZERO));
        assert!(parse_age("7w").is_err());
        assert!(parse_age("d").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(
            parse_size("512M"),
            Ok(ferry_engine::budget::DEFAULT_MAX_MEMORY),
            "the default as --help shows it"
        );
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("65536K"), Ok(64 << 20));
        assert_eq!(parse_size("33554432"), Ok(32 << 20));
        assert!(parse_size("16M").is_err(), "below the minimum");
        assert!(parse_size("1T").is_err());
        assert!(parse_size("M").is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

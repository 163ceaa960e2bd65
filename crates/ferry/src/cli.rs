//! Command-line arguments as typed (clap). They are turned into validated
//! operations in `main.rs`; nothing below the binary sees clap.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgMatches, Args, Parser, Subcommand, ValueHint};
use ferry_engine::{Compression, FilterRule, RuleKind};

pub const DEFAULT_PORT: u16 = 8834;

/// What the copy is called: the rule for upload, download and cp (README).
macro_rules! placement {
    () => {
        "What the copy is called (SRC is the source's name):\n  \
        any source  -> DEST/, DEST/. or .           DEST/SRC, inside it\n  \
        a file      -> DEST, an existing directory  DEST/SRC, inside it (as cp and scp)\n  \
        a file      -> DEST, anything else          DEST itself (a symlink there is replaced, \
        not followed)\n  \
        a directory -> DEST, new or existing        DEST itself (an existing one receives the \
        tree, merged)"
    };
}

/// Which side of `ferry cp` is where (see `spec.rs`).
macro_rules! copy_forms {
    () => {
        "Where each side is:\n  \
        /x, ./x, ../x, .      a local path, always (a local name with a colon: ./a:b)\n  \
        dir/a:b, plain        a local path (no colon before the first slash)\n  \
        HOST:PATH             PATH on the server HOST (a name or IPv4 address), port from --port\n  \
        [IPV6]:PATH           the same with an IPv6 address\n  \
        ferry://HOST:PORT/PATH, ferry://[IPV6]:PORT/PATH   with the port (optional) in the URL\n\n\
        A remote PATH is relative to the server's root (there is no ~), and ferry has no users \
        (no user@). Anything that could be read two ways (::1:x, host:8834:x, host::x) is \
        refused, never guessed."
    };
}

const PLACEMENT: &str = placement!();
const COPY_HELP: &str = concat!(copy_forms!(), "\n\n", placement!());

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
    #[command(visible_alias = "up", after_help = PLACEMENT)]
    Upload(UploadArgs),
    /// Fetch a file or directory from a server.
    #[command(visible_alias = "down", after_help = PLACEMENT)]
    Download(DownloadArgs),
    /// Copy like scp: either side may be HOST:PATH; both local copies through an in-process server.
    #[command(visible_alias = "cp", after_help = COPY_HELP)]
    Copy(CopyArgs),
    /// Back up a directory as a dated snapshot in a directory of snapshots on a server: files
    /// unchanged since the newest snapshot are hard-linked from it (a snapshot costs what
    /// changed), the snapshot appears only once it is whole (an interrupted one is resumed by the
    /// next run), `latest` names the newest, and --keep-* prune the old ones.
    Backup(BackupArgs),
    /// List a file or tree on a server: each entry's mode, size, mtime and path, recursively.
    Ls(LsArgs),
    /// Compare two trees by content, without changing or sending anything: either side may be
    /// HOST:PATH. Lists what is missing from DST, what differs (content, size, mtime, mode, owner,
    /// link target) and what DST has extra; exits 1 if anything differs, 0 if the trees are the
    /// same. The way to verify a backup or a deploy.
    Check(CheckArgs),
    /// Switch a destination published with --atomic back to the version its last publish replaced
    /// (that one is kept in its place: run it again to switch forward).
    Rollback(RollbackArgs),
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

/// How a command that only talks to a server reaches it and trusts it.
#[derive(Debug, Args)]
pub struct ConnectOpts {
    /// Trust only the server whose certificate has this fingerprint (see `ferry upload --help`).
    #[arg(long, value_name = "SHA256:...", conflicts_with = "no_tls")]
    pub fingerprint: Option<String>,
    /// Where known_hosts and this user's server token are kept (see `ferry upload --help`).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Talk plain TCP to a server run with --no-tls.
    #[arg(long)]
    pub no_tls: bool,
    /// Read the server's token from FILE (see `ferry upload --help`).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl ConnectOpts {
    /// Into the options of a transfer (which carry the same).
    pub fn apply(&self, opts: &mut TransferOpts) {
        opts.fingerprint = self.fingerprint.clone();
        opts.state_dir = self.state_dir.clone();
        opts.no_tls = self.no_tls;
        opts.token_file = self.token_file.clone();
    }
}

/// `ferry backup`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    ferry backup /var/www/html backup.example.com:backups/www --keep-daily 7 --keep-weekly 4\n  \
    ferry backup --list backup.example.com:backups/www\n  \
    ferry download backups/www/2026-12-06T031500Z ./restore --host backup.example.com")]
pub struct BackupArgs {
    /// SRC HOST:PATH: the local directory to back up, and the directory of snapshots on the
    /// server (made if missing). With --list, only HOST:PATH.
    #[arg(num_args = 1..=2, required = true, value_name = "PATHS")]
    pub paths: Vec<OsString>,
    /// List the snapshots (name, files, size) instead of making one.
    #[arg(long)]
    pub list: bool,
    /// Keep the newest snapshot of each of the last N days that have one.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the last N weeks that have one.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the last N months that have one. Without any
    /// --keep-*, every snapshot is kept; with some, the others are deleted after each backup
    /// (the newest is always kept).
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Server port [default: 8834]. A port in a ferry:// URL must agree with it.
    #[arg(long, short = 'p')]
    pub port: Option<u16>,
    #[command(flatten)]
    pub transfer: TransferOpts,
}

/// `ferry ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Path on the server, relative to its root (a directory is listed with everything in it).
    pub remote: OsString,
    #[command(flatten)]
    pub remote_opts: RemoteOpts,
    /// Print NDJSON: an `entry` event (path, kind, size, mode, mtime, target) for each entry.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: ConnectOpts,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The tree as it should be: a local path or HOST:PATH.
    pub src: OsString,
    /// The tree to check against it: a local path or HOST:PATH.
    pub dst: OsString,
    /// Server port for a HOST:PATH side [default: 8834]. A port in a ferry:// URL must agree with it.
    #[arg(long, short = 'p')]
    pub port: Option<u16>,
    /// Print NDJSON events: a `changed` (action `created`: missing from DST, `updated`: differs)
    /// or `deleted` (extra in DST) event for each difference, then `summary`.
    #[arg(long)]
    pub json: bool,
    /// Print nothing; the exit status says whether the trees are the same.
    #[arg(long, short = 'q', conflicts_with = "json")]
    pub quiet: bool,
    /// Leave out what PATTERN matches, on both sides (see `ferry upload --help`).
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,
    #[command(flatten)]
    pub connect: ConnectOpts,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The destination of the atomic publish: a path on the server, relative to its root; with
    /// --local, a local directory (the destination of an atomic download or local copy).
    pub path: OsString,
    /// PATH is local: switch it back here, without a server.
    #[arg(long, conflicts_with_all = ["host", "port"])]
    pub local: bool,
    #[command(flatten)]
    pub remote_opts: RemoteOpts,
    #[command(flatten)]
    pub connect: ConnectOpts,
}

/// The server's settings as typed. Those that a configuration file may
/// set too are options here without clap defaults, so that `main` can tell
/// one given on the command line (which wins) from one left out (the
/// file's, else the default named in its help).
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Read settings, roots and tokens from this TOML file (see the README): each token gets its
    /// own root and mode. SIGHUP reloads its roots and tokens; sessions already running keep
    /// what they started with. Options given here override the file's [server] settings; the
    /// per-token ones (--root, --read-only, --write-only, --token-file, --no-auth) cannot be
    /// combined with it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["root", "read_only", "write_only", "append_only", "token_file", "no_auth"])]
    pub config: Option<PathBuf>,
    /// Address to listen on. Use 0.0.0.0 to accept connections from the network [default: 127.0.0.1].
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free port (the address is printed) [default: 8834].
    #[arg(long, short = 'p')]
    pub port: Option<u16>,
    /// Directory served: every remote path is relative to it and confined to it [default: current directory].
    #[arg(long, value_hint = ValueHint::DirPath)]
    pub root: Option<PathBuf>,
    /// Also append the log to this file.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// End a session that makes no progress (no file data verified, no entry settled) for this many seconds; its resumable part files stay [default: 30].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT))]
    pub timeout: Option<u64>,
    /// Drop a connection that has not finished its handshake (TLS and authentication included) within this many seconds [default: 15].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=MAX_HANDSHAKE_TIMEOUT))]
    pub handshake_timeout: Option<u64>,
    /// Remove part files of interrupted uploads once untouched for this long (e.g. 36h, 7d, 0 = never); checked at start and hourly [default: 7d].
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub keep_parts: Option<std::time::Duration>,
    /// Serve downloads only: uploads are refused, nothing below the root is changed.
    #[arg(long, conflicts_with = "write_only")]
    pub read_only: bool,
    /// Accept uploads only: downloads are refused, nothing below the root is sent out.
    #[arg(long)]
    pub write_only: bool,
    /// Never overwrite, truncate or delete anything that exists below the root: clients may
    /// create new files and directories (and download), nothing more. --delete, --atomic and
    /// rollback are refused, a backup's --keep-* too; a new snapshot is fine. For a backup
    /// target that a compromised client cannot destroy.
    #[arg(long, conflicts_with_all = ["read_only", "write_only"])]
    pub append_only: bool,
    /// Recreate the device nodes clients upload (when running as root). Off by default: a node
    /// opens whatever device it names (a disk, say) to anyone its mode lets in, so any client
    /// allowed to upload could hand local users raw access to this machine's disks.
    #[arg(long)]
    pub devices: bool,
    /// Where the server keeps its TLS key and certificate and its client token (made on first start; clients of the same user find the token there) [default: $STATE_DIRECTORY (as systemd sets it), else $XDG_CONFIG_HOME/ferry or ~/.config/ferry, else /var/lib/ferry for root].
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
    /// need more waits (its data connections pause) or is refused as busy until others end
    /// [default: 512M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<u64>,
}

/// The longest `--timeout`, in seconds.
pub const MAX_TIMEOUT: u64 = 86_400;
/// The longest `--handshake-timeout`, in seconds.
pub const MAX_HANDSHAKE_TIMEOUT: u64 = 600;

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// Local file or directory to send.
    #[arg(value_hint = ValueHint::AnyPath)]
    pub local: OsString,
    /// Path of the copy on the server, relative to its root. Ending in `/` (or `.`), or an existing directory for a file, puts the copy inside it (see below).
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
    /// Local path of the copy. Ending in `/` (or `.`), or an existing directory for a file, puts the copy inside it (see below).
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
    /// Source: a local path, HOST:PATH, [IPV6]:PATH or ferry://HOST[:PORT]/PATH.
    #[arg(value_hint = ValueHint::AnyPath)]
    pub src: OsString,
    /// Destination: the same forms.
    #[arg(value_hint = ValueHint::AnyPath)]
    pub dst: OsString,
    /// Server port for a HOST:PATH side [default: 8834]. A port in a ferry:// URL must agree with it.
    #[arg(long, short = 'p')]
    pub port: Option<u16>,
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

#[derive(Debug, Clone, Args)]
pub struct TransferOpts {
    /// Print only errors.
    #[arg(long, short = 'q', conflicts_with_all = ["verbose", "json"])]
    pub quiet: bool,
    /// Print a line for each file.
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// Print NDJSON events on stdout, one object per line: start, file_done, file_unchanged,
    /// resumed, file_incomplete, file_failed, skipped, vanished, changed, deleted, delete_failed,
    /// deletions_held_back, published, not_published, retry, progress, summary, error.
    #[arg(long)]
    pub json: bool,
    /// Parallel connections for the transfer (1-16) [default: one per core, at most 8, widened up
    /// to 8 while more pay, over a loss-based TCP congestion control such as CUBIC].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16))]
    pub streams: Option<u32>,
    /// Compression: auto (zstd when the link is the bottleneck, raw on loopback and for data that
    /// does not shrink), off, or a zstd level 1-19.
    #[arg(long, default_value = "auto", value_parser = parse_compression, value_name = "auto|off|LEVEL")]
    pub compress: Compression,
    /// Send every file, even those the receiver already has with the same size and mtime.
    #[arg(long, short = 'I', conflicts_with = "checksum")]
    pub ignore_times: bool,
    /// Decide "unchanged" by content instead of size and mtime: both sides read each file of
    /// the same size and compare whole-file digests (each on its own thread, at once). A file
    /// whose content is the same is not sent, and gets the sender's mtime.
    #[arg(long, short = 'c')]
    pub checksum: bool,
    /// Send changed files whole. By default, a changed file of 64 KiB or more that the receiver
    /// holds in another version (at the destination, or in a --link-dest tree) is sent as the
    /// parts that differ: the receiver describes its version in content-defined blocks and the
    /// sender sends only the blocks it lacks. Both ends local (`ferry cp ./a ./b`): always whole.
    #[arg(long, short = 'W')]
    pub whole_file: bool,
    /// Do not preserve owners. By default a receiver running as root (the server for an upload,
    /// this client for a download) gives each file the user and group ids it has on the sending
    /// side, by number, as `rsync -a --numeric-ids` does; other receivers keep their own.
    #[arg(long)]
    pub no_owner: bool,
    /// After a broken connection, stall or damaged data, try again up to N times in a row without progress (0 = never) [default: 12, about 3 minutes].
    #[arg(long, value_name = "N")]
    pub retries: Option<u32>,
    /// Consider the transfer stalled after this many seconds without progress (no file data sent or verified, no entry settled).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT))]
    pub timeout: u64,
    /// Trust only the server whose certificate has this fingerprint (as `ferry server` prints it), instead of known_hosts.
    #[arg(long, value_name = "SHA256:...", conflicts_with = "no_tls")]
    pub fingerprint: Option<String>,
    /// Where known_hosts (the fingerprints of servers seen before) is kept, and where this user's own `ferry server` keeps the token this client proves to it [default: $STATE_DIRECTORY, else $XDG_CONFIG_HOME/ferry or ~/.config/ferry, else /var/lib/ferry for root].
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
    /// Make the destination equal to the source: once every entry is in place, delete what the
    /// destination has and the source does not, within the transferred tree only. Nothing is
    /// deleted if any entry failed. A deletion never follows a symlink (it removes the link) and
    /// never leaves the destination. What the filters leave out of the destination is kept (see
    /// --delete-excluded). Shown with -v as `deleting PATH`, and as `deleted` JSON events.
    #[arg(long)]
    pub delete: bool,
    /// With --delete: delete nothing, and exit with status 25, if more than N entries would go
    /// (a directory counts with everything in it).
    #[arg(long, value_name = "N", requires = "delete")]
    pub max_delete: Option<u64>,
    /// With --delete: also delete what the filters leave out (otherwise kept in the destination).
    #[arg(long, requires = "delete")]
    pub delete_excluded: bool,
    /// Change nothing, on either side: print what the same command would do, one line per entry
    /// that would change (as --itemize), the deletions --delete would make, and the bytes that
    /// would be sent. No file data crosses the wire.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Hard-link each file that this tree on the receiving side has unchanged (same size, mtime,
    /// mode, owner) instead of sending it, as rsync's --link-dest: the way to make a daily
    /// snapshot cost only what changed. For an upload a path on the server (below its root), for
    /// a download a local path. May be given up to 20 times; the first tree that has the file wins.
    #[arg(long, value_name = "DIR")]
    pub link_dest: Vec<OsString>,
    /// Publish a directory all at once: the new version is assembled beside the live one
    /// (`.NAME.ferry-next`; unchanged files hard-linked from the live tree, never sent again) and
    /// switched in with one rename, so a reader of the destination sees the old tree or the new
    /// one, never a mix. The new version is exactly the source (as with --delete; what leaves
    /// the live tree is listed with -v/-i). The version it replaces is kept as `.NAME.ferry-prev`
    /// until the next publish; `ferry rollback` switches back. Nothing is switched if any entry
    /// failed: the live tree stays as it was, and the same command resumes the publish.
    #[arg(long)]
    pub atomic: bool,
    /// Print one line per entry that changes in the destination: `created PATH`, `updated PATH
    /// (what differs: size, mtime, mode, owner, target, kind)`, `deleted PATH`; in --json,
    /// `changed` and `deleted` events. Entries already equal are not listed.
    #[arg(long, short = 'i')]
    pub itemize: bool,
    /// Set by `ferry check`: the dry run reports differences, and its exit status says whether
    /// there were any.
    #[arg(skip)]
    pub check: bool,
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
        Command::Backup(a) => &mut a.transfer,
        Command::Server(_)
        | Command::Rollback(_)
        | Command::Check(_)
        | Command::Ls(_)
        | Command::Completions(_)
        | Command::Man => return Ok(()),
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
pub fn parse_age(s: &str) -> Result<std::time::Duration, String> {
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
pub fn parse_size(s: &str) -> Result<u64, String> {
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

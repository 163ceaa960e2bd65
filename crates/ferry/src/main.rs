//! The `ferry` binary: arguments in, engine calls, exit codes out.
//!
//! All transfer logic lives in `ferry-engine`; this crate turns what the
//! user typed into exact operations (`paths`), shows progress (`ui`) and
//! maps outcomes to exit codes.

mod backups;
mod cli;
mod config;
mod exit;
mod listing;
mod logbuf;
mod manual;
mod paths;
mod spec;
mod ui;

use std::ffi::OsStr;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::auth::Token;
use ferry_engine::client::{self, ClientConfig};
use ferry_engine::events::{TransferReport, TransferSummary};
use ferry_engine::policy::{GrantSpec, LivePolicy, Policy};
use ferry_engine::server::{self, ServerConfig};
use ferry_engine::tls::{ClientTls, ServerTls};
use ferry_engine::{CancellationToken, EngineError, HeldBack, Keep, Mirror, escape};
use tokio::net::TcpListener;

use crate::cli::{
    BackupArgs, CheckArgs, Cli, Command, LsArgs, RollbackArgs, ServerArgs, TransferOpts,
};
use crate::config::{Config, ConfigError, Settings};
use crate::spec::Spec;
use crate::ui::{Mode, Ui};
use clap::{Args, FromArgMatches};

fn main() -> ExitCode {
    let cli = match parse_command_line() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if !matches!(cli.command, Command::Server(_)) && std::env::var_os("RUST_LOG").is_some() {
        // Clients are silent but for their own output; RUST_LOG opts into
        // the engine's diagnostics (e.g. RUST_LOG=ferry_engine=debug).
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_workers())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let result = match cli.command {
        Command::Server(args) => runtime.block_on(run_server(args)),
        Command::Upload(args) => plan_upload(
            Path::new(&args.local),
            args.remote.as_bytes(),
            address(&args.remote_opts.host, args.remote_opts.port),
        )
        .and_then(|plan| runtime.block_on(run_transfer(plan, &args.transfer, false))),
        Command::Download(args) => plan_download(
            args.remote.as_bytes(),
            Path::new(&args.local),
            address(&args.remote_opts.host, args.remote_opts.port),
        )
        .and_then(|plan| {
            runtime.block_on(run_transfer(plan, &args.transfer, args.receive.devices))
        }),
        Command::Copy(args) => plan_copy(&args.src, &args.dst, args.port).and_then(|plan| {
            runtime.block_on(run_transfer(plan, &args.transfer, args.receive.devices))
        }),
        Command::Completions(args) => Ok(manual::print(&manual::completions(args.shell))),
        Command::Man => Ok(manual::print(&manual::man_page())),
        Command::Rollback(args) => runtime.block_on(run_rollback(args)),
        Command::Ls(args) => runtime.block_on(run_ls(args)),
        Command::Backup(args) => match args.list {
            true => runtime.block_on(list_backups(&args)),
            false => plan_backup(&args).and_then(|(plan, opts)| {
                let keep = Keep {
                    daily: args.keep_daily,
                    weekly: args.keep_weekly,
                    monthly: args.keep_monthly,
                };
                let backup = |c: &mut ClientConfig| c.backup = Some(keep);
                runtime.block_on(run_transfer_with(plan, &opts, false, backup))
            }),
        },
        Command::Check(args) => plan_check(&args)
            .and_then(|(plan, opts)| runtime.block_on(run_transfer(plan, &opts, false))),
    };
    match result {
        Ok(code) => code,
        Err(Fatal::Usage(message)) => {
            eprintln!("ferry: {message}");
            ExitCode::from(exit::USAGE)
        }
        Err(Fatal::Failed(message)) => {
            eprintln!("ferry: {message}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// The command line as typed, or the exit code if there is nothing to run
/// (a usage error, --help, --version).
fn parse_command_line() -> Result<Cli, ExitCode> {
    use clap::{CommandFactory, FromArgMatches};
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (mut cli, matches) = parsed.map_err(|e| {
        let _ = e.print();
        // --help and --version are not errors.
        if e.use_stderr() {
            ExitCode::from(exit::USAGE)
        } else {
            ExitCode::SUCCESS
        }
    })?;
    cli::order_filters(&mut cli, &matches).map_err(|message| {
        eprintln!("ferry: {message}");
        ExitCode::from(exit::USAGE)
    })?;
    Ok(cli)
}

/// An error that ends the command before any transfer ran.
enum Fatal {
    Usage(String),
    Failed(String),
}

/// `host:port`, with brackets for a bare IPv6 address.
fn address(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// One transfer, with every path exact.
struct Plan {
    direction: Direction,
    server: Target,
}

enum Direction {
    Upload { local: PathBuf, remote: Vec<u8> },
    Download { remote: Vec<u8>, local: PathBuf },
}

/// Where the server is.
enum Target {
    /// `host:port` of a running `ferry server`.
    Remote(String),
    /// None: run one in this process, serving this root.
    InProcess { root: PathBuf },
}

fn plan_upload(local: &Path, remote: &[u8], addr: String) -> Result<Plan, Fatal> {
    let remote = checked_remote(remote)?;
    let name = paths::local_name(local).map_err(Fatal::Failed)?;
    Ok(Plan {
        direction: Direction::Upload {
            local: local.to_path_buf(),
            remote: paths::tidy_remote(&paths::copy_path(remote, &name)),
        },
        server: Target::Remote(addr),
    })
}

fn plan_download(remote: &[u8], local: &Path, addr: String) -> Result<Plan, Fatal> {
    let remote = checked_remote(remote)?;
    let local_bytes = local.as_os_str().as_bytes();
    let local = if local_bytes.is_empty()
        || local_bytes.ends_with(b"/")
        || local_bytes == b"."
        || local_bytes.ends_with(b"/.")
    {
        let name = paths::remote_name(remote).map_err(Fatal::Usage)?;
        PathBuf::from(paths::os(paths::copy_path(local_bytes, &name)))
    } else {
        local.to_path_buf()
    };
    Ok(Plan {
        direction: Direction::Download {
            remote: paths::tidy_remote(remote),
            local,
        },
        server: Target::Remote(addr),
    })
}

/// A remote path as typed, if it means what it seems to (no `~`).
fn checked_remote(path: &[u8]) -> Result<&[u8], Fatal> {
    spec::remote_path(path)
        .map_err(|why| Fatal::Usage(format!("{}: {}", escape(path), why.reason())))
}

fn plan_copy(src: &OsStr, dst: &OsStr, port: Option<u16>) -> Result<Plan, Fatal> {
    let side = |arg: &OsStr| {
        spec::parse(arg).map_err(|why| Fatal::Usage(format!("{}: {why}", escape(arg.as_bytes()))))
    };
    let address = |remote: &spec::Remote| {
        spec::port(remote, port, cli::DEFAULT_PORT)
            .map(|port| address(&remote.host, port))
            .map_err(|why| Fatal::Usage(why.to_string()))
    };
    match (side(src)?, side(dst)?) {
        (Spec::Local(local), Spec::Remote(remote)) => {
            plan_upload(&local, &remote.path, address(&remote)?)
        }
        (Spec::Remote(remote), Spec::Local(local)) => {
            plan_download(&remote.path, &local, address(&remote)?)
        }
        (Spec::Remote(_), Spec::Remote(_)) => Err(Fatal::Usage(
            "copying between two remote hosts is not supported; one side must be local".into(),
        )),
        (Spec::Local(src), Spec::Local(dst)) => plan_local_copy(src, &dst),
    }
}

/// A local copy runs through the same pipeline, against a server on
/// loopback whose root is the destination's parent.
fn plan_local_copy(src: PathBuf, dst: &Path) -> Result<Plan, Fatal> {
    let name = paths::local_name(&src).map_err(Fatal::Failed)?;
    let copy = PathBuf::from(paths::os(paths::copy_path(
        dst.as_os_str().as_bytes(),
        &name,
    )));
    let copy_name = copy
        .file_name()
        .ok_or_else(|| Fatal::Usage(format!("{}: name the copy", copy.display())))?;
    let parent = match copy.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| {
        Fatal::Failed(format!(
            "{}: {}",
            parent.display(),
            ferry_engine::error::reason(&e)
        ))
    })?;
    Ok(Plan {
        direction: Direction::Upload {
            local: src,
            remote: copy_name.as_bytes().to_vec(),
        },
        server: Target::InProcess { root: parent },
    })
}

/// Run `plan`; `devices`: recreate device nodes where this process receives.
async fn run_transfer(plan: Plan, opts: &TransferOpts, devices: bool) -> Result<ExitCode, Fatal> {
    run_transfer_with(plan, opts, devices, |_| {}).await
}

/// [`run_transfer`], with the client's configuration adjusted by `adjust`
/// (what a subcommand asks beyond the transfer options).
async fn run_transfer_with(
    plan: Plan,
    opts: &TransferOpts,
    devices: bool,
    adjust: impl FnOnce(&mut ClientConfig),
) -> Result<ExitCode, Fatal> {
    if devices
        && let (Direction::Upload { .. }, Target::Remote(_)) = (&plan.direction, &plan.server)
    {
        // `cp --devices` to HOST:PATH: the server receives.
        return Err(Fatal::Usage(
            "--devices applies where the copy is received: for an upload the server decides \
             (`ferry server --devices`)"
                .into(),
        ));
    }
    check_atomic(opts)?;
    let own_root = match &plan.server {
        Target::InProcess { root } => Some(root.as_path()),
        Target::Remote(_) => None,
    };
    let ui = Ui::new(ui_mode(opts), opts.verbose)
        .itemizing(opts.itemize, opts.dry_run)
        .serving(own_root);
    let ui = Arc::new(if opts.check { ui.checking() } else { ui });
    let cancel = CancellationToken::new();
    tokio::spawn(interrupt_handler(cancel.clone()));

    // For a local copy: a server of our own on loopback, stopped when done.
    let (addr, in_process) = match &plan.server {
        Target::Remote(addr) => (addr.clone(), None),
        Target::InProcess { root } => {
            let (addr, server) = LocalServer::start(root, devices).await?;
            (addr, Some(server))
        }
    };
    let in_process_token = in_process.as_ref().map(|s| s.token.clone());
    let mut config = client_config(
        &plan.server,
        addr,
        in_process_token,
        opts,
        devices,
        ui.shows_progress(),
    )?;
    adjust(&mut config);
    let (from, to, outcome) = transfer(&plan, &config, &ui, &cancel).await;
    if let Some(server) = in_process {
        server.stop().await;
    }
    Ok(finish(&ui, outcome, &from, &to))
}

/// The `--link-dest` trees as the receiver names them: for a local copy,
/// relative to the in-process server's root (they must be below it).
fn link_dests(server: &Target, dirs: &[std::ffi::OsString]) -> Result<Vec<Vec<u8>>, Fatal> {
    if dirs.len() > ferry_engine::MAX_LINK_DESTS {
        let n = dirs.len();
        return Err(Fatal::Usage(format!(
            "{n} --link-dest trees; at most 20 are taken"
        )));
    }
    let Target::InProcess { root } = server else {
        return Ok(dirs.iter().map(|d| d.as_bytes().to_vec()).collect());
    };
    let root = root
        .canonicalize()
        .map_err(|e| Fatal::Failed(e.to_string()))?;
    dirs.iter()
        .map(|dir| {
            let shown = escape(dir.as_bytes());
            let full = Path::new(dir)
                .canonicalize()
                .map_err(|e| Fatal::Failed(format!("--link-dest {shown}: {e}")))?;
            match full.strip_prefix(&root) {
                Ok(inside) if !inside.as_os_str().is_empty() => {
                    Ok(inside.as_os_str().as_bytes().to_vec())
                }
                _ => Err(Fatal::Usage(format!(
                    "--link-dest {shown}: for a local copy it must be beside the copy or below \
                     its directory ({})",
                    root.display()
                ))),
            }
        })
        .collect()
}

/// An atomic publish carries over nothing of the live tree: what the
/// filters leave out of it would be lost, so that must be asked for.
fn check_atomic(opts: &TransferOpts) -> Result<(), Fatal> {
    let filtered = !opts.filters.is_empty() || opts.gitignore;
    if opts.atomic && filtered && !opts.delete_excluded {
        return Err(Fatal::Usage(
            "--atomic publishes exactly the source: what --exclude or --gitignore leave out of \
             the live tree would not be in the new version; add --delete --delete-excluded to \
             accept that"
                .into(),
        ));
    }
    Ok(())
}

/// `ferry check`: a dry run that compares by content and mirrors, so that
/// every difference is listed (what is missing, what differs, what is
/// extra); nothing is created, on either side.
fn plan_check(args: &CheckArgs) -> Result<(Plan, TransferOpts), Fatal> {
    let both_local = [&args.src, &args.dst]
        .iter()
        .all(|p| matches!(spec::parse(p), Ok(Spec::Local(_))));
    if both_local && !Path::new(&args.dst).exists() {
        let shown = escape(args.dst.as_bytes());
        return Err(Fatal::Failed(format!("{shown}: no such file or directory")));
    }
    let plan = plan_copy(&args.src, &args.dst, args.port)?;
    let mut opts = default_transfer_opts()?;
    (opts.dry_run, opts.checksum, opts.delete, opts.check) = (true, true, true, true);
    (opts.json, opts.quiet) = (args.json, args.quiet);
    opts.filters = args
        .exclude
        .iter()
        .map(|pattern| ferry_engine::FilterRule {
            rule: ferry_engine::RuleKind::Exclude,
            pattern: pattern.clone(),
        })
        .collect();
    args.connect.apply(&mut opts);
    Ok((plan, opts))
}

/// The transfer options as if none were given on the command line.
fn default_transfer_opts() -> Result<TransferOpts, Fatal> {
    let matches =
        TransferOpts::augment_args(clap::Command::new("ferry")).get_matches_from(["ferry"]);
    TransferOpts::from_arg_matches(&matches).map_err(|e| Fatal::Failed(e.to_string()))
}

/// `ferry backup SRC HOST:PATH`: an upload into a directory of snapshots.
fn plan_backup(args: &BackupArgs) -> Result<(Plan, TransferOpts), Fatal> {
    let [src, dst] = args.paths.as_slice() else {
        return Err(Fatal::Usage(
            "ferry backup takes SRC HOST:PATH (or --list HOST:PATH)".into(),
        ));
    };
    let implied = [
        (args.transfer.atomic, "--atomic"),
        (args.transfer.delete, "--delete"),
        (args.transfer.dry_run, "--dry-run"),
        (!args.transfer.link_dest.is_empty(), "--link-dest"),
    ];
    if let Some((_, flag)) = implied.iter().find(|(given, _)| *given) {
        return Err(Fatal::Usage(format!(
            "ferry backup decides {flag} itself: a snapshot is published atomically, linked to \
             the newest one"
        )));
    }
    let (addr, path) = remote_side(dst, args.port)?;
    let plan = plan_upload(Path::new(src), &path, addr)?;
    Ok((plan, args.transfer.clone()))
}

/// A `HOST:PATH` argument: the server's address and the path.
fn remote_side(arg: &OsStr, port: Option<u16>) -> Result<(String, Vec<u8>), Fatal> {
    let shown = escape(arg.as_bytes());
    match spec::parse(arg) {
        Ok(Spec::Remote(remote)) => {
            let port = spec::port(&remote, port, cli::DEFAULT_PORT)
                .map_err(|why| Fatal::Usage(why.to_string()))?;
            Ok((address(&remote.host, port), remote.path))
        }
        Ok(Spec::Local(_)) => Err(Fatal::Usage(format!(
            "{shown}: a backup goes to a server: write HOST:PATH"
        ))),
        Err(why) => Err(Fatal::Usage(format!("{shown}: {why}"))),
    }
}

/// `ferry backup --list HOST:PATH`: the snapshots, from a listing.
async fn list_backups(args: &BackupArgs) -> Result<ExitCode, Fatal> {
    let [dst] = args.paths.as_slice() else {
        return Err(Fatal::Usage("ferry backup --list takes HOST:PATH".into()));
    };
    let (addr, path) = remote_side(dst, args.port)?;
    let target = Target::Remote(addr.clone());
    let config = client_config(&target, addr, None, &args.transfer, false, false)?;
    let remote = paths::tidy_remote(&path);
    let sink = Arc::new(backups::Snapshots::of(escape(&remote)));
    let cancel = CancellationToken::new();
    if let Err(e) = client::list(&config, &remote, sink.clone(), &cancel).await {
        return Err(Fatal::Failed(e.to_string()));
    }
    for (name, files, bytes, latest) in sink.table() {
        let mark = if latest { "  (latest)" } else { "" };
        match args.transfer.json {
            true => println!(
                "{}",
                serde_json::json!({"event": "snapshot", "name": name, "files": files, "new_bytes": bytes, "latest": latest})
            ),
            false => println!(
                "{name}  {files:>9} files  {:>12} new{mark}",
                ui::human_bytes(bytes)
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry ls`: the server sends the tree's entries to a listing receiver,
/// which keeps nothing and plans no file: no data crosses.
async fn run_ls(args: LsArgs) -> Result<ExitCode, Fatal> {
    let addr = address(&args.remote_opts.host, args.remote_opts.port);
    let mut opts = default_transfer_opts()?;
    args.connect.apply(&mut opts);
    opts.json = args.json;
    let mut config = client_config(
        &Target::Remote(addr.clone()),
        addr,
        None,
        &opts,
        false,
        false,
    )?;
    config.streams = 1;
    config.widen_streams = false;
    let mode = if args.json { Mode::Json } else { Mode::Human };
    let ui = Arc::new(Ui::new(mode, false).listing());
    let cancel = CancellationToken::new();
    tokio::spawn(interrupt_handler(cancel.clone()));
    let remote = paths::tidy_remote(args.remote.as_bytes());
    match client::list(&config, &remote, ui.clone(), &cancel).await {
        Ok(summary) => Ok(exit_status(&summary.report)),
        Err(e) => {
            ui.fatal(&e.to_string());
            Ok(ExitCode::from(exit::FAILURE))
        }
    }
}

/// `ferry rollback`: switch back, on the server or here.
async fn run_rollback(args: RollbackArgs) -> Result<ExitCode, Fatal> {
    let shown = escape(args.path.as_bytes());
    if args.local {
        client::rollback_local(Path::new(&args.path)).map_err(|e| Fatal::Failed(e.to_string()))?;
    } else {
        let addr = address(&args.remote_opts.host, args.remote_opts.port);
        let mut opts = TransferOpts::from_arg_matches(
            &TransferOpts::augment_args(clap::Command::new("rollback"))
                .get_matches_from(["rollback"]),
        )
        .map_err(|e| Fatal::Failed(e.to_string()))?;
        args.connect.apply(&mut opts);
        opts.quiet = true;
        let config = client_config(
            &Target::Remote(addr.clone()),
            addr,
            None,
            &opts,
            false,
            false,
        )?;
        let ui = Arc::new(Ui::new(Mode::Quiet, false));
        let cancel = CancellationToken::new();
        client::rollback(&config, args.path.as_bytes(), ui, &cancel)
            .await
            .map_err(|e| Fatal::Failed(e.to_string()))?;
    }
    println!(
        "rolled back {shown}: the version it replaced is kept; run the same command again to switch forward"
    );
    Ok(ExitCode::SUCCESS)
}

fn ui_mode(opts: &TransferOpts) -> Mode {
    if opts.quiet {
        Mode::Quiet
    } else if opts.json {
        Mode::Json
    } else {
        Mode::Human
    }
}

/// The server a local copy runs against, in this process.
struct LocalServer {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// What it asks the client to prove: its port is open to every local
    /// user while the copy runs.
    token: Token,
}

impl LocalServer {
    /// Serve `root` on a loopback port: the server and its address.
    async fn start(root: &Path, devices: bool) -> Result<(String, LocalServer), Fatal> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Fatal::Failed(format!("cannot start the local copy server: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Fatal::Failed(e.to_string()))?;
        let stop = CancellationToken::new();
        let token = Token::random()
            .map_err(|e| Fatal::Failed(format!("cannot start the local copy server: {e}")))?;
        // Other local users can reach the port: only the copy's own
        // client, which holds the token, is served.
        let spec = GrantSpec {
            name: "copy".into(),
            root_name: "destination".into(),
            root: root.to_path_buf(),
            access: server::Access::ReadWrite,
        };
        let policy = Policy::tokens(vec![(token.clone(), spec)])
            .map_err(|e| Fatal::Failed(format!("cannot start the local copy server: {e}")))?;
        let config = ServerConfig {
            policy: LivePolicy::new(policy),
            idle_timeout: server::DEFAULT_IDLE_TIMEOUT,
            // The user's own directory: leftovers are theirs to keep.
            part_max_age: None,
            // The user's own copy: as asked.
            devices,
            // Both ends in this process: nothing to hide from the network.
            tls: None,
            max_memory: ferry_engine::budget::DEFAULT_MAX_MEMORY,
            handshake_timeout: server::DEFAULT_HANDSHAKE_TIMEOUT,
        };
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            server::serve(listener, config, stopped.cancelled_owned()).await
        });
        Ok((addr.to_string(), LocalServer { stop, task, token }))
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// What the engine's client needs from the options, for the server at
/// `addr` (a server in this process asks for `in_process_token`);
/// `devices`: recreate device nodes if this client receives.
fn client_config(
    server: &Target,
    addr: String,
    in_process_token: Option<Token>,
    opts: &TransferOpts,
    devices: bool,
    shows_progress: bool,
) -> Result<ClientConfig, Fatal> {
    let token = match in_process_token {
        Some(token) => Some(token),
        None => configured_token(opts.token_file.as_deref())?,
    };
    let (mut tls, mut own_token) = (None, None);
    if let Target::Remote(_) = server
        && !opts.no_tls
    {
        let state_dir = state_dir(opts.state_dir.as_deref())?;
        let failed = |e: EngineError| Fatal::Failed(e.to_string());
        tls = Some(ClientTls::new(&addr, &state_dir, opts.fingerprint.as_deref()).map_err(failed)?);
        // This user's own server's token, for that server only (the engine
        // knows it by its certificate).
        if token.is_none() {
            own_token = ferry_engine::auth::own_token(&state_dir).map_err(failed)?;
        }
    }
    Ok(ClientConfig {
        tls,
        token,
        own_token,
        addr,
        // Both ends local: there is no link whose bytes compression could
        // save, so `auto` means off.
        compression: match (server, opts.compress) {
            (Target::InProcess { .. }, ferry_engine::Compression::Auto) => {
                ferry_engine::Compression::Off
            }
            (_, chosen) => chosen,
        },
        streams: opts.streams.unwrap_or_else(client::default_streams),
        // A count the user gives is kept.
        widen_streams: opts.streams.is_none(),
        early_totals: shows_progress,
        ignore_times: opts.ignore_times,
        owners: !opts.no_owner,
        devices,
        filters: opts.filters.clone(),
        gitignore: opts.gitignore,
        bwlimit: opts.bwlimit,
        mirror: opts.delete.then(|| Mirror {
            max_delete: opts.max_delete,
            delete_excluded: opts.delete_excluded,
            ..Mirror::default()
        }),
        itemize: opts.itemize,
        dry_run: opts.dry_run,
        atomic: opts.atomic,
        checksum: opts.checksum,
        listing: false,
        link_dest: link_dests(server, &opts.link_dest)?,
        // Both ends local: reading the old version costs as much as
        // copying the new one, as rsync judges too.
        whole_file: opts.whole_file || matches!(server, Target::InProcess { .. }),
        backup: None,
        retries: opts.retries.unwrap_or(client::DEFAULT_RETRIES),
        timeout: Duration::from_secs(opts.timeout),
    })
}

/// Run the planned transfer: what it copied from and to, as the user is
/// shown them, and how it ended.
async fn transfer(
    plan: &Plan,
    config: &ClientConfig,
    ui: &Arc<Ui>,
    cancel: &CancellationToken,
) -> (String, String, Result<TransferSummary, EngineError>) {
    let remote_label = |path: &[u8]| match &plan.server {
        Target::Remote(addr) => format!("{addr}:{}", escape(path)),
        Target::InProcess { root } => {
            escape(root.join(OsStr::from_bytes(path)).as_os_str().as_bytes())
        }
    };
    match &plan.direction {
        Direction::Upload { local, remote } => {
            let (from, to) = (escape(local.as_os_str().as_bytes()), remote_label(remote));
            ui.start("upload", &from, &to);
            let r = client::upload(config, local, remote, ui.clone(), cancel).await;
            (from, to, r)
        }
        Direction::Download { remote, local } => {
            let (from, to) = (remote_label(remote), escape(local.as_os_str().as_bytes()));
            ui.start("download", &from, &to);
            let r = client::download(config, remote, local, ui.clone(), cancel).await;
            (from, to, r)
        }
    }
}

fn finish(
    ui: &Ui,
    outcome: Result<TransferSummary, EngineError>,
    from: &str,
    to: &str,
) -> ExitCode {
    match outcome {
        Ok(summary) => {
            ui.summary(&summary, from, to);
            match ui.is_checking() {
                true => check_status(&summary.report),
                false => exit_status(&summary.report),
            }
        }
        Err(EngineError::Cancelled) => {
            ui.fatal(
                "interrupted: files already in place stay; of the files not yet complete, those of \
                 4 MiB or more keep what arrived verified. Run the same command again to resume.",
            );
            ExitCode::from(exit::INTERRUPTED)
        }
        Err(e) => {
            ui.fatal(&e.to_string());
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// The exit status of a transfer that ran to its end (see exit.rs).
fn exit_status(report: &TransferReport) -> ExitCode {
    if !report.failed.is_empty() || !report.delete_failed.is_empty() {
        ExitCode::from(exit::FAILURE)
    } else if let Some(HeldBack::MaxDelete { .. }) = report.held_back {
        ExitCode::from(exit::MAX_DELETE)
    } else if report.published == Some(false) {
        ExitCode::from(exit::FAILURE)
    } else if !report.vanished.is_empty() {
        ExitCode::from(exit::VANISHED)
    } else {
        ExitCode::SUCCESS
    }
}

/// `ferry check`'s exit status: 1 if the trees differ at all.
fn check_status(report: &TransferReport) -> ExitCode {
    match report.created + report.updated + report.deleted {
        0 => exit_status(report),
        _ => ExitCode::from(exit::FAILURE),
    }
}

/// First ^C: stop cleanly (small files' parts are removed, large files'
/// verified parts are kept for a resume). Second: leave now.
async fn interrupt_handler(cancel: CancellationToken) {
    if tokio::signal::ctrl_c().await.is_ok() {
        cancel.cancel();
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(i32::from(exit::INTERRUPTED));
        }
    }
}

async fn run_server(args: ServerArgs) -> Result<ExitCode, Fatal> {
    let config = args.config.as_deref().map(load_config).transpose()?;
    let settings = Settings::new(&args, config.as_ref().map(|c| &c.server));
    // The roots and the token files before anything else: a mistake in
    // them is the most likely one, and is said before the server starts.
    let (policy, clients) = match config {
        Some(config) => (config_policy(&config)?, Clients::Config(config)),
        None => flag_policy(&args, &settings)?,
    };
    let logs = init_server_logging(settings.log_file.as_deref())?;
    let addr = address(&settings.host, settings.port);
    let listener = TcpListener::bind(&addr).await.map_err(|e| {
        Fatal::Failed(format!(
            "cannot listen on {addr}: {}",
            ferry_engine::error::reason(&e)
        ))
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| Fatal::Failed(e.to_string()))?;
    let tls = server_tls(&settings)?;
    let shutdown = shutdown_signal()?;
    let live = LivePolicy::new(policy);
    if let Clients::Config(config) = &clients {
        // Installed before the server announces itself: a SIGHUP from then
        // on reloads, never kills.
        tokio::spawn(reload_on_hangup(config, live.clone())?);
    }
    announce(local, tls.as_ref(), &clients, &live);
    log_setup(local, tls.as_ref(), &clients, &live);
    let config = ServerConfig {
        policy: live,
        idle_timeout: settings.timeout,
        part_max_age: settings.keep_parts,
        devices: settings.devices,
        tls,
        max_memory: settings.max_memory,
        handshake_timeout: settings.handshake_timeout,
    };
    let served = server::serve(listener, config, shutdown).await;
    match &served {
        Ok(()) => tracing::info!("server stopped"),
        Err(e) => tracing::error!("server failed: {e}"),
    }
    // The log is written in the background: write out the rest now.
    logs.iter().for_each(logbuf::BufferedLog::flush);
    served.map_err(|e| Fatal::Failed(e.to_string()))?;
    Ok(ExitCode::SUCCESS)
}

/// Whom a server serves, as its operator is told.
enum Clients {
    /// The command line's: one root, for the token the server was given or
    /// made (or, with `--no-auth`, for anyone).
    Flags { root: PathBuf, auth: ServerAuth },
    /// A configuration file's tokens, each with its root and mode.
    Config(Config),
}

/// The configuration file at `path`, checked.
fn load_config(path: &Path) -> Result<Config, Fatal> {
    config::load(path).map_err(config_error)
}

/// A configuration file's policy: its token files read, its roots opened.
fn config_policy(config: &Config) -> Result<Policy, Fatal> {
    if std::env::var_os(ferry_engine::auth::TOKEN_ENV).is_some() {
        // Not an error: the variable may be there for a client.
        eprintln!(
            "ferry: {} is ignored by this server: its tokens come from {}",
            ferry_engine::auth::TOKEN_ENV,
            config.path.display()
        );
    }
    config::policy(config).map_err(config_error)
}

fn config_error(e: ConfigError) -> Fatal {
    if e.is_usage() {
        Fatal::Usage(e.to_string())
    } else {
        Fatal::Failed(e.to_string())
    }
}

/// The policy of a server run without a configuration file: the root of
/// `--root` (else the current directory), with the access the flags give,
/// for the server's token.
fn flag_policy(args: &ServerArgs, settings: &Settings) -> Result<(Policy, Clients), Fatal> {
    let root = server_root(args.root.as_deref())?;
    let auth = server_auth(args, settings)?;
    let spec = GrantSpec {
        name: "default".into(),
        root_name: "root".into(),
        root: root.clone(),
        access: match (args.read_only, args.write_only, args.append_only) {
            (true, _, _) => server::Access::ReadOnly,
            (_, true, _) => server::Access::WriteOnly,
            (_, _, true) => server::Access::AppendOnly,
            _ => server::Access::ReadWrite,
        },
    };
    let policy = match &auth {
        Some((token, _)) => Policy::tokens(vec![(token.clone(), spec)]),
        None => Policy::anyone(spec),
    };
    let policy = policy.map_err(|e| Fatal::Failed(e.to_string()))?;
    Ok((policy, Clients::Flags { root, auth }))
}

/// On each SIGHUP, read the configuration file again and give the
/// sessions that start from then on its roots and tokens. A file that
/// cannot be used is logged, in one line, and the policy in force stays.
/// The handler is installed when this returns.
fn reload_on_hangup(
    config: &Config,
    live: LivePolicy,
) -> Result<impl std::future::Future<Output = ()> + use<>, Fatal> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup())
        .map_err(|e| Fatal::Failed(format!("cannot install signal handlers: {e}")))?;
    let (path, started) = (config.path.clone(), config.server.clone());
    Ok(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading {}", path.display());
            let file = path.clone();
            let loaded = tokio::task::spawn_blocking(move || {
                let config = config::load(&file)?;
                Ok::<_, ConfigError>((config::policy(&config)?, config))
            })
            .await;
            match loaded {
                Ok(Ok((policy, config))) => {
                    tracing::info!("reloaded {}: {}", path.display(), describe(&policy));
                    live.replace(policy);
                    if config.server != started {
                        tracing::warn!(
                            "{}: [server] has changed; its settings take effect when the server \
                             restarts (a reload applies [roots] and [[token]])",
                            path.display()
                        );
                    }
                }
                Ok(Err(e)) => tracing::error!(
                    "reload failed: {e}; the configuration loaded before stays in force"
                ),
                Err(e) => tracing::error!(
                    "reload of {} failed: {e}; the configuration loaded before stays in force",
                    path.display()
                ),
            }
        }
    })
}

/// Each grant of `policy`, on one line.
fn describe(policy: &Policy) -> String {
    let grants: Vec<String> = policy
        .grants()
        .iter()
        .map(|grant| {
            let (root_name, root) = grant.root();
            format!(
                "token {}: root {root_name} ({}), {}",
                grant.name(),
                root.display(),
                grant.access().name()
            )
        })
        .collect();
    grants.join("; ")
}

/// The directory to serve (`--root`, else the current one), absolute.
fn server_root(given: Option<&Path>) -> Result<PathBuf, Fatal> {
    let root = match given {
        Some(r) => r.to_path_buf(),
        None => {
            std::env::current_dir().map_err(|e| Fatal::Failed(format!("current directory: {e}")))?
        }
    };
    let root = root.canonicalize().map_err(|e| {
        Fatal::Failed(format!(
            "server root {}: {}",
            root.display(),
            ferry_engine::error::reason(&e)
        ))
    })?;
    if !root.is_dir() {
        return Err(Fatal::Failed(format!(
            "server root {}: not a directory",
            root.display()
        )));
    }
    Ok(root)
}

/// The server's TLS identity, made on first use; none with `--no-tls`.
fn server_tls(settings: &Settings) -> Result<Option<ServerTls>, Fatal> {
    if !settings.tls {
        return Ok(None);
    }
    let dir = state_dir(settings.state_dir.as_deref())?;
    let (tls, created) =
        ServerTls::load_or_create(&dir).map_err(|e| Fatal::Failed(e.to_string()))?;
    if created {
        tracing::info!("made a new TLS key and certificate in {}", dir.display());
    }
    Ok(Some(tls))
}

/// The token clients must prove, if any; when the server keeps it in its
/// state directory, also where, and whether it was made just now.
type ServerAuth = Option<(Token, Option<(PathBuf, bool)>)>;

/// The token the user configured; else the one kept in the state
/// directory (made on first use), which clients of the same user find
/// there; none with `--no-auth`. Loopback is no exception: every local
/// user can reach it, and the server may read and write what they may not.
fn server_auth(args: &ServerArgs, settings: &Settings) -> Result<ServerAuth, Fatal> {
    if args.no_auth {
        return Ok(None);
    }
    Ok(match configured_token(args.token_file.as_deref())? {
        Some(token) => Some((token, None)),
        None => {
            let dir = state_dir(settings.state_dir.as_deref())?;
            let (token, path, created) = ferry_engine::auth::load_or_create_token(&dir)
                .map_err(|e| Fatal::Failed(e.to_string()))?;
            Some((token, Some((path, created))))
        }
    })
}

/// Tell the operator, on stdout, where the server listens and what clients
/// need to reach it.
fn announce(local: SocketAddr, tls: Option<&ServerTls>, clients: &Clients, live: &LivePolicy) {
    match clients {
        Clients::Flags { root, .. } => println!(
            "ferry server listening on {local} (root: {})",
            root.display()
        ),
        Clients::Config(config) => println!(
            "ferry server listening on {local} (config: {})",
            config.path.display()
        ),
    }
    match tls {
        Some(tls) => println!("ferry server fingerprint {}", tls.fingerprint()),
        None => println!("ferry server: TLS is off (--no-tls): sessions travel in plaintext"),
    }
    let auth = match clients {
        Clients::Flags { auth, .. } => auth,
        Clients::Config(_) => {
            for grant in live.current().grants() {
                let (root_name, root) = grant.root();
                println!(
                    "ferry server token {}: root {root_name} ({}), {}",
                    grant.name(),
                    root.display(),
                    grant.access().name()
                );
            }
            &None
        }
    };
    match auth {
        Some((token, Some((path, true)))) => println!(
            "ferry server token: {} (stored in {}; clients of this user on this machine find it \
             there, others pass it with FERRY_TOKEN or --token-file)",
            token.as_str(),
            path.display()
        ),
        Some((_, Some((path, false)))) => println!(
            "ferry server token stored in {}; clients of this user on this machine find it \
             there, others pass it with FERRY_TOKEN or --token-file",
            path.display()
        ),
        // Nothing the operator has to pass on.
        Some((_, None)) | None => {}
    }
    let _ = std::io::stdout().flush();
}

/// The same, for the log.
fn log_setup(local: SocketAddr, tls: Option<&ServerTls>, clients: &Clients, live: &LivePolicy) {
    match clients {
        Clients::Flags { root, .. } => {
            tracing::info!("listening on {local}, root {}", root.display())
        }
        Clients::Config(config) => tracing::info!(
            "listening on {local}, configured by {}: {}",
            config.path.display(),
            describe(&live.current())
        ),
    }
    match tls {
        Some(tls) => tracing::info!("TLS 1.3, certificate fingerprint {}", tls.fingerprint()),
        None => tracing::warn!("TLS is off (--no-tls): sessions travel in plaintext"),
    }
    match clients {
        Clients::Flags {
            auth: Some((_, Some((path, true)))),
            ..
        } => tracing::info!("made a new client token in {}", path.display()),
        Clients::Flags { auth: Some(_), .. } => tracing::info!("clients must prove the token"),
        Clients::Config(_) => tracing::info!("clients must prove one of the tokens"),
        Clients::Flags { auth: None, .. } => tracing::warn!(
            "authentication is off (--no-auth): any client that can connect is served, \
             every local user included"
        ),
    }
}

/// The token from FERRY_TOKEN, else from `--token-file` (refused if
/// others may read it).
fn configured_token(file: Option<&Path>) -> Result<Option<Token>, Fatal> {
    let env = std::env::var(ferry_engine::auth::TOKEN_ENV).ok();
    ferry_engine::auth::configured_token(env.as_deref(), file)
        .map_err(|e| Fatal::Failed(e.to_string()))
}

/// The state directory: `given` (`--state-dir`), else the default for
/// this process's environment (see [`default_state_dir`]).
fn state_dir(given: Option<&Path>) -> Result<PathBuf, Fatal> {
    let env = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty());
    let defaults = StateEnv {
        state_directory: env("STATE_DIRECTORY"),
        xdg_config_home: env("XDG_CONFIG_HOME"),
        home: env("HOME"),
        root: rustix::process::geteuid().is_root(),
    };
    given
        .map(Path::to_path_buf)
        .or_else(|| default_state_dir(&defaults))
        .ok_or_else(|| {
            Fatal::Failed(
                "no state directory: pass --state-dir DIR (none of STATE_DIRECTORY, \
                 XDG_CONFIG_HOME and HOME is set, and /var/lib/ferry is root's)"
                    .into(),
            )
        })
}

/// What the default state directory depends on.
struct StateEnv {
    state_directory: Option<std::ffi::OsString>,
    xdg_config_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
    root: bool,
}

/// `$STATE_DIRECTORY` (the first, if systemd lists several), else
/// `$XDG_CONFIG_HOME/ferry`, else `~/.config/ferry`, else, for root,
/// `/var/lib/ferry`: a service's user may have no home.
fn default_state_dir(env: &StateEnv) -> Option<PathBuf> {
    let systemd = env.state_directory.as_ref().and_then(|dirs| {
        let first = dirs.as_bytes().split(|&b| b == b':').next()?;
        (!first.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(first)))
    });
    systemd
        .or_else(|| {
            env.xdg_config_home
                .as_ref()
                .map(|x| Path::new(x).join("ferry"))
        })
        .or_else(|| {
            env.home
                .as_ref()
                .map(|h| Path::new(h).join(".config/ferry"))
        })
        .or_else(|| env.root.then(|| PathBuf::from("/var/lib/ferry")))
}

/// Lift the soft limit on open files to the hard limit (as Go programs
/// do). A transfer holds a descriptor for each file it has announced ahead
/// of the data (up to 1024, and as many again on the receiving side while
/// their last chunks arrive), and a server serves many sessions; the
/// common soft default of 1024 would be the bottleneck, the hard limit
/// rarely is. Best effort: at worst the old limit stays.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed before this
/// returns, so a signal that arrives right after the server announces
/// itself is already a clean shutdown, not the default kill.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, Fatal> {
    use tokio::signal::unix::{SignalKind, signal};
    let install = |kind: SignalKind| {
        signal(kind).map_err(|e| Fatal::Failed(format!("cannot install signal handlers: {e}")))
    };
    let mut interrupt = install(SignalKind::interrupt())?;
    let mut terminate = install(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    })
}

/// Threads for the async runtime: one per core but one. Each transfer
/// reads or writes its files on a thread of its own, which keeps a core
/// busy; the runtime (sockets, TLS) gets the others. One worker per core
/// on top of that thread made them take turns: on 2 cores, 20,000 small
/// files took 0.172 s with 2 workers a side and 0.164 s with 1 (medians
/// of 15 interleaved runs; a 1 GiB file and the CPython tree within the
/// noise).
fn runtime_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get().saturating_sub(1))
        .max(1)
}

/// Server logs: stderr always, and appended to `--log-file` when given.
/// `RUST_LOG` overrides the default level (info).
fn init_server_logging(log_file: Option<&Path>) -> Result<Vec<logbuf::BufferedLog>, Fatal> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt};

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let buffered = |out| {
        logbuf::BufferedLog::new(out)
            .map_err(|e| Fatal::Failed(format!("cannot start the log writer: {e}")))
    };
    let mut logs = Vec::new();
    let stderr = buffered(Box::new(std::io::stderr()) as Box<dyn std::io::Write + Send>)?;
    logs.push(stderr.clone());
    let file_layer = match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    Fatal::Failed(format!(
                        "log file {}: {}",
                        path.display(),
                        ferry_engine::error::reason(&e)
                    ))
                })?;
            let writer = buffered(Box::new(file))?;
            logs.push(writer.clone());
            Some(fmt::layer().with_ansi(false).with_writer(writer))
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(stderr),
        )
        .with(file_layer)
        .init();
    Ok(logs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server of a local copy listens on a loopback port that every
    /// local user can reach while the copy runs: only the copy's own client,
    /// which holds its token, is served.
    #[tokio::test]
    async fn the_local_copy_server_serves_only_its_own_client() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), b"root's\n").unwrap();
        let (addr, server) = LocalServer::start(dir.path(), false).await.ok().unwrap();
        let mut opts = <Cli as clap::Parser>::try_parse_from(["ferry", "cp", "a", "b"]).unwrap();
        let Command::Copy(args) = &mut opts.command else {
            unreachable!()
        };
        args.transfer.retries = Some(0);
        let target = Target::InProcess {
            root: dir.path().into(),
        };
        let got = dir.path().join("got");
        let ui = Arc::new(Ui::new(Mode::Quiet, false));
        let cancel = CancellationToken::new();
        let mut config = client_config(&target, addr, None, &args.transfer, false, false)
            .ok()
            .unwrap();
        let refused = client::download(&config, b"secret", &got, ui.clone(), &cancel).await;
        assert!(
            matches!(refused, Err(EngineError::TokenRequired)),
            "{refused:?}"
        );
        assert!(!got.exists());
        config.token = Some(server.token.clone());
        client::download(&config, b"secret", &got, ui, &cancel)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&got).unwrap(), b"root's\n");
        server.stop().await;
    }

    #[test]
    fn the_state_directory_of_a_service_without_a_home() {
        let env = |state: Option<&str>, xdg: Option<&str>, home: Option<&str>, root| StateEnv {
            state_directory: state.map(Into::into),
            xdg_config_home: xdg.map(Into::into),
            home: home.map(Into::into),
            root,
        };
        let dir = |e: &StateEnv| default_state_dir(e).map(|p| p.display().to_string());
        let all = env(Some("/var/lib/ferry-svc"), Some("/x"), Some("/h"), true);
        assert_eq!(dir(&all).as_deref(), Some("/var/lib/ferry-svc"));
        // systemd joins several StateDirectory= with colons: the first is ours.
        let many = env(Some("/var/lib/a:/var/lib/b"), None, None, false);
        assert_eq!(dir(&many).as_deref(), Some("/var/lib/a"));
        let xdg = env(None, Some("/x"), Some("/h"), false);
        assert_eq!(dir(&xdg).as_deref(), Some("/x/ferry"));
        let home = env(None, None, Some("/h"), false);
        assert_eq!(dir(&home).as_deref(), Some("/h/.config/ferry"));
        let root = env(None, None, None, true);
        assert_eq!(dir(&root).as_deref(), Some("/var/lib/ferry"));
        assert_eq!(dir(&env(None, None, None, false)), None);
    }

    #[test]
    fn addresses() {
        assert_eq!(address("localhost", 8834), "localhost:8834");
        assert_eq!(address("::1", 1), "[::1]:1");
        assert_eq!(address("[::1]", 1), "[::1]:1");
    }
}

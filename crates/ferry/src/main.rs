//! The `ferry` binary: arguments in, engine calls, exit codes out.
//!
//! All transfer logic lives in `ferry-engine`; this crate turns what the
//! user typed into exact operations (`paths`), shows progress (`ui`) and
//! maps outcomes to exit codes.

mod cli;
mod exit;
mod logbuf;
mod manual;
mod paths;
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
use ferry_engine::events::TransferSummary;
use ferry_engine::server::{self, ServerConfig};
use ferry_engine::tls::{ClientTls, ServerTls};
use ferry_engine::{CancellationToken, EngineError, escape};
use tokio::net::TcpListener;

use crate::cli::{Cli, Command, ServerArgs, TransferOpts};
use crate::paths::Spec;
use crate::ui::{Mode, Ui};

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

fn plan_copy(src: &OsStr, dst: &OsStr, port: u16) -> Result<Plan, Fatal> {
    match (paths::parse_spec(src), paths::parse_spec(dst)) {
        (Spec::Local(local), Spec::Remote { host, path }) => {
            plan_upload(&local, &path, address(&host, port))
        }
        (Spec::Remote { host, path }, Spec::Local(local)) => {
            plan_download(&path, &local, address(&host, port))
        }
        (Spec::Remote { .. }, Spec::Remote { .. }) => Err(Fatal::Usage(
            "copying between two remote hosts is not supported; one side must be local".into(),
        )),
        (Spec::Local(src), Spec::Local(dst)) => {
            // A local copy runs through the same pipeline, against a server
            // on loopback whose root is the destination's parent.
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
    }
}

/// Run `plan`; `devices`: recreate device nodes where this process receives.
async fn run_transfer(plan: Plan, opts: &TransferOpts, devices: bool) -> Result<ExitCode, Fatal> {
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
    let ui = Arc::new(Ui::new(ui_mode(opts), opts.verbose));
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
    let config = client_config(
        &plan.server,
        addr,
        in_process_token,
        opts,
        devices,
        ui.shows_progress(),
    )?;
    let (from, to, outcome) = transfer(&plan, &config, &ui, &cancel).await;
    if let Some(server) = in_process {
        server.stop().await;
    }
    Ok(finish(&ui, outcome, &from, &to))
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
        let config = ServerConfig {
            root: root.to_path_buf(),
            idle_timeout: server::DEFAULT_IDLE_TIMEOUT,
            // The user's own directory: leftovers are theirs to keep.
            part_max_age: None,
            access: server::Access::ReadWrite,
            // The user's own copy: as asked.
            devices,
            // Both ends in this process: nothing to hide from the
            // network, but other local users can reach the port.
            tls: None,
            auth: Some(token.clone()),
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
        early_totals: shows_progress,
        ignore_times: opts.ignore_times,
        owners: !opts.no_owner,
        devices,
        filters: opts.filters.clone(),
        gitignore: opts.gitignore,
        bwlimit: opts.bwlimit,
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
            if !summary.report.failed.is_empty() {
                ExitCode::from(exit::FAILURE)
            } else if !summary.report.vanished.is_empty() {
                ExitCode::from(exit::VANISHED)
            } else {
                ExitCode::SUCCESS
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
    let root = server_root(args.root.as_deref())?;
    let logs = init_server_logging(args.log_file.as_deref())?;
    let addr = address(&args.host, args.port);
    let listener = TcpListener::bind(&addr).await.map_err(|e| {
        Fatal::Failed(format!(
            "cannot listen on {addr}: {}",
            ferry_engine::error::reason(&e)
        ))
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| Fatal::Failed(e.to_string()))?;
    let tls = server_tls(&args)?;
    let auth = server_auth(&args)?;
    let shutdown = shutdown_signal()?;
    announce(local, &root, tls.as_ref(), &auth);
    log_setup(local, &root, tls.as_ref(), &auth);
    let config = ServerConfig {
        root,
        idle_timeout: Duration::from_secs(args.timeout),
        part_max_age: (!args.keep_parts.is_zero()).then_some(args.keep_parts),
        access: match (args.read_only, args.write_only) {
            (true, _) => server::Access::ReadOnly,
            (_, true) => server::Access::WriteOnly,
            _ => server::Access::ReadWrite,
        },
        devices: args.devices,
        tls,
        auth: auth.map(|(token, _)| token),
        max_memory: args.max_memory,
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
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
fn server_tls(args: &ServerArgs) -> Result<Option<ServerTls>, Fatal> {
    if args.no_tls {
        return Ok(None);
    }
    let dir = state_dir(args.state_dir.as_deref())?;
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
fn server_auth(args: &ServerArgs) -> Result<ServerAuth, Fatal> {
    if args.no_auth {
        return Ok(None);
    }
    Ok(match configured_token(args.token_file.as_deref())? {
        Some(token) => Some((token, None)),
        None => {
            let dir = state_dir(args.state_dir.as_deref())?;
            let (token, path, created) = ferry_engine::auth::load_or_create_token(&dir)
                .map_err(|e| Fatal::Failed(e.to_string()))?;
            Some((token, Some((path, created))))
        }
    })
}

/// Tell the operator, on stdout, where the server listens and what clients
/// need to reach it.
fn announce(local: SocketAddr, root: &Path, tls: Option<&ServerTls>, auth: &ServerAuth) {
    println!(
        "ferry server listening on {local} (root: {})",
        root.display()
    );
    match tls {
        Some(tls) => println!("ferry server fingerprint {}", tls.fingerprint()),
        None => println!("ferry server: TLS is off (--no-tls): sessions travel in plaintext"),
    }
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
fn log_setup(local: SocketAddr, root: &Path, tls: Option<&ServerTls>, auth: &ServerAuth) {
    tracing::info!("listening on {local}, root {}", root.display());
    match tls {
        Some(tls) => tracing::info!("TLS 1.3, certificate fingerprint {}", tls.fingerprint()),
        None => tracing::warn!("TLS is off (--no-tls): sessions travel in plaintext"),
    }
    match auth {
        Some((_, Some((path, true)))) => {
            tracing::info!("made a new client token in {}", path.display())
        }
        Some(_) => tracing::info!("clients must prove the token"),
        None => tracing::warn!(
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

/// The state directory given, or the default one.
fn state_dir(given: Option<&Path>) -> Result<PathBuf, Fatal> {
    given
        .map(Path::to_path_buf)
        .or_else(ferry_engine::tls::default_state_dir)
        .ok_or_else(|| {
            Fatal::Failed(
                "no state directory: set HOME or XDG_CONFIG_HOME, or pass --state-dir".into(),
            )
        })
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
    fn addresses() {
        assert_eq!(address("localhost", 8834), "localhost:8834");
        assert_eq!(address("::1", 1), "[::1]:1");
        assert_eq!(address("[::1]", 1), "[::1]:1");
    }
}

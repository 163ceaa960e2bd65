//! The client: connect, shake hands, ask, then send or receive.

use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::message::{Compression, Message};
use ferry_proto::path::{WireBytes, escape};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::conn::{
    BoxRead, BoxWrite, DataConn, FrameReader, FrameWriter, HANDSHAKE_TIMEOUT, Meter, check_version,
};
use crate::error::{EngineError, reason};
use crate::events::{EventSink, Tally, TransferSummary};
use crate::fsx;
use crate::receiver::{Destination, run_receiver};
use crate::sender::{SendJob, run_sender};

/// How long to wait for a TCP connection to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server is and how to talk to it.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port`, as given by the user (a name or an address).
    pub addr: String,
    pub compression: Compression,
    /// Connections for the session, the control one included (at least 1;
    /// the server may allow fewer).
    pub streams: u32,
    /// Count an upload's tree before sending, so that progress shows totals
    /// from the start. Costs a stat of every entry: worth it only when
    /// someone watches the progress.
    pub early_totals: bool,
}

/// The default number of connections: one per core, at most 8. More
/// connections than cores add context switches and no parallelism on the
/// CPU side, while a few already fill a long fat link.
pub fn default_streams() -> u32 {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8) as u32)
}

/// What identifies a session to the connections that join it.
#[derive(Clone)]
struct SessionKey {
    id: String,
    secret: String,
    max_streams: u32,
}

struct Connection {
    reader: FrameReader<BoxRead>,
    writer: FrameWriter<BoxWrite>,
    session: SessionKey,
    /// Bytes over all of the session's connections.
    meter: Meter,
}

/// Connect and exchange prefaces: a connection ready for its first message.
async fn connect(
    addr: &str,
    meter: &Meter,
) -> Result<(FrameReader<BoxRead>, FrameWriter<BoxWrite>), EngineError> {
    let connect_error = |reason: String| EngineError::Connect {
        addr: addr.to_string(),
        reason,
    };
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Err(_) => {
            let waited = CONNECT_TIMEOUT.as_secs();
            return Err(connect_error(format!("no answer within {waited} s")));
        }
        Ok(Err(e)) => return Err(connect_error(reason(&e))),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let mut reader = FrameReader::new(Box::new(r) as BoxRead, meter.clone());
    let mut writer = FrameWriter::new(Box::new(w) as BoxWrite, meter.clone());
    writer.preface().await?;
    check_version(reader.preface().await?)?;
    Ok((reader, writer))
}

/// The peer's next message, within the handshake timeout.
async fn reply(reader: &mut FrameReader<BoxRead>) -> Result<Message, EngineError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.message())
        .await
        .map_err(|_| EngineError::Timeout(HANDSHAKE_TIMEOUT.as_secs()))?
}

/// Open a data connection and attach it to `session`.
async fn join(addr: &str, session: &SessionKey, meter: &Meter) -> Result<DataConn, EngineError> {
    let (mut reader, mut writer) = connect(addr, meter).await?;
    writer
        .send_now(&Message::Join {
            session_id: session.id.clone(),
            secret: session.secret.clone(),
        })
        .await?;
    match reply(&mut reader).await? {
        Message::Joined => Ok(DataConn { reader, writer }),
        other => Err(EngineError::Protocol(format!(
            "expected joined, got {other:?}"
        ))),
    }
}

impl Connection {
    async fn open(addr: &str) -> Result<Self, EngineError> {
        let meter = Meter::default();
        let (mut reader, mut writer) = connect(addr, &meter).await?;
        writer
            .send_now(&Message::Hello {
                software: crate::SOFTWARE.to_string(),
            })
            .await?;
        match reply(&mut reader).await? {
            Message::Welcome {
                session_id,
                secret,
                max_streams,
                ..
            } => Ok(Connection {
                reader,
                writer,
                session: SessionKey {
                    id: session_id,
                    secret,
                    max_streams,
                },
                meter,
            }),
            other => Err(EngineError::Protocol(format!(
                "expected welcome, got {other:?}"
            ))),
        }
    }

    async fn reply(&mut self) -> Result<Message, EngineError> {
        reply(&mut self.reader).await
    }

    /// Open the session's data connections in the background: the
    /// transfer starts on the control connection and widens as they join.
    fn data_streams(&self, addr: &str, wanted: u32) -> mpsc::Receiver<DataConn> {
        let extra = wanted.min(self.session.max_streams).saturating_sub(1);
        let (tx, rx) = mpsc::channel(extra.max(1) as usize);
        for _ in 0..extra {
            let (addr, session, tx) = (addr.to_string(), self.session.clone(), tx.clone());
            let meter = self.meter.clone();
            tokio::spawn(async move {
                match join(&addr, &session, &meter).await {
                    Ok(conn) => {
                        let _ = tx.send(conn).await;
                    }
                    // One connection fewer is slower, not wrong.
                    Err(e) => tracing::warn!("a data connection could not join: {e}"),
                }
            });
        }
        rx
    }

    /// Send a request and wait for the server to accept it.
    async fn request(&mut self, msg: &Message) -> Result<(), EngineError> {
        self.writer.send_now(msg).await?;
        match self.reply().await? {
            Message::Ready => Ok(()),
            other => Err(EngineError::Protocol(format!(
                "expected ready, got {other:?}"
            ))),
        }
    }

    fn wire_bytes(&self) -> u64 {
        self.meter.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Send the local file or tree at `local` to `remote` (relative to the
/// server's root; the copy itself, not a directory to put it in).
pub async fn upload(
    config: &ClientConfig,
    local: &Path,
    remote: &[u8],
    events: Arc<dyn EventSink>,
    cancel: &CancellationToken,
) -> Result<TransferSummary, EngineError> {
    let started = Instant::now();
    let root = fsx::open_local_root(local).map_err(|e| EngineError::Local {
        path: escape(local.as_os_str().as_bytes()),
        reason: reason(&e),
    })?;
    let mut conn = Connection::open(&config.addr).await?;
    conn.request(&Message::Upload {
        dest: WireBytes(remote.to_vec()),
    })
    .await?;
    let joins = conn.data_streams(&config.addr, config.streams);
    let tally = Arc::new(Tally::new(events));
    let job = SendJob {
        root,
        compression: config.compression,
        label: escape(local.as_os_str().as_bytes()),
        early_totals: config.early_totals,
    };
    let result = run_sender(
        &mut conn.reader,
        &mut conn.writer,
        job,
        tally.clone(),
        cancel,
        joins,
    )
    .await;
    finish(conn, tally, started, result).await
}

/// Fetch the remote file or tree at `remote` into `local` (the copy itself;
/// missing parent directories are created).
pub async fn download(
    config: &ClientConfig,
    remote: &[u8],
    local: &Path,
    events: Arc<dyn EventSink>,
    cancel: &CancellationToken,
) -> Result<TransferSummary, EngineError> {
    let started = Instant::now();
    let dest = local_destination(local, escape(remote))?;
    let mut conn = Connection::open(&config.addr).await?;
    conn.request(&Message::Download {
        source: WireBytes(remote.to_vec()),
        compression: config.compression,
    })
    .await?;
    let joins = conn.data_streams(&config.addr, config.streams);
    let tally = Arc::new(Tally::new(events));
    let result = run_receiver(
        &mut conn.reader,
        &mut conn.writer,
        dest,
        tally.clone(),
        cancel,
        joins,
    )
    .await;
    finish(conn, tally, started, result).await
}

async fn finish(
    mut conn: Connection,
    tally: Arc<Tally>,
    started: Instant,
    result: Result<(), EngineError>,
) -> Result<TransferSummary, EngineError> {
    let _ = conn.writer.shutdown().await;
    result?;
    tally.add_wire_bytes(conn.wire_bytes());
    Ok(TransferSummary {
        report: tally.report(),
        elapsed: started.elapsed(),
    })
}

/// The local destination `path`: its parent directory (created if
/// missing, the user's own path, so followed as given) and its name.
fn local_destination(path: &Path, label: String) -> Result<Destination, EngineError> {
    let local_error = |reason: String| EngineError::Local {
        path: escape(path.as_os_str().as_bytes()),
        reason,
    };
    let name = path
        .file_name()
        .ok_or_else(|| local_error("the destination must name a file or directory".into()))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| local_error(reason(&e)))?;
    let base: OwnedFd = rustix::fs::open(
        parent,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| local_error(reason(&e.into())))?;
    Ok(Destination {
        base,
        prefix: vec![name.as_bytes().to_vec()],
        label,
    })
}

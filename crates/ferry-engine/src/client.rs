//! The client: connect, shake hands, ask, then send or receive.

use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::message::{Compression, Message};
use ferry_proto::path::{WireBytes, escape};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;

use crate::conn::{FrameReader, FrameWriter, HANDSHAKE_TIMEOUT, check_version};
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
}

struct Connection {
    reader: FrameReader<OwnedReadHalf>,
    writer: FrameWriter<OwnedWriteHalf>,
}

impl Connection {
    async fn open(addr: &str) -> Result<Self, EngineError> {
        let connect_error = |reason: String| EngineError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(connect_error(format!(
                    "no answer within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
            Ok(Err(e)) => return Err(connect_error(reason(&e))),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let mut conn = Connection {
            reader: FrameReader::new(r),
            writer: FrameWriter::new(w),
        };
        conn.writer.preface().await?;
        check_version(conn.reader.preface().await?)?;
        conn.writer
            .send_now(&Message::Hello {
                software: crate::SOFTWARE.to_string(),
            })
            .await?;
        match conn.reply().await? {
            Message::Welcome { .. } => Ok(conn),
            other => Err(EngineError::Protocol(format!(
                "expected welcome, got {other:?}"
            ))),
        }
    }

    async fn reply(&mut self) -> Result<Message, EngineError> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.reader.message())
            .await
            .map_err(|_| EngineError::Timeout(HANDSHAKE_TIMEOUT.as_secs()))?
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
        self.reader.bytes_read() + self.writer.bytes_written()
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
    let tally = Arc::new(Tally::new(events));
    let job = SendJob {
        root,
        compression: config.compression,
        label: escape(local.as_os_str().as_bytes()),
    };
    let result = run_sender(
        &mut conn.reader,
        &mut conn.writer,
        job,
        tally.clone(),
        cancel,
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
    let tally = Arc::new(Tally::new(events));
    let result = run_receiver(
        &mut conn.reader,
        &mut conn.writer,
        dest,
        tally.clone(),
        cancel,
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

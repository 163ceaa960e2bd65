//! Frames over a byte stream: the only place where protocol meets socket.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_proto::PROTOCOL_VERSION;
use ferry_proto::frame::{self, Frame};
use ferry_proto::message::Message;
use ferry_proto::preface::{PREFACE_LEN, Preface};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};

use crate::error::EngineError;

/// How long a peer may take to send its preface or first message.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Reads frames from one half of a connection.
pub(crate) struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    bytes_read: u64,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(256 * 1024),
            bytes_read: 0,
        }
    }

    /// The next frame; `Ok(None)` on a clean end of stream between frames.
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, EngineError> {
        loop {
            if let Some(frame) = frame::decode(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if self.buf.capacity() - self.buf.len() < 64 * 1024 {
                self.buf.reserve(256 * 1024);
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(EngineError::Closed)
                };
            }
            self.bytes_read += n as u64;
        }
    }

    /// The next frame if it is already buffered, without reading.
    pub(crate) fn buffered(&mut self) -> Result<Option<Frame>, EngineError> {
        Ok(frame::decode(&mut self.buf)?)
    }

    /// The next frame, which must be a control message.
    pub(crate) async fn message(&mut self) -> Result<Message, EngineError> {
        match self.next().await? {
            Some(Frame::Control(Message::Error { code, message })) => {
                Err(EngineError::Remote { code, message })
            }
            Some(Frame::Control(m)) => Ok(m),
            Some(Frame::Data(_)) => Err(EngineError::Protocol("unexpected data chunk".into())),
            None => Err(EngineError::Closed),
        }
    }

    /// Read the peer's preface, within the handshake timeout.
    pub(crate) async fn preface(&mut self) -> Result<Preface, EngineError> {
        let mut bytes = [0u8; PREFACE_LEN];
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.inner.read_exact(&mut bytes)).await {
            Err(_) => Err(EngineError::Timeout(HANDSHAKE_TIMEOUT.as_secs())),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(EngineError::Closed),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(_)) => {
                self.bytes_read += PREFACE_LEN as u64;
                Ok(Preface::decode(&bytes)?)
            }
        }
    }

    pub(crate) fn bytes_read(&self) -> u64 {
        self.bytes_read
    }
}

/// Writes frames to the other half, buffering small ones together.
pub(crate) struct FrameWriter<W: AsyncWrite> {
    inner: BufWriter<W>,
    scratch: BytesMut,
    bytes_written: u64,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        FrameWriter {
            inner: BufWriter::with_capacity(256 * 1024, inner),
            scratch: BytesMut::new(),
            bytes_written: 0,
        }
    }

    pub(crate) async fn preface(&mut self) -> Result<(), EngineError> {
        self.raw(&Preface::ours().encode()).await?;
        self.flush().await
    }

    /// Queue a control message (call [`flush`](Self::flush) to push it out).
    pub(crate) async fn send(&mut self, msg: &Message) -> Result<(), EngineError> {
        self.scratch.clear();
        frame::encode_control(msg, &mut self.scratch)?;
        let bytes = self.scratch.split().freeze();
        self.raw(&bytes).await
    }

    /// Send a message now.
    pub(crate) async fn send_now(&mut self, msg: &Message) -> Result<(), EngineError> {
        self.send(msg).await?;
        self.flush().await
    }

    /// Queue bytes that already hold whole frames.
    pub(crate) async fn raw(&mut self, frames: &[u8]) -> Result<(), EngineError> {
        self.inner.write_all(frames).await?;
        self.bytes_written += frames.len() as u64;
        Ok(())
    }

    pub(crate) async fn flush(&mut self) -> Result<(), EngineError> {
        self.inner.flush().await?;
        Ok(())
    }

    pub(crate) async fn shutdown(&mut self) -> Result<(), EngineError> {
        self.inner.shutdown().await?;
        Ok(())
    }

    pub(crate) fn bytes_written(&self) -> u64 {
        self.bytes_written
    }
}

/// Check the peer's version against ours.
pub(crate) fn check_version(peer: Preface) -> Result<(), EngineError> {
    if peer.version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(EngineError::VersionMismatch {
            peer: peer.version,
            ours: PROTOCOL_VERSION,
        })
    }
}

/// Write a stream of pre-encoded frames until the channel closes,
/// flushing whenever it runs dry so that small messages are not held back.
pub(crate) async fn pump<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    rx: &mut tokio::sync::mpsc::Receiver<Bytes>,
) -> Result<(), EngineError> {
    loop {
        let frames = match rx.try_recv() {
            Ok(f) => f,
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                writer.flush().await?;
                match rx.recv().await {
                    Some(f) => f,
                    None => break,
                }
            }
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break,
        };
        writer.raw(&frames).await?;
    }
    writer.flush().await
}

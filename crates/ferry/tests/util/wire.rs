//! The wire, written by hand: frames, the preface, and hostile peers'
//! sessions (PROTOCOL.md §3, §4), for tests that must send what no ferry
//! would. A hostile client may connect from any loopback address
//! ([`connect_from`]), so that a test can play many clients on one host.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Instant;

use super::files::MIB;
use super::server::{MAGIC, PROTOCOL_VERSION, Server, proof};

/// A control frame (type 1) holding `json`.
pub fn control_frame(json: &str) -> Vec<u8> {
    let mut frame = vec![1u8];
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(json.as_bytes());
    frame
}

/// A data frame (type 2, PROTOCOL.md §6): a chunk of `raw_len` bytes of
/// `file_id` at `offset`, in `codec` (0 raw, 1 zstd, 2 zeros), with
/// `payload` as its bytes on the wire.
pub fn data_frame(
    file_id: u64,
    offset: u64,
    raw_len: u32,
    codec: u8,
    hash: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::with_capacity(29 + payload.len());
    body.extend_from_slice(&file_id.to_be_bytes());
    body.extend_from_slice(&offset.to_be_bytes());
    body.extend_from_slice(&raw_len.to_be_bytes());
    body.push(codec);
    body.extend_from_slice(&hash.to_be_bytes());
    body.extend_from_slice(payload);
    let mut frame = vec![2u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// The 8 bytes that open a connection: magic and version.
pub fn preface() -> [u8; 8] {
    let mut bytes = [0u8; 8];
    bytes[..6].copy_from_slice(MAGIC);
    bytes[6..].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    bytes
}

/// A connection to `server` from `source` (any 127.x.y.z works on
/// Linux: the whole of 127/8 is this host).
pub fn connect_from(source: Ipv4Addr, server: &str) -> std::io::Result<TcpStream> {
    let server: SocketAddr = server.parse().expect("a server address");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
        socket.connect(server).await
    })?;
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// The first message of a download past its `totals`: the root's entry
/// (checked to be one).
pub fn read_root_entry(stream: &mut TcpStream, deadline: Instant) -> serde_json::Value {
    let entry = loop {
        let msg = read_message(stream, deadline);
        if msg["type"] != "totals" {
            break msg;
        }
    };
    assert_eq!(entry["type"], "entry", "{entry}");
    entry
}

/// Reads one frame; `None` at end of stream, an error, or the deadline.
pub fn read_frame(stream: &mut TcpStream, deadline: Instant) -> Option<(u8, Vec<u8>)> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return None;
    }
    stream.set_read_timeout(Some(left)).unwrap();
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).ok()?;
    let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
    // Bounded: no legitimate frame is larger (PROTOCOL.md §3).
    if len > 29 + 4 * MIB as usize {
        return None;
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    Some((header[0], body))
}

/// The control messages `stream` receives until `done`, `error`, the end
/// of the stream or the deadline, parsed.
pub fn read_messages(stream: &mut TcpStream, deadline: Instant) -> Vec<serde_json::Value> {
    let mut got = Vec::new();
    // Bounded by the deadline and by the count.
    while got.len() < 10_000 {
        let Some((kind, body)) = read_frame(stream, deadline) else {
            break;
        };
        if kind != 1 {
            continue;
        }
        let msg: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!("bad control body {:?}: {e}", String::from_utf8_lossy(&body))
        });
        let last = msg["type"] == "done" || msg["type"] == "error";
        got.push(msg);
        if last {
            break;
        }
    }
    got
}

/// The next frame, which must be a control message.
pub fn read_message(stream: &mut TcpStream, deadline: Instant) -> serde_json::Value {
    let (kind, body) = read_frame(stream, deadline).expect("a frame from the peer");
    assert_eq!(kind, 1, "a control frame");
    serde_json::from_slice(&body).unwrap()
}

/// Preface and `hello` on `stream`, and the proof of `token` (a server's,
/// see [`Server::token`]) if it asks: what the server then answered
/// (`welcome`, or why not).
pub fn greet(stream: &mut TcpStream, token: &str, deadline: Instant) -> serde_json::Value {
    let mut hello = preface().to_vec();
    hello.extend(control_frame(r#"{"type":"hello","software":"hostile"}"#));
    stream.write_all(&hello).unwrap();
    let mut theirs = [0u8; 8];
    stream.read_exact(&mut theirs).unwrap();
    assert_eq!(theirs, preface());
    let answer = read_message(stream, deadline);
    if answer["type"] != "challenge" {
        return answer;
    }
    let mac = proof(token, answer["nonce"].as_str().expect("a nonce"), b"");
    let auth = format!(r#"{{"type":"auth","mac":"{mac}"}}"#);
    stream.write_all(&control_frame(&auth)).unwrap();
    read_message(stream, deadline)
}

/// A hand-written client's session: preface and `hello` on `stream`, the
/// proof of `token` if the server asks, then `request` (a JSON message);
/// what the server answered it.
pub fn open_session(
    stream: &mut TcpStream,
    token: &str,
    request: &str,
    deadline: Instant,
) -> serde_json::Value {
    let welcome = greet(stream, token, deadline);
    if welcome["type"] != "welcome" {
        return welcome;
    }
    stream.write_all(&control_frame(request)).unwrap();
    read_message(stream, deadline)
}

/// A hand-written client's upload session to `dest`, accepted (`ready`).
/// It holds the server's token: the threat that remains.
pub fn hostile_upload_session(server: &Server, dest: &str, deadline: Instant) -> TcpStream {
    let request = format!(r#"{{"type":"upload","dest":"{dest}"}}"#);
    hostile_session(server, &request, deadline)
}

/// A hand-written client's download session of `source`, accepted: what
/// the server sent first (`ready`, then the transfer's first messages).
pub fn hostile_download_session(server: &Server, source: &str, deadline: Instant) -> TcpStream {
    let request =
        format!(r#"{{"type":"download","source":"{source}","compression":{{"mode":"off"}}}}"#);
    hostile_session(server, &request, deadline)
}

/// A hand-written client's session making `request`, past the token,
/// accepted (`ready`).
fn hostile_session(server: &Server, request: &str, deadline: Instant) -> TcpStream {
    let mut stream = server.plaintext_session("hostile");
    let welcome = read_message(&mut stream, deadline);
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    stream.write_all(&control_frame(request)).unwrap();
    let ready = read_message(&mut stream, deadline);
    assert_eq!(ready["type"], "ready", "{ready}\n{}", server.stderr());
    stream
}

//! The checks behind the fuzz targets in `fuzz/`, one function per target.
//!
//! They live here, not in the fuzz crate, so that a stable test
//! (`tests/fuzz_corpus.rs`) replays the committed corpus through exactly the
//! code libFuzzer runs, and so that they always compile with the crate.
//! Each function takes arbitrary bytes, must never panic on them, and
//! asserts an invariant of the decoder it drives: what decodes re-encodes
//! to something that decodes to the same value.

use bytes::{Bytes, BytesMut};

use crate::chunk::{Codec, DataChunk};
use crate::frame::{self, FRAME_HEADER_LEN, Frame, FrameError, MAX_DATA_BODY};
use crate::limits::MAX_CONTROL_LEN;
use crate::message::Message;
use crate::path::{WireBytes, WirePath, escape};

/// A stream of frames: decoding it whole and decoding it fed in two pieces
/// give the same frames and the same error; each frame re-encodes; a
/// decoder that waits for more bytes consumes nothing and reserves no more
/// than the limits allow.
pub fn frame(data: &[u8]) {
    let whole = decode_stream(data, data.len());
    // Where the stream is cut comes from the input (its last byte scaled to
    // its length), so the fuzzer explores cuts everywhere.
    let cut = data
        .last()
        .map_or(0, |&b| usize::from(b) * data.len() / 255);
    let fed_in_two = decode_stream(data, cut);
    assert_eq!(whole, fed_in_two, "decoding depends on how bytes arrive");
}

/// What decoding a stream gave: each frame, then the error that stopped it
/// (as text: `FrameError` holds a `serde_json::Error`, which has no `Eq`).
type Decoded = (Vec<Frame>, Option<String>);

fn decode_stream(data: &[u8], cut: usize) -> Decoded {
    let mut buf = BytesMut::from(&data[..cut]);
    let mut fed = cut;
    let mut pos = 0;
    let mut frames = Vec::new();
    loop {
        let before = buf.len();
        match frame::decode(&mut buf) {
            Ok(Some(f)) => {
                let used = before - buf.len();
                check_frame(&f, &data[pos..pos + used]);
                pos += used;
                frames.push(f);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete frame consumed bytes");
                let most = 2 * (FRAME_HEADER_LEN + MAX_DATA_BODY as usize).max(data.len());
                assert!(buf.capacity() <= most, "reserved {}", buf.capacity());
                if fed == data.len() {
                    return (frames, None);
                }
                buf.extend_from_slice(&data[fed..]);
                fed = data.len();
            }
            Err(e) => return (frames, Some(e.to_string())),
        }
    }
}

/// `f` was decoded from exactly the bytes `wire`.
fn check_frame(f: &Frame, wire: &[u8]) {
    let body = &wire[FRAME_HEADER_LEN..];
    let len = u32::from_be_bytes([wire[1], wire[2], wire[3], wire[4]]);
    assert_eq!(len as usize, body.len());
    match f {
        Frame::Control(msg) => {
            assert_eq!(wire[0], 1);
            assert!(len <= MAX_CONTROL_LEN);
            check_message(msg);
        }
        Frame::Data(chunk) => {
            assert_eq!(wire[0], 2);
            assert!(len <= MAX_DATA_BODY);
            // The data frame encoding is canonical: byte for byte the same.
            let mut again = BytesMut::new();
            frame::encode_data(&chunk.header, &chunk.payload, &mut again);
            assert_eq!(&again[..], wire);
        }
    }
}

/// A JSON control message: what decodes re-encodes (as JSON and as a
/// frame) to the same message, and its JSON is canonical from then on.
pub fn control(data: &[u8]) {
    // The fast path for per-file messages must read as serde does.
    let fast = Message::from_json(data).ok();
    let Ok(msg) = serde_json::from_slice::<Message>(data) else {
        assert!(fast.is_none(), "the fast path took what serde refuses");
        return;
    };
    assert_eq!(fast.as_ref(), Some(&msg), "the fast path read it otherwise");
    check_message(&msg);
}

fn check_message(msg: &Message) {
    let json = serde_json::to_vec(msg).expect("a decoded message re-encodes");
    let back: Message = serde_json::from_slice(&json).expect("a re-encoded message decodes");
    assert_eq!(&back, msg);
    assert_eq!(
        serde_json::to_vec(&back).unwrap(),
        json,
        "JSON not canonical"
    );

    let mut buf = BytesMut::new();
    match frame::encode_control(msg, &mut buf) {
        Ok(()) => {
            // The fast writer for per-file messages writes serde's bytes.
            assert_eq!(
                &buf[frame::FRAME_HEADER_LEN..],
                &json[..],
                "the fast path wrote it otherwise"
            );
            let again = frame::decode(&mut buf).expect("our own frame decodes");
            assert_eq!(again, Some(Frame::Control(msg.clone())));
            assert!(buf.is_empty());
        }
        // A message can grow when re-encoded (a `b64` path that is valid
        // UTF-8 full of control characters becomes a string of `\u00XX`
        // escapes), so one that arrived within the limit may not be
        // sendable. That is an error, not a panic.
        Err(FrameError::ControlTooLarge(n)) => assert!(n > MAX_CONTROL_LEN as usize),
        Err(e) => panic!("encoding a decoded message failed: {e}"),
    }
}

/// A data chunk body: what decodes is valid by §6 items 1 to 5 and
/// re-encodes byte for byte, alone and inside a frame.
pub fn chunk(data: &[u8]) {
    let Ok(c) = DataChunk::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    let h = c.header;
    assert!(h.offset.checked_add(u64::from(h.raw_len)).is_some());
    assert_eq!(h.end(), h.offset + u64::from(h.raw_len));
    match h.codec {
        Codec::Raw => assert_eq!(c.payload.len(), h.raw_len as usize),
        Codec::Zstd | Codec::Delta => {
            assert!(!c.payload.is_empty() && c.payload.len() < h.raw_len as usize)
        }
        Codec::Zeros => {
            assert!(c.payload.is_empty());
            assert_eq!(h.raw_len, crate::limits::DEFAULT_CHUNK_LEN);
        }
    }
    let mut again = Vec::new();
    h.encode(&mut again);
    again.extend_from_slice(&c.payload);
    assert_eq!(again, data);

    let mut buf = BytesMut::new();
    frame::encode_data(&h, &c.payload, &mut buf);
    assert_eq!(frame::decode(&mut buf).unwrap(), Some(Frame::Data(c)));
    assert!(buf.is_empty());
}

/// Path bytes: a parsed path holds only plain components and rebuilds
/// from them; everything shown to a user is free of terminal controls;
/// any bytes survive both JSON forms.
pub fn wire_path(data: &[u8]) {
    match WirePath::parse(data) {
        Ok(p) => {
            assert_eq!(p.as_bytes(), data);
            assert!(!data.starts_with(b"/") && !data.contains(&0));
            let components: Vec<&[u8]> = p.components().collect();
            for c in &components {
                assert!(!c.is_empty() && c != b"." && c != b"..");
                assert!(!c.contains(&b'/'));
            }
            assert_eq!(components.join(&b'/'), data);
            // Joining the last component back onto the parent rebuilds the
            // path (once, not per component: that would be quadratic).
            if let Some((last, parent)) = components.split_last() {
                let parent = WirePath::parse(&parent.join(&b'/')).expect("a parent is valid");
                assert_eq!(parent.join(last).expect("a component joins"), p);
            }
            assert_eq!(p.to_wire().as_bytes(), data);
            assert_terminal_safe(&p.display());
        }
        Err(e) => assert_terminal_safe(&e.to_string()),
    }
    assert_terminal_safe(&escape(data));

    // The bytes as a path value in a message.
    let wire = WireBytes::from(data);
    let json = serde_json::to_string(&wire).unwrap();
    assert_eq!(json.starts_with('"'), std::str::from_utf8(data).is_ok());
    let back: WireBytes = serde_json::from_str(&json).unwrap();
    assert_eq!(back, wire);

    // The bytes as the JSON text of a path value.
    if let Ok(w) = serde_json::from_slice::<WireBytes>(data) {
        let json = serde_json::to_string(&w).unwrap();
        let back: WireBytes = serde_json::from_str(&json).unwrap();
        assert_eq!(back, w);
    }
}

fn assert_terminal_safe(shown: &str) {
    for c in shown.chars() {
        let bidi_or_zero_width = matches!(c,
            '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        assert!(
            !c.is_control() && !bidi_or_zero_width,
            "{c:?} reaches the terminal in {shown:?}"
        );
    }
}

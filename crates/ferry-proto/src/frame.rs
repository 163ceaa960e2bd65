//! Frames: how messages and chunks are delimited on a connection.
//!
//! ```text
//! type    u8       1 = control (JSON message), 2 = data (chunk)
//! length  u32 BE   length of the body that follows
//! body    …
//! ```
//!
//! Decoding follows "check, then parse, then advance": the header is read,
//! its type and length are checked against the per-type maximum, and only
//! then is room reserved for the body. A frame that is not yet complete is
//! `Ok(None)`, a state rather than an error.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::chunk::{CHUNK_HEADER_LEN, ChunkError, ChunkHeader, DataChunk};
use crate::json;
use crate::limits::{MAX_CHUNK_LEN, MAX_CONTROL_LEN};
use crate::message::Message;

/// Length of the frame header (type and length).
pub const FRAME_HEADER_LEN: usize = 5;

const TYPE_CONTROL: u8 = 1;
const TYPE_DATA: u8 = 2;

/// The largest body a data frame may have.
pub const MAX_DATA_BODY: u32 = CHUNK_HEADER_LEN as u32 + MAX_CHUNK_LEN;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Control(Message),
    Data(DataChunk),
}

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("{kind} frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        kind: &'static str,
        len: u32,
        max: u32,
    },
    /// serde's words may quote what the peer sent (an unknown `type`,
    /// say): escaped, so that a peer cannot put control characters into a
    /// log line or onto a terminal.
    #[error("malformed control message: {}", crate::path::escape(.0.to_string().as_bytes()))]
    BadMessage(#[from] serde_json::Error),
    #[error(transparent)]
    BadChunk(#[from] ChunkError),
    #[error("control message of {0} bytes is too large to send")]
    ControlTooLarge(usize),
}

/// Append a control frame carrying `msg` to `dst`. The JSON is written
/// in place, behind a header whose length is filled in after it; on an
/// error `dst` is left as it was.
pub fn encode_control(msg: &Message, dst: &mut BytesMut) -> Result<(), FrameError> {
    let start = dst.len();
    dst.put_u8(TYPE_CONTROL);
    dst.put_u32(0);
    let written = json::write(msg, dst);
    let len = dst.len() - start - FRAME_HEADER_LEN;
    if let Err(e) = written {
        dst.truncate(start);
        return Err(e.into());
    }
    if len > MAX_CONTROL_LEN as usize {
        dst.truncate(start);
        return Err(FrameError::ControlTooLarge(len));
    }
    dst[start + 1..start + FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Append a data frame with this chunk header and encoded payload to `dst`.
///
/// The caller guarantees the payload respects the header (the sender builds
/// both); the receiver re-checks everything in [`decode`].
pub fn encode_data(header: &ChunkHeader, payload: &[u8], dst: &mut BytesMut) {
    let body_len = CHUNK_HEADER_LEN + payload.len();
    dst.reserve(FRAME_HEADER_LEN + body_len);
    dst.put_u8(TYPE_DATA);
    dst.put_u32(body_len as u32);
    header.encode(dst);
    dst.put_slice(payload);
}

/// Bytes in front of a data frame's payload: the frame header, then the
/// chunk header.
pub const DATA_PREFIX_LEN: usize = FRAME_HEADER_LEN + CHUNK_HEADER_LEN;

/// Write the prefix of a data frame whose payload (`payload_len` bytes)
/// follows it in the same buffer: for a sender that reads file bytes
/// straight into the frame rather than copying them there. `dst` is at
/// least [`DATA_PREFIX_LEN`] bytes; only those are written.
pub fn write_data_prefix(header: &ChunkHeader, payload_len: usize, dst: &mut [u8]) {
    let mut dst = &mut dst[..DATA_PREFIX_LEN];
    dst.put_u8(TYPE_DATA);
    dst.put_u32((CHUNK_HEADER_LEN + payload_len) as u32);
    header.encode(&mut dst);
}

/// Decode one frame from the front of `src`, advancing past it.
///
/// Returns `Ok(None)` when `src` does not yet hold a whole frame; room for
/// the rest of the frame is reserved in `src` then, within the limits.
pub fn decode(src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if src.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let frame_type = src[0];
    let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]);
    let (kind, max) = match frame_type {
        TYPE_CONTROL => ("control", MAX_CONTROL_LEN),
        TYPE_DATA => ("data", MAX_DATA_BODY),
        other => return Err(FrameError::UnknownType(other)),
    };
    if len > max {
        return Err(FrameError::TooLarge { kind, len, max });
    }
    let total = FRAME_HEADER_LEN + len as usize;
    if src.len() < total {
        src.reserve(total - src.len());
        return Ok(None);
    }
    src.advance(FRAME_HEADER_LEN);
    let body: Bytes = src.split_to(len as usize).freeze();
    let frame = match frame_type {
        TYPE_CONTROL => Frame::Control(Message::from_json(&body)?),
        _ => Frame::Data(DataChunk::decode(body)?),
    };
    Ok(Some(frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Codec;
    use crate::message::{ErrorCode, Message};

    #[test]
    fn a_malformed_message_cannot_put_control_characters_into_a_log_line() {
        let forged = r#"{"type":"x\nWARN forged line\u001b[2J"}"#;
        let mut buf = BytesMut::new();
        buf.put_u8(1);
        buf.put_u32(forged.len() as u32);
        buf.put_slice(forged.as_bytes());
        let e = decode(&mut buf).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("malformed control message"), "{text}");
        assert!(!text.chars().any(|c| c.is_control()), "{text:?}");
    }
    use proptest::prelude::*;

    fn control_bytes(msg: &Message) -> BytesMut {
        let mut b = BytesMut::new();
        encode_control(msg, &mut b).unwrap();
        b
    }

    #[test]
    fn golden_control_frame() {
        let b = control_bytes(&Message::End);
        assert_eq!(&b[..], b"\x01\x00\x00\x00\x0e{\"type\":\"end\"}");
    }

    #[test]
    fn golden_data_frame() {
        let mut b = BytesMut::new();
        let h = ChunkHeader {
            file_id: 1,
            offset: 0,
            raw_len: 2,
            codec: Codec::Raw,
            hash: 0,
        };
        encode_data(&h, b"hi", &mut b);
        assert_eq!(&b[..5], &[2, 0, 0, 0, 31]);
        assert_eq!(&b[5 + 29..], b"hi");
    }

    #[test]
    fn an_oversized_control_message_is_refused_and_leaves_the_buffer_as_it_was() {
        let mut b = control_bytes(&Message::End);
        let before = b.clone();
        let huge = Message::error(ErrorCode::Io, "x".repeat(MAX_CONTROL_LEN as usize));
        assert!(matches!(
            encode_control(&huge, &mut b),
            Err(FrameError::ControlTooLarge(n)) if n > MAX_CONTROL_LEN as usize
        ));
        assert_eq!(b, before);
        // What follows still frames correctly.
        encode_control(&Message::Ready, &mut b).unwrap();
        assert_eq!(decode(&mut b).unwrap(), Some(Frame::Control(Message::End)));
        assert_eq!(
            decode(&mut b).unwrap(),
            Some(Frame::Control(Message::Ready))
        );
    }

    #[test]
    fn a_prefix_written_in_place_makes_the_same_frame() {
        let h = ChunkHeader {
            file_id: 7,
            offset: 1 << 20,
            raw_len: 5,
            codec: Codec::Zstd,
            hash: 0xfeed,
        };
        let mut appended = BytesMut::new();
        encode_data(&h, b"12345", &mut appended);
        let mut in_place = vec![0xaa; DATA_PREFIX_LEN];
        in_place.extend_from_slice(b"12345");
        write_data_prefix(&h, 5, &mut in_place);
        assert_eq!(&appended[..], &in_place[..]);
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let whole = control_bytes(&Message::Ready);
        for cut in 0..whole.len() {
            let mut partial = BytesMut::from(&whole[..cut]);
            assert!(decode(&mut partial).unwrap().is_none(), "cut at {cut}");
            assert_eq!(partial.len(), cut, "nothing consumed");
        }
        let mut full = whole.clone();
        assert_eq!(
            decode(&mut full).unwrap(),
            Some(Frame::Control(Message::Ready))
        );
        assert!(full.is_empty());
    }

    #[test]
    fn oversized_lengths_are_refused_before_allocating() {
        let mut huge = BytesMut::from(&[TYPE_DATA, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            decode(&mut huge),
            Err(FrameError::TooLarge { kind: "data", .. })
        ));
        assert!(
            huge.capacity() < 1024,
            "no room reserved for the claimed body"
        );
        let mut big_control = BytesMut::from(&[TYPE_CONTROL, 0, 0x10, 0, 0][..]);
        assert!(matches!(
            decode(&mut big_control),
            Err(FrameError::TooLarge {
                kind: "control",
                ..
            })
        ));
    }

    #[test]
    fn garbage_is_refused() {
        let mut unknown = BytesMut::from(&[9u8, 0, 0, 0, 0][..]);
        assert!(matches!(
            decode(&mut unknown),
            Err(FrameError::UnknownType(9))
        ));
        let mut not_json = BytesMut::from(&b"\x01\x00\x00\x00\x03abc"[..]);
        assert!(matches!(
            decode(&mut not_json),
            Err(FrameError::BadMessage(_))
        ));
        let mut short_chunk = BytesMut::from(&b"\x02\x00\x00\x00\x03abc"[..]);
        assert!(matches!(
            decode(&mut short_chunk),
            Err(FrameError::BadChunk(_))
        ));
    }

    #[test]
    fn back_to_back_frames() {
        let mut b = control_bytes(&Message::Ready);
        b.extend_from_slice(&control_bytes(&Message::error(ErrorCode::Io, "x")));
        assert_eq!(
            decode(&mut b).unwrap(),
            Some(Frame::Control(Message::Ready))
        );
        assert!(matches!(
            decode(&mut b).unwrap(),
            Some(Frame::Control(Message::Error { .. }))
        ));
        assert_eq!(decode(&mut b).unwrap(), None);
    }

    proptest! {
        #[test]
        fn data_round_trip_split_anywhere(payload in proptest::collection::vec(any::<u8>(), 1..4096), id: u64, split in 0usize..5000) {
            let h = ChunkHeader { file_id: id, offset: 0, raw_len: payload.len() as u32, codec: Codec::Raw, hash: 1 };
            let mut whole = BytesMut::new();
            encode_data(&h, &payload, &mut whole);
            let split = split.min(whole.len());
            let mut buf = BytesMut::from(&whole[..split]);
            let first = decode(&mut buf).unwrap();
            if split < whole.len() {
                prop_assert!(first.is_none());
                buf.extend_from_slice(&whole[split..]);
            } else {
                prop_assert!(first.is_some());
                return Ok(());
            }
            match decode(&mut buf).unwrap() {
                Some(Frame::Data(c)) => { prop_assert_eq!(c.header, h); prop_assert_eq!(&c.payload[..], &payload[..]); }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..8 {
                match decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
        }
    }
}

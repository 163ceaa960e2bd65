//! A control message's JSON body, read and written: the per-file messages
//! by the hand-written fast path in `hot` when it takes them, everything
//! else, and whatever that path declines, by serde.
//!
//! The choice lives here, above both, so that `message` only defines the
//! types and `hot` only knows their canonical form: `frame` and the fuzz
//! checks reach the codec through this module.

use bytes::{BufMut, BytesMut};

use crate::hot;
use crate::message::Message;

impl Message {
    /// Read a control message's JSON body: the messages sent once per file
    /// by a fast path that takes only their canonical form (see `hot`),
    /// everything else, and whatever that path declines, by serde.
    pub fn from_json(body: &[u8]) -> Result<Message, serde_json::Error> {
        match hot::parse(body) {
            Some(msg) => Ok(msg),
            None => serde_json::from_slice(body),
        }
    }
}

/// Append `msg`'s JSON to `dst`, byte for byte what serde writes. On an
/// error `dst` may hold part of it: the caller truncates.
pub(crate) fn write(msg: &Message, dst: &mut BytesMut) -> Result<(), serde_json::Error> {
    // The per-file messages skip serde when they can: see `hot`.
    match hot::write(msg, dst) {
        true => Ok(()),
        false => serde_json::to_writer(dst.writer(), msg),
    }
}

//! The preface: the first 8 bytes each side sends on a new connection.
//!
//! `FERRY\0` followed by the protocol version as a big-endian `u16`. It is
//! fixed forever, so that two ferry builds of any versions can always tell
//! each other which version they speak and fail with a clear message
//! instead of misreading each other's frames.

use thiserror::Error;

/// The magic bytes that open every ferry connection.
pub const MAGIC: [u8; 6] = *b"FERRY\0";
/// Length of the preface in bytes.
pub const PREFACE_LEN: usize = 8;

/// What a peer announced in its preface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preface {
    pub version: u16,
}

/// The preface did not come from a ferry peer.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("the peer is not a ferry endpoint (it sent {got:02x?} instead of the ferry preface)")]
pub struct PrefaceError {
    pub got: [u8; PREFACE_LEN],
}

impl Preface {
    /// The preface for the version this crate speaks.
    pub fn ours() -> Self {
        Preface {
            version: crate::PROTOCOL_VERSION,
        }
    }

    pub fn encode(&self) -> [u8; PREFACE_LEN] {
        let mut out = [0u8; PREFACE_LEN];
        out[..6].copy_from_slice(&MAGIC);
        out[6..].copy_from_slice(&self.version.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8; PREFACE_LEN]) -> Result<Self, PrefaceError> {
        if bytes[..6] != MAGIC {
            return Err(PrefaceError { got: *bytes });
        }
        Ok(Preface {
            version: u16::from_be_bytes([bytes[6], bytes[7]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_bytes() {
        assert_eq!(
            Preface { version: 1 }.encode(),
            [0x46, 0x45, 0x52, 0x52, 0x59, 0x00, 0x00, 0x01]
        );
    }

    /// The preface this build sends (PROTOCOL.md §2).
    #[test]
    fn golden_bytes_of_this_version() {
        assert_eq!(
            Preface::ours().encode(),
            [0x46, 0x45, 0x52, 0x52, 0x59, 0x00, 0x00, 0x08]
        );
    }

    #[test]
    fn round_trip_and_reject() {
        let p = Preface { version: 0xBEEF };
        assert_eq!(Preface::decode(&p.encode()), Ok(p));
        assert!(Preface::decode(b"SSH-2.0-").is_err());
    }
}

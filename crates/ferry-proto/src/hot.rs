//! The control messages that travel once per file, read and written
//! without serde.
//!
//! A tree of small files costs three control messages per file (`entry`,
//! `file_end`, `outcome`), and serde reads a tagged enum by buffering the
//! whole object first: on 20,000 files of 4 KiB that was a fifth of what
//! both ends spend outside the kernel. Writing them through serde costs the
//! sender a map serializer per flattened field and an escape scan per key.
//! These messages have one canonical form, the one serde writes (fields in
//! declaration order, no whitespace). This reader takes exactly that form
//! and nothing else; anything it does not take (other messages, another
//! field order, escapes in a string, a number with a sign or a leading
//! zero, …) goes to serde, which stays the authority on what is valid JSON:
//! what this reader accepts, serde reads the same way. The writer writes
//! byte for byte what serde would, and declines every message or string
//! that would need more than copying (a path with a quote, say). Property
//! tests hold both to serde, and the control fuzz target checks every
//! message it decodes.

use bytes::{BufMut, BytesMut};

use crate::message::{EntryKind, Message, Mtime, Outcome, Owner};
use crate::path::WireBytes;

/// Append `msg`'s JSON to `out` as serde writes it, if it is a hot message
/// whose strings need no escape; otherwise leave `out` as it was and
/// return false.
pub(crate) fn write(msg: &Message, out: &mut BytesMut) -> bool {
    match msg {
        // An entry with a digest (`checksum`) goes through serde.
        Message::Entry {
            id,
            path,
            kind,
            owner,
            digest: None,
        } => {
            let Some(path) = plain(path.as_bytes()) else {
                return false;
            };
            let (mode, mtime) = match kind {
                EntryKind::File { mode, mtime, .. } | EntryKind::Dir { mode, mtime } => {
                    (*mode, mtime)
                }
                _ => return false,
            };
            out.put_slice(b"{\"type\":\"entry\",\"id\":");
            put_unsigned(out, *id);
            out.put_slice(b",\"path\":\"");
            out.put_slice(path);
            if let EntryKind::File { size, .. } = kind {
                out.put_slice(b"\",\"kind\":\"file\",\"size\":");
                put_unsigned(out, *size);
                out.put_slice(b",\"mode\":");
            } else {
                out.put_slice(b"\",\"kind\":\"dir\",\"mode\":");
            }
            put_unsigned(out, u64::from(mode));
            out.put_slice(b",\"mtime\":{\"sec\":");
            if mtime.sec < 0 {
                out.put_u8(b'-');
            }
            put_unsigned(out, mtime.sec.unsigned_abs());
            out.put_slice(b",\"nsec\":");
            put_unsigned(out, u64::from(mtime.nsec));
            out.put_u8(b'}');
            if let Some(owner) = owner {
                out.put_slice(b",\"owner\":{\"uid\":");
                put_unsigned(out, u64::from(owner.uid));
                out.put_slice(b",\"gid\":");
                put_unsigned(out, u64::from(owner.gid));
                out.put_u8(b'}');
            }
            out.put_u8(b'}');
        }
        Message::FileEnd { id, digest } => {
            let Some(digest) = plain(digest.as_bytes()) else {
                return false;
            };
            out.put_slice(b"{\"type\":\"file_end\",\"id\":");
            put_unsigned(out, *id);
            out.put_slice(b",\"digest\":\"");
            out.put_slice(digest);
            out.put_slice(b"\"}");
        }
        Message::Outcome { id, outcome } => {
            let status: &[u8] = match outcome {
                Outcome::Ok => b"ok",
                Outcome::Unchanged => b"unchanged",
                _ => return false,
            };
            out.put_slice(b"{\"type\":\"outcome\",\"id\":");
            put_unsigned(out, *id);
            out.put_slice(b",\"status\":\"");
            out.put_slice(status);
            out.put_slice(b"\"}");
        }
        _ => return false,
    }
    true
}

/// `text` if JSON writes it as it is: UTF-8 with no quote, no backslash
/// and no control character (the only bytes serde escapes).
fn plain(text: &[u8]) -> Option<&[u8]> {
    let needs_escape = text.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20);
    (!needs_escape && std::str::from_utf8(text).is_ok()).then_some(text)
}

/// `n` in decimal, as JSON writes an unsigned integer.
fn put_unsigned(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[at..]);
}

/// `body` as one of the hot messages in canonical form, if it is one.
pub(crate) fn parse(body: &[u8]) -> Option<Message> {
    let mut c = Cursor { rest: body };
    c.lit(b"{\"type\":\"")?;
    let msg = if c.lit(b"entry\",\"id\":").is_some() {
        entry(&mut c)?
    } else if c.lit(b"file_end\",\"id\":").is_some() {
        let id = c.unsigned()?;
        c.lit(b",\"digest\":")?;
        let digest = c.plain_str()?.to_string();
        Message::FileEnd { id, digest }
    } else if c.lit(b"outcome\",\"id\":").is_some() {
        let id = c.unsigned()?;
        c.lit(b",\"status\":")?;
        let outcome = match c.plain_str()? {
            "ok" => Outcome::Ok,
            "unchanged" => Outcome::Unchanged,
            _ => return None,
        };
        Message::Outcome { id, outcome }
    } else {
        return None;
    };
    c.lit(b"}")?;
    c.rest.is_empty().then_some(msg)
}

/// The rest of a file's or a directory's `entry`, after `"id":`.
fn entry(c: &mut Cursor<'_>) -> Option<Message> {
    let id = c.unsigned()?;
    c.lit(b",\"path\":")?;
    let path = WireBytes::from(c.plain_str()?);
    c.lit(b",\"kind\":\"")?;
    let kind = if c.lit(b"file\",\"size\":").is_some() {
        let size = c.unsigned()?;
        c.lit(b",\"mode\":")?;
        let mode = u32::try_from(c.unsigned()?).ok()?;
        EntryKind::File {
            size,
            mode,
            mtime: mtime(c)?,
        }
    } else if c.lit(b"dir\",\"mode\":").is_some() {
        let mode = u32::try_from(c.unsigned()?).ok()?;
        EntryKind::Dir {
            mode,
            mtime: mtime(c)?,
        }
    } else {
        return None;
    };
    let owner = if c.lit(b",\"owner\":{\"uid\":").is_some() {
        let uid = u32::try_from(c.unsigned()?).ok()?;
        c.lit(b",\"gid\":")?;
        let gid = u32::try_from(c.unsigned()?).ok()?;
        c.lit(b"}")?;
        Some(Owner { uid, gid })
    } else {
        None
    };
    Some(Message::Entry {
        id,
        path,
        kind,
        owner,
        digest: None,
    })
}

/// `,"mtime":{"sec":S,"nsec":N}`.
fn mtime(c: &mut Cursor<'_>) -> Option<Mtime> {
    c.lit(b",\"mtime\":{\"sec\":")?;
    let sec = c.signed()?;
    c.lit(b",\"nsec\":")?;
    let nsec = u32::try_from(c.unsigned()?).ok()?;
    c.lit(b"}")?;
    Some(Mtime { sec, nsec })
}

struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Consume `expected`, if the input goes on with exactly it.
    fn lit(&mut self, expected: &[u8]) -> Option<()> {
        self.rest = self.rest.strip_prefix(expected)?;
        Some(())
    }

    /// Digits as JSON writes an unsigned integer: no sign, no leading zero,
    /// no fraction or exponent, within u64.
    fn unsigned(&mut self) -> Option<u64> {
        let digits = self.rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let (number, rest) = self.rest.split_at(digits);
        if digits == 0 || (digits > 1 && number[0] == b'0') {
            return None;
        }
        // A fraction or an exponent makes it no integer of ours.
        if matches!(rest.first(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        let value = number.iter().try_fold(0u64, |acc, &d| {
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })?;
        self.rest = rest;
        Some(value)
    }

    /// An integer within i64, with an optional minus sign.
    fn signed(&mut self) -> Option<i64> {
        let negative = self.lit(b"-").is_some();
        let magnitude = self.unsigned()?;
        if negative && magnitude == 0 {
            // JSON's -0 is a float to serde (the fuzzer found this).
            return None;
        }
        if negative {
            // i64::MIN's magnitude is one past i64::MAX.
            0i64.checked_sub_unsigned(magnitude)
        } else {
            i64::try_from(magnitude).ok()
        }
    }

    /// A string with nothing to unescape: UTF-8 up to the closing quote,
    /// with no backslash and no control character (which JSON forbids
    /// unescaped).
    fn plain_str(&mut self) -> Option<&'a str> {
        self.lit(b"\"")?;
        let end = self
            .rest
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if self.rest[end] != b'"' {
            return None;
        }
        let text = std::str::from_utf8(&self.rest[..end]).ok()?;
        self.rest = &self.rest[end + 1..];
        Some(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn via_serde(body: &[u8]) -> Option<Message> {
        serde_json::from_slice(body).ok()
    }

    /// What the fast writer makes of `msg`, if it takes it.
    fn written(msg: &Message) -> Option<Vec<u8>> {
        let mut out = BytesMut::new();
        let took = write(msg, &mut out);
        assert!(
            took || out.is_empty(),
            "a declined message left bytes behind"
        );
        took.then(|| out.to_vec())
    }

    #[test]
    fn writes_what_serde_writes_and_declines_what_needs_escapes() {
        let file = |path: &[u8], sec| Message::Entry {
            id: u64::MAX,
            path: WireBytes(path.to_vec()),
            kind: EntryKind::File {
                size: 0,
                mode: u32::MAX,
                mtime: Mtime { sec, nsec: 0 },
            },
            owner: None,
            digest: None,
        };
        let owned = |owner| Message::Entry {
            id: 2,
            path: "d".into(),
            kind: EntryKind::Dir {
                mode: 0o700,
                mtime: Mtime { sec: 1, nsec: 2 },
            },
            owner: Some(owner),
            digest: None,
        };
        for msg in [
            owned(Owner { uid: 0, gid: 0 }),
            owned(Owner {
                uid: u32::MAX,
                gid: 65534,
            }),
            file(b"a/b c", i64::MIN),
            file(b"", i64::MAX),
            file("é/\u{7f}".as_bytes(), -1),
            Message::Outcome {
                id: 0,
                outcome: Outcome::Unchanged,
            },
        ] {
            let body = written(&msg).expect("a hot message is written");
            assert_eq!(body, serde_json::to_vec(&msg).unwrap());
        }
        for msg in [
            file(b"a\"b", 0),
            file(b"a\\b", 0),
            file(b"tab\there", 0),
            file(b"\xff", 0),
            Message::FileEnd {
                id: 1,
                digest: "\n".into(),
            },
            Message::Outcome {
                id: 1,
                outcome: Outcome::Failed("disk full".into()),
            },
            Message::End,
        ] {
            assert_eq!(written(&msg), None, "{msg:?}");
        }
    }

    #[test]
    fn reads_the_canonical_forms() {
        for msg in [
            Message::Entry {
                id: 7,
                path: "dir/file name.txt".into(),
                kind: EntryKind::File {
                    size: 4096,
                    mode: 0o644,
                    mtime: Mtime {
                        sec: -5,
                        nsec: 999_999_999,
                    },
                },
                owner: None,
                digest: None,
            },
            Message::Entry {
                id: 8,
                path: "f".into(),
                kind: EntryKind::File {
                    size: 1,
                    mode: 0o600,
                    mtime: Mtime { sec: 5, nsec: 0 },
                },
                owner: Some(Owner {
                    uid: 1000,
                    gid: 4_294_967_295,
                }),
                digest: None,
            },
            Message::Entry {
                id: 1,
                path: "".into(),
                kind: EntryKind::Dir {
                    mode: 0o755,
                    mtime: Mtime { sec: 0, nsec: 0 },
                },
                owner: None,
                digest: None,
            },
            Message::FileEnd {
                id: u64::MAX,
                digest: "553ac1fdd3cd2fbe408dc8693462f526".into(),
            },
            Message::Outcome {
                id: 3,
                outcome: Outcome::Ok,
            },
            Message::Outcome {
                id: 4,
                outcome: Outcome::Unchanged,
            },
        ] {
            let body = serde_json::to_vec(&msg).unwrap();
            assert_eq!(
                parse(&body),
                Some(msg),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    #[test]
    fn leaves_everything_else_to_serde() {
        for body in [
            // Other messages, other forms of these ones.
            &br#"{"type":"end"}"#[..],
            br#"{"type":"outcome","id":9,"status":"failed","reason":"disk full"}"#,
            br#"{"type":"error","code":"not_found","message":"not found","path":"a/b"}"#,
            br#"{"type":"entry","id":3,"path":{"b64":"ZC//"},"kind":"file","size":5,"mode":420,"mtime":{"sec":1,"nsec":2}}"#,
            br#"{"type":"entry","id":4,"path":"l","kind":"symlink","target":"../t","mtime":{"sec":0,"nsec":0}}"#,
            br#"{"type":"file_end","digest":"00","id":1}"#,
            br#"{ "type":"file_end","id":1,"digest":"00"}"#,
            br#"{"type":"file_end","id":1,"digest":"a\"b"}"#,
            br#"{"type":"file_end","id":1,"digest":"a\u0041"}"#,
            // Numbers JSON writes otherwise, or that do not fit.
            br#"{"type":"outcome","id":01,"status":"ok"}"#,
            br#"{"type":"outcome","id":-1,"status":"ok"}"#,
            br#"{"type":"outcome","id":1.0,"status":"ok"}"#,
            br#"{"type":"outcome","id":1e3,"status":"ok"}"#,
            br#"{"type":"outcome","id":18446744073709551616,"status":"ok"}"#,
            br#"{"type":"entry","id":1,"path":"a","kind":"dir","mode":4294967296,"mtime":{"sec":0,"nsec":0}}"#,
            br#"{"type":"entry","id":1,"path":"a","kind":"dir","mode":1,"mtime":{"sec":-9223372036854775809,"nsec":0}}"#,
            br#"{"type":"entry","id":1,"path":"","kind":"dir","mode":493,"mtime":{"sec":-0,"nsec":9}}"#,
            br#"{"type":"entry","id":1,"path":"a","kind":"dir","mode":1,"mtime":{"sec":0,"nsec":0},"owner":{"gid":0,"uid":0}}"#,
            br#"{"type":"entry","id":1,"path":"a","kind":"dir","mode":1,"mtime":{"sec":0,"nsec":0},"owner":{"uid":4294967296,"gid":0}}"#,
            br#"{"type":"entry","id":1,"path":"a","kind":"dir","mode":1,"mtime":{"sec":0,"nsec":0},"owner":null}"#,
            // Trailing bytes, truncation, invalid UTF-8.
            br#"{"type":"outcome","id":1,"status":"ok"} "#,
            br#"{"type":"outcome","id":1,"status":"ok""#,
            b"{\"type\":\"file_end\",\"id\":1,\"digest\":\"\xff\"}",
        ] {
            assert_eq!(parse(body), None, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn the_extreme_mtimes_read_as_serde_reads_them() {
        for sec in [i64::MIN, i64::MAX, -1, 0] {
            let body = format!(
                r#"{{"type":"entry","id":1,"path":"a","kind":"dir","mode":1,"mtime":{{"sec":{sec},"nsec":0}}}}"#
            );
            assert_eq!(parse(body.as_bytes()), via_serde(body.as_bytes()));
            assert!(parse(body.as_bytes()).is_some());
        }
    }

    proptest! {
        /// Whatever the fast path takes, serde reads the same way.
        #[test]
        fn agrees_with_serde_on_whatever_it_accepts(body in proptest::collection::vec(any::<u8>(), 0..96)) {
            if let Some(msg) = parse(&body) {
                prop_assert_eq!(Some(msg), via_serde(&body));
            }
        }

        /// And it takes every canonical hot message ferry writes.
        #[test]
        fn takes_every_canonical_hot_message(
            id in any::<u64>(),
            path in "[^\"\\\\\\x00-\\x1f]{0,40}",
            size in any::<u64>(),
            mode in any::<u32>(),
            sec in any::<i64>(),
            nsec in any::<u32>(),
            is_file in any::<bool>(),
            owner in proptest::option::of((any::<u32>(), any::<u32>())),
        ) {
            let mtime = Mtime { sec, nsec };
            let kind = if is_file {
                EntryKind::File { size, mode, mtime }
            } else {
                EntryKind::Dir { mode, mtime }
            };
            let owner = owner.map(|(uid, gid)| Owner { uid, gid });
            let msg = Message::Entry { id, path: path.as_str().into(), kind, owner, digest: None };
            let body = serde_json::to_vec(&msg).unwrap();
            prop_assert_eq!(written(&msg), Some(body.clone()));
            prop_assert_eq!(parse(&body), Some(msg));
        }

        /// What the fast writer writes, byte for byte, is serde's JSON,
        /// whatever the strings hold.
        #[test]
        fn writes_exactly_what_serde_writes(
            id in any::<u64>(),
            text in proptest::collection::vec(any::<u8>(), 0..24),
            size in any::<u64>(),
            sec in any::<i64>(),
            which in 0..5u8,
        ) {
            let mtime = Mtime { sec, nsec: 7 };
            let msg = match which {
                0 => Message::Entry { id, path: WireBytes(text), kind: EntryKind::File { size, mode: 0o644, mtime }, owner: None, digest: None },
                1 => Message::Entry { id, path: WireBytes(text), kind: EntryKind::Dir { mode: 0o755, mtime }, owner: Some(Owner { uid: size as u32, gid: 0 }), digest: None },
                2 => Message::FileEnd { id, digest: String::from_utf8_lossy(&text).into_owned() },
                3 => Message::Outcome { id, outcome: Outcome::Ok },
                _ => Message::Outcome { id, outcome: Outcome::Skipped(String::from_utf8_lossy(&text).into_owned()) },
            };
            if let Some(body) = written(&msg) {
                prop_assert_eq!(body, serde_json::to_vec(&msg).unwrap());
            } else {
                // Declined only for a reason: a string that needs an escape
                // or is not text, or a message that is not hot.
                let escaped = serde_json::to_vec(&msg).unwrap().contains(&b'\\');
                let b64 = match &msg {
                    Message::Entry { path, .. } => std::str::from_utf8(path.as_bytes()).is_err(),
                    _ => false,
                };
                prop_assert!(which == 4 || escaped || b64, "declined {:?}", msg);
            }
        }

        /// Near-misses of canonical forms: one byte changed.
        #[test]
        fn agrees_with_serde_on_mutated_hot_messages(at in any::<prop::sample::Index>(), byte in any::<u8>(), owned in any::<bool>()) {
            let canonical: &[u8] = if owned {
                br#"{"type":"entry","id":12,"path":"a/b","kind":"file","size":4096,"mode":420,"mtime":{"sec":1700000000,"nsec":5},"owner":{"uid":1000,"gid":100}}"#
            } else {
                br#"{"type":"entry","id":12,"path":"a/b","kind":"file","size":4096,"mode":420,"mtime":{"sec":1700000000,"nsec":5}}"#
            };
            let mut body = canonical.to_vec();
            let i = at.index(body.len());
            body[i] = byte;
            if let Some(msg) = parse(&body) {
                prop_assert_eq!(Some(msg), via_serde(&body));
            }
        }
    }
}

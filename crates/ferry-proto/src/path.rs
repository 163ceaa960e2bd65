//! Paths on the wire.
//!
//! Linux names are bytes, not text, so paths travel as bytes: a JSON string
//! when they are valid UTF-8, `{"b64": "…"}` (standard base64) when they are
//! not. Any byte sequence survives the trip.
//!
//! What arrives is [`WireBytes`]: untrusted. A receiver turns it into a
//! [`WirePath`] with [`WirePath::parse`], which accepts only a relative path
//! of plain components: no leading `/`, no `.` or `..`, no empty component,
//! no NUL, within the length limits. A `WirePath` therefore cannot name
//! anything outside the directory it is resolved against, as long as no
//! component is followed through a symlink (the engine's job).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::{MAX_COMPONENT_LEN, MAX_PATH_LEN};

/// Untrusted bytes from the wire: a path not yet validated, or a symlink
/// target (which is data, never resolved by ferry).
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct WireBytes(pub Vec<u8>);

impl WireBytes {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&[u8]> for WireBytes {
    fn from(b: &[u8]) -> Self {
        WireBytes(b.to_vec())
    }
}

impl From<&str> for WireBytes {
    fn from(s: &str) -> Self {
        WireBytes(s.as_bytes().to_vec())
    }
}

impl fmt::Debug for WireBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", escape(&self.0))
    }
}

impl Serialize for WireBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                use serde::ser::SerializeMap;
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("b64", &BASE64.encode(&self.0))?;
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for WireBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            Base64 { b64: String },
        }
        match Repr::deserialize(d)? {
            Repr::Text(text) => Ok(WireBytes(text.into_bytes())),
            Repr::Base64 { b64 } => BASE64
                .decode(b64.as_bytes())
                .map(WireBytes)
                .map_err(|e| serde::de::Error::custom(format!("invalid base64 path: {e}"))),
        }
    }
}

/// Why a path from the wire was refused. Each holds the path, escaped
/// (cut short when it is too long), as `path <shown> <problem>` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    Absolute(String),
    ParentComponent(String),
    Nul(String),
    NotCanonical(String),
    TooLong {
        shown: String,
        len: usize,
        max: usize,
    },
}

impl PathError {
    /// What is wrong with the path, without naming it: for a message
    /// that names the path beside it.
    pub fn problem(&self) -> String {
        match self {
            PathError::Absolute(_) => {
                "is absolute; only paths relative to the root are accepted".into()
            }
            PathError::ParentComponent(_) => "climbs out of the root with '..'".into(),
            PathError::Nul(_) => "contains a NUL byte".into(),
            PathError::NotCanonical(_) => "has an empty or '.' component".into(),
            PathError::TooLong { len, max, .. } => {
                format!("is {len} bytes long; the limit is {max}")
            }
        }
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = match self {
            PathError::Absolute(shown)
            | PathError::ParentComponent(shown)
            | PathError::Nul(shown)
            | PathError::NotCanonical(shown)
            | PathError::TooLong { shown, .. } => shown,
        };
        write!(f, "path {shown} {}", self.problem())
    }
}

impl std::error::Error for PathError {}

/// A validated relative path: zero or more plain components joined by `/`.
///
/// The empty path names the root of the transfer itself.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct WirePath(Vec<u8>);

impl WirePath {
    /// The empty path: the root of the transfer.
    pub fn root() -> Self {
        WirePath(Vec::new())
    }

    /// Validate untrusted bytes as a relative path.
    pub fn parse(bytes: &[u8]) -> Result<Self, PathError> {
        check(bytes)?;
        Ok(WirePath(bytes.to_vec()))
    }

    /// Validate a path as it came off the wire, keeping its bytes.
    pub fn from_wire(bytes: WireBytes) -> Result<Self, PathError> {
        check(&bytes.0)?;
        Ok(WirePath(bytes.0))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The plain components, in order. Empty for the root.
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    /// This path with one more component. `name` must be a plain component
    /// (the caller read it from a directory listing).
    pub fn join(&self, name: &[u8]) -> Result<Self, PathError> {
        let mut joined = self.0.clone();
        if !joined.is_empty() {
            joined.push(b'/');
        }
        joined.extend_from_slice(name);
        WirePath::parse(&joined)
    }

    pub fn to_wire(&self) -> WireBytes {
        WireBytes(self.0.clone())
    }

    /// A form safe to print on a terminal or in a log (see [`escape`]).
    pub fn display(&self) -> String {
        if self.is_root() {
            ".".to_string()
        } else {
            escape(&self.0)
        }
    }

    /// [`display`](Self::display), appended to `out`.
    pub fn display_into(&self, out: &mut String) {
        if self.is_root() {
            out.push('.');
        } else {
            escape_into(&self.0, out);
        }
    }
}

/// The checks of [`WirePath::parse`].
fn check(bytes: &[u8]) -> Result<(), PathError> {
    let shown = || escape(bytes);
    if bytes.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong {
            shown: escape(&bytes[..64]) + "…",
            len: bytes.len(),
            max: MAX_PATH_LEN,
        });
    }
    if bytes.is_empty() {
        // The root of the transfer.
        return Ok(());
    }
    if bytes.contains(&0) {
        return Err(PathError::Nul(shown()));
    }
    if bytes[0] == b'/' {
        return Err(PathError::Absolute(shown()));
    }
    // `..` anywhere is reported before any other defect, because it is
    // the one that matters to a user who typed it.
    if bytes.split(|&b| b == b'/').any(|c| c == b"..") {
        return Err(PathError::ParentComponent(shown()));
    }
    for component in bytes.split(|&b| b == b'/') {
        if component.is_empty() || component == b"." {
            return Err(PathError::NotCanonical(shown()));
        }
        if component.len() > MAX_COMPONENT_LEN {
            return Err(PathError::TooLong {
                shown: shown(),
                len: component.len(),
                max: MAX_COMPONENT_LEN,
            });
        }
    }
    Ok(())
}

impl fmt::Debug for WirePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.display())
    }
}

impl fmt::Display for WirePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

/// Render bytes chosen by a peer so that they cannot inject terminal
/// control sequences: invalid UTF-8, C0/C1 controls, DEL and the Unicode
/// bidi and zero-width format characters become `\xNN` or `\u{…}` escapes;
/// a backslash is doubled so escapes stay unambiguous.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    escape_into(bytes, &mut out);
    out
}

/// [`escape`], appended to `out`.
pub fn escape_into(bytes: &[u8], out: &mut String) {
    // Most names are printable ASCII, which needs no escape: checked in
    // one pass (this runs for every file a transfer names).
    if bytes
        .iter()
        .all(|&b| (b' '..=b'~').contains(&b) && b != b'\\')
    {
        out.push_str(&String::from_utf8_lossy(bytes));
        return;
    }
    escape_each(bytes, out);
}

/// [`escape_into`], character by character.
fn escape_each(bytes: &[u8], out: &mut String) {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => {
                    if (c as u32) < 0x100 {
                        out.push_str(&format!("\\x{:02x}", c as u32));
                    } else {
                        out.push_str(&format!("\\u{{{:x}}}", c as u32));
                    }
                }
                '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                    out.push_str(&format!("\\u{{{:x}}}", c as u32))
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_error_names_the_path_and_can_leave_it_out() {
        let e = WirePath::parse(b"a/../x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "path a/../x climbs out of the root with '..'"
        );
        assert_eq!(e.problem(), "climbs out of the root with '..'");
        let e = WirePath::parse(b"/etc").unwrap_err();
        assert_eq!(
            e.to_string(),
            "path /etc is absolute; only paths relative to the root are accepted"
        );
    }
    use proptest::prelude::*;

    #[test]
    fn accepts_plain_relative_paths() {
        for ok in [
            &b"a"[..],
            b"a/b/c",
            b"-rf",
            b"with space/x",
            b"\xff\xfe/\xc3\xa9",
            b"...",
            b".hidden",
        ] {
            let p = WirePath::parse(ok).unwrap();
            assert_eq!(p.as_bytes(), ok);
        }
        assert!(WirePath::parse(b"").unwrap().is_root());
    }

    #[test]
    fn refuses_escapes_and_oddities() {
        assert!(matches!(
            WirePath::parse(b"/etc/passwd"),
            Err(PathError::Absolute(_))
        ));
        for bad in [&b".."[..], b"../x", b"a/../../x", b"a/.."] {
            assert!(
                matches!(WirePath::parse(bad), Err(PathError::ParentComponent(_))),
                "{bad:?}"
            );
        }
        for bad in [&b"a//b"[..], b"a/", b"./a", b"a/./b", b"."] {
            assert!(
                matches!(WirePath::parse(bad), Err(PathError::NotCanonical(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(WirePath::parse(b"a\0b"), Err(PathError::Nul(_))));
        assert!(matches!(
            WirePath::parse(&[b'x'; 256]),
            Err(PathError::TooLong { .. })
        ));
        assert!(matches!(
            WirePath::parse(&[b'x'; 5000]),
            Err(PathError::TooLong { .. })
        ));
    }

    #[test]
    fn json_forms() {
        let text = serde_json::to_string(&WireBytes::from("dir/é")).unwrap();
        assert_eq!(text, r#""dir/é""#);
        let raw = serde_json::to_string(&WireBytes(vec![b'a', 0xff])).unwrap();
        assert_eq!(raw, r#"{"b64":"Yf8="}"#);
        let back: WireBytes = serde_json::from_str(&raw).unwrap();
        assert_eq!(back.0, vec![b'a', 0xff]);
        assert!(serde_json::from_str::<WireBytes>(r#"{"b64":"!!"}"#).is_err());
    }

    proptest! {
        #[test]
        fn the_fast_path_of_escape_changes_nothing(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut each = String::new();
            escape_each(&bytes, &mut each);
            prop_assert_eq!(escape(&bytes), each);
        }

        #[test]
        fn printable_ascii_escapes_the_same_either_way(text in "[ -~]{0,64}") {
            let mut each = String::new();
            escape_each(text.as_bytes(), &mut each);
            prop_assert_eq!(escape(text.as_bytes()), each);
        }
    }

    #[test]
    fn escape_neutralises_terminal_controls() {
        assert_eq!(escape(b"ok name"), "ok name");
        assert_eq!(escape(b"\x1b[31mred"), "\\x1b[31mred");
        assert_eq!(escape(b"a\xffb"), "a\\xffb");
        assert_eq!(escape("x\u{202e}y".as_bytes()), "x\\u{202e}y");
        assert_eq!(escape(b"back\\slash"), "back\\\\slash");
    }

    proptest! {
        #[test]
        fn any_bytes_round_trip_through_json(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let json = serde_json::to_string(&WireBytes(bytes.clone())).unwrap();
            let back: WireBytes = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back.0, bytes);
        }

        #[test]
        fn parsed_paths_have_only_plain_components(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(p) = WirePath::parse(&bytes) {
                for c in p.components() {
                    prop_assert!(!c.is_empty() && c != b"." && c != b"..");
                    prop_assert!(!c.contains(&b'/') && !c.contains(&0));
                }
                prop_assert!(!p.as_bytes().starts_with(b"/"));
            }
        }
    }
}

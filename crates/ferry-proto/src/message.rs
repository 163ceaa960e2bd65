//! Control messages: JSON objects tagged by `"type"`.
//!
//! A session runs in three steps (see PROTOCOL.md for the full exchange):
//! 1. handshake: `hello` → `welcome` (or `error`);
//! 2. request: `upload` or `download` → `ready` (or `error`);
//! 3. transfer: the sender streams `entry`, data chunks, `file_end`,
//!    `dir_end` and finally `end`; the receiver answers each file with an
//!    `outcome` and the whole transfer with `done`.
//!
//! The same sender and receiver run in both directions: for an upload the
//! client sends, for a download the server does.

use serde::{Deserialize, Serialize};

use crate::path::WireBytes;

/// A file's modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Mtime {
    pub sec: i64,
    pub nsec: u32,
}

/// Who owns an entry, by number: names are not mapped (as with rsync's
/// `--numeric-ids`), so both ends should share their user database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// Whether both ids name someone: `-1` (u32::MAX) means "leave as it
    /// is" to chown(2), never an owner.
    pub fn is_valid(&self) -> bool {
        self.uid != u32::MAX && self.gid != u32::MAX
    }
}

/// How the sender should compress data chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "level")]
pub enum Compression {
    /// zstd at a light level; chunks (and files) that do not shrink are sent raw.
    Auto,
    /// Every chunk raw.
    Off,
    /// zstd at this level (1..=19); chunks that do not shrink are sent raw.
    Level(i32),
}

/// What kind of thing an entry is, with the metadata ferry preserves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum EntryKind {
    File {
        size: u64,
        mode: u32,
        mtime: Mtime,
    },
    Dir {
        mode: u32,
        mtime: Mtime,
    },
    Symlink {
        target: WireBytes,
        mtime: Mtime,
    },
    /// Another name of a file sent earlier in this transfer: entry
    /// `first`, at `target` (a path in the same transfer). It shares that
    /// file's content and metadata, so it carries none of its own.
    Hardlink {
        first: u64,
        target: WireBytes,
    },
    /// A named pipe.
    Fifo {
        mode: u32,
        mtime: Mtime,
    },
    /// A device node: character (`block` false) or block.
    Device {
        block: bool,
        major: u32,
        minor: u32,
        mode: u32,
        mtime: Mtime,
    },
    /// A socket, or a type ferry does not know: announced so the receiver
    /// can count it, never transferred.
    Special {
        what: String,
    },
}

/// The receiver's verdict on one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "reason")]
pub enum Outcome {
    Ok,
    Failed(String),
    Skipped(String),
    /// The receiver already holds this file with the same size and mtime:
    /// nothing of it is sent (rsync's "quick check").
    Unchanged,
    /// The file is not in place, for a reason that sending it again may
    /// cure (a corrupt chunk, a digest mismatch, a file another transfer
    /// was writing). What the receiver verified of it is kept for a resume.
    Incomplete(String),
}

impl Outcome {
    /// Whether the entry is in place on the receiver.
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok | Outcome::Unchanged)
    }
}

/// Machine-readable error categories, so a client can map them to exit
/// codes and messages without parsing prose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    VersionMismatch,
    BadRequest,
    BadPath,
    NotFound,
    PermissionDenied,
    NoSpace,
    Protocol,
    ShuttingDown,
    Io,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Message {
    /// Client → server, first message.
    Hello {
        /// The client's software version, for logs.
        software: String,
        /// With TLS, the proof of the token given at once, without waiting
        /// for a `challenge`: hex HMAC-SHA256(token, "ferry-auth-v1" ‖ TLS
        /// exporter). The exporter is fresh for every connection, so it
        /// binds the proof as a nonce would.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<String>,
    },
    /// Server → client, instead of `welcome` when the server requires a
    /// token: prove it. 32 random bytes, hex.
    Challenge { nonce: String },
    /// Client → server, the answer to `challenge`: hex
    /// HMAC-SHA256(token, "ferry-auth-v1" ‖ nonce ‖ TLS exporter).
    Auth { mac: String },
    /// Server → client: the session exists. More connections may join it
    /// with `join`, proving they belong to it with `secret`.
    Welcome {
        software: String,
        session_id: String,
        /// 128 random bits, hex; known only to the two ends.
        secret: String,
        /// How many connections in all (this one included) the server
        /// accepts for the session.
        max_streams: u32,
    },
    /// Client → server, first message of a data connection: attach to a
    /// session instead of starting one. Data connections carry only data
    /// chunks, from the sender to the receiver.
    Join { session_id: String, secret: String },
    /// Server → client: the data connection is attached.
    Joined,
    /// Client → server: the client will send a file or tree to `dest`
    /// (relative to the server's root).
    Upload {
        dest: WireBytes,
        /// Send every file, even one the receiver already holds with the
        /// same size and mtime. Absent means false.
        #[serde(default, skip_serializing_if = "is_false")]
        ignore_times: bool,
        /// Make the destination equal to the source: the receiver deletes
        /// what the source does not have (`--delete`). Absent means keep.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mirror: Option<Mirror>,
        /// Tell what changes, entry by entry (`changes`).
        #[serde(default, skip_serializing_if = "is_false")]
        itemize: bool,
        /// Change nothing: the receiver says what it would do (`changes`,
        /// outcomes, `deleted`), and plans no file.
        #[serde(default, skip_serializing_if = "is_false")]
        dry_run: bool,
        /// Assemble the new version beside the live tree and switch it in
        /// with one rename once it is whole (`published`).
        #[serde(default, skip_serializing_if = "is_false")]
        atomic: bool,
        /// Files are unchanged when their content is (`digest` in each
        /// file's entry), not when size and mtime are.
        #[serde(default, skip_serializing_if = "is_false")]
        checksum: bool,
        /// The source's own name (one component): a root that is not a
        /// directory, sent to a `dest` that is an existing directory, lands
        /// inside it under this name, as cp puts a file into a directory.
        /// Absent: the root becomes `dest`, whatever is there.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source_name: Option<WireBytes>,
        /// Trees below the server's root whose unchanged files the server
        /// hard-links instead of receiving (`--link-dest`, at most 20).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        link_dest: Vec<WireBytes>,
        /// `ferry backup`: `dest` is a directory of snapshots; the upload
        /// becomes a new one (published atomically, unchanged files linked
        /// from the newest one), `latest` names it, and older ones are
        /// kept as this says.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backup: Option<Keep>,
        /// Send no `signature`: every changed file travels whole
        /// (`--whole-file`).
        #[serde(default, skip_serializing_if = "is_false")]
        whole_file: bool,
    },
    /// Client → server: switch the previous version kept by an atomic
    /// publish of `dest` back in (the live one is kept in its place).
    /// Answered `ready`, or `error`.
    Rollback { dest: WireBytes },
    /// Client → server: send the file or tree at `source`.
    Download {
        source: WireBytes,
        compression: Compression,
        /// As for `upload`; the client is the receiver and applies it.
        #[serde(default, skip_serializing_if = "is_false")]
        ignore_times: bool,
        /// Send each entry's owner: the client receives as root and will
        /// apply them. Absent means false.
        #[serde(default, skip_serializing_if = "is_false")]
        owners: bool,
        /// What the sender leaves out, in order: the first rule that
        /// matches an entry decides. Absent means none.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        filters: Vec<FilterRule>,
        /// The sender also honours the `.gitignore` files of the tree.
        #[serde(default, skip_serializing_if = "is_false")]
        gitignore: bool,
        /// The rate, in bytes per second, the sender stays under, all
        /// connections together. Absent means none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bwlimit: Option<u64>,
        /// Send each file's digest in its entry (the client compares
        /// content).
        #[serde(default, skip_serializing_if = "is_false")]
        checksum: bool,
    },
    /// The request was accepted; the transfer starts.
    Ready,
    /// Sender → receiver: what the whole transfer holds, when known.
    Totals { files: u64, bytes: u64 },
    /// Sender → receiver: an entry the walk listed was gone when it was
    /// looked at (deleted meanwhile). Not transferred; reported.
    Vanished { path: WireBytes },
    /// Sender → receiver: one entry of the tree. The first entry has the
    /// empty path: the root of the transfer (the destination itself).
    Entry {
        id: u64,
        path: WireBytes,
        #[serde(flatten)]
        kind: EntryKind,
        /// Sent when the receiver may apply it (a download asked for
        /// owners; an upload unless the user said `--no-owner`). A receiver
        /// that is not root ignores it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<Owner>,
        /// A file's whole-file digest (hex), sent when the request asked
        /// for `checksum`: the receiver compares content, not size and
        /// mtime.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// Sender → receiver: every chunk of file `id` has been sent.
    FileEnd { id: u64, digest: String },
    /// Sender → receiver: entry `id` cannot be sent whole (unreadable,
    /// changed while read); the receiver discards what it has of it and
    /// reports it failed, or incomplete when `transient` says that sending
    /// it again may work (the file changed while it was read).
    Abort {
        id: u64,
        reason: String,
        #[serde(default, skip_serializing_if = "is_false")]
        transient: bool,
    },
    /// Sender → receiver: every entry below directory `id` has been sent,
    /// so its own metadata can now be applied.
    DirEnd { id: u64 },
    /// Sender → receiver: nothing more follows.
    End,
    /// Receiver → sender: the verdict on entry `id`.
    Outcome {
        id: u64,
        #[serde(flatten)]
        outcome: Outcome,
    },
    /// Receiver → sender: of file `id`, it already holds these verified
    /// chunks, as runs `[offset, len, count]` of `count` contiguous chunks
    /// of `len` bytes from `offset`. The sender sends only the rest.
    Have {
        id: u64,
        chunks: Vec<(u64, u32, u64)>,
    },
    /// Receiver → sender: of file `id`, it holds another version (its
    /// basis), cut into these blocks (`avg`: FastCDC's average block size;
    /// `blocks`: see [`crate::delta::encode_blocks`]). The sender may send
    /// the chunks the basis reaches as delta scripts. A long signature
    /// comes in several messages, each but the last with `more`.
    Signature {
        id: u64,
        avg: u32,
        blocks: String,
        #[serde(default, skip_serializing_if = "is_false")]
        more: bool,
    },
    /// Receiver → sender: every file entry up to id `through` that has had
    /// no `have` or `outcome` is to be sent whole.
    Planned { through: u64 },
    /// Receiver → sender: directory `id` did not exist; the receiver
    /// created it, so nothing below it can be unchanged or held: every file
    /// below it is planned whole, without waiting for `planned`.
    Fresh { id: u64 },
    /// Either way: still working (a long local verification), not stalled.
    Keepalive,
    /// Receiver → sender, just before the outcome of entry `id`, when the
    /// request asked to itemize or for a dry run: what placing the entry
    /// changes (or would) in the destination.
    Changes { id: u64, what: Vec<Change> },
    /// Receiver → sender, after `end` and every outcome, when the request
    /// asked for a mirror: an entry of the destination that the source
    /// does not have was deleted (`dir`: a directory, emptied first).
    /// `error` says why an entry that should go could not be deleted.
    Deleted {
        path: WireBytes,
        #[serde(default, skip_serializing_if = "is_false")]
        dir: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Receiver → sender, after the `deleted` messages and before `done`:
    /// how many entries were deleted, or why none were.
    Deletions {
        deleted: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        held_back: Option<HeldBack>,
    },
    /// Receiver → sender, before `done`, when the upload asked for an
    /// atomic publish: whether the new version was switched in for the
    /// live tree (and a previous one is kept), or why not.
    Published {
        published: bool,
        #[serde(default, skip_serializing_if = "is_false")]
        previous_kept: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// A backup's snapshot: its name in the backup directory.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshot: Option<WireBytes>,
    },
    /// Receiver → sender: everything up to `end` is settled.
    Done,
    /// Either way: the session cannot go on. `path` names what failed
    /// when the failure is about one path: a request's (relative to the
    /// server's root) or an entry's (relative to the root of the transfer).
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<WireBytes>,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What a mirror (`--delete`) asks of the receiver: once every entry is
/// in place, delete what the source does not have, within the transfer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mirror {
    /// Delete nothing if more than this many entries would go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delete: Option<u64>,
    /// Also delete what the filters leave out (which is otherwise kept).
    #[serde(default, skip_serializing_if = "is_false")]
    pub delete_excluded: bool,
    /// The transfer's filter rules and `.gitignore` switch, as the sender
    /// applies them: what they leave out of the destination is kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<FilterRule>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub gitignore: bool,
}

/// One way an entry placed differs from what the destination had there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Nothing was there.
    Created,
    /// Something of another kind was there (a file where a directory is).
    Kind,
    Size,
    Mtime,
    /// Content of the same size (`checksum`).
    Content,
    /// Permission bits.
    Mode,
    Owner,
    /// A symlink's target, or the file a hard link names.
    Target,
}

impl Change {
    /// Whether this change leaves the content alone (a file that passes
    /// the quick check keeps its content and gets only these).
    pub fn is_metadata(self) -> bool {
        matches!(self, Change::Mode | Change::Owner)
    }
}

/// Which snapshots a backup keeps: the newest of each of the last `daily`
/// days, `weekly` weeks and `monthly` months that have one. None at all:
/// every snapshot is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly: Option<u32>,
}

/// Why a receiver deleted nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum HeldBack {
    /// `count` entries failed or are incomplete: the source was not seen
    /// whole, so nothing is deleted.
    Failures { count: u64 },
    /// `would` entries would have been deleted, more than `max`.
    MaxDelete { would: u64, max: u64 },
    /// The receiver could not remember the source's entries within its
    /// memory budget.
    Memory,
}

/// One filter rule: a gitignore-style glob (PROTOCOL.md §4.2) and whether
/// the entries it matches are sent or left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterRule {
    pub rule: RuleKind,
    pub pattern: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    Include,
    Exclude,
}

impl Message {
    /// An `error` about no path in particular.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Message::Error {
            code,
            message: message.into(),
            path: None,
        }
    }

    /// The message's `type` on the wire, to name it in errors without
    /// echoing what a peer put in it.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Challenge { .. } => "challenge",
            Message::Auth { .. } => "auth",
            Message::Welcome { .. } => "welcome",
            Message::Join { .. } => "join",
            Message::Joined => "joined",
            Message::Upload { .. } => "upload",
            Message::Download { .. } => "download",
            Message::Ready => "ready",
            Message::Totals { .. } => "totals",
            Message::Vanished { .. } => "vanished",
            Message::Entry { .. } => "entry",
            Message::FileEnd { .. } => "file_end",
            Message::Abort { .. } => "abort",
            Message::DirEnd { .. } => "dir_end",
            Message::End => "end",
            Message::Outcome { .. } => "outcome",
            Message::Have { .. } => "have",
            Message::Signature { .. } => "signature",
            Message::Planned { .. } => "planned",
            Message::Fresh { .. } => "fresh",
            Message::Keepalive => "keepalive",
            Message::Changes { .. } => "changes",
            Message::Deleted { .. } => "deleted",
            Message::Published { .. } => "published",
            Message::Rollback { .. } => "rollback",
            Message::Deletions { .. } => "deletions",
            Message::Done => "done",
            Message::Error { .. } => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(m: &Message) -> String {
        serde_json::to_string(m).unwrap()
    }

    #[test]
    fn a_message_name_is_its_wire_type() {
        for m in samples() {
            let value: serde_json::Value = serde_json::from_str(&json(&m)).unwrap();
            assert_eq!(value["type"], m.name(), "{m:?}");
        }
    }

    /// The JSON shapes below are normative (PROTOCOL.md); changing one is a
    /// protocol change.
    #[test]
    fn golden_json() {
        assert_eq!(
            json(&Message::Hello {
                software: "ferry 0.1.0".into(),
                mac: None,
            }),
            r#"{"type":"hello","software":"ferry 0.1.0"}"#
        );
        assert_eq!(
            json(&Message::Download {
                source: "a/b".into(),
                compression: Compression::Level(3),
                ignore_times: false,
                owners: false,
                filters: vec![],
                gitignore: false,
                bwlimit: None,
                checksum: false,
            }),
            r#"{"type":"download","source":"a/b","compression":{"mode":"level","level":3}}"#
        );
        assert_eq!(
            json(&Message::Download {
                source: "x".into(),
                compression: Compression::Auto,
                ignore_times: false,
                owners: false,
                filters: vec![],
                gitignore: false,
                bwlimit: None,
                checksum: false,
            }),
            r#"{"type":"download","source":"x","compression":{"mode":"auto"}}"#
        );
        assert_eq!(
            json(&Message::Entry {
                id: 3,
                path: WireBytes(vec![b'd', b'/', 0xff]),
                kind: EntryKind::File {
                    size: 5,
                    mode: 0o644,
                    mtime: Mtime { sec: 1, nsec: 2 }
                },
                owner: None,
                digest: None,
            }),
            r#"{"type":"entry","id":3,"path":{"b64":"ZC//"},"kind":"file","size":5,"mode":420,"mtime":{"sec":1,"nsec":2}}"#
        );
        assert_eq!(
            json(&Message::Entry {
                id: 6,
                path: "f".into(),
                kind: EntryKind::File {
                    size: 0,
                    mode: 0o600,
                    mtime: Mtime::default()
                },
                owner: Some(Owner { uid: 1000, gid: 33 }),
                digest: None,
            }),
            r#"{"type":"entry","id":6,"path":"f","kind":"file","size":0,"mode":384,"mtime":{"sec":0,"nsec":0},"owner":{"uid":1000,"gid":33}}"#
        );
        assert_eq!(
            json(&Message::Entry {
                id: 7,
                path: "b/f".into(),
                kind: EntryKind::Hardlink {
                    first: 6,
                    target: "f".into()
                },
                owner: None,
                digest: None,
            }),
            r#"{"type":"entry","id":7,"path":"b/f","kind":"hardlink","first":6,"target":"f"}"#
        );
        assert_eq!(
            json(&Message::Entry {
                id: 8,
                path: "p".into(),
                kind: EntryKind::Fifo {
                    mode: 0o644,
                    mtime: Mtime::default()
                },
                owner: None,
                digest: None,
            }),
            r#"{"type":"entry","id":8,"path":"p","kind":"fifo","mode":420,"mtime":{"sec":0,"nsec":0}}"#
        );
        assert_eq!(
            json(&Message::Entry {
                id: 9,
                path: "null".into(),
                kind: EntryKind::Device {
                    block: false,
                    major: 1,
                    minor: 3,
                    mode: 0o666,
                    mtime: Mtime::default()
                },
                owner: None,
                digest: None,
            }),
            r#"{"type":"entry","id":9,"path":"null","kind":"device","block":false,"major":1,"minor":3,"mode":438,"mtime":{"sec":0,"nsec":0}}"#
        );
        assert_eq!(
            json(&Message::Download {
                source: "x".into(),
                compression: Compression::Off,
                ignore_times: false,
                owners: true,
                filters: vec![],
                gitignore: false,
                bwlimit: None,
                checksum: false,
            }),
            r#"{"type":"download","source":"x","compression":{"mode":"off"},"owners":true}"#
        );
        assert_eq!(
            json(&Message::Entry {
                id: 4,
                path: "l".into(),
                kind: EntryKind::Symlink {
                    target: "../t".into(),
                    mtime: Mtime::default()
                },
                owner: None,
                digest: None,
            }),
            r#"{"type":"entry","id":4,"path":"l","kind":"symlink","target":"../t","mtime":{"sec":0,"nsec":0}}"#
        );
        assert_eq!(
            json(&Message::Outcome {
                id: 9,
                outcome: Outcome::Failed("disk full".into())
            }),
            r#"{"type":"outcome","id":9,"status":"failed","reason":"disk full"}"#
        );
        assert_eq!(
            json(&Message::Outcome {
                id: 1,
                outcome: Outcome::Ok
            }),
            r#"{"type":"outcome","id":1,"status":"ok"}"#
        );
        assert_eq!(
            json(&Message::error(ErrorCode::NotFound, "x: not found")),
            r#"{"type":"error","code":"not_found","message":"x: not found"}"#
        );
        assert_eq!(
            json(&Message::Error {
                code: ErrorCode::NotFound,
                message: "no such file or directory".into(),
                path: Some("photos/2024".into()),
            }),
            r#"{"type":"error","code":"not_found","message":"no such file or directory","path":"photos/2024"}"#
        );
        assert_eq!(json(&Message::End), r#"{"type":"end"}"#);
    }

    /// The remaining examples of PROTOCOL.md §4, byte for byte.
    #[test]
    fn golden_json_protocol_md_examples() {
        let cases = [
            (
                Message::Welcome {
                    software: "ferry 0.1.0".into(),
                    session_id: "5f1c0a93e2b74d68a0c4e1f2973b6d05".into(),
                    secret: "0d1b4be3c1e2a3f40718293a4b5c6d7e".into(),
                    max_streams: 16,
                },
                r#"{"type":"welcome","software":"ferry 0.1.0","session_id":"5f1c0a93e2b74d68a0c4e1f2973b6d05","secret":"0d1b4be3c1e2a3f40718293a4b5c6d7e","max_streams":16}"#,
            ),
            (
                Message::Join {
                    session_id: "5f1c0a93e2b74d68a0c4e1f2973b6d05".into(),
                    secret: "0d1b4be3c1e2a3f40718293a4b5c6d7e".into(),
                },
                r#"{"type":"join","session_id":"5f1c0a93e2b74d68a0c4e1f2973b6d05","secret":"0d1b4be3c1e2a3f40718293a4b5c6d7e"}"#,
            ),
            (Message::Joined, r#"{"type":"joined"}"#),
            (
                Message::Challenge {
                    nonce: "9c0f".into(),
                },
                r#"{"type":"challenge","nonce":"9c0f"}"#,
            ),
            (
                Message::Auth { mac: "41d2".into() },
                r#"{"type":"auth","mac":"41d2"}"#,
            ),
            (
                Message::Upload {
                    dest: "backup/photos".into(),
                    ignore_times: false,
                    mirror: None,
                    itemize: false,
                    dry_run: false,
                    atomic: false,
                    checksum: false,
                    source_name: None,
                    link_dest: vec![],
                    backup: None,
                    whole_file: false,
                },
                r#"{"type":"upload","dest":"backup/photos"}"#,
            ),
            (
                Message::Upload {
                    dest: "b".into(),
                    ignore_times: true,
                    mirror: None,
                    itemize: false,
                    dry_run: false,
                    atomic: false,
                    checksum: false,
                    source_name: None,
                    link_dest: vec![],
                    backup: None,
                    whole_file: false,
                },
                r#"{"type":"upload","dest":"b","ignore_times":true}"#,
            ),
            (
                Message::Upload {
                    dest: "w".into(),
                    ignore_times: false,
                    mirror: Some(Mirror {
                        max_delete: Some(10),
                        ..Mirror::default()
                    }),
                    itemize: false,
                    dry_run: true,
                    atomic: false,
                    checksum: false,
                    source_name: None,
                    link_dest: vec![],
                    backup: None,
                    whole_file: false,
                },
                r#"{"type":"upload","dest":"w","mirror":{"max_delete":10},"dry_run":true}"#,
            ),
            (
                Message::Changes {
                    id: 4,
                    what: vec![Change::Size, Change::Mtime],
                },
                r#"{"type":"changes","id":4,"what":["size","mtime"]}"#,
            ),
            (
                Message::Deleted {
                    path: "old/page.html".into(),
                    dir: false,
                    error: None,
                },
                r#"{"type":"deleted","path":"old/page.html"}"#,
            ),
            (
                Message::Deletions {
                    deleted: 0,
                    held_back: Some(HeldBack::MaxDelete { would: 12, max: 10 }),
                },
                r#"{"type":"deletions","deleted":0,"held_back":{"reason":"max_delete","would":12,"max":10}}"#,
            ),
            (
                Message::Upload {
                    dest: "www".into(),
                    ignore_times: false,
                    mirror: None,
                    itemize: false,
                    dry_run: false,
                    atomic: false,
                    checksum: false,
                    source_name: Some("index.html".into()),
                    link_dest: vec![],
                    backup: None,
                    whole_file: false,
                },
                r#"{"type":"upload","dest":"www","source_name":"index.html"}"#,
            ),
            (
                Message::Download {
                    source: "".into(),
                    compression: Compression::Off,
                    ignore_times: false,
                    owners: false,
                    filters: vec![],
                    gitignore: false,
                    bwlimit: None,
                    checksum: false,
                },
                r#"{"type":"download","source":"","compression":{"mode":"off"}}"#,
            ),
            (Message::Ready, r#"{"type":"ready"}"#),
            (
                Message::Totals { files: 2, bytes: 5 },
                r#"{"type":"totals","files":2,"bytes":5}"#,
            ),
            (
                Message::Entry {
                    id: 1,
                    path: "".into(),
                    kind: EntryKind::Dir {
                        mode: 0o755,
                        mtime: Mtime {
                            sec: 1_700_000_000,
                            nsec: 123_456_789,
                        },
                    },
                    owner: None,
                    digest: None,
                },
                r#"{"type":"entry","id":1,"path":"","kind":"dir","mode":493,"mtime":{"sec":1700000000,"nsec":123456789}}"#,
            ),
            (
                Message::Entry {
                    id: 5,
                    path: "p".into(),
                    kind: EntryKind::Special {
                        what: "socket".into(),
                    },
                    owner: None,
                    digest: None,
                },
                r#"{"type":"entry","id":5,"path":"p","kind":"special","what":"socket"}"#,
            ),
            (
                Message::FileEnd {
                    id: 1,
                    digest: "553ac1fdd3cd2fbe408dc8693462f526".into(),
                },
                r#"{"type":"file_end","id":1,"digest":"553ac1fdd3cd2fbe408dc8693462f526"}"#,
            ),
            (
                Message::Abort {
                    id: 1,
                    reason: "read error".into(),
                    transient: false,
                },
                r#"{"type":"abort","id":1,"reason":"read error"}"#,
            ),
            (
                Message::Abort {
                    id: 2,
                    reason: "changed".into(),
                    transient: true,
                },
                r#"{"type":"abort","id":2,"reason":"changed","transient":true}"#,
            ),
            (
                Message::Have {
                    id: 7,
                    chunks: vec![(0, 1_048_576, 90), (95_420_416, 1_048_576, 2)],
                },
                r#"{"type":"have","id":7,"chunks":[[0,1048576,90],[95420416,1048576,2]]}"#,
            ),
            (
                Message::Signature {
                    id: 7,
                    avg: 8192,
                    blocks: "AAAgAAECAwQFBgcI".into(),
                    more: true,
                },
                r#"{"type":"signature","id":7,"avg":8192,"blocks":"AAAgAAECAwQFBgcI","more":true}"#,
            ),
            (
                Message::Planned { through: 12 },
                r#"{"type":"planned","through":12}"#,
            ),
            (
                Message::Outcome {
                    id: 8,
                    outcome: Outcome::Unchanged,
                },
                r#"{"type":"outcome","id":8,"status":"unchanged"}"#,
            ),
            (
                Message::Outcome {
                    id: 9,
                    outcome: Outcome::Incomplete("chunk at offset 0 is corrupt".into()),
                },
                r#"{"type":"outcome","id":9,"status":"incomplete","reason":"chunk at offset 0 is corrupt"}"#,
            ),
            (Message::Keepalive, r#"{"type":"keepalive"}"#),
            (Message::Fresh { id: 1 }, r#"{"type":"fresh","id":1}"#),
            (Message::DirEnd { id: 1 }, r#"{"type":"dir_end","id":1}"#),
            (
                Message::Outcome {
                    id: 5,
                    outcome: Outcome::Skipped("socket".into()),
                },
                r#"{"type":"outcome","id":5,"status":"skipped","reason":"socket"}"#,
            ),
            (Message::Done, r#"{"type":"done"}"#),
        ];
        for (msg, text) in cases {
            assert_eq!(json(&msg), text);
            assert_eq!(serde_json::from_str::<Message>(text).unwrap(), msg);
        }
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let back: Message = serde_json::from_str(&json(&m)).unwrap();
            assert_eq!(back, m);
        }
    }

    /// One of each message.
    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                software: "s".into(),
                mac: Some("ab".into()),
            },
            Message::Challenge {
                nonce: "00ff".into(),
            },
            Message::Auth { mac: "ab".into() },
            Message::Welcome {
                software: "s".into(),
                session_id: "00ff".into(),
                secret: "11".into(),
                max_streams: 2,
            },
            Message::Join {
                session_id: "00ff".into(),
                secret: "11".into(),
            },
            Message::Joined,
            Message::Upload {
                dest: "d".into(),
                ignore_times: true,
                mirror: Some(Mirror::default()),
                itemize: true,
                dry_run: true,
                atomic: true,
                checksum: false,
                source_name: Some("n".into()),
                link_dest: vec![],
                backup: None,
                whole_file: false,
            },
            Message::Rollback { dest: "w".into() },
            Message::Published {
                published: false,
                previous_kept: false,
                reason: Some("2 entries failed".into()),
                snapshot: None,
            },
            Message::Changes {
                id: 9,
                what: vec![Change::Created],
            },
            Message::Deleted {
                path: "d/x".into(),
                dir: true,
                error: Some("permission denied".into()),
            },
            Message::Deletions {
                deleted: 3,
                held_back: Some(HeldBack::Failures { count: 1 }),
            },
            Message::Download {
                source: "".into(),
                compression: Compression::Off,
                ignore_times: true,
                owners: false,
                filters: vec![],
                gitignore: false,
                bwlimit: None,
                checksum: false,
            },
            Message::Ready,
            Message::Totals { files: 1, bytes: 2 },
            Message::Vanished {
                path: "gone/f".into(),
            },
            Message::Entry {
                id: 1,
                path: "".into(),
                kind: EntryKind::Dir {
                    mode: 0o755,
                    mtime: Mtime { sec: -5, nsec: 9 },
                },
                owner: None,
                digest: None,
            },
            Message::Entry {
                id: 2,
                path: "f".into(),
                kind: EntryKind::Special {
                    what: "fifo".into(),
                },
                owner: None,
                digest: None,
            },
            Message::FileEnd {
                id: 1,
                digest: "00".repeat(16),
            },
            Message::Abort {
                id: 1,
                reason: "gone".into(),
                transient: true,
            },
            Message::Have {
                id: 3,
                chunks: vec![(0, 4, 1)],
            },
            Message::Planned { through: 3 },
            Message::Fresh { id: 2 },
            Message::Keepalive,
            Message::DirEnd { id: 1 },
            Message::End,
            Message::Outcome {
                id: 2,
                outcome: Outcome::Skipped("fifo".into()),
            },
            Message::Done,
            Message::error(ErrorCode::VersionMismatch, "v"),
            Message::Error {
                code: ErrorCode::BadPath,
                message: "m".into(),
                path: Some(WireBytes(vec![b'a', 0xff])),
            },
        ]
    }

    #[test]
    fn unknown_or_malformed_messages_are_errors() {
        for bad in [
            r#"{"type":"launch_missiles"}"#,
            r#"{"type":"entry","id":-1}"#,
            "[]",
            "",
            "{",
        ] {
            assert!(serde_json::from_str::<Message>(bad).is_err(), "{bad}");
        }
    }
}

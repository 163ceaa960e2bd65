//! The real receiver against a sender played frame by frame: what it
//! makes of ordinary, unusual and hostile senders.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use ferry_proto::message::{EntryKind, ErrorCode, Message, Outcome, Owner};
use ferry_proto::path::WireBytes;

use super::harness::{self, *};
use crate::error::{EngineError, Role, Violation};
use crate::events::Event;
use crate::receiver::Inbound;

const MIB: usize = 1024 * 1024;

/// Files in `dir` (recursively) whose names say they are part files or
/// journals.
fn leftovers(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".ferry-") {
            found.push(name);
        } else if e.file_type().unwrap().is_dir() {
            found.extend(leftovers(&e.path()));
        }
    }
    found
}

/// A tree root, `frames`, its end and the transfer's end, in one batch.
fn in_root(frames: Vec<Inbound>) -> Vec<Inbound> {
    let mut all = vec![dir(1, "")];
    all.extend(frames);
    all.push(dir_end(1));
    all.push(end());
    all
}

fn assert_violation(e: EngineError, want: impl Fn(&Violation) -> bool) {
    match &e {
        EngineError::Protocol(v) if want(v) => {}
        other => panic!("not the violation expected: {other:?}"),
    }
}

/// The receiver told the sender why it ended the session.
fn told_protocol_error(r: &Receiving) -> bool {
    matches!(
        r.answers.last(),
        Some(Message::Error {
            code: ErrorCode::Protocol,
            ..
        })
    )
}

#[test]
fn a_new_file_arrives_whole_with_its_metadata() {
    let mut r = Receiving::new();
    let data = content(3 * MIB + 7, 1);
    r.take(in_root(whole_file(2, "a", &data))).unwrap();
    assert!(r.done);
    assert_eq!(r.outcome(2), Some(&Outcome::Ok));
    assert_eq!(r.outcome(1), Some(&Outcome::Ok));
    assert_eq!(std::fs::read(r.dst().join("a")).unwrap(), data);
    let meta = std::fs::metadata(r.dst().join("a")).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o644);
    assert_eq!((meta.mtime(), meta.mtime_nsec()), (MTIME.sec, 5));
    assert_eq!(std::fs::metadata(r.dst()).unwrap().mtime(), MTIME.sec);
    assert!(leftovers(&r.dst()).is_empty());
    assert_eq!(r.report().files_ok, 1);
}

#[test]
fn a_file_as_the_root_takes_the_destination_name() {
    let mut r = Receiving::new();
    let data = content(10, 2);
    let mut frames = whole_file(1, "", &data);
    frames.push(end());
    r.take(frames).unwrap();
    assert!(r.done);
    assert_eq!(std::fs::read(r.dst()).unwrap(), data);
}

/// A receiver told the source's name (`f.txt`), into `dst` as `make`
/// leaves it.
fn receiver_told_the_name(make: impl FnOnce(&std::path::Path)) -> Receiving {
    let tmp = tempfile::tempdir().unwrap();
    make(&tmp.path().join("dst"));
    Receiving::in_dir(tmp, |d| d.inside = Some(b"f.txt".to_vec()))
}

#[test]
fn a_file_as_the_root_goes_inside_an_existing_directory() {
    let mut r = receiver_told_the_name(|dst| std::fs::create_dir(dst).unwrap());
    let data = content(10, 3);
    let mut frames = whole_file(1, "", &data);
    frames.push(end());
    r.take(frames).unwrap();
    assert!(r.done);
    assert_eq!(r.outcome(1), Some(&Outcome::Ok));
    assert_eq!(std::fs::read(r.dst().join("f.txt")).unwrap(), data);
}

#[test]
fn a_file_as_the_root_replaces_a_file_and_takes_a_free_name_as_before() {
    for existing in [true, false] {
        let mut r = receiver_told_the_name(|dst| {
            if existing {
                std::fs::write(dst, b"old").unwrap();
            }
        });
        let data = content(10, 4);
        let mut frames = whole_file(1, "", &data);
        frames.push(end());
        r.take(frames).unwrap();
        assert_eq!(
            std::fs::read(r.dst()).unwrap(),
            data,
            "existing: {existing}"
        );
    }
}

/// A symlink to a directory at the destination is not followed: the file
/// replaces the link, and nothing arrives in the directory it points to.
#[test]
fn a_file_as_the_root_replaces_a_symlink_to_a_directory() {
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().to_path_buf();
    let mut r = receiver_told_the_name(|dst| std::os::unix::fs::symlink(&target, dst).unwrap());
    let data = content(10, 5);
    let mut frames = whole_file(1, "", &data);
    frames.push(end());
    r.take(frames).unwrap();
    assert_eq!(r.outcome(1), Some(&Outcome::Ok));
    assert!(std::fs::symlink_metadata(r.dst()).unwrap().is_file());
    assert_eq!(std::fs::read(r.dst()).unwrap(), data);
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
}

/// A directory root onto an existing directory is that directory: the
/// tree merges into it, as before.
#[test]
fn a_directory_as_the_root_merges_into_an_existing_directory() {
    let mut r = receiver_told_the_name(|dst| {
        std::fs::create_dir(dst).unwrap();
        std::fs::write(dst.join("kept"), b"kept").unwrap();
    });
    let data = content(10, 6);
    r.take(in_root(whole_file(2, "a", &data))).unwrap();
    assert!(r.done);
    assert_eq!(std::fs::read(r.dst().join("a")).unwrap(), data);
    assert_eq!(std::fs::read(r.dst().join("kept")).unwrap(), b"kept");
    assert!(!r.dst().join("f.txt").exists());
}

#[test]
fn an_empty_file_needs_no_chunk() {
    let mut r = Receiving::new();
    r.take(in_root(whole_file(2, "empty", b""))).unwrap();
    assert_eq!(r.outcome(2), Some(&Outcome::Ok));
    assert_eq!(std::fs::read(r.dst().join("empty")).unwrap(), b"");
}

/// A destination holding `a` as the sender has it (size and mtime).
fn receiver_with_a(data: &[u8], mode: u32) -> Receiving {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    std::fs::write(dst.join("a"), data).unwrap();
    std::fs::set_permissions(dst.join("a"), std::fs::Permissions::from_mode(mode)).unwrap();
    let time = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: MTIME.sec,
            tv_nsec: 5,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: MTIME.sec,
            tv_nsec: 5,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        dst.join("a"),
        &time,
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
    Receiving::in_dir(tmp, |_| {})
}

#[test]
fn an_unchanged_file_is_answered_before_any_data() {
    let data = content(2 * MIB, 3);
    let mut r = receiver_with_a(&data, 0o644);
    let replies = r
        .take(vec![dir(1, ""), file(2, "a", data.len() as u64)])
        .unwrap();
    // Answered when the receiver is idle, before any data is asked for.
    assert!(
        replies.contains(&Message::Outcome {
            id: 2,
            outcome: Outcome::Unchanged
        }),
        "{replies:?}"
    );
    r.take(vec![dir_end(1), end()]).unwrap();
    assert!(r.done);
    assert_eq!(r.report().files_unchanged, 1);
}

#[test]
fn an_unchanged_file_gets_the_senders_mode() {
    let data = content(100, 4);
    let mut r = receiver_with_a(&data, 0o600);
    r.take(in_root(vec![file(2, "a", data.len() as u64)]))
        .unwrap();
    assert_eq!(r.outcome(2), Some(&Outcome::Unchanged));
    let mode = std::fs::metadata(r.dst().join("a")).unwrap().mode();
    assert_eq!(mode & 0o777, 0o644);
}

#[test]
fn ignore_times_receives_a_file_that_looks_unchanged() {
    let old = content(100, 5);
    let tmp = receiver_with_a(&old, 0o644).break_off();
    let mut r = Receiving::in_dir(tmp, |d| d.ignore_times = true);
    // Same size, other bytes: only a receiver that looks again sees it.
    let new = content(100, 6);
    r.take(in_root(whole_file(2, "a", &new))).unwrap();
    assert_eq!(r.outcome(2), Some(&Outcome::Ok));
    assert_eq!(std::fs::read(r.dst().join("a")).unwrap(), new);
}

#[test]
fn a_fresh_directory_is_said_so_and_an_existing_one_is_not() {
    let mut r = Receiving::new();
    let replies = r.take(vec![dir(1, ""), dir(2, "sub")]).unwrap();
    assert!(replies.contains(&Message::Fresh { id: 1 }), "{replies:?}");
    // Below a fresh directory, everything is fresh: said once, at the top.
    assert!(!replies.contains(&Message::Fresh { id: 2 }), "{replies:?}");
    let tmp = r.break_off();
    let mut again = Receiving::in_dir(tmp, |_| {});
    let replies = again.take(vec![dir(1, ""), dir(2, "sub")]).unwrap();
    assert!(!replies.iter().any(|m| matches!(m, Message::Fresh { .. })));
}

#[test]
fn plans_go_out_when_the_receiver_is_idle() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("dst")).unwrap();
    let mut r = Receiving::in_dir(tmp, |_| {});
    // An existing directory: its files wait for their plans.
    let replies = r
        .take_busy(vec![dir(1, ""), file(2, "a", 5), file(3, "b", 5)], true)
        .unwrap();
    assert!(!replies.iter().any(|m| matches!(m, Message::Planned { .. })));
    assert!(r.idle().contains(&Message::Planned { through: 3 }));
    // Nothing new: nothing more to say.
    assert!(r.idle().is_empty());
}

/// Send the first `chunks` chunks of a big file, then break the session off.
fn interrupted(data: &[u8], chunks: usize) -> tempfile::TempDir {
    let mut r = Receiving::new();
    let mut frames = vec![dir(1, ""), file(2, "big", data.len() as u64)];
    frames.extend(chunks_from(2, data, 0).into_iter().take(chunks));
    r.take(frames).unwrap();
    assert!(r.outcome(2).is_none());
    r.break_off()
}

#[test]
fn a_big_file_broken_off_resumes_from_its_journal() {
    let data = content(6 * MIB + 100, 7);
    let tmp = interrupted(&data, 3);
    assert_eq!(
        leftovers(&tmp.path().join("dst")).len(),
        2,
        "part and journal"
    );
    let mut r = Receiving::in_dir(tmp, |_| {});
    let replies = r
        .take(vec![dir(1, ""), file(2, "big", data.len() as u64)])
        .unwrap();
    let have = Message::Have {
        id: 2,
        chunks: vec![(0, MIB as u32, 3)],
    };
    assert!(replies.contains(&have), "{replies:?}");
    let mut rest = chunks_from(2, &data, 3 * MIB as u64);
    rest.push(file_end(2, &data));
    rest.extend([dir_end(1), end()]);
    r.take(rest).unwrap();
    assert_eq!(r.outcome(2), Some(&Outcome::Ok));
    assert_eq!(std::fs::read(r.dst().join("big")).unwrap(), data);
    assert!(leftovers(&r.dst()).is_empty());
    assert!(r.events.all().contains(&Event::Resumed {
        path: "dst/big".into(),
        bytes: 3 * MIB as u64
    }));
}

#[test]
fn a_small_file_broken_off_leaves_nothing_behind() {
    let data = content(3 * MIB, 8);
    let tmp = interrupted(&data, 2);
    assert!(leftovers(&tmp.path().join("dst")).is_empty());
}

#[test]
fn a_resume_for_a_source_that_changed_starts_over() {
    let data = content(5 * MIB, 9);
    let tmp = interrupted(&data, 2);
    let mut r = Receiving::in_dir(tmp, |_| {});
    // Another size: the journal is of another source.
    let new = content(5 * MIB + 1, 10);
    let replies = r
        .take(vec![dir(1, ""), file(2, "big", new.len() as u64)])
        .unwrap();
    assert!(!replies.iter().any(|m| matches!(m, Message::Have { .. })));
    let mut rest = chunks_from(2, &new, 0);
    rest.extend([file_end(2, &new), dir_end(1), end()]);
    r.take(rest).unwrap();
    assert_eq!(std::fs::read(r.dst().join("big")).unwrap(), new);
}

#[test]
fn a_corrupt_chunk_settles_the_file_and_only_it_comes_again() {
    let data = content(6 * MIB, 11);
    let mut r = Receiving::new();
    let mut frames = vec![dir(1, ""), file(2, "big", data.len() as u64)];
    let mut chunks = chunks_from(2, &data, 0);
    let bad = &data[2 * MIB..3 * MIB];
    chunks[2] = chunk_hashed(2, 2 * MIB as u64, bad, 12345);
    frames.extend(chunks);
    frames.push(file_end(2, &data));
    r.take(frames).unwrap();
    let Some(Outcome::Incomplete(why)) = r.outcome(2) else {
        panic!("{:?}", r.answers)
    };
    assert!(why.contains("checksum"), "{why}");
    // What verified stays: the repair sends one chunk.
    let tmp = r.break_off();
    let mut again = Receiving::in_dir(tmp, |_| {});
    let replies = again
        .take(vec![dir(1, ""), file(2, "big", data.len() as u64)])
        .unwrap();
    let have = Message::Have {
        id: 2,
        chunks: vec![(0, MIB as u32, 2), (3 * MIB as u64, MIB as u32, 3)],
    };
    assert!(replies.contains(&have), "{replies:?}");
    again
        .take(vec![
            chunk(2, 2 * MIB as u64, bad),
            file_end(2, &data),
            dir_end(1),
            end(),
        ])
        .unwrap();
    assert_eq!(again.outcome(2), Some(&Outcome::Ok));
    assert_eq!(std::fs::read(again.dst().join("big")).unwrap(), data);
}

#[test]
fn a_digest_mismatch_keeps_nothing_of_the_file() {
    let data = content(5 * MIB, 13);
    let mut r = Receiving::new();
    let mut frames = vec![file(2, "big", data.len() as u64)];
    frames.extend(chunks_from(2, &data, 0));
    frames.push(file_end(2, &content(5 * MIB, 14)));
    r.take(in_root(frames)).unwrap();
    let Some(Outcome::Incomplete(why)) = r.outcome(2) else {
        panic!("{:?}", r.answers)
    };
    assert!(why.contains("digest mismatch"), "{why}");
    assert!(!r.dst().join("big").exists());
    assert!(leftovers(&r.dst()).is_empty());
}

#[test]
fn a_chunk_that_overlaps_a_verified_one_settles_the_file() {
    let data = content(2 * MIB, 15);
    let mut r = Receiving::new();
    let frames = vec![
        file(2, "a", data.len() as u64),
        chunk(2, 0, &data[..MIB]),
        chunk(2, 0, &data[..MIB]),
    ];
    r.take(in_root(frames)).unwrap();
    assert!(matches!(r.outcome(2), Some(Outcome::Incomplete(_))));
}

#[test]
fn a_chunk_that_overtakes_its_entry_waits_for_it() {
    let data = content(MIB + 1, 16);
    let mut r = Receiving::new();
    // The second chunk comes on another connection, ahead of the entry.
    r.take(vec![dir(1, ""), chunk(2, MIB as u64, &data[MIB..])])
        .unwrap();
    let mut frames = vec![file(2, "a", data.len() as u64), chunk(2, 0, &data[..MIB])];
    frames.extend([file_end(2, &data), dir_end(1), end()]);
    r.take(frames).unwrap();
    assert_eq!(r.outcome(2), Some(&Outcome::Ok));
    assert_eq!(std::fs::read(r.dst().join("a")).unwrap(), data);
}

#[test]
fn the_file_end_may_overtake_the_last_chunks() {
    let data = content(2 * MIB, 17);
    let mut r = Receiving::new();
    let chunks = chunks_from(2, &data, 0);
    let mut frames = vec![dir(1, ""), file(2, "a", data.len() as u64)];
    let mut chunks = chunks.into_iter();
    frames.push(chunks.next().unwrap());
    frames.push(file_end(2, &data));
    r.take(frames).unwrap();
    assert!(r.outcome(2).is_none(), "not before its last chunk");
    r.take(vec![chunks.next().unwrap(), dir_end(1), end()])
        .unwrap();
    assert_eq!(r.outcome(2), Some(&Outcome::Ok));
}

#[test]
fn too_many_chunks_ahead_of_their_entries_end_the_session() {
    let mut r = Receiving::new();
    let frames: Vec<Inbound> = (0..200).map(|i| chunk(5, i * 10, b"0123456789")).collect();
    let e = r.take(frames).unwrap_err();
    assert_violation(e, |v| matches!(v, Violation::OverLimit { .. }));
    assert!(told_protocol_error(&r));
}

#[test]
fn chunks_of_entries_that_never_come_fail_the_end() {
    let mut r = Receiving::new();
    let e = r
        .take(vec![dir(1, ""), chunk(9, 0, b"x"), dir_end(1), end()])
        .unwrap_err();
    assert_violation(e, |v| matches!(v, Violation::OrphanChunks));
}

#[test]
fn a_directory_is_finished_only_after_everything_below_it() {
    let data = content(MIB + 3, 18);
    let mut r = Receiving::new();
    let read_only = entry(
        2,
        "sub",
        EntryKind::Dir {
            mode: 0o555,
            mtime: MTIME,
        },
    );
    // The sender ends the directory while its file's data is on its way.
    let mut frames = vec![dir(1, ""), read_only, file(3, "sub/f", data.len() as u64)];
    frames.extend([dir_end(2), dir_end(1)]);
    r.take(frames).unwrap();
    assert!(r.outcome(2).is_none(), "{:?}", r.answers);
    let mut rest = chunks_from(3, &data, 0);
    rest.extend([file_end(3, &data), end()]);
    r.take(rest).unwrap();
    let order: Vec<u64> = r
        .answers
        .iter()
        .filter_map(|m| match m {
            Message::Outcome { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(order, [3, 2, 1]);
    assert_eq!(std::fs::read(r.dst().join("sub/f")).unwrap(), data);
    let sub = std::fs::metadata(r.dst().join("sub")).unwrap();
    assert_eq!((sub.mode() & 0o777, sub.mtime()), (0o555, MTIME.sec));
}

fn hardlink(id: u64, path: &str, first: u64, target: &str) -> Inbound {
    entry(
        id,
        path,
        EntryKind::Hardlink {
            first,
            target: WireBytes(target.as_bytes().to_vec()),
        },
    )
}

#[test]
fn a_hard_link_to_a_file_in_flight_waits_for_it() {
    let data = content(MIB + 9, 19);
    let mut r = Receiving::new();
    let mut frames = vec![
        dir(1, ""),
        file(2, "a", data.len() as u64),
        hardlink(3, "b", 2, "a"),
    ];
    frames.extend(chunks_from(2, &data, 0));
    frames.extend([file_end(2, &data), dir_end(1), end()]);
    r.take(frames).unwrap();
    assert_eq!(r.outcome(3), Some(&Outcome::Ok));
    let (a, b) = (r.dst().join("a"), r.dst().join("b"));
    assert_eq!(
        std::fs::metadata(a).unwrap().ino(),
        std::fs::metadata(b).unwrap().ino()
    );
}

#[test]
fn a_hard_link_to_a_settled_file_is_made_at_once() {
    let data = content(10, 20);
    let mut r = Receiving::new();
    let mut frames = whole_file(2, "a", &data);
    frames.push(hardlink(3, "b", 2, "a"));
    r.take(in_root(frames)).unwrap();
    assert_eq!(r.outcome(3), Some(&Outcome::Ok));
    assert_eq!(std::fs::read(r.dst().join("b")).unwrap(), data);
}

#[test]
fn a_hard_link_shares_the_fate_of_a_file_that_did_not_arrive() {
    let data = content(2 * MIB, 21);
    let mut r = Receiving::new();
    let mut frames = vec![file(2, "a", data.len() as u64), hardlink(3, "b", 2, "a")];
    frames.extend(chunks_from(2, &data, 0));
    frames.push(file_end(2, b"something else"));
    r.take(in_root(frames)).unwrap();
    let Some(Outcome::Incomplete(why)) = r.outcome(3) else {
        panic!("{:?}", r.answers)
    };
    assert!(why.contains("its file did not arrive whole"), "{why}");
    assert!(r.done, "the link settled, so did the transfer");
}

#[test]
fn a_hard_link_naming_a_later_entry_ends_the_session() {
    let mut r = Receiving::new();
    let e = r
        .take(vec![dir(1, ""), hardlink(2, "b", 5, "a")])
        .unwrap_err();
    assert_violation(e, |v| matches!(v, Violation::LinkAhead { id: 2, first: 5 }));
}

#[test]
fn the_entry_that_ends_the_session_is_named_to_the_sender() {
    let mut r = Receiving::new();
    r.take(vec![
        dir(1, ""),
        dir(2, "sub"),
        hardlink(3, "sub/b", 5, "a"),
    ])
    .unwrap_err();
    match r.answers.last() {
        Some(Message::Error {
            code: ErrorCode::Protocol,
            message,
            path: Some(path),
        }) => {
            assert_eq!(path.as_bytes(), b"sub/b");
            assert!(message.contains("hard link 3 names entry 5"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_hard_link_to_the_root_ends_the_session() {
    let mut r = Receiving::new();
    let e = r
        .take(vec![dir(1, ""), hardlink(2, "b", 1, "")])
        .unwrap_err();
    assert_violation(e, |v| matches!(v, Violation::LinkToRoot { id: 2 }));
}

#[test]
fn entry_ids_must_increase() {
    let mut r = Receiving::new();
    let e = r.take(vec![dir(1, ""), file(1, "a", 0)]).unwrap_err();
    assert_violation(e, |v| {
        matches!(v, Violation::EntryIdNotIncreasing { id: 1 })
    });
    assert!(told_protocol_error(&r));
}

#[test]
fn an_owner_of_minus_one_ends_the_session() {
    let mut r = Receiving::new();
    let e = r
        .take(vec![ctl(Message::Entry {
            id: 1,
            path: WireBytes(Vec::new()),
            kind: EntryKind::Dir {
                mode: 0o755,
                mtime: MTIME,
            },
            owner: Some(Owner {
                uid: u32::MAX,
                gid: 0,
            }),
            digest: None,
        })])
        .unwrap_err();
    assert!(e.to_string().contains("invalid owner 4294967295:0"), "{e}");
}

#[test]
fn messages_about_entries_never_announced_end_the_session() {
    for (frame, name) in [
        (file_end(7, b""), "file_end"),
        (dir_end(7), "dir_end"),
        (
            ctl(Message::Abort {
                id: 7,
                reason: "x".into(),
                transient: false,
            }),
            "abort",
        ),
    ] {
        let mut r = Receiving::new();
        let e = r.take(vec![dir(1, ""), frame]).unwrap_err();
        assert_violation(
            e,
            |v| matches!(v, Violation::NeverAnnounced { message, id: 7 } if *message == name),
        );
    }
}

#[test]
fn a_message_only_a_server_sends_ends_the_session_and_is_named() {
    let mut r = Receiving::new();
    let e = r.take(vec![ctl(Message::Ready)]).unwrap_err();
    assert_violation(e, |v| {
        matches!(
            v,
            Violation::UnexpectedMessage {
                from: Role::Sender,
                message: "ready"
            }
        )
    });
}

#[test]
fn a_malformed_digest_ends_the_session() {
    let mut r = Receiving::new();
    let frames = vec![
        dir(1, ""),
        file(2, "a", 0),
        ctl(Message::FileEnd {
            id: 2,
            digest: "not hex".into(),
        }),
    ];
    let e = r.take(frames).unwrap_err();
    assert_violation(e, |v| matches!(v, Violation::MalformedDigest { id: 2 }));
}

#[test]
fn too_many_open_directories_end_the_session() {
    let mut r = Receiving::new();
    let limit = ferry_proto::limits::MAX_OPEN_DIRS as u64;
    let mut frames = vec![dir(1, "")];
    frames.extend((2..=limit + 1).map(|id| dir(id, &format!("d{id}"))));
    let e = r.take(frames).unwrap_err();
    assert_violation(e, |v| matches!(v, Violation::OverLimit { .. }));
}

#[test]
fn an_abort_fails_the_file_and_removes_its_part() {
    let data = content(5 * MIB, 22);
    let mut r = Receiving::new();
    let mut frames = vec![file(2, "big", data.len() as u64)];
    frames.extend(chunks_from(2, &data, 0).into_iter().take(2));
    frames.push(ctl(Message::Abort {
        id: 2,
        reason: "the file changed while it was being sent".into(),
        transient: true,
    }));
    r.take(in_root(frames)).unwrap();
    assert!(matches!(r.outcome(2), Some(Outcome::Incomplete(_))));
    assert!(leftovers(&r.dst()).is_empty());
    assert!(!r.dst().join("big").exists());
}

#[test]
fn an_aborted_directory_fails_when_it_ends() {
    let mut r = Receiving::new();
    let frames = vec![
        dir(2, "sub"),
        ctl(Message::Abort {
            id: 2,
            reason: "cannot list directory: permission denied".into(),
            transient: false,
        }),
        dir_end(2),
    ];
    r.take(in_root(frames)).unwrap();
    let Some(Outcome::Failed(why)) = r.outcome(2) else {
        panic!("{:?}", r.answers)
    };
    assert!(why.contains("cannot list directory"), "{why}");
}

#[test]
fn specials_are_skipped_and_devices_need_permission() {
    let mut r = Receiving::new();
    let frames = vec![
        entry(
            2,
            "sock",
            EntryKind::Special {
                what: "socket".into(),
            },
        ),
        entry(
            3,
            "disk",
            EntryKind::Device {
                block: true,
                major: 8,
                minor: 0,
                mode: 0o600,
                mtime: MTIME,
            },
        ),
    ];
    r.take(in_root(frames)).unwrap();
    assert!(matches!(r.outcome(2), Some(Outcome::Skipped(_))));
    let Some(Outcome::Skipped(why)) = r.outcome(3) else {
        panic!("{:?}", r.answers)
    };
    assert!(why.contains("--devices"), "{why}");
    assert!(!r.dst().join("disk").exists());
}

#[test]
fn a_symlink_and_a_fifo_are_made_as_such() {
    let mut r = Receiving::new();
    let frames = vec![
        entry(
            2,
            "link",
            EntryKind::Symlink {
                target: WireBytes(b"../elsewhere".to_vec()),
                mtime: MTIME,
            },
        ),
        entry(
            3,
            "fifo",
            EntryKind::Fifo {
                mode: 0o640,
                mtime: MTIME,
            },
        ),
    ];
    r.take(in_root(frames)).unwrap();
    assert_eq!(r.outcome(2), Some(&Outcome::Ok));
    let target = std::fs::read_link(r.dst().join("link")).unwrap();
    assert_eq!(target, std::path::Path::new("../elsewhere"));
    use std::os::unix::fs::FileTypeExt;
    let fifo = std::fs::symlink_metadata(r.dst().join("fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o777, 0o640);
}

#[test]
fn a_sender_error_ends_the_session_and_removes_what_was_open() {
    let data = content(2 * MIB, 23);
    let mut r = Receiving::new();
    let mut frames = vec![dir(1, ""), file(2, "a", data.len() as u64)];
    frames.push(chunk(2, 0, &data[..MIB]));
    frames.push(ctl(Message::error(ErrorCode::Io, "disk on fire")));
    let e = r.take(frames).unwrap_err();
    assert!(
        matches!(&e, EngineError::Remote(failure) if failure.message == "disk on fire"),
        "{e:?}"
    );
    // The sender ended it: it is not told again.
    assert!(!told_protocol_error(&r));
    assert!(leftovers(&r.dst()).is_empty());
}

#[test]
fn a_file_that_cannot_take_its_name_fails_alone() {
    let tmp = tempfile::tempdir().unwrap();
    // A non-empty directory where the file should land.
    std::fs::create_dir_all(tmp.path().join("dst/a/inside")).unwrap();
    let mut r = Receiving::in_dir(tmp, |_| {});
    let data = content(100, 24);
    let mut frames = whole_file(2, "a", &data);
    frames.extend(whole_file(3, "b", &data));
    r.take(in_root(frames)).unwrap();
    let Some(Outcome::Failed(why)) = r.outcome(2) else {
        panic!("{:?}", r.answers)
    };
    assert!(why.contains("directory"), "{why}");
    assert_eq!(r.outcome(3), Some(&Outcome::Ok));
    assert!(r.dst().join("a/inside").is_dir(), "kept");
    assert!(leftovers(&r.dst()).is_empty());
}

#[test]
fn an_entry_whose_directory_is_missing_fails_alone() {
    let mut r = Receiving::new();
    let data = content(10, 25);
    let mut frames = whole_file(2, "nowhere/a", &data);
    frames.extend(whole_file(3, "b", &data));
    r.take(in_root(frames)).unwrap();
    let Some(Outcome::Failed(why)) = r.outcome(2) else {
        panic!("{:?}", r.answers)
    };
    assert!(why.contains("cannot open its directory"), "{why}");
    assert_eq!(r.outcome(3), Some(&Outcome::Ok));
    assert!(r.done);
}

#[test]
fn a_vanished_entry_is_reported_and_creates_nothing() {
    let mut r = Receiving::new();
    let gone = ctl(Message::Vanished {
        path: WireBytes(b"sub/gone".to_vec()),
    });
    r.take(in_root(vec![gone])).unwrap();
    assert!(r.done);
    assert_eq!(r.report().vanished, ["dst/sub/gone"]);
    assert!(!r.dst().join("sub").exists());
}

#[test]
fn a_vanished_entry_with_a_path_that_climbs_ends_the_session() {
    let mut r = Receiving::new();
    let climbing = ctl(Message::Vanished {
        path: WireBytes(b"../etc/passwd".to_vec()),
    });
    let e = r.take(vec![dir(1, ""), climbing]).unwrap_err();
    assert!(matches!(e, EngineError::BadPath(_)), "{e:?}");
}

// ---------------------------------------------------------------------------
// Working names: parts, journals and what links and nodes are made under
// ---------------------------------------------------------------------------

/// A receiver into `dst`, which exists already (so its files are looked
/// for, and large ones resumed), after `plant` has put things in it.
fn into_existing(plant: impl FnOnce(&std::path::Path)) -> Receiving {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    plant(&dst);
    Receiving::in_dir(tmp, |_| {})
}

/// A journal for `data` (as the entry `file(…, data.len())` announces it)
/// that vouches for its first `chunks` chunks, private, as the receiver
/// writes one.
fn vouching_journal(dir: &std::path::Path, name: &str, data: &[u8], chunks: usize) {
    use crate::journal::{ChunkRecord, Journal, SourceStamp};
    use std::os::fd::AsFd;
    let stamp = SourceStamp {
        size: data.len() as u64,
        mtime_sec: MTIME.sec,
        mtime_nsec: MTIME.nsec,
    };
    let dir = std::fs::File::open(dir).unwrap();
    let mut journal = Journal::create(dir.as_fd(), name.as_bytes(), stamp).unwrap();
    for (i, piece) in data.chunks(MIB).take(chunks).enumerate() {
        let record = ChunkRecord {
            offset: (i * MIB) as u64,
            len: piece.len() as u32,
            hash: ferry_proto::digest::chunk_hash(piece),
        };
        journal.record(record).unwrap();
    }
}

/// Watches a path for anyone opening it. An `O_PATH` handle is not an
/// open: Linux gives such descriptors no fsnotify events.
fn watch_opens(path: &std::path::Path) -> std::os::fd::OwnedFd {
    use rustix::fs::inotify;
    let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
    inotify::add_watch(&fd, path, inotify::WatchFlags::OPEN).unwrap();
    fd
}

fn was_opened(watch: &std::os::fd::OwnedFd) -> bool {
    use rustix::fs::inotify;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    let mut events = inotify::Reader::new(watch, &mut buf);
    // Bounded: the buffer holds a few hundred events at most.
    while let Ok(event) = events.next() {
        if event.events().contains(inotify::ReadFlags::OPEN) {
            return true;
        }
    }
    false
}

fn has_have(r: &Receiving) -> bool {
    r.answers.iter().any(|m| matches!(m, Message::Have { .. }))
}

/// The rest of file 2 (`data`, of which the receiver holds nothing), and
/// the transfer's end.
fn the_rest(data: &[u8]) -> Vec<Inbound> {
    let mut frames = chunks_from(2, data, 0);
    frames.extend([file_end(2, data), dir_end(1), end()]);
    frames
}

#[test]
fn entries_under_the_receivers_working_names_are_refused() {
    let data = content(10, 30);
    let mut r = Receiving::new();
    let mut frames = whole_file(2, "fine", &data);
    frames.extend(whole_file(3, ".a.ferry-part", &data));
    frames.extend(whole_file(4, ".a.ferry-journal", &data));
    frames.push(entry(
        5,
        ".x.ferry-journal",
        EntryKind::Symlink {
            target: WireBytes(b"fine".to_vec()),
            mtime: MTIME,
        },
    ));
    frames.push(entry(
        6,
        ".b.ferry-part",
        EntryKind::Fifo {
            mode: 0o600,
            mtime: MTIME,
        },
    ));
    frames.push(hardlink(7, "link", 2, ".a.ferry-part"));
    frames.push(dir(8, ".c.ferry-part"));
    frames.push(dir_end(8));
    frames.extend(whole_file(9, ".ferry-new.0123456789abcdef", &data));
    r.take(in_root(frames)).unwrap();
    assert_eq!(r.outcome(2), Some(&Outcome::Ok));
    for id in 3..=9 {
        let Some(Outcome::Failed(why)) = r.outcome(id) else {
            panic!("entry {id}: {:?}", r.answers)
        };
        assert!(why.contains("ferry"), "{why}");
    }
    let names: Vec<_> = std::fs::read_dir(r.dst()).unwrap().flatten().collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(r.done);
}

#[test]
fn a_destination_under_a_working_name_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = Receiving::in_dir(tmp, |d| d.prefix = vec![b".x.ferry-part".to_vec()]);
    let data = content(10, 31);
    let mut frames = whole_file(1, "", &data);
    frames.push(end());
    r.take(frames).unwrap();
    assert!(
        matches!(r.outcome(1), Some(Outcome::Failed(_))),
        "{:?}",
        r.answers
    );
    assert!(!r.tmp.path().join(".x.ferry-part").exists());
}

#[test]
fn a_node_under_a_part_or_journal_name_is_never_opened() {
    let data = content(5 * MIB, 35);
    let fifo = |path: &std::path::Path| {
        let kind = rustix::fs::FileType::Fifo;
        rustix::fs::mknodat(rustix::fs::CWD, path, kind, 0o600.into(), 0).unwrap();
    };
    let mut r = into_existing(|dst| {
        fifo(&dst.join(".a.ferry-part"));
        // A part the receiver left (private, its own), with a fifo for
        // its journal.
        let part = dst.join(".b.ferry-part");
        std::fs::write(&part, &data[..MIB]).unwrap();
        std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o600)).unwrap();
        fifo(&dst.join(".b.ferry-journal"));
    });
    let watches = [
        watch_opens(&r.dst().join(".a.ferry-part")),
        watch_opens(&r.dst().join(".b.ferry-journal")),
    ];
    let mut frames = vec![dir(1, ""), file(2, "a", data.len() as u64)];
    frames.extend(chunks_from(2, &data, 0));
    frames.push(file_end(2, &data));
    frames.push(file(3, "b", data.len() as u64));
    frames.extend(chunks_from(3, &data, 0));
    frames.extend([file_end(3, &data), dir_end(1), end()]);
    r.take(frames).unwrap();
    assert!(watches.iter().all(|w| !was_opened(w)), "a fifo was opened");
    assert_eq!(r.outcome(2), Some(&Outcome::Ok));
    assert_eq!(r.outcome(3), Some(&Outcome::Ok));
    assert_eq!(std::fs::read(r.dst().join("a")).unwrap(), data);
    assert!(leftovers(&r.dst()).is_empty(), "{:?}", leftovers(&r.dst()));
}

#[test]
fn a_link_or_node_entry_leaves_another_transfers_part_alone() {
    let data = content(5 * MIB, 36);
    let mut writer = into_existing(|dst| std::fs::write(dst.join("other"), b"o").unwrap());
    writer
        .take(vec![dir(1, ""), file(2, "big", data.len() as u64)])
        .unwrap();
    let part = writer.dst().join(".big.ferry-part");
    let part_ino = std::fs::metadata(&part).unwrap().ino();
    let kinds = [
        EntryKind::Symlink {
            target: WireBytes(b"elsewhere".to_vec()),
            mtime: MTIME,
        },
        EntryKind::Hardlink {
            first: 1,
            target: WireBytes(b"other".to_vec()),
        },
        EntryKind::Fifo {
            mode: 0o600,
            mtime: MTIME,
        },
    ];
    for kind in kinds {
        // Another transfer into the same directory.
        let base = harness::open_dir(writer.tmp.path());
        let mut other = Receiving::in_dir(tempfile::tempdir().unwrap(), |d| d.base = base);
        other.take(in_root(vec![entry(2, "big", kind)])).unwrap();
        assert_eq!(other.outcome(2), Some(&Outcome::Ok), "{:?}", other.answers);
        let now = std::fs::symlink_metadata(&part).map(|m| m.ino());
        assert_eq!(now.ok(), Some(part_ino), "the part in flight was removed");
    }
    writer.take(the_rest(&data)).unwrap();
    assert_eq!(
        writer.outcome(2),
        Some(&Outcome::Ok),
        "{:?}",
        writer.answers
    );
    assert_eq!(std::fs::read(writer.dst().join("big")).unwrap(), data);
}

#[test]
fn a_hard_link_under_a_part_name_is_never_resumed_nor_written() {
    let data = content(5 * MIB, 32);
    let secret = content(5 * MIB, 33);
    let mut r = into_existing(|dst| {
        std::fs::write(dst.join("secret"), &secret).unwrap();
        std::fs::hard_link(dst.join("secret"), dst.join(".big.ferry-part")).unwrap();
        vouching_journal(dst, ".big.ferry-journal", &secret, 3);
    });
    let journal = watch_opens(&r.dst().join(".big.ferry-journal"));
    r.take(vec![dir(1, ""), file(2, "big", data.len() as u64)])
        .unwrap();
    assert!(!has_have(&r), "{:?}", r.answers);
    assert!(!was_opened(&journal), "the planted journal was read");
    r.take(the_rest(&data)).unwrap();
    assert_eq!(r.outcome(2), Some(&Outcome::Ok));
    assert_eq!(std::fs::read(r.dst().join("big")).unwrap(), data);
    assert_eq!(std::fs::read(r.dst().join("secret")).unwrap(), secret);
    assert_eq!(
        std::fs::metadata(r.dst().join("secret")).unwrap().nlink(),
        1
    );
    assert!(leftovers(&r.dst()).is_empty(), "{:?}", leftovers(&r.dst()));
}

#[test]
fn a_part_others_could_open_is_replaced_not_adopted() {
    let data = content(5 * MIB, 34);
    let mut r = into_existing(|dst| {
        let part = dst.join(".big.ferry-part");
        std::fs::write(&part, &data[..2 * MIB]).unwrap();
        std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o644)).unwrap();
        vouching_journal(dst, ".big.ferry-journal", &data, 2);
    });
    // Kept open, as whoever could open it may have: its inode stays its
    // own (and its number is not reused).
    let kept = std::fs::File::open(r.dst().join(".big.ferry-part")).unwrap();
    let planted = kept.metadata().unwrap().ino();
    r.take(vec![dir(1, ""), file(2, "big", data.len() as u64)])
        .unwrap();
    assert!(!has_have(&r), "{:?}", r.answers);
    r.take(the_rest(&data)).unwrap();
    assert_eq!(r.outcome(2), Some(&Outcome::Ok));
    assert_ne!(
        std::fs::metadata(r.dst().join("big")).unwrap().ino(),
        planted
    );
    assert_eq!(std::fs::read(r.dst().join("big")).unwrap(), data);
}

#[test]
fn a_resume_whose_held_chunks_no_longer_match_keeps_only_what_it_received() {
    let old = content(6 * MIB, 31);
    let tmp = interrupted(&old, 2);
    // The source's first chunk changed in place since (size and mtime put back).
    let mut new = old.clone();
    new[..MIB].copy_from_slice(&content(MIB, 32));
    let mut r = Receiving::in_dir(tmp, |_| {});
    r.take(vec![dir(1, ""), file(2, "big", new.len() as u64)])
        .unwrap();
    let mut rest = chunks_from(2, &new, 2 * MIB as u64);
    rest.push(file_end(2, &new));
    r.take(rest).unwrap();
    let Some(Outcome::Incomplete(why)) = r.outcome(2) else {
        panic!("{:?}", r.answers)
    };
    assert!(why.contains("no longer match"), "{why}");
    // The next attempt is offered only what this one received.
    let mut again = Receiving::in_dir(r.break_off(), |_| {});
    let replies = again
        .take(vec![dir(1, ""), file(2, "big", new.len() as u64)])
        .unwrap();
    let have = Message::Have {
        id: 2,
        chunks: vec![(2 * MIB as u64, MIB as u32, 4)],
    };
    assert!(replies.contains(&have), "{replies:?}");
    let mut held_back = chunks_from(2, &new[..2 * MIB], 0);
    held_back.extend([file_end(2, &new), dir_end(1), end()]);
    again.take(held_back).unwrap();
    assert_eq!(again.outcome(2), Some(&Outcome::Ok));
    assert_eq!(std::fs::read(again.dst().join("big")).unwrap(), new);
}

/// A session at its share of descriptors puts off what would hold one
/// more: a file is answered `incomplete` (the client sends it again), a
/// directory is made but answered `incomplete` (its metadata waits), and
/// what lies below it lands all the same once descriptors come back.
#[test]
fn a_session_out_of_descriptors_puts_entries_off_and_goes_on() {
    use crate::budget::{Budget, SessionBudget, Split};
    let three = Budget::new(Split {
        reserve: 3,
        reserved_max: 3,
        shared: 0,
        share: 0,
    });
    let tmp = tempfile::tempdir().unwrap();
    let mut r = Receiving::in_dir(tmp, |dest| {
        dest.budget = SessionBudget {
            descriptors: three.admit().unwrap(),
            ..SessionBudget::unlimited()
        };
    });
    let data = content(10, 2);
    let abort = |id| {
        ctl(Message::Abort {
            id,
            reason: "gone".into(),
            transient: true,
        })
    };
    // The root and `d` hold one each, `d/x` (announced, not sent) the last.
    let mut frames = vec![dir(1, ""), dir(2, "d"), file(3, "d/x", 10)];
    frames.extend([file(4, "d/y", 10), dir(5, "d/e"), abort(3)]);
    frames.extend(whole_file(6, "d/e/f", &data));
    frames.extend([dir_end(5), dir_end(2), dir_end(1), end()]);
    r.take(frames).unwrap();
    for ok in [1, 2, 6] {
        assert_eq!(
            r.outcome(ok),
            Some(&Outcome::Ok),
            "entry {ok}: {:?}",
            r.answers
        );
    }
    for put_off in [4, 5] {
        let Some(Outcome::Incomplete(why)) = r.outcome(put_off) else {
            panic!("entry {put_off}: {:?}", r.answers)
        };
        assert!(why.contains("files open"), "{why}");
    }
    assert_eq!(std::fs::read(r.dst().join("d/e/f")).unwrap(), data);
    assert!(r.done);
}

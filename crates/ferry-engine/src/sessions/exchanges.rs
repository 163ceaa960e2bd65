//! Whole transfers, real sender against real receiver, in memory: the
//! ordinary cases and what a broken link, a changing source or a hostile
//! peer does to them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ferry_proto::message::{ErrorCode, Message, Outcome};

use super::harness::{Receiving, content};
use super::pair::{Link, assert_same_tree, chunk_of, exchange, flipped, message_of};
use crate::error::{EngineError, Side, Violation};
use crate::events::{Event, Origin};
use crate::receiver::Inbound;

const MIB: usize = 1024 * 1024;

/// A source tree in `tmp/src`: files of several sizes, an empty one, an
/// empty directory, nested directories, modes and a symlink.
fn source_tree(tmp: &Path) -> PathBuf {
    let src = tmp.join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::create_dir(src.join("empty_dir")).unwrap();
    std::fs::write(src.join("small"), content(100, 1)).unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    std::fs::write(src.join("sub/two_chunks"), content(MIB + 17, 2)).unwrap();
    std::fs::write(src.join("sub/deeper/big"), content(5 * MIB + 3, 3)).unwrap();
    set_mode(&src.join("small"), 0o600);
    set_mode(&src.join("sub"), 0o750);
    std::os::unix::fs::symlink("../small", src.join("sub/link")).unwrap();
    src
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A source and an empty receiver beside it.
fn setup() -> (PathBuf, Receiving) {
    let tmp = tempfile::tempdir().unwrap();
    let src = source_tree(tmp.path());
    (src, Receiving::in_dir(tmp, |_| {}))
}

/// The receiver of an earlier exchange, for the next one into the same place.
fn again(rx: Receiving) -> Receiving {
    Receiving::in_dir(rx.break_off(), |_| {})
}

fn sent_bytes(events: &[Event]) -> u64 {
    events
        .iter()
        .map(|e| match e {
            Event::Bytes { n } => *n,
            _ => 0,
        })
        .sum()
}

#[test]
fn a_tree_arrives_equal() {
    let (src, rx) = setup();
    let ended = exchange(&src, rx, Link::default());
    ended.assert_ok();
    assert_same_tree(&src, &ended.rx.dst());
    assert_eq!(ended.sent.files_ok, 5);
    assert!(ended.sent.failed.is_empty());
}

#[test]
fn a_second_run_sends_nothing() {
    let (src, rx) = setup();
    let first = exchange(&src, rx, Link::default());
    first.assert_ok();
    let second = exchange(&src, again(first.rx), Link::default());
    second.assert_ok();
    assert_eq!(second.sent.files_unchanged, 4, "the symlink is made again");
    assert_eq!(sent_bytes(&second.sent_events.all()), 0);
    assert_same_tree(&src, &second.rx.dst());
}

#[test]
fn only_the_file_that_changed_is_sent_again() {
    let (src, rx) = setup();
    let first = exchange(&src, rx, Link::default());
    first.assert_ok();
    std::fs::write(src.join("sub/two_chunks"), content(MIB + 18, 4)).unwrap();
    let second = exchange(&src, again(first.rx), Link::default());
    second.assert_ok();
    assert_eq!(sent_bytes(&second.sent_events.all()), MIB as u64 + 18);
    assert_same_tree(&src, &second.rx.dst());
}

#[test]
fn a_single_file_arrives_under_the_destination_name() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("one");
    std::fs::write(&file, content(3 * MIB, 5)).unwrap();
    let ended = exchange(&file, Receiving::in_dir(tmp, |_| {}), Link::default());
    ended.assert_ok();
    assert_same_tree(&file, &ended.rx.dst());
}

#[test]
fn many_small_files_arrive_in_few_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..3000 {
        std::fs::write(src.join(format!("f{i:04}")), content(64, i as u8)).unwrap();
    }
    let ended = exchange(&src, Receiving::in_dir(tmp, |_| {}), Link::default());
    ended.assert_ok();
    assert_eq!(ended.sent.files_ok, 3000);
    assert_same_tree(&src, &ended.rx.dst());
}

#[test]
fn hard_links_arrive_as_links() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("a"), content(2 * MIB + 1, 6)).unwrap();
    std::fs::hard_link(src.join("a"), src.join("d/b")).unwrap();
    std::fs::hard_link(src.join("a"), src.join("c")).unwrap();
    let ended = exchange(&src, Receiving::in_dir(tmp, |_| {}), Link::default());
    ended.assert_ok();
    let dst = ended.rx.dst();
    let ino = |p: &str| std::fs::metadata(dst.join(p)).unwrap().ino();
    assert_eq!(ino("a"), ino("d/b"));
    assert_eq!(ino("a"), ino("c"));
    assert_eq!(sent_bytes(&ended.sent_events.all()), 2 * MIB as u64 + 1);
}

/// A link that passes frames until `cut_at` says so, then breaks.
fn cut_when<'a>(mut cut_at: impl FnMut(&Inbound) -> bool + 'a) -> Link<'a> {
    Link {
        frames: Box::new(move |f| (!cut_at(&f)).then(|| vec![f])),
        ..Link::default()
    }
}

#[test]
fn a_cut_in_a_big_file_is_resumed_with_only_the_rest() {
    let (src, rx) = setup();
    // Cut as the big file's fourth chunk comes: three are in its journal.
    let first = exchange(
        &src,
        rx,
        cut_when(|f| matches!(chunk_of(f), Some((_, offset)) if offset == 3 * MIB as u64)),
    );
    assert!(matches!(first.receiver, Err(EngineError::Closed)));
    let second = exchange(&src, again(first.rx), Link::default());
    second.assert_ok();
    assert_same_tree(&src, &second.rx.dst());
    let events = second.sent_events.all();
    let resumed = events.iter().find_map(|e| match e {
        Event::Resumed { path, bytes } => Some((path.clone(), *bytes)),
        _ => None,
    });
    assert_eq!(resumed, Some(("src/sub/deeper/big".into(), 3 * MIB as u64)));
    // The rest of the big file, and the file the cut kept from coming.
    assert_eq!(sent_bytes(&events), (2 * MIB + 3 + MIB + 17) as u64);
}

#[test]
fn a_chunk_damaged_on_the_way_is_all_that_comes_again() {
    let (src, rx) = setup();
    let damage = Link {
        frames: Box::new(|f| {
            let hit = matches!(chunk_of(&f), Some((_, offset)) if offset == 2 * MIB as u64);
            Some(vec![if hit { flipped(f) } else { f }])
        }),
        ..Link::default()
    };
    let first = exchange(&src, rx, damage);
    first.assert_ok();
    let incomplete = &first.sent.incomplete;
    assert_eq!(incomplete.len(), 1, "{incomplete:?}");
    // The receiver found it damaged: named in the destination, the
    // receiver's.
    assert_eq!(incomplete[0].path, "dst/sub/deeper/big");
    assert_eq!(incomplete[0].origin, Origin::Peer);
    let second = exchange(&src, again(first.rx), Link::default());
    second.assert_ok();
    assert_same_tree(&src, &second.rx.dst());
    assert_eq!(sent_bytes(&second.sent_events.all()), MIB as u64);
}

#[test]
fn a_chunk_that_overtakes_its_entry_is_held_until_it_comes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("big"), content(3 * MIB, 7)).unwrap();
    // Hold every entry back until the next frame has passed.
    let mut held: Option<Inbound> = None;
    let reorder = Link {
        frames: Box::new(move |f| {
            if matches!(message_of(&f), Some(Message::Entry { id: 2, .. })) {
                held = Some(f);
                return Some(Vec::new());
            }
            Some(match held.take() {
                Some(entry) if chunk_of(&f).is_some() => vec![f, entry],
                Some(entry) => vec![entry, f],
                None => vec![f],
            })
        }),
        ..Link::default()
    };
    let ended = exchange(&src, Receiving::in_dir(tmp, |_| {}), reorder);
    ended.assert_ok();
    assert_same_tree(&src, &ended.rx.dst());
}

#[test]
fn a_source_that_shrinks_while_it_is_read_is_reported_and_not_placed() {
    let (src, rx) = setup();
    let big = src.join("sub/deeper/big");
    let shrink = Link {
        frames: Box::new(|f| {
            if let Some(Message::Entry { path, .. }) = message_of(&f)
                && path.0 == b"sub/deeper/big"
            {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&big)
                    .unwrap()
                    .set_len(MIB as u64)
                    .unwrap();
            }
            Some(vec![f])
        }),
        ..Link::default()
    };
    let ended = exchange(&src, rx, shrink);
    ended.assert_ok();
    let incomplete = &ended.sent.incomplete;
    assert_eq!(incomplete.len(), 1, "{incomplete:?}");
    assert!(incomplete[0].reason.contains("shrank"), "{incomplete:?}");
    // The sender's own abort: its failure, under its name.
    assert_eq!(
        (incomplete[0].path.as_str(), incomplete[0].origin),
        ("src/sub/deeper/big", Origin::Here)
    );
    assert!(!ended.rx.dst().join("sub/deeper/big").exists());
}

/// A 40 MiB file that `change` changes once its first chunk is on the
/// way: the sender sees it, the file is reported incomplete and nothing
/// of it is placed.
fn assert_caught_changing(change: impl Fn(&Path)) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let big = src.join("big");
    std::fs::write(&big, content(40 * MIB, 8)).unwrap();
    let watch = Link {
        frames: Box::new(|f| {
            if chunk_of(&f) == Some((2, 0)) {
                change(&big);
            }
            Some(vec![f])
        }),
        ..Link::default()
    };
    let ended = exchange(&src, Receiving::in_dir(tmp, |_| {}), watch);
    ended.assert_ok();
    let incomplete = &ended.sent.incomplete;
    assert!(
        incomplete.len() == 1 && incomplete[0].reason.contains("changed"),
        "{incomplete:?}"
    );
    assert!(!ended.rx.dst().join("big").exists());
}

#[test]
fn a_source_rewritten_while_it_is_read_is_reported_and_not_placed() {
    // Same size, new bytes and a new mtime.
    assert_caught_changing(|big| {
        std::fs::write(big, content(40 * MIB, 9)).unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        let file = std::fs::File::options().write(true).open(big).unwrap();
        file.set_modified(later).unwrap();
    });
}

#[test]
fn a_source_rewritten_in_place_with_its_mtime_put_back_is_not_placed() {
    // Only the ctime tells.
    assert_caught_changing(|big| {
        use std::os::unix::fs::FileExt;
        let mtime = std::fs::metadata(big).unwrap().modified().unwrap();
        let file = std::fs::File::options().write(true).open(big).unwrap();
        file.write_all_at(&content(MIB, 11), 0).unwrap();
        file.set_modified(mtime).unwrap();
    });
}

#[test]
fn a_sender_that_breaks_the_protocol_is_told_why() {
    let (src, rx) = setup();
    // Every entry arrives twice: the second has an id already used.
    let repeat = Link {
        frames: Box::new(|f| {
            let twice = matches!(message_of(&f), Some(Message::Entry { id: 3, .. }));
            Some(if twice {
                let copy = match &f {
                    Inbound::Control(m) => Inbound::Control(m.clone()),
                    Inbound::Data(_) => unreachable!(),
                };
                vec![f, copy]
            } else {
                vec![f]
            })
        }),
        ..Link::default()
    };
    let ended = exchange(&src, rx, repeat);
    assert!(matches!(
        ended.receiver,
        Err(EngineError::Protocol(Violation::EntryIdNotIncreasing {
            id: 3
        }))
    ));
    match &ended.sender {
        Err(EngineError::Remote(failure)) => {
            assert_eq!(failure.code, ErrorCode::Protocol);
            assert!(
                failure.message.contains("entry id 3 is not increasing"),
                "{failure}"
            );
            // The receiver named the entry it failed on, and its side.
            assert_eq!(failure.side, Side::Server);
            assert!(failure.path.is_some(), "{failure}");
        }
        other => panic!("{other:?}"),
    }
}

/// A link that replaces the receiver's replies as `lie` says.
fn lying<'a>(lie: impl FnMut(Message) -> Vec<Message> + 'a) -> Link<'a> {
    Link {
        replies: Box::new(lie),
        ..Link::default()
    }
}

#[test]
fn a_receiver_that_plans_entries_never_announced_is_refused() {
    let (src, rx) = setup();
    let ended = exchange(
        &src,
        rx,
        lying(|m| match m {
            Message::Planned { through } => vec![Message::Planned {
                through: through + 1000,
            }],
            m => vec![m],
        }),
    );
    assert!(
        matches!(
            ended.sender,
            Err(EngineError::Protocol(Violation::NeverAnnounced {
                message: "planned",
                ..
            }))
        ),
        "{:?}",
        ended.sender
    );
}

#[test]
fn a_receiver_that_claims_chunks_it_cannot_hold_is_refused() {
    let (src, rx) = setup();
    let first = exchange(
        &src,
        rx,
        cut_when(|f| matches!(chunk_of(f), Some((_, offset)) if offset == 3 * MIB as u64)),
    );
    // On the resume, the receiver claims more than the file holds.
    let ended = exchange(
        &src,
        again(first.rx),
        lying(|m| match m {
            Message::Have { id, .. } => vec![Message::Have {
                id,
                chunks: vec![(0, MIB as u32, 100)],
            }],
            m => vec![m],
        }),
    );
    assert!(
        matches!(
            ended.sender,
            Err(EngineError::Protocol(Violation::ImpossibleHeld { .. }))
        ),
        "{:?}",
        ended.sender
    );
}

#[test]
fn a_verdict_on_an_unknown_entry_is_refused() {
    let (src, rx) = setup();
    let ended = exchange(
        &src,
        rx,
        lying(|m| match m {
            Message::Outcome { id: 2, outcome } => vec![
                Message::Outcome {
                    id: 2,
                    outcome: outcome.clone(),
                },
                Message::Outcome { id: 2, outcome },
            ],
            m => vec![m],
        }),
    );
    assert!(
        matches!(
            ended.sender,
            Err(EngineError::Protocol(Violation::UnknownVerdict { id: 2 }))
        ),
        "{:?}",
        ended.sender
    );
}

#[test]
fn a_receiver_failing_mid_file_ends_the_sender_with_its_reason() {
    let (src, rx) = setup();
    let mut said = false;
    let ended = exchange(
        &src,
        rx,
        lying(move |m| {
            if said
                || !matches!(
                    m,
                    Message::Have { .. } | Message::Planned { .. } | Message::Fresh { .. }
                )
            {
                return vec![m];
            }
            said = true;
            vec![
                m,
                Message::error(ErrorCode::NoSpace, "dst: no space left on device"),
            ]
        }),
    );
    match &ended.sender {
        Err(EngineError::Remote(failure)) => {
            assert_eq!(failure.code, ErrorCode::NoSpace);
            assert!(failure.message.contains("no space left"), "{failure}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_receiver_that_says_done_with_entries_open_is_refused() {
    let (src, rx) = setup();
    let ended = exchange(
        &src,
        rx,
        lying(|m| match m {
            Message::Fresh { id } => vec![Message::Fresh { id }, Message::Done],
            m => vec![m],
        }),
    );
    // The sender stops at `done`; its producer, still sending, is told
    // that nothing more will come.
    assert!(
        matches!(ended.sender, Err(EngineError::Closed)),
        "{:?}",
        ended.sender
    );
}

#[test]
fn a_failed_file_does_not_stop_the_tree() {
    let (src, rx) = setup();
    let ended = exchange(
        &src,
        rx,
        lying(|m| match m {
            Message::Outcome { id, .. } if id == 3 => vec![Message::Outcome {
                id,
                outcome: Outcome::Failed("permission denied".into()),
            }],
            m => vec![m],
        }),
    );
    ended.assert_ok();
    assert_eq!(ended.sent.failed.len(), 1, "{:?}", ended.sent.failed);
    assert!(ended.sent.files_ok >= 4);
}

//! `--dry-run`: a receiver that changes nothing and says what it would do.
//!
//! It takes the sender's entries as the real worker does, looks at what
//! the destination has at each (never creating, opening for writing or
//! following anything), and answers at once: what would change
//! (`changes`, judged as the real worker judges it, in `itemize.rs`), and
//! an outcome. It plans no file, so no data is sent (but a root file's
//! that may go unplanned, which it ignores); a chunk that comes anyway
//! breaks the protocol. With `--delete`, the deletions are scanned
//! as for real and listed, not made.

use std::collections::HashMap;
use std::sync::Arc;

use ferry_proto::digest::FileDigest;
use ferry_proto::limits::{MAX_OPEN_DIRS, goes_unplanned};
use ferry_proto::message::{Change, EntryKind, Message, Outcome, Owner};
use ferry_proto::path::{WireBytes, WirePath};
use tokio::sync::mpsc;

use super::deletions::{self, Deletions, Teller};
use super::itemize::{self, Existing};
use super::rules::{self, EntryOrder};
use super::{Destination, Inbound, place};
use crate::error::{EngineError, Side, Violation};
use crate::events::{Event, EventSink, Origin, Tally, display_name, peer_text, rebase};

pub(crate) struct Preview {
    dest: Destination,
    tally: Arc<Tally>,
    replies: mpsc::Sender<Vec<Message>>,
    unsent: Vec<Message>,
    order: EntryOrder,
    /// Directories whose `dir_end` has not come: answered then, with what
    /// would change.
    open_dirs: HashMap<u64, (String, Vec<Change>)>,
    deletions: Option<Deletions>,
    end_seen: bool,
    /// The sender's side: who speaks in an `error` it sends.
    peer: Side,
    /// The entry being answered because the sender aborted it: its
    /// failure is the sender's.
    aborted: Option<u64>,
    /// The root file, if its data may come unplanned: ignored.
    unplanned: Option<u64>,
}

impl Preview {
    pub(crate) fn new(
        mut dest: Destination,
        tally: Arc<Tally>,
        replies: mpsc::Sender<Vec<Message>>,
        peer: Side,
    ) -> Result<Self, EngineError> {
        let deletions = dest.pruning.take().map(Deletions::new).transpose()?;
        Ok(Preview {
            dest,
            tally,
            replies,
            unsent: Vec::new(),
            unplanned: None,
            order: EntryOrder::default(),
            open_dirs: HashMap::new(),
            deletions,
            end_seen: false,
            peer,
            aborted: None,
        })
    }

    /// The thread's body: answer until the sender has said `end` and every
    /// directory has ended.
    pub(super) fn run(
        mut self,
        mut frames: mpsc::Receiver<Vec<Inbound>>,
    ) -> Result<(), EngineError> {
        let result = self.receive(&mut frames);
        if let Err(e) = &result
            && e.is_for_the_peer()
        {
            self.unsent.push(Message::error(e.code(), e.to_string()));
            let _ = self.flush();
        }
        result
    }

    fn receive(&mut self, frames: &mut mpsc::Receiver<Vec<Inbound>>) -> Result<(), EngineError> {
        loop {
            let batch = frames.blocking_recv().ok_or(EngineError::Closed)?;
            for frame in batch {
                match frame {
                    // No file was planned: no data may come, but for a
                    // root file that may go unplanned (answered already).
                    Inbound::Data(c) if Some(c.chunk.header.file_id) == self.unplanned => {}
                    Inbound::Data(_) => return Err(Violation::UnexpectedData.into()),
                    Inbound::Control(msg) => self.message(msg)?,
                }
            }
            if self.end_seen && self.open_dirs.is_empty() {
                let base = self.dest.base.try_clone().map_err(EngineError::from)?;
                let root = self.dest.prefix.clone();
                let deletions = self.deletions.take();
                return deletions::finish(self, deletions, &base, &root, true);
            }
            self.flush()?;
        }
    }

    fn message(&mut self, msg: Message) -> Result<(), EngineError> {
        match msg {
            Message::Entry {
                id,
                path,
                kind,
                owner,
                digest,
            } => {
                let digest = rules::entry_digest(id, digest.as_deref())?;
                self.entry(id, path, kind, owner, digest)
            }
            Message::DirEnd { id } => match self.open_dirs.remove(&id) {
                Some((display, what)) => self.answer(id, display, Outcome::Ok, what, (0, true)),
                None => Err(Violation::NeverAnnounced {
                    message: "dir_end",
                    id,
                }
                .into()),
            },
            Message::Abort { id, reason, .. } => match self.open_dirs.remove(&id) {
                Some((display, _)) => {
                    let failed = Outcome::Failed(peer_text(&reason));
                    self.aborted = Some(id);
                    self.answer(id, display, failed, Vec::new(), (0, true))
                }
                // A file, answered already: nothing of it was to come.
                None => Ok(()),
            },
            Message::FileEnd { id, .. } if Some(id) == self.unplanned => Ok(()),
            Message::Keepalive => Ok(()),
            Message::End => {
                self.end_seen = true;
                Ok(())
            }
            other => super::side_message(other, &self.tally, &self.dest.label, self.peer),
        }
    }

    fn entry(
        &mut self,
        id: u64,
        path: WireBytes,
        kind: EntryKind,
        owner: Option<Owner>,
        digest: Option<FileDigest>,
    ) -> Result<(), EngineError> {
        self.order.admit(id, owner)?;
        if let EntryKind::File { size, .. } = kind
            && goes_unplanned(id, size)
        {
            self.unplanned = Some(id);
        }
        let owner = owner.filter(|_| self.dest.owners);
        let path = WirePath::from_wire(path)?;
        // A file into an existing directory, as the real worker decides it.
        place::settle_root(
            &mut self.dest,
            &mut place::ParentCache::default(),
            &path,
            &kind,
        );
        if let Some(deletions) = &mut self.deletions {
            deletions.remember(&path, &kind, &self.dest.budget);
        }
        let display = display_name(&self.dest.label, &path);
        if self.dest.listing {
            return self.list(id, display, kind);
        }
        let name = match path.components().last() {
            Some(last) => last.to_vec(),
            None => self.dest.prefix.last().cloned().unwrap_or_default(),
        };
        if let Some(refusal) = rules::name_refusal(&name) {
            let dir = matches!(kind, EntryKind::Dir { .. });
            return self.answer(id, display, refusal, Vec::new(), (0, dir));
        }
        let existing = place::look(&self.dest, &path);
        let same = match (&kind, digest) {
            (EntryKind::File { size, .. }, Some(d)) if self.dest.checksum => {
                place::content_same(&self.dest, &path, *size, d)
            }
            _ => None,
        };
        match self.judge(&kind, existing.as_ref(), owner, same) {
            Judged::Dir(what) => {
                if self.open_dirs.len() >= MAX_OPEN_DIRS {
                    let limit = MAX_OPEN_DIRS;
                    let what = "directories open";
                    return Err(Violation::OverLimit { what, limit }.into());
                }
                self.open_dirs.insert(id, (display, what));
                Ok(())
            }
            Judged::Now(outcome, what, size) => {
                self.answer(id, display, outcome, what, (size, false))
            }
        }
    }

    /// `ferry ls`: tell of the entry, and answer it as in place.
    fn list(&mut self, id: u64, display: String, kind: EntryKind) -> Result<(), EngineError> {
        let dir = matches!(kind, EntryKind::Dir { .. });
        self.tally.event(Event::Listed {
            path: display.clone(),
            kind,
        });
        match dir {
            true if self.open_dirs.len() >= MAX_OPEN_DIRS => {
                let (what, limit) = ("directories open", MAX_OPEN_DIRS);
                Err(Violation::OverLimit { what, limit }.into())
            }
            true => {
                self.open_dirs.insert(id, (display, Vec::new()));
                Ok(())
            }
            false => self.push(Message::Outcome {
                id,
                outcome: Outcome::Unchanged,
            }),
        }
    }

    /// What placing `kind` over `existing` would do, as the real worker
    /// would answer it (`same`: with `--checksum`, whether its content is
    /// the sender's).
    fn judge(
        &self,
        kind: &EntryKind,
        existing: Option<&Existing>,
        owner: Option<Owner>,
        same: Option<bool>,
    ) -> Judged {
        let ok = |what| Judged::Now(Outcome::Ok, what, 0);
        match kind {
            EntryKind::Dir { .. } => Judged::Dir(itemize::change_of(existing, kind, owner)),
            EntryKind::File { size, .. } => {
                let what = itemize::with_content(itemize::change_of(existing, kind, owner), same);
                let unchanged = match self.dest.checksum {
                    true => same == Some(true),
                    false => !self.dest.ignore_times && itemize::metadata_only(&what),
                };
                let outcome = if unchanged {
                    Outcome::Unchanged
                } else {
                    Outcome::Ok
                };
                Judged::Now(outcome, what, *size)
            }
            EntryKind::Special { what } => {
                let why = format!("special file ({}), not transferred", peer_text(what));
                Judged::Now(Outcome::Skipped(why), Vec::new(), 0)
            }
            EntryKind::Device { block, .. } => {
                match rules::device_refusal(self.dest.devices, *block) {
                    Some(refusal) => Judged::Now(refusal, Vec::new(), 0),
                    None => ok(itemize::change_of(existing, kind, owner)),
                }
            }
            EntryKind::Hardlink { target, .. } => {
                let target = WirePath::parse(target.as_bytes()).ok();
                let file = target.and_then(|t| place::look(&self.dest, &t));
                ok(itemize::link_change(existing, file.as_ref()))
            }
            EntryKind::Symlink { .. } | EntryKind::Fifo { .. } => {
                ok(itemize::change_of(existing, kind, owner))
            }
        }
    }

    /// Answer entry `id` (`of`: a file's size, and whether a directory).
    fn answer(
        &mut self,
        id: u64,
        display: String,
        outcome: Outcome,
        what: Vec<Change>,
        (size, dir): (u64, bool),
    ) -> Result<(), EngineError> {
        if let Some(deletions) = &mut self.deletions {
            deletions.answered(&outcome);
        }
        if outcome.is_ok() && !what.is_empty() {
            let path = rebase(&display, &self.dest.label, &self.dest.dest_label);
            let changed = Event::Changed {
                path,
                what: what.clone(),
                dir,
                size,
            };
            self.tally.event(changed);
            if self.dest.tell_sender {
                self.push(Message::Changes { id, what })?;
            }
        }
        // A failure is ours, unless the sender aborted the entry.
        let origin = match self.aborted.take() == Some(id) {
            true => Origin::Peer,
            false => Origin::Here,
        };
        let labels = (self.dest.label.as_str(), self.dest.dest_label.as_str());
        match (dir, &outcome) {
            (true, Outcome::Ok) => self.tally.settled(),
            _ => self.tally.event(
                Event::of_outcome(display, &outcome, size)
                    .failed_at(origin, dir)
                    .named_for(Origin::Here, labels),
            ),
        }
        self.push(Message::Outcome { id, outcome })
    }

    fn push(&mut self, msg: Message) -> Result<(), EngineError> {
        self.unsent.push(msg);
        if self.unsent.len() >= 256 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), EngineError> {
        if self.unsent.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.unsent);
        self.replies
            .blocking_send(batch)
            .map_err(|_| EngineError::Closed)
    }
}

/// What the preview makes of an entry.
enum Judged {
    /// A directory: answered at its `dir_end`, with these changes.
    Dir(Vec<Change>),
    /// Answered now: its outcome, its changes, a file's size.
    Now(Outcome, Vec<Change>, u64),
}

impl Teller for Preview {
    fn tally(&self) -> &Tally {
        &self.tally
    }

    fn reply(&mut self, msg: Message) -> Result<(), EngineError> {
        self.push(msg)
    }

    fn keepalive(&mut self) -> Result<(), EngineError> {
        self.push(Message::Keepalive)?;
        self.flush()
    }

    fn done(&mut self) -> Result<(), EngineError> {
        self.push(Message::Done)?;
        self.flush()
    }
}

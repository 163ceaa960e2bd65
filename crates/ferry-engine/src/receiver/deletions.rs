//! `--delete` for a receiver: what it remembers while the transfer runs,
//! and, once everything is settled, the deletions (or, in a dry run, what
//! they would be), told to the user's side. The real worker and the dry
//! run's both use it, through [`Teller`].

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use ferry_proto::message::{EntryKind, HeldBack, Message, Outcome};
use ferry_proto::path::{WireBytes, WirePath};

use super::mirror::{self, SEEN_CHARGE_EVERY, SEEN_ENTRY_MEMORY, Seen};
use super::prune::{self, Pruning, Tree, Victim};
use crate::budget::{Held, SessionBudget};
use crate::error::{EngineError, reason};
use crate::events::{Event, EventSink, Tally, display_bytes};

/// During a long scan the sender is told this often that we are alive.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);

/// Where a receiver tells what it deletes.
pub(super) trait Teller {
    fn tally(&self) -> &Tally;
    /// Queue a message for the sender.
    fn reply(&mut self, msg: Message) -> Result<(), EngineError>;
    /// Send a keepalive now (a long scan is under way).
    fn keepalive(&mut self) -> Result<(), EngineError>;
    /// Say `done`, now.
    fn done(&mut self) -> Result<(), EngineError>;
}

/// End a transfer into `root` (components below `base`): `done`, and the
/// deletions if any (only what they would be, in a `dry_run`). A receiver
/// that tells the sender of its deletions (a server: the user is at the
/// sender) deletes first; one whose user is here (a downloading client)
/// lets the server go first.
pub(super) fn finish(
    out: &mut dyn Teller,
    deletions: Option<Deletions>,
    base: &OwnedFd,
    root: &[Vec<u8>],
    dry_run: bool,
) -> Result<(), EngineError> {
    let Some(mut deletions) = deletions else {
        return out.done();
    };
    let how = if dry_run { How::List } else { How::Delete };
    if deletions.tells_sender() {
        deletions.run(base, root, how, out)?;
        out.done()
    } else {
        out.done()?;
        deletions.run(base, root, how, out).map(drop)
    }
}

/// What a run of the deletions does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum How {
    /// Delete, and tell each deletion (`--delete`).
    Delete,
    /// Tell what would be deleted, and delete nothing (a dry run; what
    /// leaves the live tree in an atomic publish).
    List,
    /// Delete without a word, nor `--max-delete`: an atomic publish's
    /// staging directory made equal to the source.
    Quietly,
}

/// What `--delete` keeps track of while the transfer runs.
pub(super) struct Deletions {
    /// What the current run does.
    how: How,
    pruning: Pruning,
    /// Every path the sender announced; `None` once it outgrew the
    /// session's memory (then nothing is deleted).
    seen: Option<Seen>,
    /// The memory `seen` holds.
    charges: Vec<Held>,
    /// Entries that failed or are incomplete: the source was not seen
    /// whole, so nothing may be deleted.
    failures: u64,
    /// Only a directory's contents are mirrored.
    root_is_dir: bool,
    /// The root is a directory this transfer made: it holds only what the
    /// transfer put there.
    root_made: bool,
}

impl Deletions {
    pub(super) fn new(pruning: Pruning) -> Result<Self, EngineError> {
        let bytes = crate::auth::random_bytes(8)?;
        let key = u64::from_le_bytes(bytes.try_into().unwrap_or_default());
        Ok(Deletions {
            how: How::Delete,
            pruning,
            seen: Some(Seen::new(key)),
            charges: Vec::new(),
            failures: 0,
            root_is_dir: false,
            root_made: false,
        })
    }

    /// The user is at the sender, who is told each deletion; otherwise the
    /// receiver deletes after `done`.
    pub(super) fn tells_sender(&self) -> bool {
        self.pruning.tell_sender
    }

    /// Remember an announced entry, charging its memory in steps.
    pub(super) fn remember(&mut self, path: &WirePath, kind: &EntryKind, budget: &SessionBudget) {
        if path.is_root() {
            self.root_is_dir = matches!(kind, EntryKind::Dir { .. });
        }
        let Some(seen) = &mut self.seen else {
            return;
        };
        if seen.note(path.as_bytes()) {
            let step = SEEN_CHARGE_EVERY as u64 * SEEN_ENTRY_MEMORY;
            match budget.hold(0, step) {
                Some(held) => self.charges.push(held),
                None => {
                    self.seen = None;
                    self.charges.clear();
                }
            }
        }
    }

    /// The root directory was made by this transfer, not found.
    pub(super) fn root_made(&mut self) {
        self.root_made = true;
    }

    /// An entry was answered so.
    pub(super) fn answered(&mut self, outcome: &Outcome) {
        if matches!(outcome, Outcome::Failed(_) | Outcome::Incomplete(_)) {
            self.failures += 1;
        }
    }

    /// Delete what the source does not have below `root` (components
    /// below `base`), unless something holds that back, as `how` says.
    /// What held the deletions back, if anything did.
    pub(super) fn run(
        &mut self,
        base: &OwnedFd,
        root: &[Vec<u8>],
        how: How,
        out: &mut dyn Teller,
    ) -> Result<Option<HeldBack>, EngineError> {
        let base = base.try_clone().map_err(EngineError::from)?;
        let tree = Tree {
            base: base.as_fd(),
            root,
        };
        self.how = how;
        // An atomic publish's staging directory that this transfer made
        // holds what it placed and nothing else: every entry is the
        // source's (a failed one holds the publish back before this), so a
        // scan, a listing of every directory, would find nothing.
        let nothing_to_find =
            how == How::Quietly && self.root_made && self.failures == 0 && self.seen.is_some();
        if !self.root_is_dir || nothing_to_find {
            self.tell_count(out, 0, None)?;
            return Ok(None);
        }
        let held_back = match self.seen.take() {
            None => Some(HeldBack::Memory),
            Some(seen) if self.failures > 0 => {
                self.seen = Some(seen);
                mirror::hold_back(self.failures, 0, None)
            }
            Some(seen) => {
                let victims = self.scan(&tree, &seen, out);
                self.seen = Some(seen);
                let would = self.would_delete(&tree, &victims?);
                match mirror::hold_back(0, would.1, self.max()) {
                    None => return self.delete(&tree, &would.0, out).map(|()| None),
                    held => held,
                }
            }
        };
        if let Some(held) = held_back.clone().filter(|_| self.how != How::Quietly) {
            out.tally().event(Event::HeldBack(held));
        }
        self.tell_count(out, 0, held_back.clone())?;
        Ok(held_back)
    }

    /// The failures seen: a publish waits for none.
    pub(super) fn failures(&self) -> u64 {
        self.failures
    }

    fn max(&self) -> Option<u64> {
        self.pruning.max_delete
    }

    fn scan(
        &mut self,
        tree: &Tree<'_>,
        seen: &Seen,
        out: &mut dyn Teller,
    ) -> Result<Vec<Victim>, EngineError> {
        let mut troubles = Vec::new();
        let mut last_sign = Instant::now();
        let mut told = Ok(());
        let tell = self.tells_sender();
        let victims = prune::scan(
            tree,
            seen,
            &mut self.pruning,
            &mut |t| troubles.push(t),
            &mut || {
                if last_sign.elapsed() >= KEEPALIVE_EVERY && told.is_ok() {
                    last_sign = Instant::now();
                    out.tally().working();
                    if tell {
                        told = out.keepalive();
                    }
                }
            },
        );
        told?;
        for (path, e) in troubles {
            self.failed(out, &path, &e)?;
        }
        Ok(victims)
    }

    /// `victims`, and how many entries deleting them takes, as far as it
    /// matters: counted one by one only under `--max-delete`.
    fn would_delete(&self, tree: &Tree<'_>, victims: &[Victim]) -> (Vec<Victim>, u64) {
        let Some(max) = self.max().filter(|_| self.how != How::Quietly) else {
            return (victims.to_vec(), victims.len() as u64);
        };
        let mut would = 0;
        for victim in victims {
            would += prune::count(tree, victim);
            if would > max {
                break;
            }
        }
        (victims.to_vec(), would)
    }

    fn delete(
        &mut self,
        tree: &Tree<'_>,
        victims: &[Victim],
        out: &mut dyn Teller,
    ) -> Result<(), EngineError> {
        let mut deleted = 0;
        let mut told = Ok(());
        let mut troubles = Vec::new();
        let mut each = |path: &[u8], dir: bool| {
            deleted += 1;
            if told.is_ok() {
                told = self.deleted(out, path, dir);
            }
        };
        match self.how {
            How::List => prune::list_all(tree, victims, &mut each, &mut |t| troubles.push(t)),
            How::Delete | How::Quietly => {
                prune::remove_all(tree, victims, &mut each, &mut |t| troubles.push(t))
            }
        }
        told?;
        for (path, e) in troubles {
            self.failed(out, &path, &e)?;
        }
        self.tell_count(out, deleted, None)
    }

    /// One entry deleted: an event here, and a word to the sender.
    fn deleted(&self, out: &mut dyn Teller, path: &[u8], dir: bool) -> Result<(), EngineError> {
        if self.how == How::Quietly {
            return Ok(());
        }
        let shown = display_bytes(&self.pruning.label, path);
        out.tally().event(Event::Deleted { path: shown, dir });
        match self.tells_sender() {
            true => out.reply(Message::Deleted {
                path: WireBytes(path.to_vec()),
                dir,
                error: None,
            }),
            false => Ok(()),
        }
    }

    fn failed(&self, out: &mut dyn Teller, path: &[u8], e: &io::Error) -> Result<(), EngineError> {
        let shown = display_bytes(&self.pruning.label, path);
        let why = format!("cannot delete: {}", reason(e));
        out.tally().event(Event::DeleteFailed {
            path: shown,
            reason: why.clone(),
        });
        match self.tells_sender() {
            true => out.reply(Message::Deleted {
                path: WireBytes(path.to_vec()),
                dir: false,
                error: Some(why),
            }),
            false => Ok(()),
        }
    }

    fn tell_count(
        &self,
        out: &mut dyn Teller,
        deleted: u64,
        held_back: Option<HeldBack>,
    ) -> Result<(), EngineError> {
        match self.tells_sender() && self.how != How::Quietly {
            true => out.reply(Message::Deletions { deleted, held_back }),
            false => Ok(()),
        }
    }
}

//! `ferry backup --list`: a backup directory's snapshots, each with how
//! many files it holds and the bytes it added (files it shares with an
//! older snapshot, hard-linked, add nothing), from a listing of the
//! directory.

use std::collections::BTreeMap;
use std::sync::Mutex;

use ferry_engine::EntryKind;
use ferry_engine::events::{Event, EventSink};

/// What the listing says of each snapshot.
#[derive(Default)]
pub struct Snapshots {
    /// The backup directory as the listing names it (its entries' prefix).
    dir: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Name → (files, bytes).
    snapshots: BTreeMap<String, (u64, u64)>,
    /// What `latest` points at.
    latest: Option<String>,
}

impl Snapshots {
    pub fn of(dir: String) -> Snapshots {
        Snapshots {
            dir,
            state: Mutex::default(),
        }
    }

    /// Name, files, bytes and whether it is `latest`, oldest first.
    pub fn table(&self) -> Vec<(String, u64, u64, bool)> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let latest = state.latest.as_deref();
        state
            .snapshots
            .iter()
            .filter(|(name, _)| ferry_engine::snapshots::is_snapshot(name))
            .map(|(name, (files, bytes))| {
                (name.clone(), *files, *bytes, Some(name.as_str()) == latest)
            })
            .collect()
    }
}

impl EventSink for Snapshots {
    fn event(&self, event: Event) {
        let Event::Listed { path, kind } = event else {
            return;
        };
        let Some(below) = path
            .strip_prefix(&self.dir)
            .and_then(|p| p.strip_prefix('/'))
        else {
            return;
        };
        let (name, inside) = below.split_once('/').unwrap_or((below, ""));
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match (&kind, inside.is_empty()) {
            (EntryKind::Symlink { target, .. }, true) if name == "latest" => {
                state.latest = Some(String::from_utf8_lossy(target.as_bytes()).into_owned());
            }
            (EntryKind::Dir { .. }, true) => {
                state.snapshots.entry(name.to_string()).or_default();
            }
            // A file met before in the listing (an older snapshot holds it
            // too) comes as a hard link: it costs this snapshot nothing.
            (EntryKind::File { size, .. }, false) => {
                let entry = state.snapshots.entry(name.to_string()).or_default();
                entry.0 += 1;
                entry.1 += size;
            }
            (EntryKind::Hardlink { .. }, false) => {
                state.snapshots.entry(name.to_string()).or_default().0 += 1;
            }
            _ => {}
        }
    }
}

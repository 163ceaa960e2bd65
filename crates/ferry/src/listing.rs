//! `ferry ls`: an entry as a line, in the shape of `ls -l` (mode, size,
//! mtime in UTC, path, a symlink's target).

use ferry_engine::EntryKind;

/// What a listing shows of an entry.
pub struct Entry {
    pub kind: &'static str,
    pub size: Option<u64>,
    pub mode: Option<u32>,
    pub mtime: Option<ferry_engine::Mtime>,
    pub target: Option<String>,
}

impl Entry {
    pub fn of(kind: &EntryKind) -> Entry {
        let entry = |kind, size, mode, mtime| Entry {
            kind,
            size,
            mode,
            mtime: Some(mtime),
            target: None,
        };
        match kind {
            EntryKind::File { size, mode, mtime } => {
                entry("file", Some(*size), Some(*mode), *mtime)
            }
            EntryKind::Dir { mode, mtime } => entry("dir", None, Some(*mode), *mtime),
            EntryKind::Symlink { target, mtime } => Entry {
                target: Some(ferry_engine::escape(target.as_bytes())),
                ..entry("symlink", None, None, *mtime)
            },
            EntryKind::Fifo { mode, mtime } => entry("fifo", None, Some(*mode), *mtime),
            EntryKind::Device { mode, mtime, .. } => entry("device", None, Some(*mode), *mtime),
            EntryKind::Hardlink { target, .. } => Entry {
                kind: "hardlink",
                size: None,
                mode: None,
                mtime: None,
                target: Some(ferry_engine::escape(target.as_bytes())),
            },
            EntryKind::Special { .. } => Entry {
                kind: "special",
                size: None,
                mode: None,
                mtime: None,
                target: None,
            },
        }
    }

    /// `-rw-r--r--        1234 2026-12-06 05:12:33 path -> target`.
    pub fn line(&self, path: &str) -> String {
        let size = self.size.map_or("-".to_string(), |s| s.to_string());
        let when = self.mtime.map_or("-".repeat(19), |t| utc(t.sec));
        let target = match (&self.target, self.kind) {
            (Some(t), "hardlink") => format!(" => {t}"),
            (Some(t), _) => format!(" -> {t}"),
            (None, _) => String::new(),
        };
        format!("{} {size:>12} {when} {path}{target}", self.mode_string())
    }

    fn mode_string(&self) -> String {
        let kind = match self.kind {
            "dir" => 'd',
            "symlink" => 'l',
            "fifo" => 'p',
            "device" => 'c',
            "hardlink" => 'h',
            "special" => 's',
            _ => '-',
        };
        let bits = self
            .mode
            .unwrap_or(if self.kind == "symlink" { 0o777 } else { 0 });
        let mut s = String::from(kind);
        for shift in [6, 3, 0] {
            let b = (bits >> shift) & 7;
            s.push(if b & 4 != 0 { 'r' } else { '-' });
            s.push(if b & 2 != 0 { 'w' } else { '-' });
            s.push(if b & 1 != 0 { 'x' } else { '-' });
        }
        s
    }
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS` in UTC.
pub fn utc(secs: i64) -> String {
    let (year, month, day, h, m, s) = ferry_engine::snapshots::civil(secs);
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_796_534_355), "2026-12-06 05:19:15");
        assert_eq!(utc(-1), "1969-12-31 23:59:59");
    }

    #[test]
    fn an_entry_reads_like_ls() {
        let kind = EntryKind::File {
            size: 42,
            mode: 0o644,
            mtime: ferry_engine::Mtime { sec: 0, nsec: 0 },
        };
        assert_eq!(
            Entry::of(&kind).line("a/b"),
            "-rw-r--r--           42 1970-01-01 00:00:00 a/b"
        );
    }
}

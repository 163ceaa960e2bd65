//! What the user sees: a live bar on a terminal, `-v` lines, NDJSON for
//! scripts, and the closing summary. Paths arrive from the engine already
//! escaped for display.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_engine::events::{Event, EventSink, Failure, Origin, TransferReport, TransferSummary};
use ferry_engine::{Change, EntryKind, HeldBack};

use crate::listing;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

/// How output is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// People: a bar when stderr is a terminal, the summary on stdout.
    Human,
    /// Scripts: one JSON object per line on stdout.
    Json,
    /// Errors only.
    Quiet,
}

/// How often a `progress` event is printed in JSON mode.
const JSON_PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// At most this many failures are listed again in the summary.
const FAILURES_LISTED: usize = 20;

pub struct Ui {
    mode: Mode,
    verbose: bool,
    /// A line for each entry that changes (`--itemize`, `--dry-run`).
    itemize: bool,
    /// Nothing changes: the summary says what would have.
    dry_run: bool,
    /// `ferry check`: the changes are differences between two trees.
    check: bool,
    /// `ferry ls`: a line for each entry listed, and no summary.
    listing: bool,
    /// The server is this process's own, serving this local directory (a
    /// local copy): what fails there is named in it, not on a server.
    peer_root: Option<String>,
    bar: Option<ProgressBar>,
    /// The counts, and every line that reports them, in one order: a
    /// `progress` event never says less than the events before it.
    state: Mutex<State>,
}

/// How far the transfer is, as shown.
#[derive(Default)]
struct State {
    /// Files and bytes in the whole transfer, once the sender has counted
    /// them (`None` until then: nothing is shown as a total before).
    totals: Option<Counts>,
    /// This attempt's entries settled (every one but a directory: done,
    /// unchanged, failed, skipped, incomplete) and file bytes in place
    /// (sent, resumed, or there already).
    attempt: Counts,
    /// What was shown when the last attempt failed. The next attempt
    /// counts again what is in place (as unchanged, or resumed), and what
    /// is shown is the larger: it never goes back, nor counts twice.
    floor: Counts,
    last_json_progress: Option<Instant>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    files: u64,
    bytes: u64,
}

impl State {
    fn shown(&self) -> Counts {
        Counts {
            files: self.attempt.files.max(self.floor.files),
            bytes: self.attempt.bytes.max(self.floor.bytes),
        }
    }

    /// One more entry settled, with `bytes` in place that no `bytes` or
    /// `resumed` event counted; the files shown now.
    fn settle(&mut self, bytes: u64) -> u64 {
        self.attempt.files += 1;
        self.attempt.bytes += bytes;
        self.shown().files
    }

    /// Whether this attempt is still counting again what an attempt
    /// before it had counted.
    fn catching_up(&self) -> bool {
        self.attempt.files <= self.floor.files
    }

    /// Whether a `progress` event is due (at most one per
    /// [`JSON_PROGRESS_EVERY`], unless `now`), and then what it says.
    fn progress_due(&mut self, now: bool) -> Option<serde_json::Value> {
        let due = now
            || self
                .last_json_progress
                .is_none_or(|t| t.elapsed() >= JSON_PROGRESS_EVERY);
        if !due {
            return None;
        }
        self.last_json_progress = Some(Instant::now());
        let shown = self.shown();
        Some(json!({
            "event": "progress",
            "files_done": shown.files,
            "files_total": self.totals.map(|t| t.files),
            "bytes": shown.bytes,
            "bytes_total": self.totals.map(|t| t.bytes),
        }))
    }
}

/// The bar until the totals are known: what is done so far, no total.
const SO_FAR: &str = "{spinner} {prefix}, {bytes} so far  {binary_bytes_per_sec}  {wide_msg}";
/// The bar once they are: 80 columns hold all but the current file.
const OF_TOTAL: &str = concat!(
    "{spinner} {bytes}/{total_bytes} [{bar:12}] {binary_bytes_per_sec} ETA {eta}",
    "  {prefix}  {wide_msg}"
);

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("the template is valid")
        .progress_chars("=> ")
}

impl Ui {
    pub fn new(mode: Mode, verbose: bool) -> Ui {
        let bar = (mode == Mode::Human && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(bar_style(SO_FAR));
            bar.set_prefix(files_shown(0, None));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Ui {
            mode,
            verbose,
            itemize: false,
            dry_run: false,
            check: false,
            listing: false,
            peer_root: None,
            bar,
            state: Mutex::new(State::default()),
        }
    }

    /// The same, for a copy whose server is this process's own, serving
    /// the local directory `root`.
    pub fn serving(mut self, root: Option<&std::path::Path>) -> Ui {
        use std::os::unix::ffi::OsStrExt;
        self.peer_root = root.map(|r| ferry_engine::escape(r.as_os_str().as_bytes()));
        self
    }

    /// The same, with a line for each entry that changes; in a `dry_run`,
    /// what would change.
    pub fn itemizing(mut self, itemize: bool, dry_run: bool) -> Ui {
        self.itemize = itemize || dry_run;
        self.dry_run = dry_run;
        self
    }

    /// The same, for `ferry ls`.
    pub fn listing(mut self) -> Ui {
        self.listing = true;
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self
    }

    /// The same, for `ferry check`: each change is a difference.
    pub fn checking(mut self) -> Ui {
        (self.itemize, self.dry_run, self.check) = (true, true, true);
        self
    }

    pub fn is_checking(&self) -> bool {
        self.check
    }

    /// Whether anyone sees progress (a bar, or NDJSON progress events):
    /// only then are totals worth counting before the transfer.
    pub fn shows_progress(&self) -> bool {
        self.bar.is_some() || self.mode == Mode::Json
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A line on stdout that does not tear the bar.
    fn out(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    /// A line on stderr that does not tear the bar.
    fn err(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    fn json(&self, value: serde_json::Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{value}");
        let _ = out.flush();
    }

    /// The transfer is about to start.
    pub fn start(&self, operation: &str, from: &str, to: &str) {
        match self.mode {
            Mode::Json => {
                self.json(json!({"event": "start", "operation": operation, "from": from, "to": to}))
            }
            Mode::Human if self.verbose => self.out(&format!("{operation}: {from} -> {to}")),
            _ => {}
        }
    }

    /// The transfer could not run or was cut short.
    pub fn fatal(&self, message: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if self.mode == Mode::Json {
            self.json(json!({"event": "error", "message": message}));
        }
        eprintln!("ferry: {message}");
    }

    /// The closing summary (the seed's shape).
    pub fn summary(&self, summary: &TransferSummary, from: &str, to: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let r = &summary.report;
        let secs = summary.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            r.file_bytes as f64 / secs
        } else {
            0.0
        };
        match self.mode {
            _ if self.listing => {}
            Mode::Quiet => {}
            Mode::Json => self.json(json!({
                "event": "summary",
                "from": from,
                "to": to,
                "files_total": r.files_total,
                "files_ok": r.files_ok,
                "files_failed": r.files_failed,
                "files_skipped": r.files_skipped,
                "dirs_failed": r.dirs_failed,
                "vanished": r.vanished,
                "deleted": r.deleted,
                "dry_run": self.dry_run,
                "created": r.created,
                "updated": r.updated,
                "bytes_changed": r.bytes_changed,
                "delete_failed": r.delete_failed.iter().map(|(p, why)| json!({"path": p, "reason": why})).collect::<Vec<_>>(),
                "files_unchanged": r.files_unchanged,
                "bytes_held": r.bytes_held,
                "retries": r.retries,
                "bytes": r.file_bytes,
                "wire_bytes": r.wire_bytes,
                "elapsed_secs": secs,
                "bytes_per_sec": rate,
                "failed": r.failed.iter().map(|f| self.failure_json(f)).collect::<Vec<_>>(),
            })),
            Mode::Human if self.check => self.out(&check_summary(r, from, to)),
            Mode::Human if self.dry_run => self.out(&dry_run_summary(r, from, to)),
            Mode::Human => {
                let failures: Vec<String> = r.failed.iter().map(|f| self.failure_line(f)).collect();
                self.out(&human_summary(r, (from, to), secs, &failures))
            }
        }
    }

    /// Where an entry failed, as the user is told: the side (`local` or
    /// `server`) and the path there.
    fn side_of(&self, path: &str, origin: Origin) -> (&'static str, String) {
        match (origin, &self.peer_root) {
            (Origin::Here, _) => ("local", path.to_string()),
            (Origin::Peer, None) => ("server", path.to_string()),
            (Origin::Peer, Some(root)) => ("local", format!("{root}/{path}")),
        }
    }

    /// A failure as a line: `server: PATH: why` or `PATH: why`.
    fn failure_line(&self, f: &Failure) -> String {
        match self.side_of(&f.path, f.origin) {
            ("server", path) => format!("server: {path}: {}", f.reason),
            (_, path) => format!("{path}: {}", f.reason),
        }
    }

    fn failure_json(&self, f: &Failure) -> serde_json::Value {
        let (side, path) = self.side_of(&f.path, f.origin);
        json!({"path": path, "reason": f.reason, "side": side, "dir": f.dir})
    }
}

impl EventSink for Ui {
    fn event(&self, event: Event) {
        match event {
            Event::Totals { files, bytes } => self.totals(files, bytes),
            Event::FileStarted { path, .. } => self.file_started(&path),
            Event::Bytes { n } => self.bytes(n),
            Event::FileDone { path, size } => self.file_done(&path, size),
            Event::FileFailed {
                path,
                reason,
                origin,
                dir,
            } => self.file_failed(Failure {
                path,
                reason,
                origin,
                dir,
            }),
            Event::Skipped { path, reason } => self.skipped(&path, &reason),
            Event::Vanished { path } => self.vanished(&path),
            Event::Unchanged { path, size } => self.unchanged(&path, size),
            Event::Resumed { path, bytes } => self.resumed(&path, bytes),
            Event::FileIncomplete {
                path,
                reason,
                origin,
                dir,
            } => self.file_incomplete(Failure {
                path,
                reason,
                origin,
                dir,
            }),
            Event::Changed {
                path, what, dir, ..
            } => self.changed(&path, &what, dir),
            Event::Deleted { path, dir } => self.deleted(&path, dir),
            Event::Listed { path, kind } => self.listed(&path, &kind),
            Event::DeleteFailed { path, reason } => self.delete_failed(&path, &reason),
            Event::HeldBack(why) => self.held_back(&why),
            Event::Published {
                path,
                previous,
                refused,
            } => self.published(&path, previous, refused.as_deref()),
            Event::Retry {
                attempt,
                delay,
                reason,
            } => self.retry(attempt, delay, &reason),
            Event::NewServer {
                addr,
                fingerprint,
                file,
            } => {
                // On stderr in every mode, --quiet and --json too: trusting
                // a server's key for good is worth one line to a person.
                self.err(&format!(
                    "ferry: new server {addr}, fingerprint {fingerprint}, remembered in {}",
                    file.display()
                ))
            }
        }
    }
}

/// One method per event: what it does to the counts, the bar and the
/// output of each mode.
impl Ui {
    fn totals(&self, files: u64, bytes: u64) {
        let mut s = self.state();
        let known = s.totals.is_some();
        s.totals = Some(Counts { files, bytes });
        if let Some(bar) = &self.bar {
            bar.set_length(bytes);
            if !known {
                bar.set_style(bar_style(OF_TOTAL));
            }
        }
        self.show(&mut s, true);
    }

    /// The counts in `s` shown: on the bar, and in a `progress` event
    /// when one is due (`now`: at once). Called with the state locked, so
    /// that the events are in the order of the counts.
    fn show(&self, s: &mut State, now: bool) {
        if let Some(bar) = &self.bar {
            let shown = s.shown();
            bar.set_position(shown.bytes);
            bar.set_prefix(files_shown(shown.files, s.totals));
        }
        if self.mode == Mode::Json
            && let Some(progress) = s.progress_due(now)
        {
            self.json(progress);
        }
    }

    fn file_started(&self, path: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(path.to_string());
        }
    }

    fn bytes(&self, n: u64) {
        let mut s = self.state();
        s.attempt.bytes += n;
        self.show(&mut s, false);
    }

    fn file_done(&self, path: &str, size: u64) {
        let mut s = self.state();
        let n = s.settle(0);
        // In a dry run nothing was done: its `changed` line says what
        // would be.
        match self.mode {
            _ if self.dry_run => {}
            Mode::Json => self.json(json!({"event": "file_done", "path": path, "bytes": size})),
            Mode::Human if self.verbose => self.out(&format!(
                "{} {path} ({})",
                numbered(n, s.totals),
                human_bytes(size)
            )),
            _ => {}
        }
        self.show(&mut s, false);
    }

    fn file_failed(&self, f: Failure) {
        let mut s = self.state();
        if !f.dir {
            s.settle(0);
        }
        if self.mode == Mode::Json {
            let mut event = self.failure_json(&f);
            event["event"] = json!("file_failed");
            self.json(event);
        }
        self.err(&format!("ferry: {}", self.failure_line(&f)));
        self.show(&mut s, false);
    }

    fn skipped(&self, path: &str, reason: &str) {
        let mut s = self.state();
        s.settle(0);
        match self.mode {
            Mode::Json => self.json(json!({"event": "skipped", "path": path, "reason": reason})),
            Mode::Human => self.err(&format!("ferry: warning: skipped {path}: {reason}")),
            Mode::Quiet => {}
        }
        self.show(&mut s, false);
    }

    /// Not an error of ferry's, but the copy lacks it: said even with
    /// --quiet, as the exit status says it too. Not counted: the source
    /// no longer has it.
    fn vanished(&self, path: &str) {
        match self.mode {
            Mode::Json => self.json(json!({"event": "vanished", "path": path})),
            Mode::Human | Mode::Quiet => self.err(&format!(
                "ferry: warning: {path} vanished from the source before it could be sent"
            )),
        }
    }

    fn unchanged(&self, path: &str, size: u64) {
        let mut s = self.state();
        let n = s.settle(size);
        match self.mode {
            Mode::Json => {
                self.json(json!({"event": "file_unchanged", "path": path, "bytes": size}))
            }
            // After a retry, what the attempt before put in place is
            // unchanged now: it was listed then.
            Mode::Human if self.verbose && !s.catching_up() => {
                self.out(&format!("{} {path} (unchanged)", numbered(n, s.totals)))
            }
            _ => {}
        }
        self.show(&mut s, false);
    }

    fn resumed(&self, path: &str, bytes: u64) {
        let mut s = self.state();
        s.attempt.bytes += bytes;
        match self.mode {
            Mode::Json => self.json(json!({"event": "resumed", "path": path, "bytes_held": bytes})),
            Mode::Human if self.verbose => self.out(&format!(
                "resuming {path}: {} already there",
                human_bytes(bytes)
            )),
            _ => {}
        }
        self.show(&mut s, false);
    }

    fn file_incomplete(&self, f: Failure) {
        let mut s = self.state();
        if !f.dir {
            s.settle(0);
        }
        match self.mode {
            Mode::Json => {
                let mut event = self.failure_json(&f);
                event["event"] = json!("file_incomplete");
                self.json(event)
            }
            // The retry line says it too; the summary lists what never
            // arrived.
            Mode::Human if self.verbose => self.err(&format!(
                "ferry: warning: {}; it will be sent again",
                self.failure_line(&f)
            )),
            _ => {}
        }
        self.show(&mut s, false);
    }

    fn changed(&self, path: &str, what: &[Change], dir: bool) {
        if !self.itemize {
            return;
        }
        let action = match what.first() {
            Some(Change::Created) => "created",
            _ => "updated",
        };
        let shown = match (self.check, action) {
            (true, "created") => "missing",
            (true, _) => "differs",
            (false, _) => action,
        };
        let details: Vec<&str> = what.iter().filter_map(|c| change_name(*c)).collect();
        match self.mode {
            Mode::Json => self.json(json!({
                "event": "changed", "path": path, "action": action, "what": details, "dir": dir
            })),
            Mode::Human => {
                let slash = if dir { "/" } else { "" };
                let details = match details.is_empty() {
                    true => String::new(),
                    false => format!(" ({})", details.join(", ")),
                };
                self.out(&format!("{shown:<8} {path}{slash}{details}"))
            }
            Mode::Quiet => {}
        }
    }

    fn listed(&self, path: &str, kind: &EntryKind) {
        let entry = listing::Entry::of(kind);
        match self.mode {
            Mode::Json => self.json(json!({
                "event": "entry", "path": path, "kind": entry.kind, "size": entry.size,
                "mode": entry.mode, "mtime": entry.mtime.map(|t| t.sec), "target": entry.target,
            })),
            Mode::Human => self.out(&entry.line(path)),
            Mode::Quiet => {}
        }
    }

    fn deleted(&self, path: &str, dir: bool) {
        let slash = if dir { "/" } else { "" };
        match self.mode {
            Mode::Json => self.json(json!({"event": "deleted", "path": path, "dir": dir})),
            Mode::Human if self.itemize => {
                let word = if self.check { "extra" } else { "deleted" };
                self.out(&format!("{word:<8} {path}{slash}"))
            }
            Mode::Human if self.verbose => self.out(&format!("deleting {path}{slash}")),
            _ => {}
        }
    }

    fn delete_failed(&self, path: &str, reason: &str) {
        if self.mode == Mode::Json {
            self.json(json!({"event": "delete_failed", "path": path, "reason": reason}));
        }
        self.err(&format!("ferry: {path}: {reason}"));
    }

    /// Said even with --quiet: the user asked for deletions that did not
    /// happen.
    fn held_back(&self, why: &HeldBack) {
        let (reason, text) = match why {
            HeldBack::Failures { count } => (
                "failures",
                format!(
                    "{count} {} failed, so the source was not seen whole",
                    if *count == 1 { "entry" } else { "entries" }
                ),
            ),
            HeldBack::MaxDelete { would, max } => (
                "max_delete",
                format!("{would} entries would go, more than --max-delete {max}"),
            ),
            HeldBack::Memory => (
                "memory",
                "the receiver could not remember every entry of the source within its memory \
                 budget"
                    .to_string(),
            ),
        };
        if self.mode == Mode::Json {
            self.json(json!({"event": "deletions_held_back", "reason": reason, "message": text}));
        }
        self.err(&format!("ferry: --delete deleted nothing: {text}"));
    }

    /// Said in every mode but --quiet: whether the live tree changed.
    fn published(&self, path: &str, previous: bool, refused: Option<&str>) {
        match (self.mode, refused) {
            (Mode::Json, None) => self.json(json!({
                "event": "published", "path": path, "previous_kept": previous
            })),
            (Mode::Json, Some(why)) => self.json(json!({
                "event": "not_published", "path": path, "reason": why
            })),
            (Mode::Human, None) => {
                let kept = match previous {
                    true => "; the version it replaced is kept (`ferry rollback` switches back)",
                    false => "",
                };
                self.out(&format!("published {path}{kept}"))
            }
            _ => {}
        }
        if let Some(why) = refused {
            self.err(&format!(
                "ferry: {path}: not published: {why}. The live tree is as it was; run the same \
                 command again to resume the publish."
            ));
        }
    }

    fn retry(&self, attempt: u32, delay: Duration, reason: &str) {
        {
            // The next attempt counts from the start again; what is shown
            // holds until it has counted past it.
            let mut s = self.state();
            s.floor = s.shown();
            s.attempt = Counts::default();
        }
        let secs = delay.as_secs_f64();
        match self.mode {
            Mode::Json => self.json(json!({
                "event": "retry", "attempt": attempt, "delay_secs": secs, "reason": reason
            })),
            Mode::Human => self.err(&format!(
                "ferry: attempt {attempt} failed: {reason}; retrying in {secs:.1} s"
            )),
            Mode::Quiet => {}
        }
    }
}

/// `[n/total]` before an entry's `-v` line, or `[n]` while the total is
/// not known.
fn numbered(n: u64, totals: Option<Counts>) -> String {
    match totals {
        Some(t) => format!("[{n}/{}]", t.files),
        None => format!("[{n}]"),
    }
}

/// The files on the bar: `1,204 files` so far, or `1,204/2,000 files`.
fn files_shown(n: u64, totals: Option<Counts>) -> String {
    match totals {
        Some(t) => format!("{}/{} files", thousands(n), thousands(t.files)),
        None => format!("{} files", thousands(n)),
    }
}

/// `1204` as `1,204`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// The closing summary for people (the seed's shape); `failures`: a line
/// for each failed entry.
fn human_summary(
    r: &TransferReport,
    (from, to): (&str, &str),
    secs: f64,
    failures: &[String],
) -> String {
    let rate = if secs > 0.0 {
        r.file_bytes as f64 / secs
    } else {
        0.0
    };
    let heading = if r.failed.is_empty() {
        "Transfer complete"
    } else {
        "Transfer finished with failures"
    };
    let percent = if r.files_total > 0 {
        100.0 * r.files_ok as f64 / r.files_total as f64
    } else {
        100.0
    };
    let mut lines = vec![
        format!("{heading}: {from} -> {to}"),
        format!(
            "  - files:    {} total, {} ok ({percent:.1}%), {} failed, {} skipped",
            r.files_total, r.files_ok, r.files_failed, r.files_skipped
        ),
        format!(
            "  - size:     {}{}",
            human_bytes(r.file_bytes),
            held(r.files_unchanged, r.bytes_held)
        ),
        format!(
            "  - on wire:  {}{}",
            human_bytes(r.wire_bytes),
            ratio(r.file_bytes, r.wire_bytes)
        ),
        format!("  - average:  {}/s", human_bytes(rate as u64)),
        format!("  - elapsed:  {secs:.2} s{}", retried(r.retries)),
    ];
    if r.dirs_failed > 0 {
        lines.push(format!("  - dirs:     {} failed", r.dirs_failed));
    }
    if r.deleted > 0 || !r.delete_failed.is_empty() {
        lines.push(format!(
            "  - deleted:  {} ({} could not be)",
            r.deleted,
            r.delete_failed.len()
        ));
    }
    if !r.vanished.is_empty() {
        lines.push(format!(
            "Vanished from the source while it was read: {}",
            r.vanished.len()
        ));
    }
    if !failures.is_empty() {
        lines.push("Failed:".to_string());
        for line in failures.iter().take(FAILURES_LISTED) {
            lines.push(format!("  - {line}"));
        }
        if failures.len() > FAILURES_LISTED {
            lines.push(format!("  … and {} more", failures.len() - FAILURES_LISTED));
        }
    }
    lines.join("\n")
}

/// `ferry check`'s summary: whether the trees are the same.
fn check_summary(r: &TransferReport, from: &str, to: &str) -> String {
    let differences = r.created + r.updated + r.deleted;
    match differences {
        0 => format!(
            "Same: {to} holds what {from} holds ({} files compared by content)",
            r.files_total
        ),
        n => format!(
            "Different: {n} differences between {from} and {to}: {} missing, {} differ, {} extra",
            r.created, r.updated, r.deleted
        ),
    }
}

/// A dry run's summary: what the same command would have done.
fn dry_run_summary(r: &TransferReport, from: &str, to: &str) -> String {
    let mut lines = vec![
        format!("Dry run, nothing changed: {from} -> {to}"),
        format!(
            "  - would create {}, update {}, delete {}; {} files' content already there",
            r.created, r.updated, r.deleted, r.files_unchanged
        ),
        format!("  - would send:  {}", human_bytes(r.bytes_changed)),
    ];
    if !r.failed.is_empty() {
        lines.push(format!("  - would fail:  {}", r.failed.len()));
    }
    lines.join("\n")
}

/// How a change is named in `--itemize` lines and `changed` events;
/// `created` is the action itself.
fn change_name(change: Change) -> Option<&'static str> {
    Some(match change {
        Change::Created => return None,
        Change::Kind => "kind",
        Change::Size => "size",
        Change::Content => "content",
        Change::Mtime => "mtime",
        Change::Mode => "mode",
        Change::Owner => "owner",
        Change::Target => "target",
    })
}

/// What the receiver already had, for the summary's size line.
fn held(unchanged: u64, bytes_held: u64) -> String {
    if bytes_held == 0 && unchanged == 0 {
        return String::new();
    }
    format!(
        " sent; {} already there ({unchanged} files unchanged)",
        human_bytes(bytes_held)
    )
}

fn retried(retries: u32) -> String {
    match retries {
        0 => String::new(),
        1 => " (after 1 retry)".into(),
        n => format!(" (after {n} retries)"),
    }
}

fn ratio(file_bytes: u64, wire_bytes: u64) -> String {
    if file_bytes == 0 || wire_bytes == 0 {
        return String::new();
    }
    format!(
        " ({:.2}x of the file bytes)",
        wire_bytes as f64 / file_bytes as f64
    )
}

/// Bytes in binary units, as `ls -h` and rsync print them.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_is_numbered_with_its_total_only_once_known() {
        let totals = Some(Counts {
            files: 1204,
            bytes: 9,
        });
        assert_eq!(numbered(3, None), "[3]");
        assert_eq!(numbered(3, totals), "[3/1204]");
        assert_eq!(files_shown(1204, None), "1,204 files");
        assert_eq!(files_shown(7, totals), "7/1,204 files");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn progress_says_null_until_the_totals_come_and_holds_across_a_retry() {
        let mut s = State::default();
        s.attempt.bytes += 100;
        s.settle(0);
        let first = s.progress_due(false).expect("the first is due at once");
        assert_eq!(first["files_total"], serde_json::Value::Null);
        assert_eq!(first["bytes_total"], serde_json::Value::Null);
        assert_eq!(
            (&first["files_done"], &first["bytes"]),
            (&1.into(), &100.into())
        );
        assert!(s.progress_due(false).is_none(), "at most one per interval");
        s.totals = Some(Counts {
            files: 3,
            bytes: 300,
        });
        s.settle(100);
        // A retry: the next attempt counts from nothing, and settles again
        // what the first put in place.
        s.floor = s.shown();
        s.attempt = Counts::default();
        let again = s.settle(100);
        assert_eq!((again, s.shown().bytes), (2, 200), "held, not back to 1");
        assert!(s.catching_up());
        s.settle(100);
        assert_eq!((s.settle(0), s.shown().bytes), (3, 200));
        assert!(!s.catching_up());
        let now = s.progress_due(true).unwrap();
        assert_eq!(
            (&now["files_total"], &now["files_done"]),
            (&3.into(), &3.into())
        );
    }

    #[test]
    fn both_bars_are_valid_templates() {
        // Built only on a terminal: a mistake would show there first.
        for template in [SO_FAR, OF_TOTAL] {
            assert!(ProgressStyle::with_template(template).is_ok(), "{template}");
        }
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.00 MiB");
    }
}

//! What a transfer leaves out: `--include` and `--exclude` rules, and the
//! `.gitignore` files of the tree with `--gitignore`.
//!
//! Patterns are gitignore-style globs, matched by ripgrep's `ignore` crate:
//! `*.log` matches a name at any depth, a leading `/` anchors a pattern to
//! the root of the transfer (`/build/`), a trailing `/` matches only
//! directories, `**` crosses directories (`**/node_modules/`), and an
//! exclude pattern starting with `!` keeps what it matches (`!keep.log`).
//!
//! The rules are ordered and the first that matches an entry decides, as
//! rsync's filter rules (a gitignore file is the other way round: its last
//! matching line decides, so the rules are given to the matcher reversed).
//! An entry no rule matches is decided by the `.gitignore` files of the
//! directories above it, the deepest first. A directory left out is not
//! walked: nothing below it is sent, whatever a rule says of it.
//!
//! Pure: paths and file contents in, decisions out. The walk reads the
//! `.gitignore` files and hands them over.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use ferry_proto::message::{FilterRule, RuleKind};
use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use thiserror::Error;

/// Rules a transfer may carry: a bound on what a peer makes a server
/// compile and match against every entry.
pub const MAX_RULES: usize = 1024;
/// The longest pattern accepted.
pub const MAX_PATTERN_LEN: usize = 4096;
/// A `.gitignore` is read up to this size; the rest is not looked at.
pub(crate) const MAX_GITIGNORE_BYTES: usize = 256 * 1024;

/// A rule the matcher cannot take.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("invalid filter pattern {pattern:?}: {reason}")]
    Pattern { pattern: String, reason: String },
    #[error("{count} filter rules, more than the {MAX_RULES} allowed")]
    TooMany { count: usize },
}

/// The decisions of one transfer's sender.
#[derive(Clone, Default)]
pub(crate) struct Filter {
    /// The rules, reversed: the matcher's last match is the first rule.
    rules: Option<Gitignore>,
    gitignore: bool,
    /// The `.gitignore` of each directory the walk is in, with its path.
    stack: Vec<(Vec<u8>, Option<Gitignore>)>,
}

impl Filter {
    pub(crate) fn new(rules: &[FilterRule], gitignore: bool) -> Result<Filter, FilterError> {
        if rules.len() > MAX_RULES {
            return Err(FilterError::TooMany { count: rules.len() });
        }
        let mut builder = GitignoreBuilder::new(".");
        for rule in rules.iter().rev() {
            let invalid = |reason: String| FilterError::Pattern {
                pattern: rule.pattern.clone(),
                reason,
            };
            if rule.pattern.len() > MAX_PATTERN_LEN {
                return Err(invalid(format!("longer than {MAX_PATTERN_LEN} bytes")));
            }
            builder
                .add_line(None, &gitignore_line(rule))
                .map_err(|e| invalid(e.to_string()))?;
        }
        let matcher = builder.build().map_err(|e| FilterError::Pattern {
            pattern: String::new(),
            reason: e.to_string(),
        })?;
        Ok(Filter {
            rules: (!matcher.is_empty()).then_some(matcher),
            gitignore,
            stack: Vec::new(),
        })
    }

    /// Whether anything can be left out at all.
    pub(crate) fn is_active(&self) -> bool {
        self.rules.is_some() || self.gitignore
    }

    /// Whether the walk should read each directory's `.gitignore`.
    pub(crate) fn reads_gitignore(&self) -> bool {
        self.gitignore
    }

    /// Whether the entry at `path` (relative to the root of the transfer,
    /// never the root itself) is left out.
    pub(crate) fn excludes(&self, path: &[u8], is_dir: bool) -> bool {
        if let Some(rules) = &self.rules {
            match rules.matched(as_path(path), is_dir) {
                Match::Ignore(_) => return true,
                Match::Whitelist(_) => return false,
                Match::None => {}
            }
        }
        for (dir, ignore) in self.stack.iter().rev() {
            let Some(ignore) = ignore else {
                continue;
            };
            let below = if dir.is_empty() {
                path
            } else {
                path.strip_prefix(dir.as_slice())
                    .and_then(|p| p.strip_prefix(b"/"))
                    .unwrap_or(path)
            };
            match ignore.matched(as_path(below), is_dir) {
                Match::Ignore(_) => return true,
                Match::Whitelist(_) => return false,
                Match::None => {}
            }
        }
        false
    }

    /// The walk goes into the directory at `path`, whose `.gitignore`
    /// holds `contents`, if it has one. Lines that are not valid globs
    /// are passed over, as git does.
    pub(crate) fn enter(&mut self, path: &[u8], contents: Option<&[u8]>) {
        if !self.gitignore {
            return;
        }
        let matcher = contents.and_then(|text| {
            let mut builder = GitignoreBuilder::new(".");
            for line in String::from_utf8_lossy(text).lines() {
                if let Err(e) = builder.add_line(None, line) {
                    tracing::debug!("a .gitignore line passed over: {e}");
                }
            }
            builder.build().ok().filter(|m| !m.is_empty())
        });
        self.stack.push((path.to_vec(), matcher));
    }

    /// The walk leaves the directory it last went into.
    pub(crate) fn leave(&mut self) {
        if self.gitignore {
            self.stack.pop();
        }
    }
}

/// A rule as a line of a gitignore file: an include is a negation, and an
/// exclude pattern that starts with `!` is one too.
fn gitignore_line(rule: &FilterRule) -> String {
    match rule.rule {
        RuleKind::Include => format!("!{}", escape_leading_hash(&rule.pattern)),
        RuleKind::Exclude => match rule.pattern.strip_prefix('!') {
            Some(kept) => format!("!{}", escape_leading_hash(kept)),
            None => escape_leading_hash(&rule.pattern),
        },
    }
}

/// A pattern is never a comment, as it would be in a gitignore file.
fn escape_leading_hash(pattern: &str) -> String {
    match pattern.strip_prefix('#') {
        Some(rest) => format!("\\#{rest}"),
        None => pattern.to_string(),
    }
}

fn as_path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(rule: RuleKind, pattern: &str) -> FilterRule {
        FilterRule {
            rule,
            pattern: pattern.into(),
        }
    }

    fn ex(pattern: &str) -> FilterRule {
        rule(RuleKind::Exclude, pattern)
    }

    fn inc(pattern: &str) -> FilterRule {
        rule(RuleKind::Include, pattern)
    }

    #[test]
    fn gitignore_style_globs() {
        let f = Filter::new(
            &[
                ex("*.log"),
                ex("/build/"),
                ex("**/node_modules/"),
                ex("tmp"),
            ],
            false,
        )
        .unwrap();
        assert!(f.excludes(b"a.log", false));
        assert!(f.excludes(b"deep/down/b.log", false), "any depth");
        assert!(f.excludes(b"build", true));
        assert!(!f.excludes(b"build", false), "only a directory");
        assert!(!f.excludes(b"src/build", true), "anchored to the root");
        assert!(f.excludes(b"web/node_modules", true));
        assert!(f.excludes(b"x/tmp", false) && f.excludes(b"tmp", true));
        assert!(!f.excludes(b"a.txt", false));
        assert!(!f.excludes(b"logs.txt", false));
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let f = Filter::new(&[inc("keep.log"), ex("*.log")], false).unwrap();
        assert!(!f.excludes(b"keep.log", false));
        assert!(f.excludes(b"other.log", false));
        // The other way round, the exclude comes first and wins.
        let f = Filter::new(&[ex("*.log"), inc("keep.log")], false).unwrap();
        assert!(f.excludes(b"keep.log", false));
        // An exclude pattern with `!` keeps, as in a gitignore list.
        let f = Filter::new(&[ex("!keep.log"), ex("*.log")], false).unwrap();
        assert!(!f.excludes(b"keep.log", false));
        assert!(f.excludes(b"x.log", false));
    }

    #[test]
    fn a_pattern_is_never_a_comment() {
        let f = Filter::new(&[ex("#notes")], false).unwrap();
        assert!(f.excludes(b"#notes", false));
    }

    #[test]
    fn too_many_rules_or_bad_globs_are_refused() {
        let many: Vec<FilterRule> = (0..=MAX_RULES).map(|i| ex(&format!("f{i}"))).collect();
        assert!(matches!(
            Filter::new(&many, false),
            Err(FilterError::TooMany { .. })
        ));
        let e = Filter::new(&[ex("a{b")], false).err().unwrap();
        assert!(e.to_string().contains("a{b"), "{e}");
        assert!(Filter::new(&[ex(&"x".repeat(MAX_PATTERN_LEN + 1))], false).is_err());
    }

    #[test]
    fn gitignore_files_apply_below_their_directory_the_deepest_first() {
        let mut f = Filter::new(&[], true).unwrap();
        f.enter(b"", Some(b"*.tmp\n/out/\n# a comment\n"));
        assert!(f.excludes(b"a.tmp", false));
        assert!(f.excludes(b"sub/b.tmp", false));
        assert!(f.excludes(b"out", true));
        f.enter(b"sub", Some(b"!keep.tmp\nlocal\n"));
        assert!(
            !f.excludes(b"sub/keep.tmp", false),
            "the deeper file decides"
        );
        assert!(f.excludes(b"sub/local", false));
        assert!(
            !f.excludes(b"sub/out", true),
            "anchored to its own directory"
        );
        f.leave();
        assert!(f.excludes(b"keep.tmp", false));
        assert!(!f.excludes(b"local", false));
    }

    #[test]
    fn rules_come_before_gitignore_files() {
        let mut f = Filter::new(&[inc("important.tmp")], true).unwrap();
        f.enter(b"", Some(b"*.tmp\n"));
        assert!(!f.excludes(b"important.tmp", false));
        assert!(f.excludes(b"other.tmp", false));
    }

    #[test]
    fn no_rules_leave_nothing_out() {
        let f = Filter::new(&[], false).unwrap();
        assert!(!f.is_active());
        assert!(!f.excludes(b"anything", true));
    }
}

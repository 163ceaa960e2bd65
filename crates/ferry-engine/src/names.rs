//! The receiver's own working names, and the rule that keeps peers off them.
//!
//! Beside the files it makes, the receiver works under names of its own:
//! - `.NAME.ferry-part`: a file of 4 MiB or more while it arrives, found
//!   again by that name when an interrupted transfer resumes;
//! - `.NAME.ferry-journal`: that part file's journal of verified chunks;
//! - `.ferry-new.` and 16 hex digits: what the receiver makes under a name
//!   of its own before it takes its real one (a small file's part, a
//!   symlink, a fifo, a device node, a hard link, and a large file while
//!   it gets its metadata): created exclusively under a name no other
//!   transfer uses, looks for or removes;
//! - `.ferry-probe.…`: a moment's name, to learn whether unnamed files can
//!   be named here;
//! - `.NAME.ferry-next` and `.NAME.ferry-prev`: the directory where the
//!   next version of `NAME` is assembled (`--atomic`), and the previous
//!   version, kept for `ferry rollback`.
//!
//! A peer never gets an entry made under one of these names: a part file
//! or a journal that a client could create (a hard link to a file it may
//! not read, say, with a journal of guessed hashes beside it) would be
//! taken up by the receiver as its own.
//!
//! Pure: names in, names out, no file system.

/// What a part file's name ends with.
pub(crate) const PART_SUFFIX: &[u8] = b".ferry-part";
/// What a journal's name ends with.
pub(crate) const JOURNAL_SUFFIX: &[u8] = b".ferry-journal";
/// What an atomic publish's staging directory ends with: the new version
/// of `NAME` is assembled in `.NAME.ferry-next` beside it.
pub(crate) const NEXT_SUFFIX: &[u8] = b".ferry-next";
/// What the previous version of an atomically published `NAME` is kept
/// as: `.NAME.ferry-prev`, until the next publish.
pub(crate) const PREV_SUFFIX: &[u8] = b".ferry-prev";
/// What a probe's name starts with.
pub(crate) const PROBE_PREFIX: &[u8] = b".ferry-probe.";
/// What a fresh working name starts with.
pub(crate) const NEW_PREFIX: &[u8] = b".ferry-new.";

/// The fresh working name made from `seed`: `.ferry-new.` and 16 hex
/// digits. Whoever uses it creates it exclusively, and takes another if
/// it is taken.
pub(crate) fn new_name(seed: u64) -> Vec<u8> {
    let mut name = NEW_PREFIX.to_vec();
    name.extend_from_slice(format!("{seed:016x}").as_bytes());
    name
}

/// The hidden sibling a large file is written to before it is complete:
/// `.NAME.ferry-part`, shortened (with a hash to stay unique) when that
/// would exceed the 255-byte name limit.
pub(crate) fn part_name(name: &[u8]) -> Vec<u8> {
    hidden_sibling(name, PART_SUFFIX)
}

/// `.NAME.ferry-journal`: the part file's name with its own suffix.
pub(crate) fn journal_name(name: &[u8]) -> Vec<u8> {
    hidden_sibling(name, JOURNAL_SUFFIX)
}

/// `.NAME.ferry-next`: where the new version of `NAME` is assembled.
pub(crate) fn staging_name(name: &[u8]) -> Vec<u8> {
    hidden_sibling(name, NEXT_SUFFIX)
}

/// `.NAME.ferry-prev`: the previous version of `NAME`, kept.
pub(crate) fn previous_name(name: &[u8]) -> Vec<u8> {
    hidden_sibling(name, PREV_SUFFIX)
}

/// `.NAME` + `suffix`. Names too long to leave room for the longest
/// suffix (`.ferry-journal`) are cut to 200 bytes plus `~` and a hash, the
/// same way for every suffix, so that a part file and its journal always
/// share their stem (the sweep pairs them by it).
fn hidden_sibling(name: &[u8], suffix: &[u8]) -> Vec<u8> {
    const LONGEST_SUFFIX: usize = JOURNAL_SUFFIX.len();
    let mut out = Vec::with_capacity(name.len() + 1 + suffix.len());
    out.push(b'.');
    if name.len() + 1 + LONGEST_SUFFIX <= 255 {
        out.extend_from_slice(name);
    } else {
        out.extend_from_slice(&name[..200]);
        out.extend_from_slice(
            format!("~{:016x}", ferry_proto::digest::chunk_hash(name)).as_bytes(),
        );
    }
    out.extend_from_slice(suffix);
    out
}

/// `STEM` if `name` is `.STEM` followed by `suffix`, with `STEM` not empty.
pub(crate) fn stem<'a>(name: &'a [u8], suffix: &[u8]) -> Option<&'a [u8]> {
    let stem = name.strip_prefix(b".")?.strip_suffix(suffix)?;
    (!stem.is_empty()).then_some(stem)
}

/// `.STEM` + `suffix`: the sibling of the same stem.
pub(crate) fn sibling(stem: &[u8], suffix: &[u8]) -> Vec<u8> {
    [b".", stem, suffix].concat()
}

/// Whether `name` is one the receiver keeps for its own working files.
pub(crate) fn is_working_name(name: &[u8]) -> bool {
    stem(name, PART_SUFFIX).is_some()
        || stem(name, JOURNAL_SUFFIX).is_some()
        || stem(name, NEXT_SUFFIX).is_some()
        || stem(name, PREV_SUFFIX).is_some()
        || name.starts_with(PROBE_PREFIX)
        || name.starts_with(NEW_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_stay_within_name_max() {
        assert_eq!(part_name(b"a.txt"), b".a.txt.ferry-part");
        let long = vec![b'x'; 255];
        let p = part_name(&long);
        assert!(p.len() <= 255, "{}", p.len());
        assert_ne!(part_name(&long), part_name(&[b'y'; 255]));
    }

    #[test]
    fn journal_names_stay_within_name_max() {
        assert_eq!(journal_name(b"a.txt"), b".a.txt.ferry-journal");
        // The longest name that is kept whole: 1 + 240 + 14 = 255.
        let fits = vec![b'x'; 240];
        assert_eq!(journal_name(&fits).len(), 255);
        assert!(journal_name(&fits).starts_with(b".xxx"));
        for len in [241, 255] {
            let long = vec![b'x'; len];
            let j = journal_name(&long);
            assert!(j.len() <= 255, "{len}: {}", j.len());
            let expected = format!(
                ".{}~{:016x}.ferry-journal",
                "x".repeat(200),
                ferry_proto::digest::chunk_hash(&long)
            );
            assert_eq!(j, expected.as_bytes());
            // The part file and its journal share their shortened stem.
            let (p, j) = (part_name(&long), journal_name(&long));
            assert_eq!(stem(&p, PART_SUFFIX), stem(&j, JOURNAL_SUFFIX));
        }
        assert_ne!(journal_name(&[b'x'; 255]), journal_name(&[b'y'; 255]));
        assert_ne!(journal_name(b"a"), part_name(b"a"));
    }

    #[test]
    fn an_atomic_publish_has_its_two_siblings() {
        assert_eq!(staging_name(b"www"), b".www.ferry-next");
        assert_eq!(previous_name(b"www"), b".www.ferry-prev");
        assert!(staging_name(&[b'x'; 255]).len() <= 255);
    }

    #[test]
    fn stems_are_what_lies_between_the_dot_and_the_suffix() {
        assert_eq!(stem(b".a.ferry-part", PART_SUFFIX), Some(&b"a"[..]));
        assert_eq!(stem(b"..ferry-part", PART_SUFFIX), None);
        assert_eq!(stem(b".ferry-part", PART_SUFFIX), None);
        assert_eq!(stem(b"a.ferry-part", PART_SUFFIX), None);
        assert_eq!(stem(b".a.ferry-journal", PART_SUFFIX), None);
        assert_eq!(sibling(b"a", JOURNAL_SUFFIX), b".a.ferry-journal");
    }

    #[test]
    fn working_names_are_told_from_ordinary_ones() {
        for name in [
            &b".a.ferry-part"[..],
            b".a.ferry-journal",
            b"...ferry-part",
            b".a b.ferry-part",
            b".ferry-probe.12.34",
            b".ferry-new.0123456789abcdef",
            b".ferry-new.x",
            b".www.ferry-next",
            b".www.ferry-prev",
        ] {
            assert!(is_working_name(name), "{}", String::from_utf8_lossy(name));
            assert!(is_working_name(&part_name(name)));
        }
        for name in [
            &b"a.ferry-part"[..],
            b".ferry-part",
            b"..ferry-part",
            b".ferry-journal",
            b".a.ferry-part.txt",
            b"ferry-probe",
            b".ferry-prob",
            b"a",
        ] {
            assert!(!is_working_name(name), "{}", String::from_utf8_lossy(name));
        }
        assert_eq!(new_name(0xabc), b".ferry-new.0000000000000abc");
        // Every name the receiver works under is a working name.
        assert!(is_working_name(&new_name(u64::MAX)));
        assert!(is_working_name(&part_name(&[b'x'; 255])));
        assert!(is_working_name(&journal_name(&[b'x'; 255])));
    }
}

//! The resume journal: which chunks of a part file are known to be written.
//!
//! The receiver writes a file into its hidden part file chunk by chunk
//! (see `names::part_name`). Beside it, in `.NAME.ferry-journal`, it keeps a
//! journal of the chunks it has verified and written, so that a transfer
//! cut short (connection lost, process killed) can resume and ask the
//! sender only for the chunks that are missing.
//!
//! # Invariant
//! Whatever state a crash leaves the journal in, it never makes the
//! receiver trust bytes that are not really in the part file:
//! - a record is appended only after its chunk's bytes were written to the
//!   part file;
//! - every record carries its own check, so a torn record at the end (a
//!   crash in the middle of an append) is recognised and ignored;
//! - on resume every record is checked again against the part file (its
//!   bytes re-read and re-hashed) before it is trusted. This also covers
//!   power loss, where the journal may reach the disk before the data it
//!   describes, and anyone editing either file.
//!
//! Because of that last step nothing here calls fsync: the journal is a
//! hint that saves re-sending data, never the proof that the data is there.
//!
//! # Format
//! All integers little-endian; a check is the low 32 bits of the XXH3-64 of
//! the bytes before it in the same header or record.
//!
//! | bytes | header (32 bytes)            |
//! |-------|------------------------------|
//! | 0..8  | magic `b"FERRYJ1\n"`         |
//! | 8..16 | source size, u64             |
//! | 16..24| source mtime seconds, i64    |
//! | 24..28| source mtime nanoseconds, u32|
//! | 28..32| check, u32                   |
//!
//! then any number of records:
//!
//! | bytes | record (24 bytes)            |
//! |-------|------------------------------|
//! | 0..8  | chunk offset, u64            |
//! | 8..12 | chunk length, u32            |
//! | 12..20| XXH3-64 of the chunk, u64    |
//! | 20..24| check, u32                   |
//!
//! The source size and mtime tie the journal to one version of the source
//! file: a journal written for another version is not used.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;

use ferry_proto::digest::chunk_hash;
use ferry_proto::limits::{DEFAULT_CHUNK_LEN, MAX_CHUNK_LEN};
use rustix::fs::{Mode, OFlags};
use twox_hash::XxHash3_64;

use crate::fsx;

const MAGIC: &[u8; 8] = b"FERRYJ1\n";
const HEADER_LEN: usize = 32;
const RECORD_LEN: usize = 24;

/// The source version a part file belongs to: a journal is reused only for
/// the same size and mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SourceStamp {
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
}

/// One verified chunk of the part file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkRecord {
    pub offset: u64,
    pub len: u32,
    pub hash: u64,
}

impl ChunkRecord {
    /// One past the last byte, or `None` if that does not fit a u64 (only
    /// a damaged record can say so).
    fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.len))
    }
}

/// At most what [`Journal::resume`] holds in memory for a source of `size`
/// bytes sent in chunks of ferry's size: its records, the sort's buffer
/// and the records kept.
pub(crate) fn memory_for(size: u64) -> u64 {
    size.div_ceil(u64::from(DEFAULT_CHUNK_LEN))
        .saturating_mul(RECORD_LEN as u64 * 5 / 2)
}

/// The check stored after a header or a record.
fn check_of(bytes: &[u8]) -> u32 {
    // Truncation is the format: 32 bits are plenty to tell a torn or
    // garbled record, and every record is re-verified against the data.
    XxHash3_64::oneshot(bytes) as u32
}

fn encode_header(stamp: SourceStamp) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[0..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&stamp.size.to_le_bytes());
    out[16..24].copy_from_slice(&stamp.mtime_sec.to_le_bytes());
    out[24..28].copy_from_slice(&stamp.mtime_nsec.to_le_bytes());
    let check = check_of(&out[..28]);
    out[28..32].copy_from_slice(&check.to_le_bytes());
    out
}

/// The stamp in a header, or `None` if the header is not intact.
fn decode_header(bytes: &[u8; HEADER_LEN]) -> Option<SourceStamp> {
    let (body, check) = bytes.split_at(28);
    if &body[0..8] != MAGIC || check_of(body).to_le_bytes() != check {
        return None;
    }
    Some(SourceStamp {
        size: u64::from_le_bytes(body[8..16].try_into().ok()?),
        mtime_sec: i64::from_le_bytes(body[16..24].try_into().ok()?),
        mtime_nsec: u32::from_le_bytes(body[24..28].try_into().ok()?),
    })
}

fn encode_record(rec: ChunkRecord) -> [u8; RECORD_LEN] {
    let mut out = [0u8; RECORD_LEN];
    out[0..8].copy_from_slice(&rec.offset.to_le_bytes());
    out[8..12].copy_from_slice(&rec.len.to_le_bytes());
    out[12..20].copy_from_slice(&rec.hash.to_le_bytes());
    let check = check_of(&out[..20]);
    out[20..24].copy_from_slice(&check.to_le_bytes());
    out
}

/// The record in `bytes`, or `None` if it is torn or garbled.
fn decode_record(bytes: &[u8; RECORD_LEN]) -> Option<ChunkRecord> {
    let (body, check) = bytes.split_at(20);
    if check_of(body).to_le_bytes() != check {
        return None;
    }
    Some(ChunkRecord {
        offset: u64::from_le_bytes(body[0..8].try_into().ok()?),
        len: u32::from_le_bytes(body[8..12].try_into().ok()?),
        hash: u64::from_le_bytes(body[12..20].try_into().ok()?),
    })
}

/// An open journal, ready for appends.
pub(crate) struct Journal {
    file: File,
    /// Where the next record goes: the end of the last complete record.
    /// Writing there (rather than with `O_APPEND`) means an append that
    /// failed half-way is overwritten by the next one instead of leaving a
    /// torn record in the middle, which would hide every record after it.
    end: u64,
}

impl Journal {
    /// Start a fresh journal named `name` in `dir` for `stamp`, replacing
    /// any old one (a symlink under that name is removed, never followed).
    /// Writes the header.
    pub(crate) fn create(
        dir: BorrowedFd<'_>,
        name: &[u8],
        stamp: SourceStamp,
    ) -> io::Result<Journal> {
        // A new file rather than truncating an old one in place: the old
        // one could be a hard link to some other file. Private, and never
        // opened through a symlink.
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let create = || rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(0o600));
        let fd = match create() {
            Err(rustix::io::Errno::EXIST) => {
                fsx::remove_if_present(dir, name)?;
                create()?
            }
            other => other?,
        };
        let file = File::from(fd);
        file.write_all_at(&encode_header(stamp), 0)?;
        Ok(Journal {
            file,
            end: HEADER_LEN as u64,
        })
    }

    /// Append one record. Call only after the chunk's bytes are in the
    /// part file, so that a record never runs ahead of its data.
    pub(crate) fn record(&mut self, rec: ChunkRecord) -> io::Result<()> {
        // One write of the whole record, so that a crash leaves at most
        // this one record torn, at the end, where the loader stops.
        self.file.write_all_at(&encode_record(rec), self.end)?;
        self.end += RECORD_LEN as u64;
        Ok(())
    }

    /// Append many records with as few writes as the buffer allows.
    fn record_all(&mut self, records: &[ChunkRecord]) -> io::Result<()> {
        const BATCH: usize = 2730; // records per write: 64 KiB
        let mut buf = Vec::with_capacity(BATCH.min(records.len()) * RECORD_LEN);
        for batch in records.chunks(BATCH) {
            buf.clear();
            for rec in batch {
                buf.extend_from_slice(&encode_record(*rec));
            }
            self.file.write_all_at(&buf, self.end)?;
            self.end += buf.len() as u64;
        }
        Ok(())
    }

    /// Load the journal `name` in `dir` for a resume.
    ///
    /// Returns `Ok(None)` when there is no journal (or what stands under
    /// its name is not one the receiver made: see `fsx::is_own_private`),
    /// its header is damaged, or
    /// it was written for another version of the source than `stamp`: the
    /// caller then starts over with [`Journal::create`].
    ///
    /// Otherwise reads records up to the end or the first one whose check
    /// fails (a torn tail), and keeps those that:
    /// - have a length from 1 to `MAX_CHUNK_LEN` and lie within
    ///   `stamp.size`;
    /// - overlap no record kept before them, in offset order (a receiver
    ///   never journals overlapping chunks, so only a damaged journal has
    ///   them, and which one survives matters only for what is re-sent);
    /// - still match their hash when read back from `part`;
    /// - and, among those that lie after the first gap (the first byte
    ///   range from offset 0 not covered), are among the first
    ///   `max_records_after_gap`. The caller seeds a `ChunkLedger` with the
    ///   records, which holds the ones past the gap in a bounded map.
    ///
    /// A journal with more records than the part file (or the source) has
    /// chunks of `chunk_len` bytes was not written by a receiver, which
    /// journals each chunk once: it is not read at all (`Ok(None)`), so
    /// that whatever its length, it costs no memory.
    ///
    /// `progress` gets the number of bytes read back so far after each
    /// record checked, so that the caller can send keepalives during a long
    /// verification. A read error on `part` (other than it being short) is
    /// returned as an error.
    ///
    /// Returns the kept records sorted by offset, and the journal rewritten
    /// to hold exactly those, ready for [`Journal::record`].
    pub(crate) fn resume(
        dir: BorrowedFd<'_>,
        name: &[u8],
        stamp: SourceStamp,
        part: BorrowedFd<'_>,
        chunk_len: u32,
        max_records_after_gap: usize,
        progress: &mut dyn FnMut(u64),
    ) -> io::Result<Option<(Journal, Vec<ChunkRecord>)>> {
        // Records past the part file's end cannot be checked against it.
        let part_len = rustix::fs::fstat(part)?.st_size.max(0) as u64;
        let max_records = stamp
            .size
            .min(part_len)
            .div_ceil(u64::from(chunk_len.max(1)));
        let Some(candidates) = load(dir, name, stamp, max_records)? else {
            return Ok(None);
        };
        let kept = verify(candidates, part, max_records_after_gap, progress)?;
        let mut journal = Journal::create(dir, name, stamp)?;
        journal.record_all(&kept)?;
        Ok(Some((journal, kept)))
    }
}

/// Read the journal's records that are well-formed, fit `stamp.size`, and
/// do not overlap, sorted by offset; `None` if there is no usable journal
/// for `stamp`, or one of more than `max_records` records (which no
/// receiver wrote: it is not read at all).
///
/// Memory: the records are held in a Vec, 24 bytes per chunk, so about
/// 24 bytes per MiB of file at the usual chunk size (24 MiB for a 1 TiB
/// file), plus half that while sorting.
fn load(
    dir: BorrowedFd<'_>,
    name: &[u8],
    stamp: SourceStamp,
    max_records: u64,
) -> io::Result<Option<Vec<ChunkRecord>>> {
    // Looked at before it is opened: only a journal as the receiver makes
    // them (its own, private, of one name) is read. Another user's file, a
    // hard link, a symlink, a fifo or a device node in its place is never
    // opened (`create` replaces it).
    let Some(found) = fsx::look(dir, name)? else {
        return Ok(None);
    };
    if !fsx::is_own_private(&found.stat) {
        return Ok(None);
    }
    let most = max_records.saturating_mul(RECORD_LEN as u64) + HEADER_LEN as u64;
    if found.stat.st_size.max(0) as u64 > most {
        tracing::debug!(
            "a journal of {} bytes for {max_records} chunks at most: not read",
            found.stat.st_size
        );
        return Ok(None);
    }
    let Some(fd) = found.open_regular(OFlags::RDONLY) else {
        return Ok(None);
    };
    let mut reader = BufReader::with_capacity(64 * 1024, File::from(fd));

    let mut header = [0u8; HEADER_LEN];
    if read_full(&mut reader, &mut header)? < HEADER_LEN {
        return Ok(None);
    }
    if decode_header(&header) != Some(stamp) {
        return Ok(None);
    }

    let mut records = Vec::new();
    let mut raw = [0u8; RECORD_LEN];
    // Bounded even if the journal grows while it is read.
    while (records.len() as u64) < max_records {
        if read_full(&mut reader, &mut raw)? < RECORD_LEN {
            break; // the end, or a torn last record
        }
        let Some(rec) = decode_record(&raw) else {
            // A garbled record: nothing after it is trusted either, as
            // anything past a torn write is not from an orderly append.
            break;
        };
        let fits = rec.end().is_some_and(|end| end <= stamp.size);
        if rec.len > 0 && rec.len <= MAX_CHUNK_LEN && fits {
            records.push(rec);
        }
    }

    // Stable, so that of records at the same offset the first written wins.
    records.sort_by_key(|rec| rec.offset);
    let mut covered_to = 0u64;
    records.retain(|rec| {
        let keep = rec.offset >= covered_to;
        if keep {
            // Cannot overflow: checked against the size above.
            covered_to = rec.offset + u64::from(rec.len);
        }
        keep
    });
    Ok(Some(records))
}

/// Keep the records (sorted, non-overlapping) whose bytes in `part` still
/// match their hash, at most `max_after_gap` of them past the first gap.
fn verify(
    records: Vec<ChunkRecord>,
    part: BorrowedFd<'_>,
    max_after_gap: usize,
    progress: &mut dyn FnMut(u64),
) -> io::Result<Vec<ChunkRecord>> {
    let largest = records.iter().map(|rec| rec.len).max().unwrap_or(0);
    let mut buf = vec![0u8; largest as usize];
    let mut checked_bytes = 0u64;
    let mut contiguous_end = 0u64;
    let mut after_gap = 0usize;
    let mut kept = Vec::with_capacity(records.len());
    for rec in records {
        let extends_prefix = after_gap == 0 && rec.offset == contiguous_end;
        // Records are in offset order, so once past the gap every later
        // one is past it too: none of them can be kept, so none is read.
        if !extends_prefix && after_gap >= max_after_gap {
            break;
        }
        let chunk = &mut buf[..rec.len as usize];
        let whole = fsx::read_full_at(part, chunk, rec.offset)?;
        checked_bytes += u64::from(rec.len);
        if whole && chunk_hash(chunk) == rec.hash {
            if extends_prefix {
                contiguous_end += u64::from(rec.len);
            } else {
                after_gap += 1;
            }
            kept.push(rec);
        }
        progress(checked_bytes);
    }
    Ok(kept)
}

/// Fill `buf` from `reader`; returns how much was filled, which is less
/// than `buf.len()` only at the end of the input.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Remove the journal `name` in `dir` if present.
pub(crate) fn remove(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    fsx::remove_if_present(dir, name)
}

/// Group records sorted by offset into runs of contiguous chunks of equal
/// length, as `(offset, len, count)`: the compact form in which the
/// receiver tells the sender what it already holds.
pub(crate) fn runs(records: &[ChunkRecord]) -> Vec<(u64, u32, u64)> {
    let mut out: Vec<(u64, u32, u64)> = Vec::new();
    for rec in records {
        if let Some((offset, len, count)) = out.last_mut() {
            let run_end = *offset + u64::from(*len) * *count;
            if *len == rec.len && run_end == rec.offset {
                *count += 1;
                continue;
            }
        }
        out.push((rec.offset, rec.len, 1));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::path::Path;

    const STAMP: SourceStamp = SourceStamp {
        size: 40,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 123,
    };
    const NAME: &[u8] = b".f.ferry-journal";

    struct Fixture {
        tmp: tempfile::TempDir,
        dir: File,
        part: File,
    }

    impl Fixture {
        /// A directory with a part file holding `STAMP.size` bytes.
        fn new() -> Fixture {
            let tmp = tempfile::tempdir().unwrap();
            let content: Vec<u8> = (0..STAMP.size as u8).collect();
            std::fs::write(tmp.path().join(".f.ferry-part"), &content).unwrap();
            let dir = File::open(tmp.path()).unwrap();
            let part = File::options()
                .read(true)
                .write(true)
                .open(tmp.path().join(".f.ferry-part"))
                .unwrap();
            Fixture { tmp, dir, part }
        }

        fn path(&self, name: &[u8]) -> std::path::PathBuf {
            self.tmp.path().join(std::str::from_utf8(name).unwrap())
        }

        /// The true record for `len` bytes of the part file at `offset`.
        fn chunk(&self, offset: u64, len: u32) -> ChunkRecord {
            let mut buf = vec![0u8; len as usize];
            self.part.read_exact_at(&mut buf, offset).unwrap();
            ChunkRecord {
                offset,
                len,
                hash: chunk_hash(&buf),
            }
        }

        fn create(&self) -> Journal {
            Journal::create(self.dir.as_fd(), NAME, STAMP).unwrap()
        }

        fn resume_with(
            &self,
            stamp: SourceStamp,
            max_after_gap: usize,
        ) -> Option<(Journal, Vec<ChunkRecord>)> {
            Journal::resume(
                self.dir.as_fd(),
                NAME,
                stamp,
                self.part.as_fd(),
                1,
                max_after_gap,
                &mut |_| {},
            )
            .unwrap()
        }

        fn resume(&self) -> Option<Vec<ChunkRecord>> {
            self.resume_with(STAMP, 4096).map(|(_, kept)| kept)
        }
    }

    fn append_raw(path: &Path, bytes: &[u8]) {
        use std::io::Write;
        let mut f = File::options().append(true).open(path).unwrap();
        f.write_all(bytes).unwrap();
    }

    #[test]
    fn round_trip_keeps_verified_chunks_sorted() {
        let fx = Fixture::new();
        let mut journal = fx.create();
        let chunks = [fx.chunk(16, 8), fx.chunk(0, 8), fx.chunk(8, 8)];
        for rec in chunks {
            journal.record(rec).unwrap();
        }
        drop(journal);

        let mut seen = Vec::new();
        let (mut journal, kept) = Journal::resume(
            fx.dir.as_fd(),
            NAME,
            STAMP,
            fx.part.as_fd(),
            1,
            4096,
            &mut |bytes| seen.push(bytes),
        )
        .unwrap()
        .unwrap();
        assert_eq!(kept, [fx.chunk(0, 8), fx.chunk(8, 8), fx.chunk(16, 8)]);
        assert_eq!(seen, [8, 16, 24]);

        // The resumed journal takes further appends.
        journal.record(fx.chunk(24, 16)).unwrap();
        drop(journal);
        assert_eq!(
            fx.resume().unwrap(),
            [
                fx.chunk(0, 8),
                fx.chunk(8, 8),
                fx.chunk(16, 8),
                fx.chunk(24, 16)
            ]
        );
        let len = std::fs::metadata(fx.path(NAME)).unwrap().len();
        assert_eq!(len, (HEADER_LEN + 4 * RECORD_LEN) as u64);
    }

    #[test]
    fn format_is_as_documented() {
        let header = encode_header(STAMP);
        assert_eq!(&header[..8], b"FERRYJ1\n");
        assert_eq!(header[8..16], 40u64.to_le_bytes());
        assert_eq!(
            header[28..32],
            (XxHash3_64::oneshot(&header[..28]) as u32).to_le_bytes()
        );
        let rec = ChunkRecord {
            offset: 7,
            len: 9,
            hash: 0xabcd,
        };
        let raw = encode_record(rec);
        assert_eq!(raw[..8], 7u64.to_le_bytes());
        assert_eq!(raw[8..12], 9u32.to_le_bytes());
        assert_eq!(raw[12..20], 0xabcdu64.to_le_bytes());
        assert_eq!(decode_record(&raw), Some(rec));
    }

    #[test]
    fn another_source_version_starts_over() {
        let fx = Fixture::new();
        let mut journal = fx.create();
        journal.record(fx.chunk(0, 8)).unwrap();
        drop(journal);
        for stamp in [
            SourceStamp { size: 41, ..STAMP },
            SourceStamp {
                mtime_sec: 1,
                ..STAMP
            },
            SourceStamp {
                mtime_nsec: 124,
                ..STAMP
            },
        ] {
            assert!(fx.resume_with(stamp, 4096).is_none(), "{stamp:?}");
        }
        assert!(fx.resume().is_some());
    }

    #[test]
    fn no_journal_starts_over() {
        let fx = Fixture::new();
        assert!(fx.resume().is_none());
        // Nor does looking create one.
        assert!(!fx.path(NAME).exists());
    }

    #[test]
    fn damaged_header_starts_over() {
        let fx = Fixture::new();
        let mut journal = fx.create();
        journal.record(fx.chunk(0, 8)).unwrap();
        drop(journal);
        let mut bytes = std::fs::read(fx.path(NAME)).unwrap();
        bytes[20] ^= 1;
        std::fs::write(fx.path(NAME), &bytes).unwrap();
        assert!(fx.resume().is_none());

        // A header cut short, too.
        std::fs::write(fx.path(NAME), &encode_header(STAMP)[..31]).unwrap();
        assert!(fx.resume().is_none());
    }

    #[test]
    fn torn_tail_is_ignored() {
        let fx = Fixture::new();
        let mut journal = fx.create();
        journal.record(fx.chunk(0, 8)).unwrap();
        journal.record(fx.chunk(8, 8)).unwrap();
        drop(journal);
        append_raw(&fx.path(NAME), &encode_record(fx.chunk(16, 8))[..13]);
        assert_eq!(fx.resume().unwrap(), [fx.chunk(0, 8), fx.chunk(8, 8)]);

        // A whole record with a bad check ends the journal just the same.
        let mut garbled = encode_record(fx.chunk(16, 8));
        garbled[3] ^= 0x40;
        append_raw(&fx.path(NAME), &garbled);
        append_raw(&fx.path(NAME), &encode_record(fx.chunk(24, 8)));
        assert_eq!(fx.resume().unwrap(), [fx.chunk(0, 8), fx.chunk(8, 8)]);
    }

    #[test]
    fn changed_part_bytes_drop_the_record_for_good() {
        let fx = Fixture::new();
        let mut journal = fx.create();
        for offset in [0, 8, 16] {
            journal.record(fx.chunk(offset, 8)).unwrap();
        }
        drop(journal);
        let (a, c) = (fx.chunk(0, 8), fx.chunk(16, 8));
        fx.part.write_all_at(b"X", 10).unwrap();
        assert_eq!(fx.resume().unwrap(), [a, c]);

        // The rewritten journal no longer holds it, even once the bytes
        // are back (the sender sends that chunk again).
        fx.part.write_all_at(&[10], 10).unwrap();
        assert_eq!(fx.resume().unwrap(), [a, c]);
        let len = std::fs::metadata(fx.path(NAME)).unwrap().len();
        assert_eq!(len, (HEADER_LEN + 2 * RECORD_LEN) as u64);
    }

    #[test]
    fn short_part_file_drops_the_records_it_lacks() {
        let fx = Fixture::new();
        let mut journal = fx.create();
        journal.record(fx.chunk(0, 8)).unwrap();
        journal.record(fx.chunk(32, 8)).unwrap();
        drop(journal);
        fx.part.set_len(36).unwrap();
        assert_eq!(fx.resume().unwrap(), [fx.chunk(0, 8)]);
    }

    #[test]
    fn overlapping_empty_and_out_of_range_records_are_dropped() {
        let fx = Fixture::new();
        let mut journal = fx.create();
        let bad = [
            fx.chunk(4, 8),  // overlaps the chunk at 0
            fx.chunk(12, 0), // empty
            ChunkRecord {
                offset: 36,
                len: 8,
                hash: 0,
            }, // runs past the size
            ChunkRecord {
                offset: u64::MAX,
                len: 2,
                hash: 0,
            }, // wraps around
            ChunkRecord {
                offset: 0,
                len: MAX_CHUNK_LEN + 1,
                hash: 0,
            }, // longer than any chunk
        ];
        journal.record(fx.chunk(0, 8)).unwrap();
        for rec in bad {
            journal.record(rec).unwrap();
        }
        journal.record(fx.chunk(8, 8)).unwrap();
        drop(journal);
        assert_eq!(fx.resume().unwrap(), [fx.chunk(0, 8), fx.chunk(8, 8)]);
    }

    #[test]
    fn records_past_the_first_gap_are_bounded() {
        let fx = Fixture::new();
        let mut journal = fx.create();
        // Prefix 0..8, gap 8..12, then five records of 4 bytes (one with
        // bad bytes, which does not count against the limit).
        let mut records = vec![fx.chunk(0, 8)];
        records.extend([12, 16, 20, 24, 28].map(|o| fx.chunk(o, 4)));
        records[2].hash ^= 1;
        for rec in &records {
            journal.record(*rec).unwrap();
        }
        drop(journal);

        let mut seen = Vec::new();
        let (_, kept) = Journal::resume(
            fx.dir.as_fd(),
            NAME,
            STAMP,
            fx.part.as_fd(),
            1,
            2,
            &mut |bytes| seen.push(bytes),
        )
        .unwrap()
        .unwrap();
        assert_eq!(kept, [fx.chunk(0, 8), fx.chunk(12, 4), fx.chunk(20, 4)]);
        // Records beyond the limit are not even read.
        assert_eq!(seen, [8, 12, 16, 20]);

        let (_, kept) = fx.resume_with(STAMP, 0).unwrap();
        assert_eq!(kept, [fx.chunk(0, 8)]);
    }

    #[test]
    fn more_records_than_chunks_is_no_journal() {
        let fx = Fixture::new();
        let mut journal = fx.create();
        for offset in (0..40).step_by(10) {
            journal.record(fx.chunk(offset, 10)).unwrap();
        }
        let resume = |chunk_len| {
            Journal::resume(
                fx.dir.as_fd(),
                NAME,
                STAMP,
                fx.part.as_fd(),
                chunk_len,
                4096,
                &mut |_| {},
            )
            .unwrap()
            .map(|(_, kept)| kept.len())
        };
        assert_eq!(resume(10), Some(4), "four chunks of 10: four records");
        // Resume rewrote the same four records.
        assert_eq!(resume(14), None, "40 bytes hold three chunks of 14");
        let mut journal = fx.create();
        for offset in (0..40).step_by(10) {
            journal.record(fx.chunk(offset, 10)).unwrap();
        }
        journal.record(fx.chunk(0, 10)).unwrap();
        assert_eq!(resume(10), None, "a fifth record, past what 40 bytes hold");
    }

    #[test]
    fn a_gap_at_the_start_counts() {
        let fx = Fixture::new();
        let mut journal = fx.create();
        journal.record(fx.chunk(8, 8)).unwrap();
        journal.record(fx.chunk(16, 8)).unwrap();
        drop(journal);
        let (_, kept) = fx.resume_with(STAMP, 1).unwrap();
        assert_eq!(kept, [fx.chunk(8, 8)]);
    }

    #[test]
    fn runs_group_contiguous_equal_chunks() {
        let rec = |offset, len| ChunkRecord {
            offset,
            len,
            hash: 0,
        };
        assert!(runs(&[]).is_empty());
        let records = [
            rec(0, 4),
            rec(4, 4),
            rec(8, 4),
            rec(12, 2), // shorter: a new run
            rec(20, 4), // after a gap: a new run
            rec(24, 4),
            rec(28, 8), // longer: a new run
        ];
        assert_eq!(
            runs(&records),
            [(0, 4, 3), (12, 2, 1), (20, 4, 2), (28, 8, 1)]
        );
    }

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let fx = Fixture::new();
        let outside = fx.tmp.path().join("outside");
        std::fs::write(&outside, b"precious").unwrap();
        std::os::unix::fs::symlink(&outside, fx.path(NAME)).unwrap();

        // Resume does not read through it...
        assert!(fx.resume().is_none());
        // ...and create replaces it rather than writing through it.
        let mut journal = fx.create();
        journal.record(fx.chunk(0, 8)).unwrap();
        drop(journal);
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(fx.path(NAME)).unwrap().is_file());
        assert_eq!(fx.resume().unwrap(), [fx.chunk(0, 8)]);
    }

    #[test]
    fn remove_is_quiet_when_absent() {
        let fx = Fixture::new();
        remove(fx.dir.as_fd(), NAME).unwrap();
        drop(fx.create());
        assert!(fx.path(NAME).exists());
        remove(fx.dir.as_fd(), NAME).unwrap();
        assert!(!fx.path(NAME).exists());
    }
}

//! Micro-benchmarks of the per-chunk work on ferry's data path: framing,
//! hashing, path validation and zstd.
//!
//! Run with `cargo bench -p ferry-proto --bench codec` (add `-- --quick`
//! for a fast pass). Every group reports throughput in bytes, so the
//! numbers compare directly with a link's rate: a 1 Gbit/s link moves
//! ~119 MiB/s, loopback several GiB/s.
//!
//! Only public APIs of `ferry-proto` are used, plus `zstd::bulk` with the
//! same reused-context pattern as the engine's chunk encoder.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferry_proto::chunk::{ChunkHeader, Codec};
use ferry_proto::digest::{ChunkLedger, DigestBuilder, chunk_hash};
use ferry_proto::frame::{Frame, decode, encode_control, encode_data};
use ferry_proto::limits::DEFAULT_CHUNK_LEN;
use ferry_proto::message::{EntryKind, Message, Mtime, Outcome, Owner};
use ferry_proto::path::WirePath;

const MIB: usize = 1024 * 1024;

/// A tiny deterministic generator (xorshift64), so inputs are the same on
/// every run without a `rand` dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Incompressible bytes.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Compressible text that does not repeat within zstd's window, and that
/// does not change when the code does: indented lines of pseudo-words drawn
/// from a fixed vocabulary with a skewed (Zipf-like) frequency, as in real
/// text. It compresses about 3× at level 1, the pessimistic end of the
/// source code, HTML and logs users move (3-5×); repeating a real file
/// instead would compress ~30× and flatter zstd.
fn text_bytes(len: usize) -> Vec<u8> {
    const SYLLABLES: &[&str] = &[
        "in", "re", "con", "de", "ex", "pro", "per", "com", "sub", "tra", "at", "ion", "ent", "er",
        "al", "ing", "ed", "ly", "or", "an", "st", "th", "ch", "ble", "ment", "ous", "ive", "ize",
        "fer", "ry", "da", "ta", "byte", "file", "path", "buf", "len", "s", "x", "_", "::", "()",
    ];
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let vocabulary: Vec<String> = (0..4096)
        .map(|_| {
            (0..1 + rng.below(4))
                .map(|_| SYLLABLES[rng.below(SYLLABLES.len())])
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(len + 256);
    while out.len() < len {
        out.resize(out.len() + 4 * rng.below(4), b' ');
        for i in 0..3 + rng.below(10) {
            if i > 0 {
                out.push(b' ');
            }
            // u³ skews the draw towards the first words: a few are very
            // common, most are rare.
            let u = rng.below(1 << 20) as f64 / f64::from(1 << 20);
            let word = &vocabulary[(u * u * u * vocabulary.len() as f64) as usize];
            out.extend_from_slice(word.as_bytes());
        }
        out.extend_from_slice(if rng.below(3) == 0 { b";\n" } else { b"\n" });
    }
    out.truncate(len);
    out
}

fn file_entry() -> Message {
    Message::Entry {
        id: 4711,
        path: "lib/python3.11/email/mime/multipart.py".into(),
        kind: EntryKind::File {
            size: 1_593,
            mode: 0o644,
            mtime: Mtime {
                sec: 1_700_000_000,
                nsec: 123_456_789,
            },
        },
        owner: Some(Owner {
            uid: 1000,
            gid: 1000,
        }),
        digest: None,
    }
}

fn outcome_ok() -> Message {
    Message::Outcome {
        id: 4711,
        outcome: Outcome::Ok,
    }
}

/// Encode then decode one frame, as sender and receiver do per chunk.
fn bench_frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");

    let payload = random_bytes(DEFAULT_CHUNK_LEN as usize);
    let header = ChunkHeader {
        file_id: 1,
        offset: 0,
        raw_len: payload.len() as u32,
        codec: Codec::Raw,
        hash: chunk_hash(&payload),
    };
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("data_1MiB_encode_decode", |b| {
        b.iter(|| {
            // A fresh buffer per frame: decode() splits the body off and
            // freezes it, as the receiver does, so the buffer cannot be reused.
            let mut buf = BytesMut::with_capacity(payload.len() + 64);
            encode_data(black_box(&header), black_box(&payload), &mut buf);
            match decode(&mut buf) {
                Ok(Some(Frame::Data(chunk))) => black_box(chunk),
                other => panic!("unexpected {other:?}"),
            }
        })
    });

    for (name, msg) in [("entry_file", file_entry()), ("outcome_ok", outcome_ok())] {
        let mut probe = BytesMut::new();
        encode_control(&msg, &mut probe).expect("encodes");
        g.throughput(Throughput::Bytes(probe.len() as u64));
        g.bench_function(BenchmarkId::new("control_encode_decode", name), |b| {
            b.iter(|| {
                let mut buf = BytesMut::with_capacity(256);
                encode_control(black_box(&msg), &mut buf).expect("encodes");
                match decode(&mut buf) {
                    Ok(Some(Frame::Control(m))) => black_box(m),
                    other => panic!("unexpected {other:?}"),
                }
            })
        });
    }
    g.finish();
}

/// XXH3-64 per chunk, the XXH3-128 file digest, and the receiver's ledger.
fn bench_digest(c: &mut Criterion) {
    let mut g = c.benchmark_group("digest");
    for (name, len) in [("4KiB", 4096), ("1MiB", MIB)] {
        let data = random_bytes(len);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(BenchmarkId::new("chunk_hash", name), |b| {
            b.iter(|| chunk_hash(black_box(&data)))
        });
    }

    // A 1 GiB file: 1024 chunk hashes folded into the XXH3-128 digest. The
    // throughput counted is the bytes actually hashed (size + 1024 × u64).
    let hashes: Vec<u64> = (0..1024u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let file_size = 1024 * MIB as u64;
    g.throughput(Throughput::Bytes(8 + 8 * hashes.len() as u64));
    g.bench_function("file_digest_1024_chunks", |b| {
        b.iter(|| {
            let mut d = DigestBuilder::new(black_box(file_size));
            for &h in &hashes {
                d.push(h);
            }
            d.finish()
        })
    });
    g.bench_function("ledger_1024_chunks_in_order", |b| {
        b.iter(|| {
            let mut ledger = ChunkLedger::new(file_size);
            for (i, &h) in hashes.iter().enumerate() {
                let offset = i as u64 * MIB as u64;
                ledger.record(offset, MIB as u32, h).expect("fits");
            }
            black_box(ledger.received())
        })
    });
    g.finish();
}

/// Validation of a path received from the peer.
fn bench_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("path");
    let path: &[u8] =
        b"lib/python3.11/site-packages/pip/_vendor/rich/__pycache__/console.cpython-311.pyc";
    g.throughput(Throughput::Bytes(path.len() as u64));
    g.bench_function("wirepath_parse", |b| {
        b.iter(|| WirePath::parse(black_box(path)).expect("valid"))
    });
    g.finish();
}

/// zstd bulk compression of one 1 MiB chunk with a reused context, as the
/// engine's chunk encoder and decoder do, on text and on random data.
fn bench_zstd(c: &mut Criterion) {
    let mut g = c.benchmark_group("zstd");
    let inputs = [("text", text_bytes(MIB)), ("random", random_bytes(MIB))];
    for level in [1, 3] {
        for (kind, raw) in &inputs {
            let mut compressor = zstd::bulk::Compressor::new(level).expect("level");
            // Room for the worst case, so random data measures zstd's full
            // work rather than an early "destination too small" error.
            let mut compressed = Vec::with_capacity(raw.len() + raw.len() / 64 + 1024);
            compressor
                .compress_to_buffer(raw, &mut compressed)
                .expect("compresses");
            let ratio = compressed.len() as f64 / raw.len() as f64;
            eprintln!("zstd level {level} on 1 MiB {kind}: {ratio:.3} of the raw size");

            g.throughput(Throughput::Bytes(raw.len() as u64));
            let id = format!("{kind}_l{level}");
            let mut scratch = Vec::with_capacity(compressed.capacity());
            g.bench_function(BenchmarkId::new("compress_1MiB", &id), |b| {
                b.iter(|| {
                    scratch.clear();
                    compressor
                        .compress_to_buffer(black_box(raw.as_slice()), &mut scratch)
                        .expect("compresses")
                })
            });

            let mut decompressor = zstd::bulk::Decompressor::new().expect("context");
            let mut out = Vec::with_capacity(raw.len());
            g.bench_function(BenchmarkId::new("decompress_1MiB", &id), |b| {
                b.iter(|| {
                    out.clear();
                    let n = decompressor
                        .decompress_to_buffer(black_box(compressed.as_slice()), &mut out)
                        .expect("decompresses");
                    assert_eq!(n, raw.len());
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_frames, bench_digest, bench_path, bench_zstd);
criterion_main!(benches);

//! Whole exchanges in memory, in the spirit of quinn-proto's `Pair`.
//!
//! No sockets, no runtime, no binary: the receiver's worker is stepped
//! frame batch by frame batch from the test's own thread, with files in a
//! temporary directory. A test either plays the sender itself, frame by
//! frame (`Script`, in `receiving.rs`: hostile and unusual senders), or
//! runs the real sender's producer against the real receiver (`Pair`, in
//! `pair.rs`), and may tamper with what passes between them. Each runs in
//! milliseconds; each bug fix gets one.

mod exchanges;
mod harness;
mod pair;
mod receiving;

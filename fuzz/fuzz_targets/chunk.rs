//! A data frame body: chunk header and payload.
//! The checks are `ferry_proto::fuzzing::chunk`, shared with the corpus replay test.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_proto::fuzzing::chunk(data));

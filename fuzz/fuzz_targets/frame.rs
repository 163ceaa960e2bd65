//! A stream of frames, decoded whole and fed in two pieces.
//! The checks are `ferry_proto::fuzzing::frame`, shared with the corpus replay test.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_proto::fuzzing::frame(data));

//! A JSON control message body.
//! The checks are `ferry_proto::fuzzing::control`, shared with the corpus replay test.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_proto::fuzzing::control(data));

//! Path bytes from the wire, and the JSON text of a path value.
//! The checks are `ferry_proto::fuzzing::wire_path`, shared with the corpus replay test.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_proto::fuzzing::wire_path(data));

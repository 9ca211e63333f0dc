//! Channel::ToNode as a stream of frames: see `herald_fuzz::check_stream`.
#![no_main]

use herald::protocol::Channel;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    herald_fuzz::check_stream(data, Channel::ToNode, None);
});

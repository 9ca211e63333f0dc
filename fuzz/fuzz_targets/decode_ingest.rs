//! The ingest port, both ways: the first input byte picks Channel::Ingest
//! (even) or Channel::FromIngest (odd); the rest is a stream of frames.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((channel, stream)) = herald_fuzz::select(data, &herald_fuzz::INGEST) {
        herald_fuzz::check_stream(stream, channel, None);
    }
});

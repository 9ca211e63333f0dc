//! The decision server's channels: the first input byte picks (modulo 3)
//! Channel::ToDecision, Channel::FromDecision or Channel::Heartbeat; the rest
//! is a stream of frames. Every complete frame also goes through
//! `sign::verify_frame`, and ADMIN / HEARTBEAT through the signing checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((channel, stream)) = herald_fuzz::select(data, &herald_fuzz::DECISION) {
        herald_fuzz::check_stream(stream, channel, Some(herald_fuzz::KEY));
    }
});

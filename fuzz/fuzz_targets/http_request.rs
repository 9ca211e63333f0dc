//! The node's `/metrics` / `/healthz` request reader
//! (`herald::fuzzing::http_take`) over a request arriving in pieces: see
//! `herald_fuzz::check_http`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    herald_fuzz::check_http(data);
});

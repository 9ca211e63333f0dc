//! `token::verify` on arbitrary bytes under a fixed secret at several times,
//! and `token::mint` round trips: see `herald_fuzz::check_token`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    herald_fuzz::check_token(data);
});

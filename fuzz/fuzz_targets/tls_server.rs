//! Bytes fed to herald's server side of a TLS session (`ServerTls` over an
//! in-memory socket, `herald::fuzzing::server_session`): see
//! `herald_fuzz::check_tls`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    herald_fuzz::check_tls(data);
});

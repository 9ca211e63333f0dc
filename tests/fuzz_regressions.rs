//! Inputs the fuzz targets (`fuzz/`) found, replayed through the same entry
//! points (`herald::fuzzing`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Herald's server configuration for a fresh `localhost` certificate, as
/// the `tls_server` target runs it.
fn server_config() -> Arc<rustls::ServerConfig> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("herald-fuzz-regress-{}-{n}", std::process::id()));
    let ca = herald::cert::new_ca("herald test CA", 30).unwrap();
    ca.save(&dir, true).unwrap();
    ca.issue("localhost", &[], &[], 30).unwrap().save(&dir, true).unwrap();
    let files = herald::tls::ServerFiles {
        cert: dir.join("localhost.pem"),
        key: dir.join("localhost.key"),
        client_ca: Some(dir.join("ca.pem")),
        client_cert_optional: true,
    };
    let cfg = files.config().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    cfg
}

fn input(name: &str) -> Vec<u8> {
    std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz").join(name)).unwrap()
}

/// Runs a `tls_server` input (bytes 0 and 1: piece size and write budget,
/// see `fuzz/src/lib.rs`) through herald's server session, and the same
/// bytes through rustls's buffered `ServerConnection`.
fn both(data: &[u8]) -> (herald::fuzzing::Outcome, Option<rustls::Error>, Vec<u8>) {
    let cfg = server_config();
    let stream = &data[2..];
    let turns: Vec<&[u8]> = match data[0] {
        0 => vec![stream],
        n => stream.chunks(usize::from(n)).collect(),
    };
    let herald = herald::fuzzing::server_session(cfg.clone(), &turns, None);
    let mut c = rustls::ServerConnection::new(cfg).unwrap();
    let mut rd = stream;
    c.read_tls(&mut rd).unwrap();
    let err = c.process_new_packets().err();
    let mut sent = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut sent).unwrap();
    }
    (herald, err, sent)
}

fn rustls_error(o: &herald::fuzzing::Outcome) -> Option<&rustls::Error> {
    o.error.as_ref()?.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Found by `tls_server` (first 60 s run): a ClientHello whose length
/// field says 8 MiB. rustls refuses it without an alert, buffered or not;
/// the target expected an alert. herald refuses it the same way and sends
/// nothing, fed whole or byte by byte.
#[test]
fn tls_handshake_message_over_the_limit_is_refused_silently() {
    let mut data = input("tls-handshake-too-large.bin");
    for shape in [0, 1] {
        data[0] = shape;
        let (herald, err, sent) = both(&data);
        let want = rustls::Error::InvalidMessage(rustls::InvalidMessage::HandshakePayloadTooLarge);
        assert_eq!(err.as_ref(), Some(&want));
        assert_eq!(rustls_error(&herald), Some(&want), "{:?}", herald.error);
        assert!(sent.is_empty() && herald.sent.is_empty(), "{:?}", herald.sent);
        assert_eq!(herald.plaintext, 0);
    }
}

/// Found by `tls_server` (second run): a ClientHello whose length field
/// runs past its record, then a record of another type, while the
/// handshake message is incomplete. rustls refuses it without an alert
/// (MessageInterleavedWithHandshakeMessage); so does herald.
#[test]
fn tls_record_interleaved_with_a_partial_handshake_message_is_refused_silently() {
    let data = input("tls-interleaved.bin");
    let (herald, err, sent) = both(&data);
    assert!(err.is_some());
    assert_eq!(rustls_error(&herald), err.as_ref(), "{:?}", herald.error);
    assert!(sent.is_empty() && herald.sent.is_empty(), "{:?}", herald.sent);
}

//! Writes the seed corpus: one file per sample of `herald::protocol::samples`
//! for each target that reads its channel, whole streams of them, and tokens.
//!
//! Usage (from the repository root):
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example write_seeds [DIR...]
//! ```
//!
//! Writes `DIR/<target>/<name>` for each DIR (default: `fuzz/seeds` and
//! `fuzz/corpus`). The output is deterministic, so re-running it over the
//! checked-in `fuzz/seeds` changes nothing unless the samples changed. The
//! `tls_server` seeds hold ClientHellos (random by nature: client random,
//! key share), so they are only written where no file of that name exists.

use std::fs;
use std::path::{Path, PathBuf};

use herald::protocol::samples::{self, Sample};
use herald::protocol::token;
use herald_fuzz::{tls_dir, KEY, OTHER_KEY, TARGETS};

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if dirs.is_empty() {
        dirs = vec![root.join("seeds"), root.join("corpus")];
    }
    let all = samples::all();
    for dir in &dirs {
        let mut total = 0;
        for (target, channels, selects) in TARGETS {
            let out = dir.join(target);
            fs::create_dir_all(&out)?;
            let files =
                if channels.is_empty() { token_seeds() } else { frame_seeds(&all, channels, selects) };
            for (name, bytes) in &files {
                fs::write(out.join(name), bytes)?;
            }
            total += files.len();
        }
        total += write_new(&dir.join("http_request"), http_seeds())?;
        total += write_new(&dir.join("tls_server"), tls_seeds())?;
        println!("{}: {total} files", dir.display());
    }
    Ok(())
}

/// For each channel of the target: every sample whose frame type the channel
/// allows (not only those listed for it), each alone, all of
/// them back to back, and that stream cut one byte short (ends Incomplete).
/// With `selects`, each input starts with the byte that picks the channel.
fn frame_seeds(
    all: &[Sample],
    channels: &[herald::protocol::Channel],
    selects: bool,
) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for (i, &channel) in channels.iter().enumerate() {
        let prefix: Vec<u8> = if selects { vec![i as u8] } else { Vec::new() };
        let tag = format!("{channel:?}").to_lowercase();
        let mut stream = prefix.clone();
        for s in all.iter().filter(|s| s.channel == channel || channel.allows(s.bytes[4])) {
            let name = if selects { format!("{tag}-{}", s.name) } else { s.name.to_string() };
            files.push((name, [&prefix[..], &s.bytes].concat()));
            stream.extend_from_slice(&s.bytes);
        }
        let cut = stream[..stream.len() - 1].to_vec();
        files.push((format!("stream-{tag}"), stream));
        files.push((format!("stream-{tag}-cut"), cut));
    }
    files
}

/// Tokens valid under the fuzz key (one that expires between the target's
/// `now` values, one at the limits), the samples' placeholder token
/// (malformed), and a well-formed token signed with another key.
fn token_seeds() -> Vec<(String, Vec<u8>)> {
    let mint = |key, user: &[u8], exp| token::mint(key, user, exp).expect("valid user").into_bytes();
    vec![
        ("valid-alice".to_string(), mint(KEY, b"alice", 1_767_225_600)),
        ("valid-max".to_string(), mint(KEY, &[0xff; 64], u64::MAX)),
        ("valid-bob".to_string(), mint(KEY, b"bob", 2_000_000_000)),
        ("other-key".to_string(), mint(OTHER_KEY, b"alice", 2_000_000_000)),
        ("placeholder".to_string(), b"v1.YWxpY2U.1767225600.00".to_vec()),
    ]
}

/// Writes `files` into `dir` except those that exist already; returns how
/// many files `dir` now holds of them.
fn write_new(dir: &Path, files: Vec<(String, Vec<u8>)>) -> std::io::Result<usize> {
    fs::create_dir_all(dir)?;
    for (name, bytes) in &files {
        let path = dir.join(name);
        if !path.exists() {
            fs::write(path, bytes)?;
        }
    }
    Ok(files.len())
}

/// Request heads as Prometheus and curl send them, whole and cut into
/// pieces (the first byte: see `herald_fuzz::piece_len`), one cut short,
/// one other path, and one over the 8 KiB limit.
fn http_seeds() -> Vec<(String, Vec<u8>)> {
    let prom = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9100\r\nUser-Agent: Prometheus/2.53.0\r\n\
Accept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.1,*/*;q=0.1\r\n\
Accept-Encoding: gzip\r\nX-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n";
    let curl =
        b"GET /healthz HTTP/1.1\r\nHost: localhost:9100\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
    let other = b"GET / HTTP/1.0\r\n\r\n";
    let with = |shape: u8, b: &[u8]| [&[shape][..], b].concat();
    let mut big = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    big.resize(8300, b'a');
    big.extend_from_slice(b"\r\n\r\n");
    vec![
        ("metrics".to_string(), with(0, prom)),
        ("metrics-bytewise".to_string(), with(1, prom)),
        ("metrics-7".to_string(), with(7, prom)),
        ("metrics-cut".to_string(), with(0, &prom[..prom.len() - 1])),
        ("healthz".to_string(), with(0, curl)),
        ("other".to_string(), with(0, other)),
        ("too-large".to_string(), with(130, &big)),
    ]
}

/// ClientHellos from herald's own client configuration (rustls, TLS 1.3,
/// ALPN `herald/1`) for the fuzz server's name, and from one offering
/// another ALPN protocol: whole, cut into pieces, the handshake message
/// split over two records, with a small write budget, and followed by the
/// client's close_notify alert. Bytes 0 and 1: see `herald_fuzz::check_tls`.
fn tls_seeds() -> Vec<(String, Vec<u8>)> {
    let ca = tls_dir().join("ca.pem");
    let cfg = herald::tls::client_config(Some(&ca)).expect("client config");
    let mut h2 = (*cfg).clone();
    h2.alpn_protocols = vec![b"h2".to_vec()];
    let hello = |cfg: std::sync::Arc<rustls::ClientConfig>| {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(cfg, name).expect("client");
        let mut out = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut out).expect("write");
        }
        out
    };
    let ch = hello(cfg);
    let other = hello(std::sync::Arc::new(h2));
    // The same handshake message in two records.
    let body = &ch[5..];
    let (a, b) = body.split_at(body.len() / 2);
    let mut split = Vec::new();
    for part in [a, b] {
        split.extend_from_slice(&[22, 3, 1]);
        split.extend_from_slice(&(part.len() as u16).to_be_bytes());
        split.extend_from_slice(part);
    }
    let close_notify = [21, 3, 3, 0, 2, 1, 0];
    let with = |shape: u8, budget: u8, parts: &[&[u8]]| [&[shape, budget][..], &parts.concat()].concat();
    vec![
        ("client-hello".to_string(), with(0, 0, &[&ch])),
        ("client-hello-bytewise".to_string(), with(1, 0, &[&ch])),
        ("client-hello-100".to_string(), with(100, 0, &[&ch])),
        ("client-hello-budget".to_string(), with(0, 4, &[&ch])),
        ("client-hello-split".to_string(), with(0, 0, &[&split])),
        ("client-hello-split-7".to_string(), with(7, 0, &[&split])),
        ("client-hello-close".to_string(), with(0, 0, &[&ch, &close_notify])),
        ("client-hello-h2".to_string(), with(0, 0, &[&other])),
    ]
}

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
//! checked-in `fuzz/seeds` changes nothing unless the samples changed.

use std::fs;
use std::path::{Path, PathBuf};

use herald::protocol::samples::{self, Sample};
use herald::protocol::token;
use herald_fuzz::{KEY, OTHER_KEY, TARGETS};

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

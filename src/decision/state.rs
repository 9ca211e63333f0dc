//! The admin settings a decision server keeps across restarts, and their
//! small text file.
//!
//! Everything else a decision server knows is soft state rebuilt from one
//! round of heartbeats (protocol.md §8); only what an operator set with
//! `herald admin` (§7.3) would be lost on a restart, so it is written to a
//! state file after every admin request and read back at start. The file is plain
//! text, one setting per line, so that an operator can read it and, with the
//! server stopped, edit it:
//!
//! ```text
//! # herald decision server admin settings
//! ceiling 40
//! ceiling node-2 50
//! capacity node-1 2000
//! drain node-3
//! seen 1767225600000 9123456789
//! ```
//!
//! `seen` lines are not settings: each is the (timestamp_ms, nonce) of an
//! ADMIN request the server took within the last 30 s, kept so that a
//! restarted server still refuses its replay (protocol.md §7.3). The server
//! writes the file after every admin request whose tag verifies, and drops
//! pairs that have left the window.
//!
//! Node ids are arbitrary bytes (protocol.md §1), so bytes outside printable
//! ASCII, and `%` itself, are written as `%XX`. Settings may name nodes that
//! the server has not (yet) seen. Parsing and rendering are pure;
//! [`load`] and [`save`] are the only functions here that touch the disk, and
//! [`save`] replaces the file atomically (write a temporary file, then
//! rename it over the old one), so a crash never leaves half a file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use crate::protocol::limits::MAX_NODE_ID_LEN;

/// What an operator has set with `herald admin`. `Default` is "nothing set".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// The global ceiling in percent, if an admin set one (otherwise the
    /// server's configured default applies).
    pub ceiling: Option<u8>,
    /// Per-node ceilings, percent (1..=100).
    pub node_ceiling: BTreeMap<Vec<u8>, u8>,
    /// Per-node capacity overrides (connections at 100 % load).
    pub capacity: BTreeMap<Vec<u8>, u32>,
    /// Nodes an admin drained.
    pub drained: BTreeSet<Vec<u8>>,
}

/// What the state file holds: the settings and the admin requests still
/// inside the replay window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// What an operator set.
    pub settings: Settings,
    /// ADMIN (timestamp_ms, nonce) pairs seen, sorted.
    pub admin_seen: Vec<(u64, u64)>,
}

impl State {
    /// The file form: [`Settings::render`], then one `seen` line per pair.
    pub fn render(settings: &Settings, admin_seen: &[(u64, u64)]) -> String {
        let mut s = settings.render();
        for (ts, nonce) in admin_seen {
            let _ = writeln!(s, "seen {ts} {nonce}");
        }
        s
    }

    /// Parses the file form (see [`Settings::parse`]; `seen` lines too).
    pub fn parse(text: &str) -> Result<State, StateError> {
        let mut st = State::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let bad = |reason: String| StateError::Parse { line, reason };
            match raw.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["seen", ts, nonce] => {
                    let n = |w: &str| w.parse::<u64>().map_err(|_| bad(format!("`{w}` is not a number")));
                    st.admin_seen.push((n(ts)?, n(nonce)?));
                }
                _ => st.settings.apply(raw, line)?,
            }
        }
        st.admin_seen.sort_unstable();
        st.admin_seen.dedup();
        Ok(st)
    }
}

/// Why a state file could not be used.
#[derive(Debug)]
pub enum StateError {
    /// The file exists but could not be read.
    Io(PathBuf, io::Error),
    /// A line is not a setting this version understands.
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Io(p, e) => write!(f, "cannot read state file {}: {e}", p.display()),
            StateError::Parse { line, reason } => write!(f, "state file line {line}: {reason}"),
        }
    }
}

impl std::error::Error for StateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StateError::Io(_, e) => Some(e),
            StateError::Parse { .. } => None,
        }
    }
}

impl Settings {
    /// Whether any setting names `node`.
    pub fn names(&self, node: &[u8]) -> bool {
        self.node_ceiling.contains_key(node)
            || self.capacity.contains_key(node)
            || self.drained.contains(node)
    }

    /// The file form: a comment line, then one setting per line in a stable
    /// order (global ceiling, node ceilings, capacities, drains).
    pub fn render(&self) -> String {
        let mut s = String::from("# herald decision server admin settings (written by the server)\n");
        if let Some(c) = self.ceiling {
            let _ = writeln!(s, "ceiling {c}");
        }
        for (n, c) in &self.node_ceiling {
            let _ = writeln!(s, "ceiling {} {c}", escape(n));
        }
        for (n, c) in &self.capacity {
            let _ = writeln!(s, "capacity {} {c}", escape(n));
        }
        for n in &self.drained {
            let _ = writeln!(s, "drain {}", escape(n));
        }
        s
    }

    /// Parses the file form. Blank lines and `#` comments are ignored; a
    /// later line for the same setting replaces an earlier one.
    pub fn parse(text: &str) -> Result<Settings, StateError> {
        let mut st = Settings::default();
        for (i, raw) in text.lines().enumerate() {
            st.apply(raw, i + 1)?;
        }
        Ok(st)
    }

    /// Applies one line of the file form (`line` is its 1-based number).
    fn apply(&mut self, raw: &str, line: usize) -> Result<(), StateError> {
        let bad = |reason: String| StateError::Parse { line, reason };
        let words: Vec<&str> = raw.split_whitespace().collect();
        match words.as_slice() {
            [] => {}
            [w, ..] if w.starts_with('#') => {}
            ["ceiling", pct] => self.ceiling = Some(percent(pct).map_err(bad)?),
            ["ceiling", node, pct] => {
                self.node_ceiling.insert(unescape(node).map_err(bad)?, percent(pct).map_err(bad)?);
            }
            ["capacity", node, n] => {
                let n: u32 = n.parse().map_err(|_| bad(format!("`{n}` is not a capacity")))?;
                self.capacity.insert(unescape(node).map_err(bad)?, n);
            }
            ["drain", node] => {
                self.drained.insert(unescape(node).map_err(bad)?);
            }
            _ => return Err(bad(format!("not a setting: `{}`", raw.trim()))),
        }
        Ok(())
    }
}

fn percent(s: &str) -> Result<u8, String> {
    match s.parse::<u8>() {
        Ok(p) if (1..=100).contains(&p) => Ok(p),
        _ => Err(format!("`{s}` is not a percentage in 1..=100")),
    }
}

/// Node id → one whitespace-free word: printable ASCII except `%` as is,
/// every other byte as `%XX`.
pub fn escape(id: &[u8]) -> String {
    let mut s = String::with_capacity(id.len());
    for &b in id {
        if b.is_ascii_graphic() && b != b'%' {
            s.push(b as char);
        } else {
            let _ = write!(s, "%{b:02X}");
        }
    }
    s
}

/// The inverse of [`escape`]; checks the node id length (1..=64 bytes).
pub fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(|| format!("bad escape in `{s}`"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape in `{s}`"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    if out.is_empty() || out.len() > MAX_NODE_ID_LEN {
        return Err(format!("node id `{s}` must be 1 to {MAX_NODE_ID_LEN} bytes"));
    }
    Ok(out)
}

/// Reads the settings and admin pairs from `path`. A missing file is an
/// empty state (the first start); any other failure is an error, so that a
/// server never silently forgets a drain.
pub fn load(path: &Path) -> Result<State, StateError> {
    match std::fs::read_to_string(path) {
        Ok(text) => State::parse(&text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(StateError::Io(path.to_owned(), e)),
    }
}

/// Writes the settings and admin pairs to `path` atomically: a temporary
/// file in the same directory, flushed to disk, then renamed over `path`.
pub fn save(path: &Path, st: &Settings, admin_seen: &[(u64, u64)]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let write = || -> io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(State::render(st, admin_seen).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    let r = write();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Settings {
        let mut s = Settings { ceiling: Some(40), ..Settings::default() };
        s.node_ceiling.insert(b"node-2".to_vec(), 50);
        s.capacity.insert(b"node-1".to_vec(), 2000);
        s.drained.insert(b"node-3".to_vec());
        s.drained.insert(b"odd id %\xff".to_vec());
        s
    }

    #[test]
    fn render_parse_round_trip() {
        let s = sample();
        let text = s.render();
        assert!(text.contains("\nceiling 40\n"), "{text}");
        assert!(text.contains("\nceiling node-2 50\n"), "{text}");
        assert!(text.contains("\ncapacity node-1 2000\n"), "{text}");
        assert!(text.contains("\ndrain node-3\n"), "{text}");
        assert!(text.contains("\ndrain odd%20id%20%25%FF\n"), "{text}");
        assert_eq!(Settings::parse(&text).unwrap(), s);
        assert_eq!(Settings::parse("").unwrap(), Settings::default());
    }

    #[test]
    fn parse_rejects_garbage() {
        for bad in [
            "ceiling 0",
            "ceiling 101",
            "ceiling n 0",
            "capacity n -1",
            "capacity n",
            "drain",
            "drain a b",
            "frobnicate",
            "drain %zz",
            "drain %4",
        ] {
            let e = Settings::parse(&format!("# ok\n{bad}\n")).unwrap_err();
            assert!(matches!(e, StateError::Parse { line: 2, .. }), "{bad}: {e}");
        }
        for bad in ["seen 1", "seen 1 2 3", "seen x 1", "seen 1 -1"] {
            let e = State::parse(&format!("# ok\n{bad}\n")).unwrap_err();
            assert!(matches!(e, StateError::Parse { line: 2, .. }), "{bad}: {e}");
        }
        let long = "x".repeat(65);
        assert!(Settings::parse(&format!("drain {long}")).is_err());
    }

    #[test]
    fn save_and_load_atomically() {
        let dir = std::env::temp_dir().join(format!("herald-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("decision.state");
        assert_eq!(load(&p).unwrap(), State::default(), "a missing file is empty");
        let s = sample();
        let seen = [(1_767_225_600_000, 1), (1_767_225_600_000, u64::MAX)];
        save(&p, &s, &seen).unwrap();
        assert_eq!(load(&p).unwrap(), State { settings: s.clone(), admin_seen: seen.to_vec() });
        save(&p, &Settings::default(), &[]).unwrap();
        assert_eq!(load(&p).unwrap(), State::default());
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Helpers shared by the command-line tools: secrets from files,
//! human-friendly durations, and the signal thread of the servers (stop on
//! SIGINT/SIGTERM, reload TLS certificates on SIGHUP). Kept in the library
//! so they are tested.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// Minimum secret length, in bytes, after trimming.
pub const MIN_SECRET_LEN: usize = 16;

/// Why a secret file could not be used.
#[derive(Debug)]
pub enum SecretError {
    /// The file could not be read.
    Io(std::path::PathBuf, std::io::Error),
    /// The secret is shorter than [`MIN_SECRET_LEN`] bytes.
    TooShort(std::path::PathBuf, usize),
}

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretError::Io(p, e) => write!(f, "cannot read secret file {}: {e}", p.display()),
            SecretError::TooShort(p, n) => {
                write!(f, "secret in {} is {n} bytes; at least {MIN_SECRET_LEN} are required", p.display())
            }
        }
    }
}

impl std::error::Error for SecretError {}

/// Reads a secret: the file's bytes with trailing whitespace (a newline from
/// `echo`) removed. Refuses secrets shorter than 16 bytes.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, SecretError> {
    let mut s = std::fs::read(path).map_err(|e| SecretError::Io(path.to_owned(), e))?;
    while s.last().is_some_and(|c| c.is_ascii_whitespace()) {
        s.pop();
    }
    if s.len() < MIN_SECRET_LEN {
        return Err(SecretError::TooShort(path.to_owned(), s.len()));
    }
    Ok(s)
}

/// Parses `250ms`, `90s`, `30m`, `1h`, `7d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("`{s}` is not a duration like 90s, 30m or 1h"))?;
    let ms = match unit {
        "ms" => n,
        "" | "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        _ => return Err(format!("unknown unit `{unit}` in `{s}`; use ms, s, m, h or d")),
    };
    Ok(Duration::from_millis(ms))
}

/// Writes a duration the way [`parse_duration`] reads it, in the largest
/// unit that divides it (`10s`, `1m`, `250ms`); below a millisecond is cut.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".to_owned(),
        _ if ms.is_multiple_of(86_400_000) => format!("{}d", ms / 86_400_000),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

/// A duration argument: parsed by [`parse_duration`] and shown by
/// [`format_duration`], so that clap's `default_value_t` can take it from a
/// `Config` and `--help` shows it the way the flag is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CliDuration(pub Duration);

impl FromStr for CliDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_duration(s).map(CliDuration)
    }
}

impl fmt::Display for CliDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

/// Handles a server's signals on a thread of its own: SIGINT and SIGTERM
/// call `stop` (which only sets a flag and wakes the loops); SIGHUP reloads
/// the TLS certificates and keys in `tls`: new handshakes use the new
/// certificate, sessions already up keep theirs, and a bad new file leaves
/// the old certificate in use. Every outcome is logged, each line starting
/// with `who` (`herald node n1`, `herald decision`).
pub fn handle_signals(
    who: String,
    tls: crate::tls::Reload,
    stop: impl Fn() + Send + 'static,
) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new().name("herald-signals".into()).spawn(move || {
        for sig in signals.forever() {
            if sig != SIGHUP {
                stop();
                continue;
            }
            if tls.is_empty() {
                log::info!("{who}: SIGHUP: no TLS certificate to reload");
            }
            for (path, r) in tls.reload() {
                match r {
                    Ok(()) => log::info!("{who}: reloaded the TLS certificate {}", path.display()),
                    Err(e) => {
                        log::error!("{who}: TLS reload refused, the old certificate stays in use: {e}")
                    }
                }
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn durations_format_as_they_parse() {
        for s in ["0s", "250ms", "1500ms", "1s", "10s", "90s", "1m", "30m", "1h", "25h", "7d"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
            assert_eq!(s.parse::<CliDuration>().unwrap().to_string(), s);
        }
        assert_eq!(format_duration(Duration::from_secs(60)), "1m");
        assert_eq!(format_duration(Duration::from_micros(1500)), "1ms");
        assert!("5y".parse::<CliDuration>().is_err());
    }

    #[test]
    fn secrets_are_trimmed_and_checked() {
        let dir = std::env::temp_dir().join(format!("herald-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s");
        std::fs::write(&p, "0123456789abcdef\n").unwrap();
        assert_eq!(read_secret(&p).unwrap(), b"0123456789abcdef");
        std::fs::write(&p, "short\n").unwrap();
        assert!(matches!(read_secret(&p), Err(SecretError::TooShort(_, 5))));
        assert!(matches!(read_secret(&dir.join("missing")), Err(SecretError::Io(..))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! `herald`: the command-line front end. Parses arguments and calls into the
//! library; no logic lives here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};

use herald::cli::{parse_duration, read_secret};

#[derive(Parser)]
#[command(name = "herald", version, about = "Low-latency personal push messaging")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mint a client (or publisher) token: v1.<user>.<expiry>.<hmac>.
    Token {
        /// File holding the shared secret (trailing whitespace is ignored).
        #[arg(long)]
        secret_file: PathBuf,
        /// The user id (or publisher name) the token is for.
        #[arg(long)]
        user: String,
        /// How long the token is valid: 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: std::time::Duration,
    },
    /// Print the herald and protocol versions.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Token { secret_file, user, ttl } => {
            let secret = match read_secret(&secret_file) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("herald token: {e}");
                    return ExitCode::from(2);
                }
            };
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            match herald::protocol::token::mint(&secret, user.as_bytes(), now + ttl.as_secs()) {
                Some(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("herald token: the user id must be 1 to 64 bytes");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Version => {
            println!("herald {} (protocol version {})", env!("CARGO_PKG_VERSION"), herald::protocol::VERSION);
            ExitCode::SUCCESS
        }
    }
}

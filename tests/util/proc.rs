//! A `herald` child process for tests: spawned with its stderr piped, the
//! first line (where the binaries print their bound addresses) read at
//! once, the rest collected on a thread (and echoed with
//! `HERALD_TEST_LOG=1`). Killed on drop.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

pub struct Proc {
    pub child: Child,
    /// The first line of stderr.
    pub first_line: String,
    log: Option<JoinHandle<Vec<String>>>,
}

impl Proc {
    /// Runs `herald ARGS` in `dir` (or here) and reads its first stderr line.
    pub fn spawn<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>, dir: Option<&Path>) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(args);
        if let Some(d) = dir {
            cmd.current_dir(d);
        }
        Proc::start(cmd)
    }

    /// Runs `cmd` (which must end up running herald, e.g. through `sh -c
    /// "ulimit … && exec herald …"`) and reads its first stderr line.
    pub fn start(mut cmd: Command) -> Proc {
        let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut first_line = String::new();
        err.read_line(&mut first_line).unwrap();
        let log = std::thread::spawn(move || {
            let echo = std::env::var_os("HERALD_TEST_LOG").is_some();
            err.lines()
                .map_while(Result::ok)
                .inspect(|l| {
                    if echo {
                        eprintln!("  | {l}");
                    }
                })
                .collect()
        });
        Proc { child, first_line, log: Some(log) }
    }

    /// The words after `marker` in the first line, up to a ',' or its end.
    pub fn after(&self, marker: &str) -> Option<String> {
        after(&self.first_line, marker)
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// Kills with SIGKILL, as a crash would, and reaps it.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Waits for the exit; returns its status and the rest of stderr.
    pub fn wait(&mut self) -> (ExitStatus, Vec<String>) {
        let status = self.child.wait().unwrap();
        let log = self.log.take().map(|t| t.join().unwrap()).unwrap_or_default();
        (status, log)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `herald decision` on loopback, both ports picked by the OS, with these
/// secret files; add more flags after it.
pub fn decision_args(cluster_secret: &Path, admin_secret: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> =
        ["decision", "--listen", "127.0.0.1:0", "--heartbeat", "127.0.0.1:0", "--cluster-secret-file"]
            .map(Into::into)
            .into();
    v.push(cluster_secret.into());
    v.push("--admin-secret-file".into());
    v.push(admin_secret.into());
    v
}

/// The words after `marker` in `line`, up to the next ',' or the end of the line.
pub fn after(line: &str, marker: &str) -> Option<String> {
    let rest = line.split(marker).nth(1)?;
    Some(rest.split([',', '\n']).next()?.trim().to_owned())
}

/// A fresh directory `herald-NAME-PID` under the temp dir holding the
/// secret files `client`, `publisher` (the test secrets), `cluster` and
/// `admin`, as cluster tests start their processes with.
pub fn secrets_dir(name: &str, cluster: &[u8], admin: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (f, s) in [
        ("client", super::CLIENT_SECRET),
        ("publisher", super::PUBLISHER_SECRET),
        ("cluster", cluster),
        ("admin", admin),
    ] {
        std::fs::write(dir.join(f), s).unwrap();
    }
    dir
}

//! openapi.yaml against a running node: schemathesis (from PyPI; `.ci/run`
//! installs it into `target/ci-venv`) generates requests from the spec,
//! valid and invalid, sends them to a node's `--http` port and fails when
//! an answer is not what the spec says (status, headers, body schema), when
//! a valid request is refused or an invalid one accepted, or on a 5xx.
//! Without schemathesis the test is skipped with the reason printed.

mod util;

use std::path::PathBuf;
use std::process::Command;

use herald::node::{Config, Node};
use util::*;

/// schemathesis: `$HERALD_SCHEMATHESIS`, `target/ci-venv`, or on the PATH.
fn schemathesis() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HERALD_SCHEMATHESIS") {
        return Some(p.into());
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv/bin/schemathesis");
    if venv.exists() {
        return Some(venv);
    }
    Command::new("schemathesis").arg("--version").output().ok().filter(|o| o.status.success())?;
    Some("schemathesis".into())
}

#[test]
fn the_openapi_description_matches_the_server() {
    let Some(st) = schemathesis() else {
        // Straight to the process's stderr: the harness captures eprintln!,
        // and a skip must not pass unseen.
        let msg = "SKIP: the_openapi_description_matches_the_server: schemathesis not found \
                   (.ci/run installs it: python3 -m venv target/ci-venv && target/ci-venv/bin/pip install schemathesis)\n";
        let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
        return;
    };
    let node = Node::bind(Config { http: Some("127.0.0.1:0".parse().unwrap()), ..test_config() }).unwrap();
    let http = node.http_addr().unwrap();
    let handle = node.shutdown_handle();
    let t = std::thread::spawn(move || node.run());
    let spec = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml");
    // ASCII strings: the spec's lengths are characters, herald's bytes; for
    // ASCII they are the same. Deterministic, so CI runs the same cases.
    let out = Command::new(&st)
        .args(["run", spec.to_str().unwrap(), "--url", &format!("http://{http}")])
        .args(["-H", &format!("Authorization: Bearer {}", pub_credential())])
        .args(["--checks", "all", "--max-examples", "100", "--workers", "1", "--max-time", "20"])
        .args(["--generation-codec", "ascii", "--generation-deterministic", "--no-color"])
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run schemathesis");
    handle.trigger();
    let _ = t.join();
    let text = String::from_utf8_lossy(&out.stdout);
    let tail: String =
        text.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    eprintln!("{tail}");
    assert!(
        out.status.success(),
        "schemathesis found disagreements:\n{}\n{}",
        text.chars().take(20_000).collect::<String>(),
        String::from_utf8_lossy(&out.stderr)
    );
}

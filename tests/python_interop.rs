//! protocol.md is enough to write a client in another language: a Python
//! client written from the spec alone (tests/python/) talks to the real
//! node binary, and checks every test vector. Needs `python3` (3.8+), which
//! the CI machine has.

use std::process::Command;

#[test]
fn python_client_written_from_the_spec_interoperates() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python");
    let out = Command::new("python3")
        .arg("interop_test.py")
        .current_dir(dir)
        .env("HERALD_BIN", env!("CARGO_BIN_EXE_herald"))
        // Also run the end-to-end conflation checks (a node of its own run
        // with --slow-policy conflate, protocol.md §5.7).
        .env("HERALD_SLOW_POLICY", "conflate")
        .output()
        .expect("python3 must be installed to run the interop test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "interop test failed:\n{stdout}\n{stderr}");
    let last = stdout.lines().rev().find(|l| l.contains("passed")).unwrap_or("");
    assert!(last.ends_with(", 0 failed"), "{last}");
}

//! `herald demo` as a user runs it: it must finish green, with and without
//! a node killed halfway, over TLS (the default) and with `--plaintext`.

use std::process::Command;

fn demo(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_herald")).arg("demo").args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn demo_finishes_green() {
    let (ok, out) = demo(&["--clients", "200", "--duration", "3s"]);
    assert!(ok, "{out}");
    assert!(out.contains("OK: every message reached its own user"), "{out}");
    assert!(out.contains("wrong user         0"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("t=") && l.contains("n1:") && l.contains("n2:")), "{out}");
    assert!(
        out.contains("TLS 1.3 on every client, publisher, mesh and decision-server connection"),
        "TLS by default: {out}"
    );
    let dir =
        out.split("throwaway CA in ").nth(1).and_then(|r| r.split(';').next()).expect("names its CA dir");
    assert!(!std::path::Path::new(dir).exists(), "the throwaway CA {dir} is removed at the end");
}

#[test]
fn demo_plaintext_finishes_green() {
    let (ok, out) = demo(&["--clients", "200", "--duration", "2s", "--plaintext"]);
    assert!(ok, "{out}");
    assert!(out.contains("plaintext: no TLS"), "{out}");
    assert!(!out.contains("throwaway CA"), "{out}");
    assert!(out.contains("OK: every message reached its own user"), "{out}");
}

#[test]
fn demo_with_chaos_rehomes_the_killed_nodes_clients() {
    let (ok, out) = demo(&["--clients", "200", "--duration", "4s", "--chaos"]);
    assert!(ok, "{out}");
    assert!(out.contains("chaos: killing node n1"), "{out}");
    assert!(out.contains("chaos: all 200 clients live again"), "{out}");
    assert!(out.contains("lost, unannounced  0"), "{out}");
}

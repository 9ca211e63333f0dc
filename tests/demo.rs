//! `herald demo` as a user runs it: it must finish green, with and without
//! a node killed halfway.

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
}

#[test]
fn demo_with_chaos_rehomes_the_killed_nodes_clients() {
    let (ok, out) = demo(&["--clients", "200", "--duration", "4s", "--chaos"]);
    assert!(ok, "{out}");
    assert!(out.contains("chaos: killing node n1"), "{out}");
    assert!(out.contains("chaos: all 200 clients live again"), "{out}");
    assert!(out.contains("lost, unannounced  0"), "{out}");
}

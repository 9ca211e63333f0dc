#!/usr/bin/env bash
# The fuzz step of .ci/run: every fuzz target for FUZZ_SECS seconds each
# (default 30) from the committed seeds (fuzz/README.md, "CI"). Skipped,
# with the reason printed and exit status 0, when its tools are missing
# (cargo-fuzz not installable, no compiler that takes -Z flags, no C++
# compiler for libFuzzer); a build failure or a crash fails it (the crash's
# artifact path is printed). FUZZ_SECS=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzz_skip() {
    echo "== fuzz: SKIPPED: $*"
    exit 0
}

fuzz_secs=${FUZZ_SECS:-30}
[ "$fuzz_secs" = 0 ] && fuzz_skip "FUZZ_SECS=0"
echo "== fuzz: $fuzz_secs s per target"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== fuzz: cargo-fuzz missing: cargo install cargo-fuzz --locked (about 1 min)"
    t0=$(date +%s)
    cargo install cargo-fuzz --locked --quiet || fuzz_skip "cargo install cargo-fuzz failed"
    echo "== fuzz: cargo-fuzz installed in $(($(date +%s) - t0)) s"
fi
command -v c++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 ||
    fuzz_skip "no C++ compiler to build libFuzzer (libfuzzer-sys)"

# cargo-fuzz passes -Z flags. The CI's own stable toolchain takes them with
# RUSTC_BOOTSTRAP=1 (run_all.sh sets it); a nightly is the fallback. Probe
# with what cargo fuzz asks of rustc: ASan and sanitizer coverage; without
# the ASan runtime, no sanitizer.
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
echo 'fn main() {}' >"$probe/p.rs"
works() { # TOOLCHAIN SANITIZER (linked with ASan; without, as a library:
    # the coverage hooks come from libFuzzer or the ASan runtime)
    local how=(-Zsanitizer="$2" -o "$probe/p")
    [ "$2" = none ] && how=(-Zunstable-options --crate-type rlib --out-dir "$probe")
    RUSTUP_TOOLCHAIN=$1 RUSTC_BOOTSTRAP=1 rustc --edition 2021 "$probe/p.rs" \
        -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 "${how[@]}" >"$probe/log" 2>&1
}
toolchain= sanitizer=
for tc in "$(rustup show active-toolchain 2>/dev/null | cut -d' ' -f1)" nightly; do
    [ -n "$tc" ] || continue
    if works "$tc" address; then toolchain=$tc sanitizer=address; break; fi
    if works "$tc" none; then toolchain=$tc sanitizer=none; break; fi
done
[ -n "$toolchain" ] || fuzz_skip "no toolchain takes -Z flags with RUSTC_BOOTSTRAP=1 or as nightly: $(tail -1 "$probe/log")"
echo "== fuzz: toolchain $toolchain, sanitizer $sanitizer"
t0=$(date +%s)
# A crash fails here; run_all.sh prints the artifact's path.
RUSTUP_TOOLCHAIN=$toolchain FUZZ_SANITIZER=$sanitizer fuzz/run_all.sh "$fuzz_secs"
echo "== fuzz: passed in $(($(date +%s) - t0)) s (build and runs)"

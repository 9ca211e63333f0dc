#!/usr/bin/env bash
# Runs every herald fuzz target in turn, one process, one job each.
#
#   fuzz/run_all.sh [SECONDS] [TARGET...]     (from the repository root)
#
# SECONDS defaults to 600 per target. FUZZ_SANITIZER (default: address) is
# passed to cargo fuzz build -s (none: no sanitizer). Logs go to fuzz/logs/<target>.log,
# new corpus entries to fuzz/corpus/<target>/ (fuzz/seeds/<target>/ is read
# as an extra, read-only corpus), crashes to fuzz/artifacts/<target>/.
# Equivalent, one target at a time:
#   RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/corpus/TARGET fuzz/seeds/TARGET -- -max_total_time=600
set -u
cd "$(dirname "$0")/.."
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(decode_to_node decode_to_client decode_ingest decode_decision token_verify http_request tls_server)
export RUSTC_BOOTSTRAP=1   # cargo-fuzz needs -Z flags; the machine has only stable
mkdir -p fuzz/logs
cargo fuzz build -s "${FUZZ_SANITIZER:-address}" || exit 1
bin=fuzz/target/x86_64-unknown-linux-gnu/release
status=0
for t in "${targets[@]}"; do
    extra=()
    case $t in
        # Channels whose frames may exceed 4 KiB: let inputs grow past the
        # 64 KiB payload limit.
        decode_to_client | decode_ingest | decode_decision) extra=(-max_len=131072) ;;
        # Past the 8 KiB head limit.
        http_request) extra=(-max_len=16384) ;;
        # Past the 64 KiB of a handshake message the session may carry over.
        tls_server) extra=(-max_len=131072) ;;
    esac
    mkdir -p "fuzz/corpus/$t"
    start=$(date -u +%FT%TZ); s0=$(date +%s)
    echo "== $t start $start" | tee "fuzz/logs/$t.log"
    # The binary `cargo fuzz run` would start, started directly so that edits
    # elsewhere in the crate during a long run never trigger a rebuild.
    mkdir -p "fuzz/artifacts/$t"
    "$bin/$t" -artifact_prefix="fuzz/artifacts/$t/" -max_total_time="$secs" -print_final_stats=1 \
        "${extra[@]}" "fuzz/corpus/$t" "fuzz/seeds/$t" >>"fuzz/logs/$t.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        status=$rc
        for a in "fuzz/artifacts/$t"/*; do
            [ -e "$a" ] && echo "== $t FAILED: artifact $a (replay: $bin/$t $a)"
        done
    fi
    echo "== $t end $(date -u +%FT%TZ) wall $(( $(date +%s) - s0 ))s rc $rc" | tee -a "fuzz/logs/$t.log"
done
exit $status

#!/usr/bin/env bash
# Builds every cargo-fuzz target and runs each for SECONDS (default 30) with -max_total_time, one libFuzzer
# job at a time. Fails (exit 1) on any crash, panic, leak, timeout or out-of-memory; prints executions per
# target. Usage: fuzz/run.sh [SECONDS] [TARGET...]      (see fuzz/README.md)
#
# Environment: FUZZ_TOOLCHAIN (default "nightly"), FUZZ_NICE (default 0; e.g. 15 on a shared machine),
# FUZZ_ARGS (extra libFuzzer flags, e.g. "-max_len=65536").
set -uo pipefail

secs=${1:-30}
shift || true
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
tc=${FUZZ_TOOLCHAIN:-nightly}
nice_level=${FUZZ_NICE:-0}

if ! cargo +"$tc" fuzz --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: cargo-fuzz is not installed for toolchain $tc (cargo install cargo-fuzz)" >&2
    exit 2
fi

if [ "$#" -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo +"$tc" fuzz list); fi

echo "== building ${#targets[@]} fuzz targets (release + debug assertions and overflow checks, AddressSanitizer)"
nice -n "$nice_level" cargo +"$tc" fuzz build || exit 1

mkdir -p logs
failed=()
summary=()
total=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "seeds/$t" "artifacts/$t"
    log="logs/$t.log"
    echo "== $t: ${secs}s (corpus/$t, seeds from seeds/$t)"
    # shellcheck disable=SC2086
    nice -n "$nice_level" cargo +"$tc" fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -timeout=60 -rss_limit_mb=2048 -print_final_stats=1 -len_control=0 ${FUZZ_ARGS:-} \
        >"$log" 2>&1
    rc=$?
    execs=$(grep -m1 '^stat::number_of_executed_units:' "$log" | awk '{print $2}')
    execs=${execs:-0}
    total=$((total + execs))
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        summary+=("$(printf '%-16s %12s  FAILED (rc %s, log fuzz/%s)' "$t" "$execs" "$rc" "$log")")
        echo "---- $t failed; last lines of fuzz/$log:"
        tail -n 40 "$log"
        ls "artifacts/$t" 2>/dev/null | sed "s|^|artifact: fuzz/artifacts/$t/|"
    else
        summary+=("$(printf '%-16s %12s  ok' "$t" "$execs")")
    fi
done

echo "== fuzz summary (${secs}s per target)"
printf '%-16s %12s\n' target executions
printf '%s\n' "${summary[@]}"
echo "total executions: $total"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED: ${failed[*]} (reproduce: cd fuzz && cargo +$tc fuzz run TARGET artifacts/TARGET/crash-...)" >&2
    exit 1
fi

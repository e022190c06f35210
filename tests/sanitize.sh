#!/usr/bin/env bash
# compute-sanitizer over a reduced GPU parity matrix (tests/test_backends_gpu.py) and the
# adversarial-metadata tests (tests/test_guard_gpu.py), one tool per pass: memcheck, racecheck,
# initcheck, synccheck. Prints each tool's error count; exits non-zero on any error, on a test
# failure under a tool, or when a tool printed no summary at all.
#
#   tests/sanitize.sh                       # all four tools
#   SANITIZE_TOOLS="memcheck" tests/sanitize.sh
#
# Environment: COMPUTE_SANITIZER (the binary; default: PATH, then /usr/local/cuda*/bin),
# PYTHON (default python3), SANITIZE_TOOLS, SANITIZE_SELECT (the -k expression for the parity
# matrix), SANITIZE_LOG_DIR (default tests/results/sanitize), SANITIZE_WARMUP=0 (skip the plain
# pytest run that first builds the -lineinfo kernels and proves the selection passes).
#
# Notes on running CuPy under compute-sanitizer:
# - --target-processes all: every process pytest starts is checked too.
# - Kernels are built with -lineinfo (CUPY_PAGED_LINEINFO=1, their own cache entries), so
#   reports name source lines.
# - memcheck runs without --leak-check: CuPy's memory pool keeps its blocks until exit, which
#   would be reported as leaks of the pool, not of this library.
# - initcheck runs with CuPy's memory pool switched off (cupy.cuda.set_allocator(None)): with
#   the pool on, a block reused from an earlier array counts as initialised and a read of
#   memory this call never wrote goes unseen. No suppressions are applied to any tool.
# - racecheck checks shared memory only (global-memory races are not its business); its
#   warnings (potential hazards) count as failures too.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TOOLS=${SANITIZE_TOOLS:-"memcheck racecheck initcheck synccheck"}
LOG_DIR=${SANITIZE_LOG_DIR:-tests/results/sanitize}
# Both backends; fp16 over every code path the matrix has (head sizes 32..256, block sizes 1,
# 16, 32, 256, GQA/MQA, partial rotary, window, softcap, mea's float32 output workspace at
# H 256, flash split-KV on the long decode, q_len 0, unmapped rows, shared prefixes, B 257),
# plus one bf16 case.
SELECT=${SANITIZE_SELECT:-"((m0_ or m3_ or m5_ or m8_ or m14_ or long_decode or qlen0_everywhere or unmapped_rows or shared_prefix or batch257_decode) and not bfloat16) or (m8_ and bfloat16)"}

SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}
if [ -z "$SANITIZER" ]; then
    SANITIZER=$(ls -d /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
fi
if [ -z "$SANITIZER" ] || [ ! -x "$SANITIZER" ]; then
    echo "sanitize.sh: compute-sanitizer not found (set COMPUTE_SANITIZER)" >&2
    exit 2
fi

TARGETS=(tests/test_backends_gpu.py)
if [ -f tests/test_guard_gpu.py ]; then
    TARGETS+=(tests/test_guard_gpu.py)
else
    echo "sanitize.sh: tests/test_guard_gpu.py not found; running the parity selection only" >&2
fi

export CUPY_PAGED_LINEINFO=1 CUPY_PAGED_QUIET=1 PYTHONUNBUFFERED=1
mkdir -p "$LOG_DIR"
# -k SELECT applies to the parity file only: the guard file runs whole (its ids are its own)
# except its timing test.
PYTEST_ARGS=(-q -m gpu -p no:cacheprovider)

run_pytest() {  # run_pytest <command that takes pytest's arguments...>: parity, then guard
    local rc=0
    "$@" "${PYTEST_ARGS[@]}" tests/test_backends_gpu.py -k "$SELECT" || rc=$?
    if [ "${#TARGETS[@]}" -gt 1 ]; then
        # the guard's timing test measures the sanitizer, not the guard: deselected here
        "$@" "${PYTEST_ARGS[@]}" "${TARGETS[@]:1}" -k "not cost_is_small" || rc=$?
    fi
    return $rc
}

# A Python that runs pytest with CuPy's memory pool off (for initcheck).
NO_POOL_PY=$(mktemp)
trap 'rm -f "$NO_POOL_PY"' EXIT
cat > "$NO_POOL_PY" <<'EOF'
import sys

import cupy
import pytest

cupy.cuda.set_allocator(None)
cupy.cuda.set_pinned_memory_allocator(None)
sys.exit(pytest.main(sys.argv[1:]))
EOF

if [ "${SANITIZE_WARMUP:-1}" != "0" ]; then
    echo "== warm-up (no sanitizer): build the -lineinfo kernels, check the selection passes"
    if ! run_pytest "$PYTHON" -m pytest > "$LOG_DIR/warmup.log" 2>&1; then
        tail -n 30 "$LOG_DIR/warmup.log"
        echo "sanitize.sh: the selection fails without a sanitizer; see $LOG_DIR/warmup.log" >&2
        exit 1
    fi
    tail -n 1 "$LOG_DIR/warmup.log"
fi

status=0
summary=()
for tool in $TOOLS; do
    log="$LOG_DIR/$tool.log"
    extra=()
    runner=("$PYTHON" -m pytest)
    case "$tool" in
        racecheck) extra=(--racecheck-report all) ;;
        initcheck) runner=("$PYTHON" "$NO_POOL_PY") ;;
    esac
    echo "== $tool"
    start=$(date +%s)
    rc=0
    run_pytest "$SANITIZER" --tool "$tool" --target-processes all --print-limit 200 \
        ${extra[@]+"${extra[@]}"} "${runner[@]}" > "$log" 2>&1 || rc=$?
    seconds=$(( $(date +%s) - start ))
    # "ERROR SUMMARY: N errors" (memcheck, initcheck, synccheck; one per checked process) and
    # "RACECHECK SUMMARY: H hazards displayed (E errors, W warnings)".
    errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+ error' "$log" | awk '{s += $3} END {print s + 0}')
    races=$(grep -Eo 'RACECHECK SUMMARY: .*\([0-9]+ error' "$log" \
            | grep -Eo '\([0-9]+' | tr -d '(' | awk '{s += $1} END {print s + 0}')
    warnings=$(grep -Eo 'RACECHECK SUMMARY: .*[0-9]+ warning' "$log" \
            | grep -Eo '[0-9]+ warning' | awk '{s += $1} END {print s + 0}')
    summaries=$(grep -Ec '(ERROR|RACECHECK) SUMMARY' "$log")
    total=$errors
    if [ "$tool" = racecheck ] && grep -q 'RACECHECK SUMMARY' "$log"; then
        total=$((races + warnings))   # warnings fail too: the selection has none (session 3)
    fi
    tests=$(grep -E '(passed|failed|errors?|skipped|deselected).* in [0-9.]+s' "$log" \
            | tr '\n' ' ')
    line="$tool: $total errors"
    [ "$tool" = racecheck ] && line="$tool: $races errors, $warnings warnings"
    line="$line; pytest rc $rc; ${seconds} s; ${tests:-no pytest summary}"
    if [ "$summaries" -eq 0 ]; then
        line="$line; NO SANITIZER SUMMARY (did the tool run?)"
        status=1
    fi
    if [ "$total" -ne 0 ] || [ "$rc" -ne 0 ]; then
        status=1
        grep -E '^=========' "$log" | grep -Ev 'SUMMARY|^========= *$' | head -n 20
    fi
    echo "$line"
    summary+=("$line")
done

echo
echo "== compute-sanitizer summary (logs in $LOG_DIR)"
printf '%s\n' "${summary[@]}"
exit $status

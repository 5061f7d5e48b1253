#!/usr/bin/env bash
# Rank 2 of a 4-rank data-parallel training run is killed with SIGKILL (or hangs) at the start of
# its third iteration. The survivors must stop within their 3 s timeout, say that rank 2 failed,
# and leave the run in the results database as failed with that reason (and no metrics).
# usage: rank_fault_test.sh kill|hang MPIEXEC PARALLAX WORKDIR
set -uo pipefail
mode=$1 mpiexec=$2 parallax=$3 dir=$4
rm -rf "$dir" && mkdir -p "$dir"
start=$(date +%s)
PARALLAX_FAULT=$mode:2:2 "$mpiexec" -np 4 --oversubscribe --enable-recovery "$parallax" train --model tiny-gpt --dp 4 \
  --global-batch 4 --micro-batch 1 --seq-length 32 --iterations 6 --timeout 3 --out "$dir/run" --db "$dir/results.db" \
  > "$dir/log.txt" 2>&1
code=$?
elapsed=$(( $(date +%s) - start ))
cat "$dir/log.txt"
fail() { echo "FAIL: $*"; exit 1; }
# (mpirun --enable-recovery may exit 0 after MPI_Abort, so the abort is checked in the log: its
# banner, or, when several survivors abort at once and mpirun's help aggregation fails on it
# (ORTE_ERROR_LOG in show_help.c), the survivors' own last words before aborting)
grep -q "MPI_ABORT was invoked" "$dir/log.txt" || grep -q "^parallax: rank 2 failed first" "$dir/log.txt" ||
  fail "the job was not aborted (exit code $code)"
[ "$elapsed" -lt 30 ] || fail "the job took ${elapsed} s to stop"
grep -q "rank 2" "$dir/log.txt" || fail "no line names rank 2"
row=$(sqlite3 "$dir/results.db" "SELECT status || '|' || failure_reason FROM runs")
echo "runs row: $row"
[[ "$row" == failed\|*"rank 2"* ]] || fail "the run is not recorded as failed naming rank 2"
[ "$(sqlite3 "$dir/results.db" "SELECT count(*) FROM metrics")" = 0 ] || fail "a failed run kept metrics"
echo "1 passed, 0 failed"

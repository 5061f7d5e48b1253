#!/usr/bin/env bash
# The simulator against the engine: 12 CPU training runs over different plans (dp, tp, tp+sp, pp
# with four schedules, cp, ep, ZeRO), at most 2 ranks (one per core of this machine, so ranks do
# not time-share). Each run's traces calibrate its op costs, a comm benchmark its collectives and
# messages; the replay of the same plan (in-order issue, as the CPU engine runs) on the
# cpu-local cluster must predict the run's measured iteration (the slowest rank's span, median over
# the traced iterations): median |error| <= 3%, max <= 8%.
# usage: benchmarks/replay_vs_engine.sh MPIEXEC PARALLAX COMM_BENCH WORKDIR
#   e.g. benchmarks/replay_vs_engine.sh mpirun build/engine/cli/parallax build/benchmarks/comm_bench /tmp/rve
# Run it on an otherwise idle machine: the runs are timed.
set -uo pipefail
mpiexec=$1 parallax=$2 comm_bench=$3 dir=$4
rm -rf "$dir" && mkdir -p "$dir"
plans=(
  "1|tiny-gpt|--dp 1 --global-batch 4 --micro-batch 2"
  "1|tiny-llama|--dp 1 --global-batch 4 --micro-batch 1"
  "2|tiny-gpt|--dp 2 --global-batch 8 --micro-batch 2"
  "2|tiny-gpt|--dp 2 --zero 1 --global-batch 8 --micro-batch 2"
  "2|tiny-gpt|--tp 2 --dp 1 --global-batch 4 --micro-batch 2"
  "2|tiny-llama|--tp 2 --dp 1 --sp --global-batch 4 --micro-batch 2"
  "2|tiny-gpt-deep|--pp 2 --dp 1 --global-batch 8 --micro-batch 1"
  "2|tiny-gpt-deep|--pp 2 --dp 1 --schedule gpipe --global-batch 8 --micro-batch 1"
  "2|tiny-gpt-deep|--pp 2 --dp 1 --schedule interleaved-1f1b --virtual-stages 2 --global-batch 8 --micro-batch 1"
  "2|tiny-gpt-deep|--pp 2 --dp 1 --schedule zero-bubble --global-batch 8 --micro-batch 1"
  "2|tiny-llama|--cp 2 --dp 1 --global-batch 4 --micro-batch 1"
  "2|tiny-moe|--dp 2 --ep 2 --global-batch 4 --micro-batch 1"
)
# The collectives' and messages' own cost on this machine, for the profiles.
"$mpiexec" -np 2 --oversubscribe "$comm_bench" -b 4 -e 4194304 -f 4 -n 100 -w 10 -c all --json "$dir/comm.json" > "$dir/comm.log" 2>&1 ||
  { cat "$dir/comm.log"; echo "FAIL: comm benchmark"; exit 1; }
errors=()
printf "%-14s %-78s %10s %10s %8s\n" model plan measured predicted error
for i in "${!plans[@]}"; do
  IFS='|' read -r np model flags <<< "${plans[$i]}"
  run="$dir/run$i"
  # shellcheck disable=SC2086
  "$mpiexec" -np "$np" --oversubscribe "$parallax" train --model "$model" $flags --iterations 34 --trace-iterations 30 \
    --out "$run" --log-every 1000 > "$run.log" 2>&1 || { cat "$run.log"; echo "FAIL: training run $i"; exit 1; }
  # shellcheck disable=SC2086
  "$parallax" calibrate --model "$model" $flags --traces "$run"/trace_rank*.json --comm-bench "$dir/comm.json" \
    --out "$run/profile.json" > /dev/null || exit 1
  # shellcheck disable=SC2086
  out=$("$parallax" simulate --model "$model" --cluster cpu-local $flags --precision fp32 --profile "$run/profile.json" --in-order-issue --json) || exit 1
  predicted=$(sed -n 's/^  "iteration_s": \([0-9.e+-]*\),*$/\1/p' <<< "$out")
  measured=$(sed -n 's/^  "profile_measured_iteration_s": \([0-9.e+-]*\),*$/\1/p' <<< "$out")
  err=$(awk -v p="$predicted" -v m="$measured" 'BEGIN { printf "%.4f", (p - m) / m }')
  errors+=("$err")
  printf "%-14s %-78s %8.3fms %8.3fms %+7.1f%%\n" "$model" "$flags" "$(awk -v m="$measured" 'BEGIN{print 1e3*m}')" \
    "$(awk -v p="$predicted" 'BEGIN{print 1e3*p}')" "$(awk -v e="$err" 'BEGIN{print 100*e}')"
done
summary=$(printf "%s\n" "${errors[@]}" | awk '{ print ($1 < 0 ? -$1 : $1) }' | sort -g |
  awk '{ a[NR] = $1 } END { med = NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.4f %.4f", med, a[NR] }')
read -r median max <<< "$summary"
echo "median |error| $(awk -v m="$median" 'BEGIN{printf "%.1f%%", 100*m}'), max $(awk -v m="$max" 'BEGIN{printf "%.1f%%", 100*m}') over ${#errors[@]} runs"
awk -v m="$median" -v x="$max" 'BEGIN { exit !(m <= 0.03 && x <= 0.08) }' || { echo "FAIL: above 3% median or 8% max"; exit 1; }
echo "1 passed, 0 failed"

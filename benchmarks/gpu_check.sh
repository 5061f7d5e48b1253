#!/usr/bin/env bash
# The checks that need a GPU, packed here and run on a GPU machine that has CUDA's libraries but
# none of this project's packages. A bundle is a folder and its compressed copy DIR.tgz: carry the
# .tgz (a device run carries 64 MiB at most; everything packs to about 45 MiB), `run` unpacks it.
#
#   benchmarks/gpu_check.sh bundle tests .gpu-tests     # every CUDA kernel and backend test, stripped
#   benchmarks/gpu_check.sh bundle bench .gpu-bench     # the kernel benchmarks
#   benchmarks/gpu_check.sh bundle train .gpu-train     # parallax-gpu: training runs and emulated ranks
#   benchmarks/gpu_check.sh bundle all .gpu-all         # all three
#   then, on the GPU machine (OUT: where results go):
#   benchmarks/gpu_check.sh run .gpu-all "$OUT"         # tests (fail if any fails or all skipped),
#       benchmarks (JSON with the GPU and driver), GPT-2 124M / 1.5B tokens/s and MFU inputs, and
#       the calibration traces of one rank of GPT-3 175B (tp8 pp16) and Llama-3 70B (tp8)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build=${PARALLAX_BUILD:-$here/build}
case "${1:-}" in
  bundle)
    kind=$2 dir=$3
    tests=$(ls "$build"/tests/cuda/test_cuda_* | grep -v '\.cmake$')
    bench=$(ls "$build"/benchmarks/cuda/bench_cuda_* | grep -v '\.cmake$')
    train=$build/engine/cli/parallax-gpu
    case "$kind" in
      tests) progs=$tests ;;
      bench) progs=$bench ;;
      train) progs=$train ;;
      all) progs="$tests $bench $train" ;;
      *) echo "gpu_check: bundle tests|bench|train|all DIR" >&2; exit 2 ;;
    esac
    rm -rf "$dir"
    # shellcheck disable=SC2086
    "$here/../shared/tools/gpu-bundle" "$dir" $progs
    strip "$dir"/bin/* "$dir"/lib/* 2>/dev/null || true
    git -C "$here" rev-parse HEAD > "$dir/COMMIT"
    git -C "$here" status --porcelain --untracked-files=no | sed 's/^/dirty: /' >> "$dir/COMMIT"
    tar -C "$dir" -czf "$dir.tgz" .
    du -sh "$dir" "$dir.tgz"
    ;;
  run)
    dir=$2 out=$3
    mkdir -p "$out"
    if [ ! -d "$dir/bin" ] && [ -f "$dir.tgz" ]; then mkdir -p "$dir" && tar -C "$dir" -xzf "$dir.tgz"; fi
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; cat "$dir/COMMIT"; } > "$out/provenance.txt"
    status=0
    export PARALLAX_DATASETS=$here/datasets
    # One run of parallax-gpu: its JSON result, log and trace folder under OUT/NAME*.
    train() {
      local name=$1; shift
      bash "$dir/run" parallax-gpu train --device cuda --json --out "$out/$name" "$@" > "$out/$name.json" 2> "$out/$name.log" || status=1
      # MFU = tokens/s x Megatron's FLOPs per token / 989.4 TFLOP/s (H100 and H200 dense bf16).
      echo "$name: $(tr -d ' \n' < "$out/$name.json" | grep -o '"tokens_per_second":[^,]*\|"compute_seconds":[^,]*\|"model_flops_per_token":[^,]*' |
        tr '\n' ' ' | awk '{ printf "%s", $0 } match($0, /"tokens_per_second":[0-9.e+-]+/) { t = substr($0, RSTART + 20, RLENGTH - 20) }
          match($0, /"model_flops_per_token":[0-9.e+-]+/) { f = substr($0, RSTART + 24, RLENGTH - 24); if (t > 0) printf " MFU %.1f%%", 100 * t * f / 989.4e12 }') $(tail -1 "$out/$name.log")"
    }
    for prog in "$dir"/bin/*; do
      name=$(basename "$prog")
      case "$name" in
        test_*) PARALLAX_REQUIRE_GPU=1 bash "$dir/run" "$name" --gtest_output="json:$out/$name.json" > "$out/$name.log" 2>&1 || status=1 ;;
        bench_*) bash "$dir/run" "$name" --benchmark_out="$out/$name.json" --benchmark_out_format=json > "$out/$name.log" 2>&1 || status=1 ;;
        parallax-gpu)
          # GPT-2 as llm.c trains it (seq 1024, no dropout), then the calibration traces of one rank
          # of each large plan (no attention dropout: the engine has none; GPT-3 keeps Megatron's
          # hidden dropout 0.1).
          nodrop="--attention-dropout 0"
          train gpt2-124m --model gpt2-124m $nodrop --hidden-dropout 0 --micro-batch 8 --global-batch 8 --seq-length 1024 \
            --iterations 30 --trace-iterations 2
          train gpt2-1.5b --model gpt2-1.5b $nodrop --hidden-dropout 0 --micro-batch 4 --global-batch 4 --seq-length 1024 \
            --iterations 15 --trace-iterations 2
          train gpt3-175b-tp8-pp16-rank0 --model gpt3-175b $nodrop --tp 8 --pp 16 --dp 1 --sp --recompute selective --micro-batch 1 \
            --global-batch 16 --seq-length 2048 --emulate-rank 0 --iterations 3 --trace-iterations 1
          train llama3-70b-tp8-rank0 --model llama3-70b --tp 8 --dp 8 --zero 1 --sp --recompute selective --micro-batch 1 \
            --global-batch 8 --seq-length 8192 --emulate-rank 0 --iterations 3 --trace-iterations 1
          continue ;;
      esac
      echo "$name: $(tail -1 "$out/$name.log")"
    done
    exit $status
    ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

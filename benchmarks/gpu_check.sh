#!/usr/bin/env bash
# The checks that need a GPU, packed here and run on a GPU machine that has CUDA's libraries but
# none of this project's packages. Two bundles, each under the 64 MiB a device run may carry:
#
#   benchmarks/gpu_check.sh bundle tests .gpu-tests     # every CUDA kernel test, stripped
#   benchmarks/gpu_check.sh bundle bench .gpu-bench     # the kernel benchmarks
#   then, on the GPU machine (OUT: where results go):
#   benchmarks/gpu_check.sh run .gpu-tests "$OUT"       # fails if any test fails or all skipped
#   benchmarks/gpu_check.sh run .gpu-bench "$OUT"       # JSON per benchmark, with the GPU and driver
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build=${PARALLAX_BUILD:-$here/build}
case "${1:-}" in
  bundle)
    kind=$2 dir=$3
    case "$kind" in
      tests) progs=$(ls "$build"/tests/cuda/test_cuda_* | grep -v '\.cmake$') ;;
      bench) progs=$(ls "$build"/benchmarks/cuda/bench_cuda_* | grep -v '\.cmake$') ;;
      *) echo "gpu_check: bundle tests|bench DIR" >&2; exit 2 ;;
    esac
    rm -rf "$dir"
    # shellcheck disable=SC2086
    "$here/../shared/tools/gpu-bundle" "$dir" $progs
    strip "$dir"/bin/* "$dir"/lib/* 2>/dev/null || true
    git -C "$here" rev-parse HEAD > "$dir/COMMIT"
    du -sh "$dir"
    ;;
  run)
    dir=$2 out=$3
    mkdir -p "$out"
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; cat "$dir/COMMIT"; } > "$out/provenance.txt"
    status=0
    for prog in "$dir"/bin/*; do
      name=$(basename "$prog")
      case "$name" in
        test_*) PARALLAX_REQUIRE_GPU=1 bash "$dir/run" "$name" --gtest_output="json:$out/$name.json" > "$out/$name.log" 2>&1 || status=1 ;;
        bench_*) bash "$dir/run" "$name" --benchmark_out="$out/$name.json" --benchmark_out_format=json > "$out/$name.log" 2>&1 || status=1 ;;
      esac
      echo "$name: $(tail -1 "$out/$name.log")"
    done
    exit $status
    ;;
  *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

#!/usr/bin/env bash
# The simulator against published training throughput beyond the README's four Selene
# runs (kept here as the first group). Each case is simulated with `parallax simulate --json` and
# compared on what its source gives:
#   selene    Korthikanti et al. 2022, Table 5 (A100, Selene): seconds per iteration, as in the README;
#   selene-fr the same table's "Full Recompute" column: the same runs with full recompute and without
#             sequence parallelism (Section 6.3: "full recomputation without sequence parallelism");
#   layer-22b the same paper's Table 4: one transformer layer of the 22B run (the first row's plan),
#             forward and backward milliseconds, for its five combinations of sequence parallelism and
#             recompute, against `simulate`'s layer_s (the mean span of one layer's forward or
#             backward pass, recompute included); not runs of their own, so not in the overall median;
#   mcore     Megatron-LM README.md, "Performance Benchmarking" (NVIDIA/Megatron-LM, images/model_table.png,
#             commit f2e5db402c): H100 weak scaling 1.7B-462B, per-GPU teraFLOP/s by Megatron's own count
#             (megatron/training/training.py, num_floating_point_operations: matmul FLOPs, forward +
#             backward, recompute not counted), turned here into tokens/s per GPU with that same count;
#   mcore-ss  the same README's GPT-3 175B strong scaling, 96 and 4,608 H100 at batch 1,152: MFU 47% and
#             42% of 989.4 TFLOP/s, likewise turned into tokens/s per GPU (tp 8, pp 6 is an assumption:
#             the README gives no plan; it is the one its weak-scaling table uses for this model);
#   torchtitan pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md: Llama 3.1 8B on 8 and 128
#             H100 (96 GB HBM2e, 500 W), tokens/s per GPU ("TPS/GPU"); seq_len 8192 from
#             train_configs/llama3_8b.toml; the fp8 rows were run with torch.compile and Float8 linears;
#   llm.c     karpathy/llm.c scripts/run_gpt2_124M.sh, run_gpt2_350M.sh, run_gpt2_1558M.sh: seconds per
#             step quoted ("~300ms", "~820ms", "2.80s") in each script's header comment, for the batch
#             (-b, -d), sequence (-t) and 8 GPUs its command sets.
# The error is always on time: predicted / published - 1 for seconds per iteration, published /
# predicted - 1 for tokens/s; negative means the simulator is too fast. Medians of |error| per source
# and over all runs (uncalibrated; the *-cal repeats left out). Nothing is fitted but the *-cal
# groups' one GEMM-curve level: every plan flag comes from the source or is marked an assumption.
# usage: benchmarks/published_results.sh PARALLAX
#   e.g. benchmarks/published_results.sh build-nocuda/engine/cli/parallax
set -euo pipefail
parallax=$1
selene="--cluster selene --seq-length 2048 --sp --recompute selective --precision fp16 --no-flash-attn --tp 8 --dp 1"
selene_fr="--cluster selene --seq-length 2048 --recompute full --precision fp16 --no-flash-attn --tp 8 --dp 1"
# The *-cal groups: the same Selene runs with the GEMM curve's level fitted to Table 4's ten layer
# times of the 22B run (parallax calibrate --layer-times selene-korthikanti-2022): 175B, 530B and
# 1T are held out of the fit, 22B is the run whose layers were fitted.
profile_dir=$(mktemp -d)
trap 'rm -rf "$profile_dir"' EXIT
layer_profile="$profile_dir/selene-layers.json"
"$parallax" calibrate --layer-times selene-korthikanti-2022 --out "$layer_profile" > /dev/null
cal="--profile $layer_profile"
layer22="--cluster selene --seq-length 2048 --precision fp16 --no-flash-attn --tp 8 --dp 1 --pp 1 --micro-batch 4 --global-batch 4"
# Megatron-Core: the README's --overlap-param-gather asserts the distributed optimizer (ZeRO-1) and
# --tp-comm-overlap asserts sequence parallelism (megatron/training/arguments.py at f2e5db402c), so
# both run wherever tp > 1 (at tp 1 Megatron turns sequence parallelism off and the assertion fails,
# so the 1.7B row had neither);
# no recompute, 1F1B, micro-batch 4 (the whole replica batch) at pp 1 and 1 at pp > 1 are assumptions
# (not stated); the README does not name its cluster: the DGX H100 SuperPOD design is used; --fold
# replays one data-parallel replica (within 1e-5 of the full replay at 48 replicas of 1.7B).
mcore="--precision bf16 --zero 1 --overlap-param-gather --recompute none --fold"
titan="--zero 3"                                   # FSDP: parameters, gradients and optimizer sharded
llmc="--precision bf16 --zero 1 --recompute none"  # llm.c's -z 1 (ZeRO-1), -r 0 (no recompute)
# group|model|published figure|its kind (s_iter, tok_gpu, tflops_gpu, mfu, layer_fwd_ms, layer_bwd_ms)|flags
cases=(
  "selene|gpt-22b|1.10|s_iter|$selene --pp 1 --micro-batch 4 --global-batch 4"
  "selene|gpt3-175b|13.75|s_iter|$selene --pp 8 --schedule interleaved-1f1b --virtual-stages 3 --micro-batch 1 --global-batch 64"
  "selene|mt-nlg-530b|37.83|s_iter|$selene --pp 35 --schedule interleaved-1f1b --virtual-stages 3 --micro-batch 1 --global-batch 280"
  "selene|gpt-1t|71.49|s_iter|$selene --pp 64 --micro-batch 1 --global-batch 512"
  "selene-fr|gpt-22b|1.42|s_iter|$selene_fr --pp 1 --micro-batch 4 --global-batch 4"
  "selene-fr|gpt3-175b|18.13|s_iter|$selene_fr --pp 8 --schedule interleaved-1f1b --virtual-stages 3 --micro-batch 1 --global-batch 64"
  "selene-fr|mt-nlg-530b|49.05|s_iter|$selene_fr --pp 35 --schedule interleaved-1f1b --virtual-stages 3 --micro-batch 1 --global-batch 280"
  "selene-fr|gpt-1t|94.42|s_iter|$selene_fr --pp 64 --micro-batch 1 --global-batch 512"
  "selene-cal|gpt-22b|1.10|s_iter|$selene --pp 1 --micro-batch 4 --global-batch 4 $cal"
  "selene-cal|gpt3-175b|13.75|s_iter|$selene --pp 8 --schedule interleaved-1f1b --virtual-stages 3 --micro-batch 1 --global-batch 64 $cal"
  "selene-cal|mt-nlg-530b|37.83|s_iter|$selene --pp 35 --schedule interleaved-1f1b --virtual-stages 3 --micro-batch 1 --global-batch 280 $cal"
  "selene-cal|gpt-1t|71.49|s_iter|$selene --pp 64 --micro-batch 1 --global-batch 512 $cal"
  "selene-fr-cal|gpt-22b|1.42|s_iter|$selene_fr --pp 1 --micro-batch 4 --global-batch 4 $cal"
  "selene-fr-cal|gpt3-175b|18.13|s_iter|$selene_fr --pp 8 --schedule interleaved-1f1b --virtual-stages 3 --micro-batch 1 --global-batch 64 $cal"
  "selene-fr-cal|mt-nlg-530b|49.05|s_iter|$selene_fr --pp 35 --schedule interleaved-1f1b --virtual-stages 3 --micro-batch 1 --global-batch 280 $cal"
  "selene-fr-cal|gpt-1t|94.42|s_iter|$selene_fr --pp 64 --micro-batch 1 --global-batch 512 $cal"
  "layer-22b|gpt-22b|7.7|layer_fwd_ms|$layer22 --recompute none"
  "layer-22b|gpt-22b|11.9|layer_bwd_ms|$layer22 --recompute none"
  "layer-22b|gpt-22b|7.2|layer_fwd_ms|$layer22 --sp --recompute none"
  "layer-22b|gpt-22b|11.8|layer_bwd_ms|$layer22 --sp --recompute none"
  "layer-22b|gpt-22b|7.7|layer_fwd_ms|$layer22 --recompute full"
  "layer-22b|gpt-22b|19.5|layer_bwd_ms|$layer22 --recompute full"
  "layer-22b|gpt-22b|7.7|layer_fwd_ms|$layer22 --recompute selective"
  "layer-22b|gpt-22b|13.2|layer_bwd_ms|$layer22 --recompute selective"
  "layer-22b|gpt-22b|7.2|layer_fwd_ms|$layer22 --sp --recompute selective"
  "layer-22b|gpt-22b|13.1|layer_bwd_ms|$layer22 --sp --recompute selective"
  "mcore|mcore-gpt-1.7b|408.8|tflops_gpu|$mcore --cluster dgx-h100-superpod --tp 1 --pp 1 --dp 48 --micro-batch 4 --global-batch 192"
  "mcore|mcore-gpt-7.1b|465.9|tflops_gpu|$mcore --cluster dgx-h100-superpod --tp 2 --sp --tp-comm-overlap --pp 1 --dp 48 --micro-batch 4 --global-batch 192"
  "mcore|mcore-gpt-16b|489.1|tflops_gpu|$mcore --cluster dgx-h100-superpod --tp 4 --sp --tp-comm-overlap --pp 1 --dp 48 --micro-batch 4 --global-batch 192"
  "mcore|mcore-gpt-32b|459.6|tflops_gpu|$mcore --cluster dgx-h100-superpod --tp 8 --sp --tp-comm-overlap --pp 1 --dp 48 --micro-batch 4 --global-batch 192"
  "mcore|mcore-gpt-70b|419.7|tflops_gpu|$mcore --cluster dgx-h100-superpod --tp 8 --sp --tp-comm-overlap --pp 2 --dp 48 --micro-batch 1 --global-batch 384"
  "mcore|mcore-gpt-119b|420.5|tflops_gpu|$mcore --cluster h100-10240 --tp 8 --sp --tp-comm-overlap --pp 4 --dp 48 --micro-batch 1 --global-batch 768"
  "mcore|mcore-gpt-177b|432.8|tflops_gpu|$mcore --cluster h100-10240 --tp 8 --sp --tp-comm-overlap --pp 6 --dp 48 --micro-batch 1 --global-batch 1152"
  "mcore|mcore-gpt-314b|474.4|tflops_gpu|$mcore --cluster h100-10240 --tp 8 --sp --tp-comm-overlap --pp 8 --dp 48 --micro-batch 1 --global-batch 1536"
  "mcore|mcore-gpt-462b|459.9|tflops_gpu|$mcore --cluster h100-10240 --tp 8 --sp --tp-comm-overlap --pp 16 --dp 48 --micro-batch 1 --global-batch 3072"
  "mcore-ss|mcore-gpt-177b|0.47|mfu|$mcore --cluster h100-10240 --tp 8 --sp --tp-comm-overlap --pp 6 --dp 2 --micro-batch 1 --global-batch 1152"
  "mcore-ss|mcore-gpt-177b|0.42|mfu|$mcore --cluster h100-10240 --tp 8 --sp --tp-comm-overlap --pp 6 --dp 96 --micro-batch 1 --global-batch 1152"
  "torchtitan|llama3.1-8b|5762|tok_gpu|$titan --cluster h100-8 --dp 8 --seq-length 8192 --recompute selective --micro-batch 2 --global-batch 16 --precision bf16"
  "torchtitan|llama3.1-8b|8532|tok_gpu|$titan --cluster h100-8 --dp 8 --seq-length 8192 --recompute selective --micro-batch 2 --global-batch 16 --precision fp8"
  "torchtitan|llama3.1-8b|5605|tok_gpu|$titan --cluster dgx-h100-superpod --dp 128 --seq-length 8192 --recompute selective --micro-batch 2 --global-batch 256 --precision bf16"
  "torchtitan|llama3.1-8b|3890|tok_gpu|$titan --cluster h100-8 --dp 8 --cp 1 --seq-length 32768 --recompute full --micro-batch 1 --global-batch 8 --precision fp8"
  "torchtitan|llama3.1-8b|2540|tok_gpu|$titan --cluster h100-8 --dp 4 --cp 2 --seq-length 65536 --recompute full --micro-batch 1 --global-batch 4 --precision fp8"
  "torchtitan|llama3.1-8b|1071|tok_gpu|$titan --cluster h100-8 --dp 2 --cp 4 --seq-length 131072 --recompute full --micro-batch 1 --global-batch 2 --precision fp8"
  "torchtitan|llama3.1-8b|548|tok_gpu|$titan --cluster h100-8 --dp 1 --cp 8 --seq-length 262144 --recompute full --micro-batch 1 --global-batch 1 --precision fp8"
  "llm.c|gpt2-124m|0.300|s_iter|$llmc --cluster a100-8 --dp 8 --micro-batch 64 --global-batch 512"
  "llm.c|gpt2-350m|0.820|s_iter|$llmc --cluster a100-8 --dp 8 --micro-batch 64 --global-batch 512"
  "llm.c|gpt2-1.5b|2.80|s_iter|$llmc --cluster h100-8 --dp 8 --micro-batch 16 --global-batch 1024"
)
top() { sed -n "s/^  \"$1\": \\([0-9.e+-]*\\),*\$/\\1/p" <<< "$2"; }
nested() { sed -n "s/^    \"$1\": \\([0-9.e+-]*\\),*\$/\\1/p" <<< "$2" | head -1; }
# Megatron-LM's FLOPs per token (num_floating_point_operations / (batch x seq)), from the model's shape.
megatron_flops_per_token() {
  local info
  info=$("$parallax" model info "$1" --json)
  awk -v l="$(nested num_layers "$info")" -v h="$(nested hidden_size "$info")" -v a="$(nested num_attention_heads "$info")" \
    -v g="$(nested num_query_groups "$info")" -v kv="$(nested kv_channels "$info")" -v f="$(nested ffn_hidden_size "$info")" \
    -v v="$(nested vocab_size "$info")" -v s="$2" -v act="$(sed -n 's/^    "activation": "\(.*\)",*$/\1/p' <<< "$info")" \
    'BEGIN { gl = act == "swiglu" ? 1.5 : 1; printf "%.6e", 12 * l * h * h * ((1 + g / a + s / h) * kv * a / h + f / h * gl + v / (2 * l * h)) }'
}
echo "| source | model | GPUs | plan | published | compared | predicted | error | peak GiB |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
errors=()
for c in "${cases[@]}"; do
  IFS='|' read -r group model figure kind flags <<< "$c"
  # shellcheck disable=SC2086
  if ! out=$("$parallax" simulate --model "$model" $flags --json 2>&1); then
    echo "| $group | $model | | \`$flags\` | $figure | | FAILED: $(tr '\n|' ' /' <<< "$out") | | |"
    continue
  fi
  gpus=$(nested world_size "$out") seq=$(nested seq_length "$out")
  iter=$(top iteration_s "$out") tps=$(awk -v t="$(top tokens_per_second "$out")" -v n="$gpus" 'BEGIN { print t / n }')
  peak=$(sed -n 's/^ *"peak_bytes": \([0-9]*\),*$/\1/p' <<< "$out" | sort -g | tail -1)
  case $kind in
    s_iter) published="$figure s/iter" compared=$figure predicted=$iter unit=s ;;
    layer_fwd_ms | layer_bwd_ms)
      pass=$([[ $kind == layer_fwd_ms ]] && echo forward || echo backward)
      published="$figure ms ($pass)" compared=$figure unit=ms
      predicted=$(awk -v s="$(nested "$pass" "$out")" 'BEGIN { print 1e3 * s }') ;;
    tok_gpu) published="$figure tok/s/GPU" compared=$figure predicted=$tps unit=tok/s ;;
    tflops_gpu | mfu)
      tf=$([[ $kind == mfu ]] && awk -v m="$figure" 'BEGIN { print m * 989.4 }' || echo "$figure")
      published=$([[ $kind == mfu ]] && echo "MFU $(awk -v m="$figure" 'BEGIN { print 100 * m }')%" || echo "$figure TFLOP/s/GPU")
      compared=$(awk -v t="$tf" -v f="$(megatron_flops_per_token "$model" "$seq")" 'BEGIN { printf "%.0f", t * 1e12 / f }')
      predicted=$tps unit=tok/s ;;
  esac
  err=$(awk -v k="$unit" -v p="$predicted" -v m="$compared" 'BEGIN { printf "%.4f", k == "s" || k == "ms" ? p / m - 1 : m / p - 1 }')
  errors+=("$group $err")
  shown=${flags/"$cal"/(GEMM curve fitted to Table 4)}
  plan=$(sed -e 's/--cluster [^ ]*//' -e 's/--precision bf16//' -e 's/--fold//' -e 's/  */ /g' -e 's/^ //' -e 's/ $//' <<< "${shown#"$selene"}")
  [[ $flags == "$selene"* ]] && plan="(Selene flags) $plan"
  [[ $flags == "$selene_fr"* ]] && plan="(Selene flags, full recompute, no sp) ${shown#"$selene_fr "}"
  [[ $flags == "$layer22"* ]] && plan="(22B run, one layer) ${flags#"$layer22 "}"
  cluster=$(sed -n 's/^  "cluster": "\(.*\)",*$/\1/p' <<< "$out")
  awk -v g="$group" -v m="$model" -v n="$gpus" -v c="$cluster" -v pl="$plan" -v pub="$published" -v cmp="$compared" -v pr="$predicted" \
    -v u="$unit" -v e="$err" -v pk="$peak" 'BEGIN {
      if (u == "s") { c1 = cmp " s"; c2 = sprintf("%.3f s", pr) } else if (u == "ms") { c1 = cmp " ms"; c2 = sprintf("%.2f ms", pr) } else { c1 = sprintf("%.0f tok/s/GPU", cmp); c2 = sprintf("%.0f tok/s/GPU", pr) }
      printf "| %s | %s | %d (%s) | `%s` | %s | %s | %s | %+.1f%% | %.1f |\n", g, m, n, c, pl, pub, c1, c2, 100 * e, pk / 2^30 }'
done
# Median |error| per source group and over all.
median() { awk '{ print ($1 < 0 ? -$1 : $1) }' | sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) { print "n/a"; exit }
  m = NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.1f%% over %d", 100 * m, NR }'; }
echo
for g in $(printf "%s\n" "${errors[@]}" | awk '{ print $1 }' | uniq); do
  echo "- median |error| $g: $(printf "%s\n" "${errors[@]}" | awk -v g="$g" '$1 == g { print $2 }' | median)"
done
echo "- median |error| all runs: $(printf "%s\n" "${errors[@]}" | awk '$1 !~ /^layer/ && $1 !~ /-cal$/ { print $2 }' | median)"

#!/bin/bash
# Write docs/RESULTS.md from the records kept under docs/runs/ (later directories win for the same row).
set -e
FUSION=docs/runs/bench/fusion_qwen05b_4k_n12_bos.json
[ -f "$FUSION" ] || FUSION=
OPT=()
for f in docs/runs/bench/secure_smollm2_3pc_current.json docs/runs/bench/secure_smollm2_2pc_4096_all.json; do
  [ -f "$f" ] && OPT+=("$f")
done
FID=()
[ -f docs/runs/fidelity_q4k_select.json ] && FID=(--fidelity docs/runs/fidelity_q4k_select.json)
DIRS=(docs/runs/eval_q4k_bf16 docs/runs/eval_q4k_bf16_quant docs/runs/eval_qwen05b_4k docs/runs/eval_qwen05b_4k_n8
  docs/runs/eval_qwen05b_4k_mpcache_nostatic docs/runs/eval_s1k_evict docs/runs/evict_tiny docs/runs/select_a_tiny
  docs/runs/select_b_tiny docs/runs/store_quant_tiny docs/runs/store_shape_tiny)
for d in docs/runs/eval_q4k_evict docs/runs/eval_q4k_select docs/runs/eval_q8k_select; do
  [ -f "$d/results.json" ] && DIRS+=("$d")
done
.venv/bin/mpckv report --results "${DIRS[@]}" "${FID[@]}" \
  --bench $FUSION docs/runs/bench/fusion_qwen05b_4k_n12.json docs/runs/bench/fusion_qwen05b_4k_n4.json docs/runs/bench/fusion_tiny_all.json docs/runs/bench/plaintext_llama8b_attn_select.json docs/runs/bench/plaintext_smollm2_storage_v2.json docs/runs/bench/plaintext_smollm2_storage.json docs/runs/bench/plaintext_llama8b_attn.json docs/runs/bench/plaintext_smollm2.json "${OPT[@]}" docs/runs/bench/secure_smollm2_4096_v2.json docs/runs/bench/secure_smollm2_2pc_1k2k.json docs/runs/bench/secure_smollm2_2pc_1k2k_persistent.json docs/runs/bench/secure_smollm2.json docs/runs/bench/secure_smollm2_3pc.json docs/runs/bench/secure_tiny_evict_512.json docs/runs/bench/secure_tiny_razor_512.json docs/runs/bench/secure_tiny_methods.json \
  --notes docs/results_notes.md --out "${OUT:-docs/RESULTS.md}"

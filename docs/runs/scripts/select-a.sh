#!/usr/bin/env bash
# select-a (issue 13, query-aware selection): commands for the lead to run on a quiet machine.
# TokenSelect, CTkvr, DELTA, NOSA. Not run by select-a (2 shared cores).
set -euo pipefail
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} MKL_NUM_THREADS=${MKL_NUM_THREADS:-4}

# 1. NOSA bias heads for the real models (frozen model, one fit per layer; ~minutes each).
#    Ship the outputs next to nosa_tiny-20e0cca73a.safetensors (name = nosa_<model id>.safetensors).
mpckv train-bias nosa --model smollm2 --out mpckv/assets/calibration/nosa_smollm2-5c89046aa0.safetensors --threads 4
mpckv train-bias nosa --model qwen2.5-coder-0.5b --out mpckv/assets/calibration/nosa_qwen2.5-coder-0.5b-5fcdfcff0f.safetensors --threads 4

# 2. Decode speed (attention part vs dense; target >= 4x; quiet machine, 1 thread).
mpckv bench plaintext --model random:layers=2,heads=32,kv_heads=8,head_dim=128,hidden=4096,ffn=1024 \
  --lengths 32768 --methods quest,tokenselect,ctkvr,delta,nosa --budgets 0.05 --batch 1 --new-tokens 8 \
  --warmup 2 --dtype float32 --device cpu --threads 1 --prefill random --hf off \
  --param quest.skip_layers=0 --json docs/runs/select_a_bench.json
# the exact (no pre-filter) TokenSelect of the card, and DELTA on a deeper stack (2 layers cap it below 2x)
mpckv bench plaintext --model random:layers=2,heads=32,kv_heads=8,head_dim=128,hidden=4096,ffn=1024 \
  --lengths 32768 --methods tokenselect --budgets 0.05 --batch 1 --new-tokens 8 --warmup 2 --dtype float32 \
  --device cpu --threads 1 --prefill random --hf off --param tokenselect.prefilter=0 \
  --json docs/runs/select_a_bench_tokenselect_exact.json
mpckv bench plaintext --model random:layers=8,heads=32,kv_heads=8,head_dim=128,hidden=4096,ffn=1024 \
  --lengths 32768 --methods delta --budgets 0.05 --batch 1 --new-tokens 8 --warmup 2 --dtype float32 \
  --device cpu --threads 1 --prefill random --hf off --json docs/runs/select_a_bench_delta_8layers.json

# 3. Accuracy on the real models (RULER-style prose tasks).
for M in smollm2 qwen2.5-coder-0.5b; do
  mpckv eval --model "$M" --suite passkey,kv_retrieval,needle --lengths 2048,4096 \
    --methods dense,quest,tokenselect,ctkvr,delta,nosa --budgets 0.05,0.1,0.2 --n 20 \
    --out "docs/runs/select_a_$M"
  # CTkvr builds its index from the prompt's last queries: with the question in the prompt it sees it
  mpckv eval --model "$M" --suite passkey,kv_retrieval,needle --lengths 2048,4096 \
    --methods dense,ctkvr,tokenselect --budgets 0.05,0.1,0.2 --n 20 --mode question-in-prompt \
    --out "docs/runs/select_a_${M}_qip"
  mpckv eval --model "$M" --suite passkey,kv_retrieval --lengths 2048 --methods dense,nosa \
    --param nosa.bias=zero --budgets 0.05,0.1,0.2 --n 20 --out "docs/runs/select_a_${M}_nosa_zero_bias"
done

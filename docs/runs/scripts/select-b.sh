#!/usr/bin/env bash
# select-b (issue 13): ShadowKV and A²ATS — calibration, bench and accuracy runs for a quiet machine.
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# A²ATS codebooks for the real models (one CPU thread; tiny is shipped, smollm2 too if present)
mpckv calibrate a2ats --model qwen2.5-coder-0.5b --threads 1 \
  --out mpckv/assets/calibration/a2ats_qwen2.5-coder-0.5b-5fcdfcff0f.safetensors
[ -f mpckv/assets/calibration/a2ats_smollm2-5c89046aa0.safetensors ] || \
  mpckv calibrate a2ats --model smollm2 --threads 1 \
    --out mpckv/assets/calibration/a2ats_smollm2-5c89046aa0.safetensors

# decode speed at 32K (attention part vs dense), cold-tier traffic is in the method states
mpckv bench plaintext --model random:layers=2,heads=32,kv_heads=8,head_dim=128,hidden=4096,ffn=1024 \
  --lengths 32768 --methods quest,shadowkv,a2ats --budgets 0.05 --batch 1 --new-tokens 8 --warmup 2 \
  --dtype float32 --device cpu --threads 1 --prefill random --hf off --param quest.skip_layers=0 \
  --json docs/runs/select_b_bench.json
# the same with a lower ShadowKV rank (the rebuild S·r·d dominates its step when chunks do not repeat)
mpckv bench plaintext --model random:layers=2,heads=32,kv_heads=8,head_dim=128,hidden=4096,ffn=1024 \
  --lengths 32768 --methods shadowkv --budgets 0.05 --batch 1 --new-tokens 8 --warmup 2 \
  --dtype float32 --device cpu --threads 1 --prefill random --hf off --param shadowkv.rank=64 \
  --json docs/runs/select_b_bench_rank64.json

# accuracy on the tiny model (done in this session: docs/runs/select_b_tiny)
mpckv eval --model tiny --suite passkey,kv_retrieval --lengths 1024 --methods dense,quest,shadowkv,a2ats \
  --budgets 0.05,0.1,0.2 --n 20 --out docs/runs/select_b_tiny

# real model, 4K passkey / kv_retrieval
mpckv eval --model qwen2.5-coder-0.5b --suite passkey,kv_retrieval --lengths 4096 \
  --methods dense,quest,shadowkv,a2ats --budgets 0.05,0.1 --n 20 --out docs/runs/select_b_qwen

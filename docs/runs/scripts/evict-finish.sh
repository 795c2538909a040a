#!/bin/bash
# evict-finish (issue 11): commands for the lead to run on a quiet machine (from the repository root).
set -ex
# 1. TRIM-KV gates for qwen2.5-coder-0.5b (the smollm2 gates were trained in 20 min of 1 busy CPU thread:
#    42 steps of 2 × 256 tokens; give qwen more: ~4× the cost per token of smollm2). Then ship the file as
#    mpckv/assets/calibration/trimkv_<model id>.safetensors (id: python -c "from mpckv.calibrate import
#    model_label; print(model_label('qwen2.5-coder-0.5b'))") and add its row to the calibration README.
OMP_NUM_THREADS=8 .venv/bin/mpckv train-gates trimkv --model qwen2.5-coder-0.5b \
  --out /tmp/trimkv_qwen2.5-coder-0.5b.safetensors --memory 64 --seq-len 512 --batch 2 --steps 300 \
  --minutes 90 --lr 1e-2 --threads 8
# 2. Real-model rows of the four issue-11 methods next to the baselines (qwen, 4K, n = 8, settings of eval_qwen05b_4k_n8, own dir)
.venv/bin/mpckv eval --model qwen2.5-coder-0.5b --suite passkey --lengths 4096 \
  --methods dense,keyformer,windowkv,razorattention,trimkv,snapkv,pyramidkv,h2o,streamingllm --budgets 0.05,0.1,0.2,0.4 --n 8 --batch-size 8 \
  --out docs/runs/evict_qwen05b_4k_n8 --no-progress
# 3. The smollm2 held-out gate check (trained vs constant gates, KL to dense; ~10 min on 1 idle thread)
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m slow tests/methods/test_trimkv_smollm2.py

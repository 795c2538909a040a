#!/bin/bash
# Quantized KV storage (issue 12, store-quant): MiKV and VidKV at equal cache bytes against eviction.
# Budgets: for mikv/vidkv the budget is the FULL-PRECISION share (the rest is stored in 4 / 1.x bits, not
# dropped); results.json records cache bytes, compare cells at equal bytes (4-bit mikv at 0.1 ≈ 25 % of
# dense bytes on head_dim 64; check live_cache_bytes / dense_cache_bytes in the records).
set -x
.venv/bin/mpckv eval --model qwen2.5-coder-0.5b --suite passkey,kv_retrieval --lengths 4096 --methods dense,snapkv,h2o --budgets 0.1,0.25 --n 20 --out runs/eval_qwen05b_4k_store_quant --no-progress
.venv/bin/mpckv eval --model qwen2.5-coder-0.5b --suite passkey,kv_retrieval --lengths 4096 --methods mikv,vidkv --budgets 0.05,0.1 --n 20 --out runs/eval_qwen05b_4k_store_quant --no-progress
.venv/bin/mpckv eval --model qwen2.5-coder-0.5b --suite passkey,kv_retrieval --lengths 4096 --methods mikv --budgets 0.1 --param mikv.low_bits=2 --n 20 --out runs/eval_qwen05b_4k_store_quant_mikv2 --no-progress
# speed: quantized attention vs dense per token at 8K on CPU (1 thread)
.venv/bin/mpckv bench plaintext --model smollm2 --lengths 8000 --methods mikv,vidkv --budgets 0.1 --prefill random --threads 1 --hf off --json runs/bench/plaintext_smollm2_store_quant.json
# attention-dominated variant (2 layers of smollm2's shape), what store-quant ran on the shared machine
.venv/bin/mpckv bench plaintext --model random:layers=2,heads=9,kv_heads=3,head_dim=64,hidden=576,ffn=1536 --lengths 8000 --methods mikv,vidkv --budgets 0.1 --prefill random --threads 1 --hf off --new-tokens 8 --warmup 2 --json runs/bench/plaintext_random_store_quant.json

#!/bin/bash
# Channel-pruned, merged and ragged KV storage (issue 12, store-shape): ThinK, KVMerger, AdaKV.
# Budgets: think's budget is the FULL-WIDTH share (the newest entries keep all key channels, the rest keep
# d − ⌊0.4·d⌋); snapkv+think gets the same budget for both parts (SnapKV keeps 25 %, ThinK keeps the newest
# 25 % of those full width). results.json records cache_bytes / live_cache_bytes: compare at equal bytes.
set -x
.venv/bin/mpckv eval --model qwen2.5-coder-0.5b --suite passkey,kv_retrieval --lengths 4096 --methods dense,snapkv,think,snapkv+think,kvmerger,adakv --budgets 0.1,0.25 --n 20 --out runs/eval_qwen05b_4k_store_shape --no-progress
# official ThinK regime on top of SnapKV: think's full-width window fixed at 32 tokens (recent=32)
.venv/bin/mpckv eval --model qwen2.5-coder-0.5b --suite passkey,kv_retrieval --lengths 4096 --methods snapkv+think --budgets 0.1,0.25 --param think.recent=32 --n 20 --out runs/eval_qwen05b_4k_store_shape_think32 --no-progress
# decode speed and bytes at 8K (1 thread, decode only)
.venv/bin/mpckv bench plaintext --model smollm2 --lengths 8000 --methods snapkv,adakv,think,kvmerger --budgets 0.25 --prefill random --threads 1 --hf off --json runs/bench/plaintext_smollm2_store_shape.json
.venv/bin/mpckv bench plaintext --model smollm2 --lengths 8000 --methods think --budgets 0.25 --param think.recent=32 --prefill random --threads 1 --hf off --json runs/bench/plaintext_smollm2_think32.json

#!/bin/bash
set -x
.venv/bin/mpckv eval --model qwen2.5-coder-0.5b --suite passkey --lengths 4096 --methods windowkv --budgets 0.1 --n 8 --batch-size 8 --out runs/eval_qwen05b_4k_n8 --no-progress
# MPCache without its static eviction (is the prefill-time eviction what loses the pass key?)
.venv/bin/mpckv eval --model qwen2.5-coder-0.5b --suite passkey --lengths 4096 --methods mpcache --budgets 0.1 --param mpcache.static_ratio=1.0 --n 8 --batch-size 8 --out runs/eval_qwen05b_4k_mpcache_nostatic --no-progress

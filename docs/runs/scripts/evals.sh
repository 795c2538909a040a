#!/bin/bash
# The real-model tables of docs/RESULTS.md (this session): run in order, each resumable.
set -x
M=snapkv,pyramidkv,streamingllm,h2o,mpcache,razorattention,keyformer,windowkv
.venv/bin/mpckv eval --model qwen2.5-coder-0.5b --suite passkey --lengths 4096 --methods dense,$M --budgets 0.1 --n 20 --out runs/eval_qwen05b_4k --no-progress
.venv/bin/mpckv bench plaintext --model smollm2 --lengths 1024,4096,8000 --methods snapkv,streamingllm,quest,mpcache --budgets 0.1 --new-tokens 12 --warmup 3 --threads 2 --prefill shared --json runs/bench/plaintext_smollm2.json
.venv/bin/mpckv bench plaintext --model random:layers=2,heads=32,kv_heads=8,head_dim=128,hidden=4096,ffn=1024 --lengths 8192,32768 --methods quest,mpcache,snapkv,streamingllm --budgets 0.05 --param quest.skip_layers=0 --param 'mpcache.dense_layers=[]' --new-tokens 12 --warmup 3 --threads 2 --prefill random --hf off --json runs/bench/plaintext_llama8b_attn.json
.venv/bin/mpckv eval --model smollm2 --suite passkey --lengths 1024 --methods dense,quest,$M --budgets 0.1,0.2 --n 20 --out runs/eval_smollm2_1k --no-progress

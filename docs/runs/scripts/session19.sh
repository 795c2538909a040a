#!/bin/bash
# Session 19 (2026-12-02) runs behind docs/RESULTS.md, in the order they were run. bf16 on the real model:
# on this CPU (AMX) bf16 matmuls are ~4x faster than fp32 for the prefill and ~2.5x for decoding.
set -x
M=.venv/bin/mpckv
# 1. every eviction / selection / storage method at 10 % on qwen2.5-coder-0.5b, passkey 4K, n = 20
$M eval --model qwen2.5-coder-0.5b --dtype bfloat16 --suite passkey --lengths 4096 \
  --methods dense,snapkv,pyramidkv,h2o,streamingllm,keyformer,windowkv,razorattention,quest,mpcache,tokenselect,ctkvr,delta,nosa,shadowkv,a2ats,think,kvmerger,adakv \
  --budgets 0.1 --n 20 --batch-size 10 --out runs/eval_q4k_bf16 --no-plots
# 2. decode attention at 32K, Llama-3-8B attention shape, 5 % (selection methods), 2 threads, quiet machine
$M bench plaintext --model random:layers=2,heads=32,kv_heads=8,head_dim=128,hidden=4096,ffn=1024 --lengths 32768 \
  --methods quest,mpcache,tokenselect,ctkvr,nosa,shadowkv,a2ats --budgets 0.05 --batch 1 --new-tokens 8 --warmup 2 \
  --dtype float32 --device cpu --threads 2 --prefill random --hf off --param quest.skip_layers=0 \
  --param 'mpcache.dense_layers=[]' --json runs/bench/plaintext_llama8b_attn_select.json
# 3. storage formats at 8K on smollm2 (cache bytes, peak memory, decode time vs dense)
$M bench plaintext --model smollm2 --lengths 8000 --methods snapkv,adakv,kvmerger,think,mikv,vidkv --budgets 0.25 \
  --new-tokens 8 --warmup 2 --threads 2 --prefill random --hf off --json runs/bench/plaintext_smollm2_storage.json
# 4. MiKV and VidKV on the first 10 prompts (they were finished after run 1 started)
$M eval --model qwen2.5-coder-0.5b --dtype bfloat16 --suite passkey --lengths 4096 --methods mikv,vidkv --budgets 0.1 \
  --n 10 --batch-size 10 --out runs/eval_q4k_bf16_quant
# 5. fusion on qwen at ~3.4K and ~4K tokens (8 chunks, 15 % recompute)
ALL=cacheblend,epic,a3,kvshare,elasticcache,graphkv
$M bench fusion --model qwen2.5-coder-0.5b --suite docqa --recompute 0.15 --lengths 17000 --chunks 8 --n 4 --repeats 1 \
  --dtype bfloat16 --methods $ALL --threads 2 --json runs/bench/fusion_qwen05b_4k.json   # -> fusion_qwen05b_4k_n4.json
$M bench fusion --model qwen2.5-coder-0.5b --suite docqa --recompute 0.15 --lengths 20000 --chunks 8 --n 12 --seed 1 \
  --repeats 1 --dtype bfloat16 --methods $ALL --threads 2 --json runs/bench/fusion_qwen05b_4k_n12.json
# 6. secure smollm2 at 4096 on the current code (merged into docs/runs/bench/secure_smollm2_4096_v2.json)
OMP_NUM_THREADS=1 $M bench secure --model smollm2 --methods dense,quest,mpcache --lengths 4096 --steps 1 --parties 2 \
  --kv-cache persistent --json runs/bench/secure_smollm2_4096_v2.json
OMP_NUM_THREADS=1 $M bench secure --model smollm2 --methods dense,mpcache --lengths 4096 --steps 1 --parties 2 \
  --kv-cache stock --json runs/bench/secure_smollm2_4096_stock_v2.json
# 7. A2ATS codebooks for qwen (shipped in mpckv/assets/calibration)
OMP_NUM_THREADS=1 $M calibrate a2ats --model qwen2.5-coder-0.5b --threads 1 \
  --out mpckv/assets/calibration/a2ats_qwen2.5-coder-0.5b-5fcdfcff0f.safetensors

#!/usr/bin/env bash
# Runs of session 20 (from the repository root). Secure benches on smollm2, 1 thread per party.
set -euo pipefail
M=.venv/bin/mpckv
export OMP_NUM_THREADS=1
# 1. 2PC at 1024 and 2048: dense, Quest, MPCache (default layers) and MPCache with every layer selective
$M bench secure --model smollm2 --methods dense,quest,mpcache,mpcache@all --param 'mpcache@all.dense_layers=[]' \
  --lengths 1024,2048 --steps 1 --parties 2 --kv-cache stock,persistent --json docs/runs/bench/secure_smollm2_2pc_1k2k.json
# 2. 2PC at 4096: MPCache with every layer selective (the other 4096 rows: secure_smollm2_4096_v2.json)
$M bench secure --model smollm2 --methods mpcache@all --param 'mpcache@all.dense_layers=[]' \
  --lengths 4096 --steps 1 --parties 2 --kv-cache stock,persistent --json docs/runs/bench/secure_smollm2_2pc_4096_all.json
# 3. 3PC on the current code
$M bench secure --model smollm2 --methods dense,quest,mpcache,mpcache@all --param 'mpcache@all.dense_layers=[]' \
  --lengths 1024,4096 --steps 1 --parties 3 --kv-cache stock,persistent --json docs/runs/bench/secure_smollm2_3pc_v2.json
# 4. issue 13: selection methods on qwen at 4K, 5 % and 20 % (10 % rows: eval_q4k_bf16), NOSA with the shipped bias
#    and A2ATS with the shipped codebook also at 10 %
E=docs/runs/eval_q4k_select
$M eval --model qwen2.5-coder-0.5b --dtype bfloat16 --suite passkey --lengths 4096 \
  --methods dense,quest,mpcache,tokenselect,ctkvr,delta,nosa,shadowkv,a2ats --budgets 0.05,0.2 --n 20 --batch-size 10 \
  --out $E --no-progress
$M eval --model qwen2.5-coder-0.5b --dtype bfloat16 --suite passkey --lengths 4096 --methods nosa,a2ats --budgets 0.1 \
  --n 20 --batch-size 10 --out $E --no-progress
#    (NOSA with a zero bias: the 10 % row of eval_q4k_bf16 was made before a qwen bias head existed, so `bias=auto`
#    found none and used b = 0; same samples: seed 0, n = 20, 4096 tokens)
# 5. issue 11: the eviction methods on smollm2 at 1K (5/10/20/40 %, n = 20)
$M eval --model smollm2 --dtype bfloat16 --suite passkey,kv_retrieval --lengths 1024 \
  --methods dense,keyformer,windowkv,razorattention,trimkv,snapkv,pyramidkv,h2o,streamingllm --budgets 0.05,0.1,0.2,0.4 \
  --n 20 --batch-size 10 --out docs/runs/eval_s1k_evict --no-progress
# 6. issue 11: TRIM-KV gates for qwen (shipped as mpckv/assets/calibration/trimkv_qwen2.5-coder-0.5b-5fcdfcff0f.safetensors;
#    67 steps in 71 min of 1 thread on a busy machine, stopped by --minutes)
OMP_NUM_THREADS=1 $M train-gates trimkv --model qwen2.5-coder-0.5b --out trimkv_qwen.safetensors --memory 48 --seq-len 256 \
  --batch 2 --steps 400 --minutes 70 --lr 1e-2 --threads 1
# 7. issue 11: the eviction methods on qwen at 4K (5/20/40 %; 10 % rows: eval_q4k_bf16), TRIM-KV with the shipped gates also at 10 %
E=docs/runs/eval_q4k_evict
$M eval --model qwen2.5-coder-0.5b --dtype bfloat16 --suite passkey --lengths 4096 \
  --methods dense,keyformer,windowkv,razorattention,trimkv,snapkv,pyramidkv,h2o,streamingllm --budgets 0.05,0.2,0.4 \
  --n 20 --batch-size 10 --out $E --no-progress
$M eval --model qwen2.5-coder-0.5b --dtype bfloat16 --suite passkey --lengths 4096 --methods trimkv --budgets 0.1 \
  --n 20 --batch-size 10 --out $E --no-progress

#!/usr/bin/env bash
# Runs of session 21 (from the repository root).
set -euo pipefail
M=.venv/bin/mpckv
# 1. issue 11: the eviction methods on qwen at 4K, 5/20/40 % (+ TRIM-KV with the shipped gates at 10 %), n = 20.
#    A first run over the whole grid (resuming session 20's partial.jsonl) was stopped once to add the per-record
#    memo of the all-query column sums (H2O, Keyformer: once per batch, not once per cell) and once more when
#    batch 0's dense prefill was on disk (--prefill-cache), to run one method group at a time: every command
#    finishes its cells (both batches) before the next starts, so a stop loses at most one group.
E=docs/runs/eval_q4k_evict
C="--model qwen2.5-coder-0.5b --dtype bfloat16 --suite passkey --lengths 4096 --n 20 --batch-size 10 --out $E"
C="$C --no-progress --prefill-cache /work/prefill-cache"
$M eval $C --methods dense
$M eval $C --methods trimkv --budgets 0.05,0.1,0.2,0.4
$M eval $C --methods razorattention,streamingllm --budgets 0.05,0.2,0.4
$M eval $C --methods snapkv,windowkv --budgets 0.05,0.2,0.4
$M eval $C --methods pyramidkv,h2o --budgets 0.05,0.2,0.4
$M eval $C --methods keyformer --budgets 0.05,0.2,0.4
# 2. issue 15: 2PC MPCache with every layer selective at 4096, then 3PC rows on the current code (1 thread per
#    party). The 3PC run at 1024/2048 hit the bench's one-hour party deadline after 11 rows (all stock rows, dense
#    persistent at both lengths, Quest persistent at 1024: the JSON keeps every finished row); the persistent rows
#    it did not reach were run on their own (bytes and rounds do not depend on the run).
export OMP_NUM_THREADS=1
$M bench secure --model smollm2 --methods mpcache@all --param 'mpcache@all.dense_layers=[]' \
  --lengths 4096 --steps 1 --parties 2 --kv-cache stock,persistent --json docs/runs/bench/secure_smollm2_2pc_4096_all.json
$M bench secure --model smollm2 --methods dense,quest,mpcache,mpcache@all --param 'mpcache@all.dense_layers=[]' \
  --lengths 1024,2048 --steps 1 --parties 3 --kv-cache stock,persistent --json docs/runs/bench/secure_smollm2_3pc_1k2k.json
$M bench secure --model smollm2 --methods quest,mpcache,mpcache@all --param 'mpcache@all.dense_layers=[]' \
  --lengths 1024,2048 --steps 1 --parties 3 --kv-cache persistent --json docs/runs/bench/secure_smollm2_3pc_1k2k_persistent.json
$M bench secure --model smollm2 --methods dense,mpcache,mpcache@all --param 'mpcache@all.dense_layers=[]' \
  --lengths 4096 --steps 1 --parties 3 --kv-cache stock --json docs/runs/bench/secure_smollm2_3pc_4096_stock.json
#    (stopped after its dense row to give the CPU to step 1.) secure_smollm2_3pc_current.json = the three
#    files above, rows merged (the one duplicate, Quest persistent at 1024, had identical bytes and rounds in both)
# 3. issue 13: the selection methods on qwen at 4K, 5 % and 20 % (10 % rows: eval_q4k_bf16), NOSA with the shipped
#    bias and A2ATS with the shipped codebook also at 10 %; the dense prefills come from step 1's --prefill-cache
unset OMP_NUM_THREADS
E=docs/runs/eval_q4k_select
$M eval --model qwen2.5-coder-0.5b --dtype bfloat16 --suite passkey --lengths 4096 \
  --methods dense,quest,mpcache,tokenselect,ctkvr,delta,nosa,shadowkv,a2ats --budgets 0.05,0.2 --n 20 --batch-size 10 \
  --out $E --no-progress --prefill-cache /work/prefill-cache
$M eval --model qwen2.5-coder-0.5b --dtype bfloat16 --suite passkey --lengths 4096 --methods nosa,a2ats --budgets 0.1 \
  --n 20 --batch-size 10 --out $E --no-progress --prefill-cache /work/prefill-cache
#    (fidelity: stopped once for the CI run, then run alone on the idle machine at the end)
$M fidelity --model qwen2.5-coder-0.5b --dtype bfloat16 --synthetic passkey --length 4096 --n 4 --steps 32 \
  --methods quest,mpcache,tokenselect,ctkvr,delta,nosa,shadowkv,a2ats --budgets 0.05,0.1,0.2 \
  --out docs/runs/fidelity_q4k_select.json

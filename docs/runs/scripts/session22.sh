#!/usr/bin/env bash
# Runs of session 22 (from the repository root).
set -euo pipefail
M=.venv/bin/mpckv
# 1. issue 13: the selection methods on qwen at 8K, 5/10/20 %, n = 20 (two batches of 10), next to Quest and
#    MPCache. Dense first: it records both batches' prefills into --prefill-cache, which the method groups load.
E=docs/runs/eval_q8k_select
C="--model qwen2.5-coder-0.5b --dtype bfloat16 --suite passkey --lengths 8192 --n 20 --batch-size 10 --out $E"
C="$C --no-progress --prefill-cache /work/prefill-cache"
$M eval $C --methods dense
$M eval $C --methods quest,tokenselect --budgets 0.05,0.1,0.2
$M eval $C --methods nosa,shadowkv --budgets 0.05,0.1,0.2
$M eval $C --methods a2ats,delta --budgets 0.05,0.1,0.2
$M eval $C --methods ctkvr,mpcache --budgets 0.05,0.1,0.2

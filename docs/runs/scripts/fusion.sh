#!/bin/bash
# KV fusion runs of issue 14 (fusion helper). Run on a quiet machine from the repository root:
#   bash docs/runs/scripts/fusion.sh
# The targets (issue 14): at 4K-token prompts of 8 chunks, TTFT >= 3x lower than full prefill for
# cacheblend / a3 / kvshare at 15 % recompute, >= 5x for epic, accuracy within 2 points of full on qwen.
set -e
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
M=.venv/bin/mpckv
ALL=cacheblend,epic,a3,kvshare,elasticcache,graphkv
mkdir -p runs/bench

# 1. qwen2.5-coder-0.5b: ~17000 bytes of docqa context = ~3.9K tokens (4000 bytes are only ~920 tokens),
#    8 documents = 8 cached chunks, n = 8 samples, TTFT = median of 3 prefills. About 1.5-2 h on 2 threads.
$M bench fusion --model qwen2.5-coder-0.5b --suite docqa --recompute 0.15 --lengths 17000 --chunks 8 \
  --n 8 --repeats 3 --methods $ALL --threads 2 --json runs/bench/fusion_qwen05b_4k.json
# the 4000-byte point of the earlier table (~920 tokens), all methods, n = 8
$M bench fusion --model qwen2.5-coder-0.5b --suite docqa --recompute 0.15 --lengths 4000 --chunks 8 \
  --n 8 --repeats 3 --methods $ALL --threads 2 --json runs/bench/fusion_qwen05b.json

# 2. tiny (4 layers: cacheblend/a3/kvshare recompute layers 0 and 1 in full, so their TTFT ratio is
#    bounded by ~1/0.58 = 1.7x there; the 3x target is a qwen (24 layers) target).
$M bench fusion --model tiny --suite docqa --recompute 0.15 --lengths 1024,2048,4000 --chunks 8 \
  --n 8 --repeats 3 --methods $ALL --threads 2 --json runs/bench/fusion_tiny.json

# 3. Graph-KV on the block-fine-tuned tiny vs the stock tiny (8 minutes of fine-tuning on 1 thread).
.venv/bin/python examples/finetune_graphkv.py --out runs/tiny-graphkv --minutes 8 --threads 1
for model in tiny runs/tiny-graphkv; do
  tag=$(basename "$model")
  $M bench fusion --model "$model" --suite docqa --recompute 0.15 --lengths 1024 --chunks 8 --n 16 \
    --repeats 1 --methods graphkv,cacheblend --threads 2 --json runs/bench/fusion_graphkv_$tag.json
done

# 4. Serving simulations (no model; seconds): Continuum vs LRU, KVShare's hit-rate scheduler vs FCFS.
$M bench agent --programs 150 --rate 0.08 --memory-tokens 8000 --json runs/bench/agent_sim.json
$M bench kvsched --requests 400 --rate 5 --batch 4 --json runs/bench/kvsched_sim.json

#!/bin/bash
# Copy the run directories' records into docs/runs/ and write docs/RESULTS.md from them.
set -e
mkdir -p docs/runs/bench
for d in "$@"; do
  n=$(basename "$d"); mkdir -p docs/runs/$n
  cp "$d"/results.json "$d"/meta.json docs/runs/$n/
  cp "$d"/plot_*.png docs/runs/$n/ 2>/dev/null || true
done
cp runs/bench/*.json docs/runs/bench/
B=$(ls docs/runs/bench/plaintext_*.json docs/runs/bench/fusion_*.json)
R=$(for d in "$@"; do echo docs/runs/$(basename "$d"); done)
.venv/bin/mpckv report --results $R --bench $B --notes docs/results_notes.md --out docs/RESULTS.md

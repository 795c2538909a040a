"""Block fine-tune of the shipped tiny model for Graph-KV (segment-graph masks with shared positions).

Graph-KV (arXiv 2506.07334) expects a backbone post-trained with block attention: with shared position
ranges every chunk starts at the same position and a stock model has never seen that. This script trains
``tiny`` on docqa prompts laid out exactly as :class:`mpckv.plaintext.fusion.graphkv.GraphKV` lays them out
at inference — documents as chunks, the first 1–3 of them sources, the others targets reading the sources
(``graph="bipartite"``, ``layout="shared"``), the question and answer reading everything — in one forward
with the Graph-KV block mask and positions, so that a source row sees only its own document (its round-0
cache) and a target row its sources and itself. A share of the rows (``--causal-frac``) keeps the ordinary
causal layout so the model still works with full prefill. Loss: next-byte cross entropy on every row,
answer bytes up-weighted.

Usage (about 8 minutes on one thread)::

    python examples/finetune_graphkv.py --out runs/tiny-graphkv --minutes 8 --threads 1

then ``mpckv bench fusion --model runs/tiny-graphkv --methods graphkv ...`` (and the same with
``--model tiny``) compares both models.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mpckv.checkpoint import load_model, save_model
from mpckv.data.synthetic import SEP, make_sample
from mpckv.plaintext.fusion.assemble import Chunk, Raw, Segment
from mpckv.plaintext.fusion.bench import split_docs
from mpckv.plaintext.fusion.graphkv import GraphKV
from mpckv.plaintext.model import LlamaModel


def layout(
    rng: random.Random, length: int, seed: int, causal_frac: float
) -> tuple[list[int], torch.Tensor, torch.Tensor, list[float]]:
    """One training row: ids, positions, the ``[N, N]`` mask and per-target weights (answer up-weighted)."""
    sample = make_sample("docqa", length, seed, num_docs=rng.randint(2, 8))
    docs = [list(d.encode("ascii", errors="replace")) for d in split_docs(sample.context)]
    tail = list((SEP + sample.question).encode("ascii", errors="replace"))
    answer = list((sample.answer + "\n").encode("ascii", errors="replace"))
    segs: list[Segment] = [*(Chunk(d) for d in docs), Raw(tail + answer)]
    ids = [t for s in segs for t in s.token_ids]
    seg_ids = torch.tensor([i for i, s in enumerate(segs) for _ in s.token_ids])
    if rng.random() < causal_frac:
        method = GraphKV(graph="causal", layout="sequential")
    else:
        method = GraphKV(
            graph="bipartite", layout="shared", sources=rng.randint(1, max(1, min(3, len(docs) - 1)))
        )
    starts = method.starts(segs)
    if starts is None:
        pos = torch.arange(len(ids))
    else:
        pos = torch.cat([torch.arange(len(s.token_ids)) + st for s, st in zip(segs, starts, strict=True)])
    mask = method.allowed(seg_ids, method.roles(segs))
    n_ans = len(answer)
    weights = [1.0] * (len(ids) - 1 - n_ans) + [5.0] * n_ans  # weight of predicting ids[i + 1]
    return ids, pos, mask, weights


def forward(model: LlamaModel, ids: list[int], pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, V]`` of one row under an arbitrary mask and positions (differentiable)."""
    hidden = model.embed(torch.tensor([ids]))
    for layer in range(model.config.num_hidden_layers):
        q, k, v = model.qkv(layer, hidden, pos[None])
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[None, None], scale=model.scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        hidden = model.finish_layer(layer, hidden, attn)
    return model.logits(hidden)[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--init", default="tiny")
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: time only)")
    p.add_argument("--batch", type=int, default=4, help="rows per optimizer step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lengths", default="768,1024,1536", help="docqa sample lengths in bytes")
    p.add_argument("--causal-frac", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.init, dtype=torch.float32)
    params = model.parameters()
    for t in params:
        t.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    lengths = [int(x) for x in args.lengths.split(",")]
    rng = random.Random(args.seed)
    t0, step, run = time.perf_counter(), 0, 0.0
    while time.perf_counter() - t0 < 60 * args.minutes and (args.steps == 0 or step < args.steps):
        opt.zero_grad()
        total = 0.0
        for _ in range(args.batch):
            ids, pos, mask, w = layout(rng, rng.choice(lengths), rng.randrange(10**9), args.causal_frac)
            logits = forward(model, ids, pos, mask)[:-1]
            ce = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
            wt = torch.tensor(w)
            loss = (ce * wt).sum() / wt.sum() / args.batch
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        run = total if step == 1 else 0.95 * run + 0.05 * total
        if step % 25 == 0:
            print(f"step {step} loss {run:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for t in params:
        t.requires_grad_(False)
    with torch.no_grad():
        model.to(dtype=torch.bfloat16)
    save_model(
        model, args.out, extra_config={"torch_dtype": "bfloat16", "mpckv_graphkv_finetune_steps": step}
    )
    print(f"wrote {args.out} after {step} steps ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

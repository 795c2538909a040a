"""mpckv demo: one prompt, several KV methods side by side.

Runs on the shipped tiny model when it is present (``mpckv.load_model("tiny")``); otherwise on a small
random-weight Llama built in memory, and says so. Prints, per method, the generated text, the kept cache
fraction, cache bytes and timings.
"""

from __future__ import annotations

import argparse
import sys

import torch

import mpckv
from mpckv.errors import CheckpointError

METHODS = [
    ("dense", {}),
    ("streamingllm", {"budget": 0.2, "sinks": 4}),
    ("h2o", {"budget": 0.2}),
    ("snapkv", {"budget": 0.2, "window": 16}),
    ("pyramidkv", {"budget": 0.2, "window": 16}),
    ("quest", {"budget": 0.2, "page_size": 16}),
]


def _model() -> tuple[mpckv.plaintext.model.LlamaModel, bool]:
    try:
        return mpckv.load_model("tiny"), True
    except CheckpointError:
        from mpckv.config import ModelConfig
        from mpckv.plaintext.model import LayerWeights, LlamaModel

        cfg = ModelConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
        g = torch.Generator().manual_seed(0)

        def w(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g) * 0.05

        layers = [
            LayerWeights(
                torch.ones(64),
                w(64, 64),
                w(32, 64),
                w(32, 64),
                w(64, 64),
                torch.ones(64),
                w(128, 64),
                w(128, 64),
                w(64, 128),
            )
            for _ in range(4)
        ]
        return LlamaModel(cfg, w(256, 64), layers, torch.ones(64), w(256, 64)), False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args(argv)
    model, trained = _model()
    tok = mpckv.ByteTokenizer()
    if trained:
        prompt = "The pass key is 48213. Remember it. " + "The grass is green. The sky is blue. " * 20
        prompt += "What is the pass key? The pass key is"
    else:
        print("note: the shipped tiny model is not present; using random weights (text will be noise)\n")
        prompt = "mpckv keeps the KV cache small. " * 12
    ids = tok.encode(prompt)
    print(f"prompt: {len(ids)} tokens, model: {model.num_parameters():,} parameters\n")
    print(
        f"{'method':<13} {'kept':>6} {'read':>6} {'cache KB':>9} {'prefill ms':>10} {'decode ms':>9}  output"
    )
    available = {m.name for m in mpckv.list_methods()}
    for name, params in METHODS:
        if name not in available:
            continue
        res = mpckv.Engine(model, name, **params).generate([ids], args.max_new_tokens, stop_tokens=[])
        st = res.stats
        read = sum(st.read_per_layer) / max(sum(st.kept_per_layer) / st.kept_fraction, 1e-9)
        text = tok.decode(res.tokens[0]).replace("\n", "\\n")
        print(
            f"{name:<13} {st.kept_fraction:>6.2f} {read:>6.2f} {st.cache_bytes / 1024:>9.1f} "
            f"{st.prefill_s * 1e3:>10.1f} {st.decode_s * 1e3:>9.1f}  {text!r}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

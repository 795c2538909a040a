"""The transformers reference row of ``mpckv bench plaintext``.

The bench's model is written as an HF-layout directory (:func:`mpckv.save_model`, the same tensors as
ours, whatever the source: checkpoint, GGUF or named model) and loaded with
``AutoModelForCausalLM.from_pretrained(dir, attn_implementation="sdpa")``; the prompt is prefilled with
``use_cache=True`` (transformers' default dynamic cache) and decoded greedily one token per call, timed
exactly like our engine.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from typing import Any

import torch

from mpckv.plaintext.model import LlamaModel

__all__ = ["hf_model", "time_hf"]


def hf_model(model: LlamaModel) -> Any:
    """A transformers causal LM holding ``model``'s weights (SDPA attention, ``model``'s dtype)."""
    from transformers import AutoModelForCausalLM

    from mpckv.checkpoint import save_model

    with tempfile.TemporaryDirectory(prefix="mpckv-hf-") as tmp:
        save_model(model, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=model.dtype)
    return hf.to(model.device).eval()


def _cache_bytes(past: Any) -> int:
    """Bytes of the key/value tensors held by a transformers cache object (0 when unknown)."""
    tensors: list[torch.Tensor] = []
    for layer in getattr(past, "layers", []) or []:
        tensors += [
            t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None
        ]
    if not tensors:
        for name in ("key_cache", "value_cache"):
            tensors += [t for t in getattr(past, name, []) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@torch.no_grad()
def time_hf(hf: Any, ids: torch.Tensor, new_tokens: int, warmup: int, rss: Any = None) -> dict[str, Any]:
    """Prefill ``ids [B, T]`` and decode ``new_tokens`` greedy tokens; per-step times in seconds.

    ``rss`` (optional callable) is sampled after the prefill and after every step.
    """
    dev = next(hf.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ids = ids.to(dev)
    t0 = time.perf_counter()
    out = hf(input_ids=ids, use_cache=True)
    sync()
    prefill_s = time.perf_counter() - t0
    past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    cache_after_prefill = _cache_bytes(past)
    samples = [rss()] if rss else []
    steps: list[float] = []
    for _ in range(new_tokens):
        t1 = time.perf_counter()
        with warnings.catch_warnings():  # the keyword is being renamed across transformers 5.x releases
            warnings.simplefilter("ignore", FutureWarning)
            out = hf(input_ids=tok, past_key_values=past, use_cache=True)
        sync()
        steps.append(time.perf_counter() - t1)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        if rss:
            samples.append(rss())
    timed = steps[warmup:] or steps
    return {
        "prefill_s": prefill_s,
        "decode_steps_s": steps,
        "decode_ms": 1e3 * statistics.median(timed) if timed else None,
        "cache_bytes_after_prefill": cache_after_prefill,
        "cache_bytes": _cache_bytes(past),
        "rss_peak_mb": max(samples) if samples else None,
    }

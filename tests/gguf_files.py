"""Small GGUF files written by the tests with ``gguf.GGUFWriter``, laid out as llama.cpp writes them.

``write_gguf(model, path, arch=...)`` stores a :class:`LlamaModel`'s weights under GGUF names, with the
rows of q/k permuted for ``llama`` (what ``convert_hf_to_gguf.py`` does) and not for ``qwen2``, plus a
byte-level BPE tokenizer (256 byte tokens, a few merges, ChatML control tokens) and a chat template.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mpckv.gguf_loader import permute_rows

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "1 2"]


def byte_unicode() -> list[str]:
    """GPT-2's printable spelling of the 256 byte values, in byte order."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def vocab() -> tuple[list[str], list[int]]:
    """Tokens and token types of the test tokenizer: bytes, merged tokens, then control tokens."""
    tokens = byte_unicode() + [m.replace(" ", "") for m in MERGES] + SPECIAL
    types = [1] * (len(tokens) - len(SPECIAL)) + [3] * len(SPECIAL)
    return tokens, types


VOCAB_SIZE = len(vocab()[0])


def _np(t: torch.Tensor | None) -> np.ndarray:
    assert t is not None
    return t.detach().to(torch.float32).cpu().numpy()


def _put(w, name: str, arr: np.ndarray, qtype) -> None:
    from gguf import GGMLQuantizationType, quants

    if qtype == GGMLQuantizationType.F32 or arr.ndim == 1:
        w.add_tensor(name, arr.astype(np.float32))
    elif qtype == GGMLQuantizationType.F16:
        w.add_tensor(name, arr.astype(np.float16))
    else:
        q = quants.quantize(arr, qtype)
        if q.dtype == np.uint8:  # the writer derives the shape from the byte shape
            w.add_tensor(name, q, raw_dtype=qtype)
        else:
            w.add_tensor(name, q, raw_shape=arr.shape, raw_dtype=qtype)


def write_gguf(
    model,
    path: Path,
    *,
    arch: str = "llama",
    qtype=None,
    pre: str = "qwen2",
    raw: dict[str, tuple[np.ndarray, object]] | None = None,
    skip: tuple[str, ...] = (),
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``model`` as a GGUF of architecture ``arch`` (``llama`` permutes q/k rows).

    ``qtype``: quantization of the matrices (default F32); ``raw``: tensors given as pre-quantized
    ``(uint8 blocks [rows, bytes], qtype)`` by GGUF name, replacing the model's; ``skip``: names left
    out; ``extra``: unexpected tensors added.
    """
    import gguf

    qtype = qtype if qtype is not None else gguf.GGMLQuantizationType.F32
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope.theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tokens, types = vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    permute = arch == "llama"
    tensors: dict[str, np.ndarray] = {
        "token_embd.weight": _np(model.embed_tokens),
        "output_norm.weight": _np(model.norm),
    }
    if model.lm_head is not model.embed_tokens:
        tensors["output.weight"] = _np(model.lm_head)
    names = {
        "input_norm": "attn_norm.weight",
        "q_proj": "attn_q.weight",
        "k_proj": "attn_k.weight",
        "v_proj": "attn_v.weight",
        "o_proj": "attn_output.weight",
        "post_norm": "ffn_norm.weight",
        "gate_proj": "ffn_gate.weight",
        "up_proj": "ffn_up.weight",
        "down_proj": "ffn_down.weight",
        "q_bias": "attn_q.bias",
        "k_bias": "attn_k.bias",
        "v_bias": "attn_v.bias",
    }
    for i, lw in enumerate(model.layers):
        for attr, gname in names.items():
            t = getattr(lw, attr)
            if t is None:
                continue
            if permute and attr in ("q_proj", "q_bias"):
                t = permute_rows(t, c.num_attention_heads)
            elif permute and attr in ("k_proj", "k_bias"):
                t = permute_rows(t, c.num_key_value_heads)
            tensors[f"blk.{i}.{gname}"] = _np(t)
    tensors.update(extra or {})
    for name, arr in tensors.items():
        if name in skip:
            continue
        if raw and name in raw:
            data, rq = raw[name]
            w.add_tensor(name, data, raw_dtype=rq)
        else:
            _put(w, name, arr, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

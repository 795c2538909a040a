"""One Llama-family decoder (Llama, Qwen2, Mistral) written over the :mod:`backend` interface.

The model holds plain tensors, not ``nn.Module`` s: the engine drives the layer loop itself so that KV
methods can hook between projection and attention. ``model(input_ids)`` runs a dense forward and returns
logits ``[B, T, V]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mpckv.config import ModelConfig
from mpckv.errors import ShapeError
from mpckv.plaintext.backend import TORCH, Backend
from mpckv.plaintext.rope import apply_rope, cos_sin, inverse_frequencies


@dataclass
class LayerWeights:
    """Weights of one decoder layer (HF ``nn.Linear`` layout: ``[out, in]``)."""

    input_norm: torch.Tensor
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every :class:`LayerWeights` field for ``cfg`` (weights and optional biases)."""
    d, hd, ff = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    nq, nk = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {
        "input_norm": (d,),
        "q_proj": (nq, d),
        "k_proj": (nk, d),
        "v_proj": (nk, d),
        "o_proj": (d, nq),
        "post_norm": (d,),
        "gate_proj": (ff, d),
        "up_proj": (ff, d),
        "down_proj": (d, ff),
        "q_bias": (nq,),
        "k_bias": (nk,),
        "v_bias": (nk,),
        "o_bias": (d,),
        "gate_bias": (ff,),
        "up_bias": (ff,),
        "down_bias": (d,),
    }


class LlamaModel:
    """Llama-family decoder.

    Parameters
    ----------
    config:
        Architecture.
    embed, norm, lm_head:
        Token embedding ``[V, D]``, final RMSNorm weight ``[D]`` and output head ``[V, D]`` (the embedding
        itself when tied).
    layers:
        One :class:`LayerWeights` per decoder layer.
    """

    def __init__(
        self,
        config: ModelConfig,
        embed: torch.Tensor,
        layers: list[LayerWeights],
        norm: torch.Tensor,
        lm_head: torch.Tensor,
        backend: Backend = TORCH,
    ) -> None:
        if len(layers) != config.num_hidden_layers:
            raise ShapeError(f"expected {config.num_hidden_layers} layers, got {len(layers)}")
        self.config = config
        self.embed_tokens = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.xp = backend
        self.inv_freq = inverse_frequencies(config.rope, config.head_dim).to(self.device)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.source: str | None = None  # checkpoint directory it was loaded from, if any

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        dev = getattr(self.embed_tokens, "device", None)
        return dev if isinstance(dev, torch.device) else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (fp32 for secret-shared weights, whose encoding is fixed point)."""
        return self.embed_tokens.dtype if isinstance(self.embed_tokens, torch.Tensor) else torch.float32

    def parameters(self) -> list[torch.Tensor]:
        """All weight tensors (shared embedding/head counted once)."""
        out: list[torch.Tensor] = [self.embed_tokens, self.norm]
        if self.lm_head is not self.embed_tokens:
            out.append(self.lm_head)
        for lw in self.layers:
            out.extend(t for t in vars(lw).values() if isinstance(t, torch.Tensor))
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LlamaModel:
        """Move (or cast) every weight in place and return self."""

        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        tied = self.lm_head is self.embed_tokens
        self.embed_tokens = mv(self.embed_tokens)
        self.norm = mv(self.norm)
        self.lm_head = self.embed_tokens if tied else mv(self.lm_head)
        for lw in self.layers:
            for key, val in vars(lw).items():
                if isinstance(val, torch.Tensor):
                    setattr(lw, key, mv(val))
        self.inv_freq = self.inv_freq.to(device=self.device)
        return self

    # ------------------------------------------------------------------ pieces used by the engine
    def embed(self, input_ids: Any) -> Any:
        """Token embeddings ``[B, T, D]`` (ids ``[B, T]``, or a secret one-hot ``[B, T, V]`` under MPC)."""
        return self.xp.embed(input_ids, self.embed_tokens)

    def qkv(
        self, layer: int, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-attention half of a layer: norm, q/k/v projections, RoPE.

        Returns q ``[B, H, T, d]`` and k, v ``[B, Hk, T, d]`` (q and k post-RoPE at ``positions [B, T]``).
        """
        c, lw, xp = self.config, self.layers[layer], self.xp
        b, t, _ = hidden.shape
        x = xp.rms_norm(hidden, lw.input_norm, c.rms_norm_eps)
        q = xp.linear(x, lw.q_proj, lw.q_bias).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = xp.linear(x, lw.k_proj, lw.k_bias).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = xp.linear(x, lw.v_proj, lw.v_bias).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        cos, sin = cos_sin(self.inv_freq, positions, self.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish_layer(self, layer: int, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Post-attention half: output projection, residual, MLP, residual. ``attn`` is ``[B, H, T, d]``."""
        c, lw, xp = self.config, self.layers[layer], self.xp
        b, _, t, _ = attn.shape
        merged = attn.transpose(1, 2).reshape(b, t, c.num_attention_heads * c.head_dim)
        hidden = hidden + xp.linear(merged, lw.o_proj, lw.o_bias)
        x = xp.rms_norm(hidden, lw.post_norm, c.rms_norm_eps)
        gated = xp.silu(xp.linear(x, lw.gate_proj, lw.gate_bias)) * xp.linear(x, lw.up_proj, lw.up_bias)
        return hidden + xp.linear(gated, lw.down_proj, lw.down_bias)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.xp.rms_norm(hidden, self.norm, self.config.rms_norm_eps)
        return self.xp.to_logits(self.xp.linear(x, self.lm_head))

    # ------------------------------------------------------------------ dense forward
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Dense causal forward; ``attention_mask [B, T]`` (1 = real token) allows right padding."""
        b, t = input_ids.shape
        ids = input_ids.to(self.device)
        lengths = (
            attention_mask.to(self.device).long().sum(-1)
            if attention_mask is not None
            else torch.full((b,), t, device=self.device, dtype=torch.long)
        )
        positions = torch.arange(t, device=self.device).expand(b, t)
        hidden = self.embed(ids)
        for layer in range(self.config.num_hidden_layers):
            q, k, v = self.qkv(layer, hidden, positions)
            attn = self.xp.prefill_attention(q, k, v, lengths, self.scale, self.config.sliding_window)
            hidden = self.finish_layer(layer, hidden, attn)
        return self.logits(hidden)

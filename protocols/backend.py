"""``CrypTenBackend``: the Backend (``xp``) interface over CrypTen secret shares.

With it, the plaintext :class:`~mpckv.plaintext.engine.Engine`, :class:`~mpckv.plaintext.model.LlamaModel`
and method objects run under MPC unchanged. What is public: shapes, the prompt length, positions, budgets
and anything a method derives from them (e.g. StreamingLLM's kept pattern). What is secret: weights
(party 0's), the prompt (party 1's), every activation, the KV cache, logits. The chosen token of each step
is revealed to party 1 only (it is the output) and fed back as a secret one-hot.

Every operation is labelled for communication accounting (:mod:`mpckv.protocols.comm`) with an ``op``
(matmul, softmax, rmsnorm, silu, embed, argmax, …); the engine adds ``phase`` and ``layer`` through
:meth:`CrypTenBackend.scope`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from mpckv.errors import ConfigError, ShapeError
from mpckv.protocols import comm
from mpckv.protocols.compat import import_crypten

OUTPUT_PARTY = 1


class SecretTokens:
    """A prompt shared by party 1: a secret one-hot ``[1, T, V]``; ``T`` is public."""

    def __init__(self, onehot: Any, length: int):
        self.onehot = onehot
        self.length = length


class CrypTenBackend:
    """Secure backend; every party runs the same calls on its shares."""

    name = "crypten"
    secure = True

    def __init__(self, output_party: int = OUTPUT_PARTY, kv_cache: str = "stock"):
        if kv_cache not in ("stock", "persistent"):
            raise ConfigError(f"kv_cache must be 'stock' or 'persistent', got {kv_cache!r}")
        self.crypten = import_crypten()
        self.output_party = output_party
        self.kv_cache = kv_cache
        # public per-norm scale hints (id of the norm's weight -> typical mean square), see set_norm_scale
        self._norm_scales: dict[int, tuple[Any, float]] = {}

    def set_norm_scale(self, weight: Any, scale: float) -> None:
        """Give the RMSNorm with this ``weight`` a public hint of its input's typical mean square.

        Real models have activations that span many orders of magnitude (SmolLM2's attention-sink token
        reaches a mean square of 10**6 while other rows sit near 10): :func:`~mpckv.protocols.numerics
        .rms_norm` divides its input by ``sqrt(scale)`` first, so the sum of squares stays inside the
        fixed-point range and its 2-party truncation rarely wraps. See
        :func:`mpckv.protocols.secure_model.norm_scales`.
        """
        if not scale > 0:
            raise ConfigError(f"a norm scale hint must be positive, got {scale}")
        self._norm_scales[id(weight)] = (weight, float(scale))

    def norm_scale(self, weight: Any) -> float:
        """The hint set for ``weight`` (1.0 when none)."""
        hit = self._norm_scales.get(id(weight))
        return hit[1] if hit is not None and hit[0] is weight else 1.0

    # ------------------------------------------------------------------ accounting scopes
    @contextlib.contextmanager
    def scope(self, phase: str | None = None, layer: int | None = None) -> Iterator[None]:
        with comm.labels(phase=phase, layer=layer):
            yield

    # ------------------------------------------------------------------ arithmetic
    def linear(self, x: Any, weight: Any, bias: Any | None = None) -> Any:
        from mpckv.protocols.persistent_weights import PersistentWeight

        with comm.op("matmul"):
            out = weight.linear(x) if isinstance(weight, PersistentWeight) else x.matmul(weight.t())
        return out if bias is None else out + bias

    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any:
        from mpckv.protocols.numerics import rms_norm

        with comm.op("rmsnorm"):
            return rms_norm(x, weight, eps, scale=self.norm_scale(weight))

    def silu(self, x: Any) -> Any:
        from mpckv.protocols.numerics import silu

        with comm.op("silu"):
            return silu(x)

    def softmax(self, x: Any, dim: int = -1, keep: torch.Tensor | None = None) -> Any:
        from mpckv.protocols.numerics import softmax

        with comm.op("softmax"):
            return softmax(x, dim=dim, keep=keep)

    def embed(self, ids: Any, table: Any) -> Any:
        """Secret one-hot ``[B, T, V]`` times the secret table ``[V, D]``."""
        from mpckv.protocols.persistent_weights import PersistentWeight

        with comm.op("embed"):
            return table.lookup(ids) if isinstance(table, PersistentWeight) else ids.matmul(table)

    def to_logits(self, x: Any) -> Any:
        return x

    # ------------------------------------------------------------------ engine plumbing
    def prepare_input(self, input_ids: Any, device: torch.device) -> tuple[Any, torch.Tensor]:
        if not isinstance(input_ids, SecretTokens):
            raise ConfigError("secure prefill takes SecretTokens (see mpckv.protocols.share_prompt)")
        return input_ids.onehot, torch.tensor([input_ids.length], dtype=torch.long)

    def new_cache(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Any:
        if self.kv_cache == "persistent":
            from mpckv.protocols.persistent_cache import PersistentKVCache

            return PersistentKVCache(num_layers, batch, kv_heads, head_dim)
        from mpckv.protocols.secure_cache import SecureKVCache

        return SecureKVCache(num_layers, batch, kv_heads, head_dim)

    def _attend(self, q: Any, k: Any, v: Any, keep: torch.Tensor, scale: float) -> tuple[Any, Any]:
        """``q [B, Hk, G, T, d]``, ``k, v [B, Hk, L, d]``, public ``keep [.., T, L]`` → out, probs."""
        from mpckv.protocols.persistent_cache import persistent_source

        b, hk, g, t, d = q.shape
        src_k, src_v = persistent_source(k), persistent_source(v)
        with comm.op("qk"):
            if src_k is not None and src_k.which == "k":  # persistent mask: O(d) online
                scores = src_k.cache.qk(q)
            else:
                scores = q.reshape(b, hk, g * t, d).matmul(k.transpose(-1, -2)).reshape(b, hk, g, t, -1)
        probs = self.softmax(scores * scale, dim=-1, keep=keep)
        with comm.op("pv"):
            if src_v is not None and src_v.which == "v":  # persistent mask: O(n) online
                out = src_v.cache.pv(probs)
            else:
                out = probs.reshape(b, hk, g * t, -1).matmul(v).reshape(b, hk, g, t, d)
        return out, probs

    def prefill_attention(
        self, q: Any, k: Any, v: Any, lengths: torch.Tensor, scale: float, sliding_window: int | None
    ) -> Any:
        from mpckv.plaintext.attention import prefill_mask

        b, h, t, d = q.shape
        hk = k.shape[1]
        keep = prefill_mask(t, lengths, sliding_window)[:, :, None]  # [B, 1, 1, T, T]
        out, _ = self._attend(q.reshape(b, hk, h // hk, t, d), k, v, keep, scale)
        return out.reshape(b, h, t, d)

    def cache_attention(
        self,
        q: Any,
        k: Any,
        v: Any,
        lengths: torch.Tensor,
        scale: float,
        keep: torch.Tensor | None,
        return_probs: bool,
    ) -> tuple[Any, Any | None]:
        b, h, d = q.shape
        hk, n = k.shape[1], k.shape[2]
        live = torch.arange(n)[None, None, :] < lengths[..., None]
        if keep is not None:
            live = live & keep
        out, probs = self._attend(q.reshape(b, hk, h // hk, 1, d), k, v, live[:, :, None, None, :], scale)
        return out.reshape(b, h, d), (probs.reshape(b, h, n) if return_probs else None)

    def take_rows(self, x: Any, index: torch.Tensor) -> Any:
        if not isinstance(index, torch.Tensor):
            raise ConfigError(
                "secure gathers by a secret selection need a one-hot gather (not supported yet)"
            )
        b, hk, kk = index.shape
        return x.gather(2, index[..., None].expand(b, hk, kk, x.shape[-1]))

    def last_hidden(self, hidden: Any, lengths: torch.Tensor) -> Any:
        if hidden.shape[0] != 1:
            raise ShapeError("secure generation serves one prompt at a time")
        return hidden[:, int(lengths[0]) - 1]

    def next_token(self, logits: Any, sampling: Any, gen: torch.Generator) -> tuple[Any, list[int] | None]:
        """Secure greedy choice: a secret one-hot argmax, opened to the output party only."""
        if getattr(sampling, "temperature", 0.0) != 0.0:
            raise ConfigError("secure generation is greedy only (temperature 0)")
        with comm.op("argmax"):
            onehot = logits.argmax(dim=-1, one_hot=True)
        with comm.op("reveal"):
            plain = onehot.get_plain_text(dst=self.output_party)
        rank = self.crypten.communicator.get().get_rank()
        visible = plain.argmax(dim=-1).tolist() if rank == self.output_party else None
        return onehot, visible

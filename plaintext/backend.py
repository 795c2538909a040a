"""The Backend (``xp``) interface that the model, the engine and the methods compute through.

Two implementations: :class:`TorchBackend` here (plaintext, CPU/CUDA) and ``CrypTenBackend`` in
:mod:`mpckv.protocols.backend` (secret shares across parties). The engine and the model only call these
operations, so the same code runs on both. Masks are multiplicative (``keep``), never additive ``-inf``: an
additive mask is a large constant that breaks fixed-point arithmetic under MPC.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from mpckv.errors import ShapeError


def check_device(device: Any) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device`` → ``torch.device``, else ``ConfigError``.

    Refuses device types the engine does not run on (``"tpu"``, ``"mps"``, ...) and CUDA when it is not
    available, with one actionable line instead of a torch ``RuntimeError``.
    """
    from mpckv.errors import ConfigError

    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA device(s) visible)"
            )
    return dev


def _is_token(x: Any) -> bool:
    """An integer token id: a Python / NumPy integer or a 0-d integer tensor (bools are not)."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not (x.dtype.is_floating_point or x.is_complex() or x.dtype == torch.bool)
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class Backend(Protocol):
    """Operations the model forward, the engine and the KV methods may use."""

    name: str
    secure: bool

    def scope(self, phase: str | None = None, layer: int | None = None) -> Any: ...

    def linear(self, x: Any, weight: Any, bias: Any | None = None) -> Any: ...

    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any: ...

    def silu(self, x: Any) -> Any: ...

    def softmax(self, x: Any, dim: int = -1, keep: torch.Tensor | None = None) -> Any: ...

    def embed(self, ids: Any, table: Any) -> Any: ...

    def to_logits(self, x: Any) -> Any: ...

    def prepare_input(self, input_ids: Any, device: torch.device) -> tuple[Any, torch.Tensor]: ...

    def new_cache(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Any: ...

    def prefill_attention(
        self, q: Any, k: Any, v: Any, lengths: torch.Tensor, scale: float, sliding_window: int | None
    ) -> Any: ...

    def cache_attention(
        self,
        q: Any,
        k: Any,
        v: Any,
        lengths: torch.Tensor,
        scale: float,
        keep: torch.Tensor | None,
        return_probs: bool,
    ) -> tuple[Any, Any | None]: ...

    def take_rows(self, x: Any, index: torch.Tensor) -> Any: ...

    def last_hidden(self, hidden: Any, lengths: torch.Tensor) -> Any: ...

    def next_token(
        self, logits: Any, sampling: Any, gen: torch.Generator
    ) -> tuple[Any, list[int] | None]: ...


class TorchBackend:
    """Plaintext backend on torch tensors (CPU or CUDA)."""

    name = "torch"
    secure = False

    @contextlib.contextmanager
    def scope(self, phase: str | None = None, layer: int | None = None) -> Iterator[None]:
        """Accounting labels (a no-op in plaintext; the secure backend counts communication per scope)."""
        yield

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Same order of operations as HF Llama: normalise in fp32, cast back, then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)

    def softmax(self, x: torch.Tensor, dim: int = -1, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax in fp32 over ``dim``; entries with ``keep == False`` get probability 0.

        A row with no kept entry returns all zeros (not NaN).
        """
        xf = x.float()
        if keep is None:
            return torch.softmax(xf, dim=dim)
        masked = xf.masked_fill(~keep, float("-inf"))
        row_max = masked.amax(dim=dim, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
        e = torch.exp(masked - row_max) * keep
        denom = e.sum(dim=dim, keepdim=True)
        return e / denom.clamp_min(torch.finfo(torch.float32).tiny)

    def embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2:
            raise ShapeError(f"input_ids must be [B, T], got shape {tuple(ids.shape)}")
        vocab = table.shape[0]
        if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            raise ShapeError(
                f"token ids must lie in [0, {vocab}); got range [{int(ids.min())}, {int(ids.max())}]"
            )
        return F.embedding(ids, table)

    def to_logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()

    def prepare_input(self, input_ids: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad a list of token lists (or accept ``[B, T]``) → ids ``[B, T]``, lengths ``[B]``.

        Raises :class:`ShapeError` for anything but integer token ids (text, floats, bools, nesting).
        """
        if isinstance(input_ids, str | bytes):
            raise ShapeError(
                "input_ids must be token ids, not text; encode the prompt first, e.g. "
                "mpckv.tokenizer.load_tokenizer(model.source, model.config.vocab_size).encode(text)"
            )
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dtype.is_floating_point or input_ids.is_complex() or input_ids.dtype == torch.bool:
                raise ShapeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
            if input_ids.dim() == 1:
                input_ids = input_ids[None]
            if input_ids.dim() != 2 or input_ids.shape[1] == 0:
                raise ShapeError(f"input_ids must be a non-empty [B, T], got {tuple(input_ids.shape)}")
            b, t = input_ids.shape
            lengths = torch.full((b,), t, dtype=torch.long, device=device)
            return input_ids.to(device=device, dtype=torch.long), lengths
        try:
            seqs = list(input_ids)
        except TypeError:
            raise ShapeError(
                f"input_ids must be a list of token ids or of token-id lists, got {type(input_ids).__name__}"
            ) from None
        if seqs and not any(isinstance(x, Sequence | torch.Tensor) and not _is_token(x) for x in seqs):
            seqs = [seqs]  # one flat prompt (its entries are checked below)
        for i, seq in enumerate(seqs):
            if isinstance(seq, str | bytes) or not isinstance(seq, Sequence | torch.Tensor):
                raise ShapeError(f"prompt {i} must be a list of token ids, got {type(seq).__name__}")
            bad = next((x for x in seq if not _is_token(x)), None)
            if bad is not None or any(isinstance(x, torch.Tensor) and x.dim() for x in seq):
                raise ShapeError(f"token ids must be integers; prompt {i} contains {bad!r}")
        seqs = [[int(x) for x in s] for s in seqs]
        if not seqs or any(len(s) == 0 for s in seqs):
            raise ShapeError("every prompt needs at least one token")
        t = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), t, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return ids.to(device), torch.tensor([len(s) for s in seqs], dtype=torch.long, device=device)

    def new_cache(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Any:
        from mpckv.plaintext.kv_cache import KVCache

        return KVCache(num_layers, batch, kv_heads, head_dim, dtype, device)

    def prefill_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lengths: torch.Tensor,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        from mpckv.plaintext.attention import prefill_attention

        return prefill_attention(q, k, v, lengths, scale, sliding_window)

    def cache_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lengths: torch.Tensor,
        scale: float,
        keep: torch.Tensor | None,
        return_probs: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from mpckv.plaintext.attention import cache_attention

        return cache_attention(q, k, v, lengths, scale, keep, return_probs)

    def sparse_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        index: torch.Tensor,
        counts: torch.Tensor,
        scale: float,
        keep: torch.Tensor | None,
        return_probs: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode attention over the cache rows ``index [B, Hk, K]`` (valid: the first ``counts``) without
        materialising the gather on CUDA (:mod:`mpckv.kernels.sparse_attention`)."""
        from mpckv.kernels.sparse_attention import sparse_decode_attention

        return sparse_decode_attention(
            q, k, v, index, counts, scale=scale, keep=keep, return_probs=return_probs
        )

    def take_rows(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Gather ``x [B, Hk, L, d]`` at ``index [B, Hk, K]`` along the entry axis (whole-row copies)."""
        from mpckv.kernels.sparse_attention import gather_rows

        return gather_rows(x, index)

    def last_hidden(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Hidden state of each sequence's last real token: ``[B, T, D]`` → ``[B, D]``."""
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]

    def next_token(
        self, logits: torch.Tensor, sampling: Any, gen: torch.Generator
    ) -> tuple[torch.Tensor, list[int] | None]:
        """Choose the next token of every sequence: (what to feed back, the ids this party sees)."""
        from mpckv.plaintext.sampling import sample_next

        nxt = sample_next(logits, sampling, gen)
        return nxt, nxt.tolist()


TORCH = TorchBackend()

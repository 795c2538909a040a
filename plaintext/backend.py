"""The Backend (``xp``) interface that the model and the methods compute through.

Two implementations are planned: :class:`TorchBackend` here (plaintext, CPU/CUDA) and a CrypTen backend in
``mpckv.protocols`` (secret shares). Everything the model forward needs goes through these few operations,
so the same model code runs on both. Masks are multiplicative (``keep``), never additive ``-inf``: an
additive mask is a large constant that breaks fixed-point arithmetic under MPC.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Backend(Protocol):
    """Operations the model forward and the KV methods may use."""

    name: str

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ...

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        ...

    def softmax(self, x: torch.Tensor, dim: int = -1, keep: torch.Tensor | None = None) -> torch.Tensor:
        ...


class TorchBackend:
    """Plaintext backend on torch tensors (CPU or CUDA)."""

    name = "torch"

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


TORCH = TorchBackend()

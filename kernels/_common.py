"""Shared helpers for the compute kernels: optional Triton import and implementation dispatch.

Triton is an optional dependency. Every kernel module imports it through this module, so that
``mpckv.kernels`` imports fine without Triton (``HAS_TRITON`` is then ``False`` and only the pure-torch
implementations are available).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton missing or broken
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "Impl",
    "GroupReduce",
    "triton",
    "tl",
    "is_interpreted",
    "resolve_impl",
    "check_group_reduce",
    "reduce_groups",
    "next_pow2",
    "use_f32_dot",
    "check_lengths",
]

Impl = Literal["auto", "torch", "triton"]
GroupReduce = Literal["mean", "sum", "max"]

#: Integer codes of the group reductions, passed to kernels as a ``tl.constexpr``.
GROUP_REDUCE_CODES: dict[str, int] = {"mean": 0, "sum": 1, "max": 2}


def is_interpreted(kernel: Any) -> bool:
    """Return whether a ``@triton.jit`` kernel was created in interpreter mode.

    Parameters
    ----------
    kernel
        The decorated kernel object.

    Returns
    -------
    bool
        ``True`` when the module defining ``kernel`` was imported with ``TRITON_INTERPRET=1``, i.e. the
        kernel runs on CPU tensors through the Triton interpreter.
    """
    return type(kernel).__name__ == "InterpretedFunction"


def resolve_impl(impl: str, tensors: tuple[torch.Tensor, ...], kernel: Any) -> Literal["torch", "triton"]:
    """Resolve the ``impl`` argument of a dispatcher into a concrete implementation.

    Parameters
    ----------
    impl
        ``"auto"``, ``"torch"`` or ``"triton"``.
    tensors
        The input tensors; their device decides what ``"auto"`` picks.
    kernel
        One of the Triton kernels used by the implementation (``None`` when Triton is missing); used to
        check whether it can run on CPU tensors (interpreter mode).

    Returns
    -------
    {"torch", "triton"}
        ``"auto"`` gives ``"triton"`` when all inputs are CUDA tensors and Triton imports, else ``"torch"``.

    Raises
    ------
    ValueError
        On an unknown ``impl``.
    RuntimeError
        When ``"triton"`` is requested but Triton is not installed, or the inputs are CPU tensors and the
        kernels were not created under ``TRITON_INTERPRET=1`` (the variable must be set before Triton and
        this package are imported).
    """
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if (HAS_TRITON and on_cuda) else "torch"
    if impl != "triton":
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if not HAS_TRITON:
        raise RuntimeError("impl='triton' requested but triton is not installed (pip install triton)")
    if not on_cuda and not is_interpreted(kernel):
        raise RuntimeError(
            "impl='triton' on non-CUDA tensors needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before importing triton and mpckv.kernels"
        )
    return "triton"


def check_group_reduce(group_reduce: str) -> int:
    """Validate a group reduction name and return its kernel code.

    Parameters
    ----------
    group_reduce
        ``"mean"``, ``"sum"`` or ``"max"``.

    Returns
    -------
    int
        The code from :data:`GROUP_REDUCE_CODES`.

    Raises
    ------
    ValueError
        On an unknown name.
    """
    if group_reduce not in GROUP_REDUCE_CODES:
        raise ValueError(f"group_reduce must be one of {sorted(GROUP_REDUCE_CODES)}, got {group_reduce!r}")
    return GROUP_REDUCE_CODES[group_reduce]


def reduce_groups(x: torch.Tensor, group_reduce: str, dim: int) -> torch.Tensor:
    """Reduce ``x`` over the query-head-group dimension ``dim`` with mean, sum or max.

    Parameters
    ----------
    x
        Tensor holding the per-query-head values.
    group_reduce
        ``"mean"``, ``"sum"`` or ``"max"``.
    dim
        The group dimension to reduce.

    Returns
    -------
    torch.Tensor
        ``x`` reduced over ``dim``.
    """
    check_group_reduce(group_reduce)
    if group_reduce == "mean":
        return x.mean(dim=dim)
    if group_reduce == "sum":
        return x.sum(dim=dim)
    return x.amax(dim=dim)


def next_pow2(n: int) -> int:
    """Return the smallest power of two ``>= max(n, 1)``."""
    return 1 << max(int(n) - 1, 0).bit_length()


def use_f32_dot(dtype: torch.dtype, kernel: Any) -> bool:
    """Return whether a kernel should up-cast its ``tl.dot`` operands to fp32 (IEEE precision).

    fp32 inputs are always multiplied in IEEE fp32 (no TF32), so scores are computed in true fp32. fp16
    and bf16 operands are multiplied natively with fp32 accumulation on GPU (products of two 16-bit
    floats are exact in fp32), except under the Triton interpreter, whose bf16 ``dot`` is unreliable.

    Parameters
    ----------
    dtype
        The dtype of the operands.
    kernel
        The kernel to be launched (to detect interpreter mode).

    Returns
    -------
    bool
        ``True`` to up-cast to fp32.
    """
    return dtype == torch.float32 or is_interpreted(kernel)


def check_lengths(lengths: torch.Tensor, batch: int, kv_heads: int, name: str = "lengths") -> None:
    """Check that ``lengths`` is an integer tensor of shape ``[batch, kv_heads]`` (or any 2-D shape).

    Parameters
    ----------
    lengths
        The tensor to check.
    batch, kv_heads
        Expected sizes.
    name
        Argument name used in error messages.

    Raises
    ------
    ValueError
        On a wrong shape or a non-integer dtype.
    """
    if tuple(lengths.shape) != (batch, kv_heads):
        raise ValueError(f"{name} must have shape {[batch, kv_heads]}, got {list(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {lengths.dtype}")

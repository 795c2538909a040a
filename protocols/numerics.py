"""MPC-safe nonlinearities on CrypTen tensors: exp, softmax, reciprocal, rsqrt, RMSNorm, sigmoid, SiLU.

CrypTen's own approximations are only valid on narrow ranges (``exp`` breaks below about −256,
``reciprocal`` above about 100, so its ``softmax`` is garbage for long rows; see
``shared/research/mpc_anchors.md``). Every function here states the input range on which it is valid and
its measured error in units of the fixed-point step ``2**-16`` ("LSB"), checked against torch at the
edges of that range by ``tests/protocols/test_numerics.py``. Masks are multiplicative (``keep``), never an
additive −inf.

Two tricks carry most of the accuracy:

* **Range reduction by public powers of two.** Comparisons of ``x`` against the public thresholds
  ``2**e`` (one batched comparison, ~8 rounds) give one-hot bins; the bin's factor ``2**-e`` is a linear
  function of the comparison bits, so ``u = x·2**-e`` lands in ``[1, 2)`` (or ``[1, 4)``) with one
  multiplication and a short Newton iteration from a minimax start needs 2–3 steps. This replaces
  CrypTen's ``reciprocal(s/n, input_in_01=True)/n``, which loses precision when ``s ≪ n`` (``s/n`` has
  only a few significant bits: for ``s ≈ 1.1`` at ``n = 16384`` the row sum is off by ~10 %).
* **exp by a degree-6 minimax polynomial on x/8, squared three times** instead of CrypTen's
  ``(1 + x/256)**256``: dividing by 256 throws away 8 bits of ``x`` that the squarings amplify back into
  a ~0.4 % relative error (≈ 230 LSB near 0); dividing by 8 costs 3 bits (≈ 10 LSB). The polynomial is
  a minimax fit rather than Taylor's, whose systematic bias adds up over long softmax rows.

Paper anchors: PUMA (Dong et al. 2023) clips exp to 0 below −14; MPCache's SPU harness does the same.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mpckv.errors import ConfigError
from mpckv.protocols.compat import import_crypten
from mpckv.protocols.primitives import (
    _add_public,
    _from_share,
    is_secret,
    select,
    to_fixed,
    tree_max,
)

__all__ = [
    "exp_clipped",
    "softmax",
    "reciprocal",
    "rsqrt",
    "rms_norm",
    "sigmoid",
    "silu",
    "exp_clipped_plain",
    "softmax_plain",
    "rms_norm_plain",
    "MASK_FILL",
]

_EXP_SQUARINGS = 3  # exp(x) = p(x / 8) ** 8
# nested coefficients a_k = c_k / c_(k-1) of the degree-6 minimax fit (c_0 = 1) of e**y on [-2, 0]
_EXP_NESTED = (0.9999193796, 0.4993687152, 0.3298390492, 0.2360634135, 0.1598002396, 0.0809577476)
MASK_FILL = -(2.0**20)
"""Value masked-out scores take for the row max: valid scores must stay above it."""

# minimax starting points (relative error 1/17 on [1, 2]; 2.4e-2 on [1, 4])
_RECIP_INIT = (24.0 / 17.0, -8.0 / 17.0)
_RSQRT_INIT = (1.33507447, -0.41045725, 0.0511782)


def _precision() -> int:
    return int(import_crypten().cfg.encoder.precision_bits)


def _exp_poly(x: Any) -> Any:
    """``p(x/8) ** 8`` with ``p`` the nested degree-6 minimax fit of ``e**y`` on ``[−2, 0]`` (9 rounds).

    ``p(y) = 1 + a1·y(1 + a2·y(1 + … (1 + a6·y)))`` keeps ``p(0) = 1`` exactly (so ``exp(0)`` is exact)
    and has relative error 3.4e-6 before fixed-point effects; the Taylor polynomial of the same degree
    is off by 1.4e-3 at ``y = −1.1``, a bias that a long softmax row sums ``n`` times.
    """
    # a_k·(x/8) in one public multiplication (one truncation; dividing first would add another)
    scale = 2.0**-_EXP_SQUARINGS
    acc = x * (_EXP_NESTED[-1] * scale) + 1.0
    for a in reversed(_EXP_NESTED[:-1]):
        acc = (x * (a * scale)) * acc + 1.0
    for _ in range(_EXP_SQUARINGS):
        acc = acc.square()
    return acc


def exp_clipped(x: Any, lo: float = -14.0) -> Any:
    """``exp(x)`` for ``lo <= x <= 0`` and exactly 0 for ``x < lo`` (any magnitude: no garbage).

    Valid range: ``x <= 0``; ``lo`` in ``[-16, 0)``. Error (2PC, 20001 points on [−14, 0]): max 10–14 LSB
    over repeated runs, mean 0.6 LSB (CrypTen's ``exp``: 229–245 LSB); tested bound 20 LSB;
    ``exp(0)`` is exactly 1; the cut at ``lo = −14`` adds ``e**-14`` ≈ 0.05 LSB. Positive inputs are not
    supported (the polynomial is fitted below 0; up to ``x ≈ 1`` it is still within ~0.01 %).
    Cost: one comparison + 9 multiplication rounds + one exact multiplication by the comparison bit.
    """
    if not -16.0 <= lo < 0.0:
        raise ConfigError(f"exp_clipped: lo must be in [-16, 0), got {lo}")
    inside = 1 - (x - lo).lt(0)
    return _exp_poly(x) * inside


def exp_clipped_plain(x: torch.Tensor, lo: float = -14.0) -> torch.Tensor:
    """Plaintext twin of :func:`exp_clipped`."""
    return torch.where(x >= lo, torch.exp(x), torch.zeros_like(x))


def _pow2_factor(x: Any, e_lo: int, e_hi: int) -> Any:
    """Secret ``f = 2**-e`` for the bin ``[2**e, 2**(e+1))`` holding ``x``, ``e_lo <= e < e_hi``.

    Below the first threshold ``f`` is ``2**-e_lo``, above the last ``2**-(e_hi − 1)``. ``f`` is a
    linear function of the comparison bits (one batched comparison), hence exact.
    """
    crypten = import_crypten()
    p = _precision()
    if e_hi - 1 > p or e_lo < -40:
        raise ConfigError(f"range [2**{e_lo}, 2**{e_hi}] too wide for {p} fractional bits")
    edges = list(range(e_lo + 1, e_hi))
    ge = 1 - crypten.stack([x - float(2.0**e) for e in edges]).lt(0) if edges else None
    return _bits_linear(ge, 1 << (p - e_lo), [(1 << (p - e)) - (1 << (p - e + 1)) for e in edges], x)


def reciprocal(x: Any, *, x_min: float = 1.0, x_max: float = 2.0**14, nr_iters: int = 3) -> Any:
    """``1/x`` for secret ``x`` in ``[x_min, x_max]`` (``2**-16 < x_min``, ``x_max <= 2**17``).

    Range reduction to ``u = x·2**-e ∈ [1, 2)`` with ``ceil(log2(x_max/x_min))`` public thresholds,
    Newton ``y ← y(2 − u·y)`` from the minimax line ``24/17 − 8u/17`` (relative error 1/17 → 3.5e-3 →
    1.2e-5 → 1.5e-10), then ``1/x = 2**-e · y``. Error: 1.2 LSB measured on ``[1, 2**14]``; bound
    3 LSB + 4·2**-16 relative (the
    relative part matters where ``1/x`` is large, i.e. ``x < 1``). Inputs outside the range diverge.
    Cost: one comparison over ``#thresholds`` copies of ``x``, then ``2 + 2·nr_iters`` multiplication
    rounds.
    """
    if not 0 < x_min < x_max:
        raise ConfigError(f"reciprocal: need 0 < x_min < x_max, got {x_min}, {x_max}")
    e_lo = math.floor(math.log2(x_min))
    e_hi = math.ceil(math.log2(x_max))
    if e_hi == e_lo:
        e_hi += 1
    f = _pow2_factor(x, e_lo, e_hi)
    u = x * f
    y = u * _RECIP_INIT[1] + _RECIP_INIT[0]
    for _ in range(nr_iters):
        y = y * (2.0 - u * y)
    return y * f


def rsqrt(x: Any, *, x_min: float = 2.0**-12, x_max: float = 2.0**18, nr_iters: int = 2) -> Any:
    """``1/sqrt(x)`` for secret ``x`` in ``[x_min, x_max]`` (``2**-16 <= x_min``, ``x_max <= 2**30``).

    Inputs up to 4x outside the range still converge (one bin of headroom at each end).

    Range reduction by powers of 4 to ``u = x·4**-i ∈ [1, 4)`` (for ``i > 8`` the factor is applied in
    two encodable steps), a quadratic minimax start (relative error 2.4 %), two Newton steps
    ``y ← y(3 − u·y²)/2``, then ``rsqrt(x) = 2**-i · y``. Error (measured): ≤ 3 LSB + 4·2**-16 relative.
    Note what fixed point allows: a small ``x`` is only known to ±2**-17 (relative ``2**-17/x``), a
    large ``x`` has a small result with few significant bits (:func:`rms_norm` avoids that), and in
    2-party CrypTen every multiplication of ``x`` fails with probability ≈ ``x·2**16/2**64``
    (truncation wrap, issue #347), so keep ``x_max`` below ~2**24 in practice.
    Cost: one comparison over ``log4(x_max/x_min)`` thresholds, 8 (9 above ``2**16``) rounds.
    """
    g, y = _rsqrt_factors(x, x_min, x_max, nr_iters)
    return g * y


def _bits_linear(ge: Any, base: int, coefs: list[int], like: Any) -> Any:
    """Fixed-point secret ``base + Σ_j ge_j·coef_j`` (ring integers) from stacked scale-1 bits ``ge``."""
    p = _precision()
    share = _add_public(torch.zeros_like(like.share), torch.full(like.share.shape, base))
    if coefs:
        view = (-1, *([1] * like.dim()))
        share = share + (ge.share * torch.tensor(coefs, dtype=torch.long).view(view)).sum(0)
    return _from_share(share, p)


def _rsqrt_factors(x: Any, x_min: float, x_max: float, nr_iters: int) -> tuple[Any, Any]:
    """``(g, y)`` with ``rsqrt(x) = g·y``; ``g = 2**-i`` exact (a power of two), ``y ∈ (1/2, 1]``."""
    crypten = import_crypten()
    p = _precision()
    if not 0 < x_min < x_max:
        raise ConfigError(f"rsqrt: need 0 < x_min < x_max, got {x_min}, {x_max}")
    if x_min < 2.0**-p:
        raise ConfigError(f"rsqrt: x_min must be >= 2**-{p}, got {x_min}")
    # one bin of headroom at each end, so inputs up to 4x outside [x_min, x_max] still converge
    i_lo = math.floor(math.log(x_min, 4)) - 1
    i_hi = max(i_lo + 2, math.ceil(math.log(x_max, 4)) + 1)
    if i_hi - 1 > p:
        raise ConfigError(f"rsqrt: x_max must be <= 2**{2 * p - 2}, got {x_max}")
    edges = list(range(i_lo + 1, i_hi))  # thresholds 4**i; bin i covers [4**i, 4**(i+1))
    ge = 1 - crypten.stack([x - float(4.0**i) for i in edges]).lt(0) if edges else None
    half = p // 2  # 4**-i = 4**-min(i, half) · 4**-max(i - half, 0), both encodable

    def lin(fn: Any) -> Any:
        base = fn(i_lo)
        return _bits_linear(ge, base, [fn(i) - fn(i - 1) for i in edges], x)

    fa = lin(lambda i: 1 << (p - 2 * min(i, half)))
    u = x * fa
    if i_hi - 1 > half:
        u = u * lin(lambda i: 1 << (p - 2 * max(i - half, 0)))  # [1, 4)
    g = lin(lambda i: 1 << (p - i))
    c0, c1, c2 = _RSQRT_INIT
    y = u * c1 + c0 + u.square() * c2
    for _ in range(nr_iters):
        y = (y * (3.0 - u * y.square())).div(2)
    return g, y


def rms_norm(
    x: Any,
    weight: Any,
    eps: float,
    *,
    scale: float = 1.0,
    ms_min: float = 2.0**-12,
    ms_max: float = 2.0**12,
) -> Any:
    """RMSNorm ``weight · x / sqrt(mean(x²) + eps)`` over the last dim (HF Llama order).

    Valid while ``ms = mean(x²)/scale`` lies in ``[ms_min, ms_max]``. ``scale`` is a public hint of
    the typical mean square (e.g. calibrated per layer in plaintext): the input is multiplied by
    ``1/sqrt(scale)`` first, which also keeps the squares small (CrypTen's 2-party truncation fails with
    probability ≈ ``|x·2**16|²/2**64`` per product, ≈ 2**-18 at ``|x| = 100``). ``weight`` is public
    (torch) or secret.

    The sum of squares ``ss = d·ms`` is never divided by ``d`` (that would keep only ``ms·2**16``
    significant units): ``x/sqrt(ms) = (x·sqrt(d)) · rsqrt(ss)``, with ``rsqrt(ss) = 2**-i·y`` from
    :func:`rsqrt`'s range reduction, evaluated as ``((x·sqrt(d))·2**-i)·y``; the sum of squares is one
    dot product (one truncation). Error (measured, 2PC, ``|weight| ≈ 1``): 3–7 LSB for ``d = 64`` and
    rms from 2**-4 to 2**6.5 (with a hint, also down to rms 2**-8), 9 LSB at ``d = 4096``. Without a
    hint the error grows like ``2**-12/ms`` LSB below ``ms ≈ 2**-8``. Tested bound: 8 LSB times
    ``max(1, |weight|)``.
    Cost: 1 (dot product) + one comparison + 7 or 8 (rsqrt) + 2 multiplication rounds (+1 for a
    secret weight).
    """
    d = x.size(-1)
    xs = x if scale == 1.0 else x * (1.0 / math.sqrt(scale))
    # sum of squares as a dot product: one truncation instead of d (≈ sqrt(d) times less noise)
    ss = xs.unsqueeze(-2).matmul(xs.unsqueeze(-1)).squeeze(-1) + d * eps / scale
    g, y = _rsqrt_factors(ss, d * ms_min, d * ms_max, nr_iters=2)
    out = ((xs * math.sqrt(d)) * g) * y
    return out * weight


def rms_norm_plain(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plaintext twin of :func:`rms_norm` (:meth:`mpckv.plaintext.backend.TorchBackend.rms_norm`)."""
    from mpckv.plaintext.backend import TORCH

    return TORCH.rms_norm(x, weight, eps)


def sigmoid(x: Any, *, clip: float = 14.0) -> Any:
    """Logistic ``1/(1+e**-x)`` for any secret ``x`` (``|x| < 2**20``).

    ``σ(x) = s + (1 − 2s)·1/(1 + e**-|x|)`` with ``s = [x < 0]``; ``e**-|x|`` is the polynomial exp of
    :func:`exp_clipped`, zeroed for ``|x| > clip`` (``σ`` is then exactly 0 or 1, off by at most
    ``e**-14`` ≈ 0.05 LSB), and ``1/(1+e)`` on ``[1, 2]`` is three Newton steps. Error (measured on
    [−20, 20]): 3.7–5 LSB (CrypTen's ``sigmoid``: 128–154 LSB); tested bound 8 LSB.
    Cost: one batched comparison (sign and clip), 1 + 9 + 1 + 6 + 1 multiplication rounds.
    """
    crypten = import_crypten()
    bits = crypten.stack([x, x + clip, clip - x]).lt(0)  # x<0, x<-clip, x>clip
    s = bits[0]
    inside = 1 - bits[1] - bits[2]
    sign = 1 - 2 * s  # ±1, scale 1
    ax = x * sign  # |x|, exact
    e = _exp_poly(-ax) * inside
    u = e + 1.0  # [1, 2]
    y = u * _RECIP_INIT[1] + _RECIP_INIT[0]
    for _ in range(3):
        y = y * (2.0 - u * y)
    return to_fixed(s) + y * sign


def silu(x: Any, *, clip: float = 14.0) -> Any:
    """SiLU ``x·σ(x)`` (SwiGLU gate) for secret ``|x| < 2**20``; error ≤ ``|x|``·(σ error) + 1 LSB.

    Exactly ``x`` above ``clip`` and exactly 0 below ``−clip``; measured 13–15 LSB on [−20, 20] (tested
    bound 24 LSB).
    """
    return x * sigmoid(x, clip=clip)


def _keep_parts(keep: Any) -> tuple[bool, Any]:
    if keep is None:
        return False, None
    if is_secret(keep):
        return True, keep
    return False, keep.to(torch.bool)


def softmax(
    x: Any,
    dim: int = -1,
    keep: Any = None,
    *,
    lo: float = -14.0,
    method: str = "pow2",
) -> Any:
    """Softmax over ``dim`` with a multiplicative ``keep`` mask (twin: ``TorchBackend.softmax``).

    ``keep`` is None, a public bool tensor or secret bits (scale-1, e.g. a comparison result)
    broadcastable to ``x``; dropped entries get probability exactly 0 and a row with nothing kept
    returns zeros. Steps: the row max over kept entries (tree of comparisons, exact), ``d = x − max``,
    :func:`exp_clipped` (``d < lo`` → 0), multiply by ``keep``, row sum ``s ∈ [1, n]``, and ``1/s``:

    * ``method="pow2"`` (default): :func:`reciprocal` on ``[1, n]`` by power-of-two range reduction;
      ≤ 2 LSB absolute on ``1/s`` for every ``s``;
    * ``method="crypten01"``: ``reciprocal(s/n, input_in_01=True)/n`` (CrypTen, ``n`` public), fine for
      flat and peaked rows but off by up to ~10 % when ``s ≪ n`` because ``s/n`` has few bits.

    Valid input: kept scores in ``(MASK_FILL, 2**19)`` (``MASK_FILL = −2**20``); rows up to
    ``n = 2**17``. Error (measured, 2PC): flat and peaked rows exact (0 LSB) up to ``n = 16384``;
    random rows (std 0.5–20) 1–2 LSB at ``n ≤ 1024``, 18–21 at 16384 (``crypten01``: 14–46 at
    ``n ≤ 1024``, up to 525, and 3058–11027 at 16384). Exps below one step truncate, so a long row
    whose mass sits in many tiny entries (e.g. one entry at 0 and 16383 at −13) is off by up to
    ~``n·2**-17``: a limit of 16 fractional bits, not of the method.
    """
    if method not in ("pow2", "crypten01"):
        raise ConfigError(f"softmax method must be 'pow2' or 'crypten01', got {method!r}")
    nd = x.dim()
    dim = dim % nd
    secret_keep, k = _keep_parts(keep)
    if k is not None:
        k = k.expand(*x.size())  # broadcast masks (e.g. [T, L] for [B, H, T, L]) to x's shape
    if dim != nd - 1:
        x = x.transpose(dim, nd - 1)
        if k is not None:
            k = k.transpose(dim, nd - 1)
    n = x.size(-1)
    if k is None:
        xm = x
    elif secret_keep:
        fill = x.clone()
        fill.share = _add_public(torch.zeros_like(x.share), _fill_ring(x.share.shape))
        xm = select(k, x, fill)
    else:
        kb = k.long()
        xm = x.clone()
        xm.share = x.share * kb + _add_public(torch.zeros_like(x.share), (1 - kb) * _fill_ring(()))
    m = tree_max(xm, -1, keepdim=True)
    e = exp_clipped(x - m, lo)
    if k is not None:
        if secret_keep:
            e = e * k
        else:
            e = e.clone()
            e.share = e.share * k.long()
    s = e.sum(-1, keepdim=True)
    if method == "pow2":
        r = reciprocal(s, x_min=1.0, x_max=float(max(n, 2)))
    else:
        r = (s / n).reciprocal(input_in_01=True) / n
    p = e * r
    if dim != nd - 1:
        p = p.transpose(dim, nd - 1)
    return p


def _fill_ring(shape: Any) -> torch.Tensor:
    return torch.full(shape, int(MASK_FILL * 2 ** _precision()), dtype=torch.long)


def softmax_plain(x: torch.Tensor, dim: int = -1, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Plaintext twin of :func:`softmax` (:meth:`mpckv.plaintext.backend.TorchBackend.softmax`)."""
    from mpckv.plaintext.backend import TORCH

    return TORCH.softmax(x, dim=dim, keep=keep)

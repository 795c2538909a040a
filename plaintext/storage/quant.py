"""Low-bit quantizers and bit packing for the quantized KV cache.

Packing (``uint8`` containers, any code count ``n``; the last byte is zero padded):

* ``bits`` in 1, 2, 4, 8 — *planar*: with ``k = 8 / bits`` codes per byte and ``m = ceil(n / k)`` bytes, byte
  ``j`` holds codes ``j, m + j, 2m + j, …`` at bit offsets ``0, bits, 2·bits, …``. Unpacking plane ``i`` is
  one shift and one mask and yields the contiguous codes ``[i·m, (i+1)·m)``, so an attention kernel can dot
  a query slice with a plane without interleaving.
* ``bits`` in 3, 5, 6, 7 — a little-endian bit stream (code ``i`` occupies bits ``[i·b, (i+1)·b)``).
* ternary (``bits = TERNARY = 1.58``) — five trits per byte in base 3 (``3^5 = 243 ≤ 256``), planar as
  above with ``m = ceil(n / 5)`` (1.6 stored bits per value).

Quantizers work on groups of ``group`` consecutive elements of the last axis (a shorter last group when the
axis is not a multiple of it); transpose first for per-channel (token-grouped) quantization:

* :func:`quantize_rtn` — round to nearest, asymmetric (``x̂ = s·q + z``, ``z = min``,
  ``s = (max − min)/(2^b − 1)``) or symmetric (``x̂ = s·(q − 2^{b−1})``, ``s = max|x| / (2^{b−1} − 1)``); the
  error is at most ``s/2`` per element. Parameters stored in a narrower dtype (fp16) are rounded *outwards*
  (the zero down, the scale up) so that the stored grid still covers ``[min, max]`` and the bound holds with
  the stored scale.
* :func:`quantize_sign` — 1 bit, ``x̂ = s·(2b − 1)`` with ``s = mean|x|`` (the least-squares scale for fixed
  signs).
* :func:`quantize_ternary` — ``x̂ ∈ {−s, 0, s}``, ``s = mean|x|``, zero when ``|x| ≤ s/2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpckv.errors import ConfigError, ShapeError
from mpckv.kernels.quant_attention import planar_planes

TERNARY = 1.58
PLANAR_BITS = (1, 2, 4, 8)
STREAM_BITS = (3, 5, 6, 7)


def check_bits(bits: float) -> None:
    if bits != TERNARY and bits not in PLANAR_BITS + STREAM_BITS:
        raise ConfigError(f"bit width must be one of 1..8 or {TERNARY} (ternary), got {bits!r}")


def packed_size(n: int, bits: float) -> int:
    """Bytes holding ``n`` codes of ``bits`` bits."""
    check_bits(bits)
    if bits == TERNARY:
        return -(-n // 5)
    b = int(bits)
    if b in PLANAR_BITS:
        return -(-n // (8 // b))
    return -(-n * b // 8)


def pack(codes: torch.Tensor, bits: float) -> torch.Tensor:
    """Pack integer codes ``[..., n]`` (values in ``[0, 2^bits)``, or ``{0, 1, 2}`` for ternary) into
    ``uint8 [..., packed_size(n, bits)]``."""
    check_bits(bits)
    n = codes.shape[-1]
    c = codes.to(torch.uint8)
    if bits == TERNARY:
        m = packed_size(n, bits)
        planes = _pad_last(c, 5 * m).unflatten(-1, (5, m))
        out = torch.zeros(*c.shape[:-1], m, dtype=torch.uint8, device=c.device)
        for i in range(5):
            out += planes[..., i, :] * (3**i)
        return out
    b = int(bits)
    if b in PLANAR_BITS:
        k = 8 // b
        m = packed_size(n, b)
        planes = _pad_last(c, k * m).unflatten(-1, (k, m))
        out = planes[..., 0, :].clone()
        for i in range(1, k):
            out |= planes[..., i, :] << (b * i)
        return out
    nbytes = packed_size(n, b)
    shifts = torch.arange(b, device=c.device, dtype=torch.uint8)
    stream = ((c[..., None] >> shifts) & 1).flatten(-2)  # [..., n·b] bits, little endian
    stream = _pad_last(stream, 8 * nbytes).unflatten(-1, (nbytes, 8))
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=c.device)
    return (stream * weights).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: float, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [..., packed_size(n, bits)]`` → codes ``uint8 [..., n]``."""
    check_bits(bits)
    if packed.shape[-1] != packed_size(n, bits):
        raise ShapeError(f"{packed.shape[-1]} bytes cannot hold {n} codes of {bits} bits")
    p = packed.to(torch.uint8).contiguous()  # strided uint8 ops take a slow path
    if bits == TERNARY:  # one table lookup per byte: [..., m, 5] → planar order [..., 5, m]
        trits = ternary_table(p.device, torch.uint8)
        t = trits.index_select(0, p.reshape(-1).to(torch.int32)).view(*p.shape, 5)
        return t.transpose(-1, -2).flatten(-2)[..., :n]
    b = int(bits)
    if b in PLANAR_BITS:
        return planar_planes(p, b).flatten(-2)[..., :n]
    shifts = torch.arange(8, device=p.device, dtype=torch.uint8)
    stream = ((p[..., None] >> shifts) & 1).flatten(-2)[..., : n * b].unflatten(-1, (n, b))
    weights = torch.tensor([1 << i for i in range(b)], dtype=torch.uint8, device=p.device)
    return (stream * weights).sum(-1, dtype=torch.uint8)


_PLANAR_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def planar_table(bits: int, device: torch.device) -> torch.Tensor:
    """fp32 ``[256, 8 / bits]``: the codes of every planar byte (column ``i`` = plane ``i``). A lookup
    ``table[bytes]`` of ``[..., m]`` bytes gives codes in *byte-major* order: slot ``j·k + i`` holds code
    ``i·m + j`` (:func:`byte_major_order`). Cached per device."""
    key = (bits, torch.device(device))
    if key not in _PLANAR_TABLES:
        byte = torch.arange(256)[:, None]
        shifts = torch.arange(0, 8, bits)[None, :]
        _PLANAR_TABLES[key] = ((byte >> shifts) & ((1 << bits) - 1)).to(device=device, dtype=torch.float32)
    return _PLANAR_TABLES[key]


def byte_major_order(n: int, bits: int, device: torch.device) -> torch.Tensor:
    """``[k·m]`` long: the code index held by each byte-major slot of :func:`planar_table` lookups
    (``k = 8 / bits`` codes per byte, ``m = packed_size(n, bits)``); padding slots get index ``n``."""
    k = 8 // bits
    m = packed_size(n, bits)
    j, i = torch.meshgrid(torch.arange(m), torch.arange(k), indexing="ij")
    return (i * m + j).flatten().clamp_max(n).to(device)


def lookup_codes(packed: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[packed]``: fp32 ``[..., m·k]`` codes in byte-major order (one gather per byte)."""
    out = table.index_select(0, packed.reshape(-1).to(torch.int32))
    return out.view(*packed.shape[:-1], packed.shape[-1] * table.shape[1])


_TERNARY_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def ternary_table(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[256, 5]``: the five trits ``{0, 1, 2}`` of every byte (base 3, lowest first; bytes ≥ 243 are not
    produced by :func:`pack`). Cached per device and dtype."""
    key = (torch.device(device), dtype)
    if key not in _TERNARY_TABLES:
        byte = torch.arange(256)
        trits = torch.stack([(byte // 3**i) % 3 for i in range(5)], dim=-1)
        _TERNARY_TABLES[key] = trits.to(device=device, dtype=dtype)
    return _TERNARY_TABLES[key]


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    extra = size - x.shape[-1]
    if extra == 0:
        return x
    return torch.cat([x, torch.zeros(*x.shape[:-1], extra, dtype=x.dtype, device=x.device)], dim=-1)


# ---------------------------------------------------------------------------------------------- groups
def _groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., n]`` → ``(xg [..., ng, group], mask [ng, group])`` with the tail padded by zeros."""
    if group < 1:
        raise ConfigError(f"quantization group size must be >= 1, got {group}")
    n = x.shape[-1]
    ng = -(-n // group)
    xg = _pad_last(x, ng * group).unflatten(-1, (ng, group))
    mask = (torch.arange(ng * group, device=x.device) < n).view(ng, group)
    return xg, mask


def _ungroup(xg: torch.Tensor, n: int) -> torch.Tensor:
    return xg.flatten(-2)[..., :n]


def num_groups(n: int, group: int) -> int:
    return -(-n // group)


def _outward(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """``x`` (fp32) stored in ``dtype`` rounded towards +inf (``up``) or -inf, returned as ``dtype``."""
    y = x.to(dtype)
    if dtype == x.dtype:
        return y
    wrong = y.float() < x if up else y.float() > x
    inf = torch.full_like(y, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(y, inf), y)


@dataclass
class RTN:
    """Round-to-nearest codes ``[..., n]`` (uint8, unpacked) with per-group ``scale`` / ``zero``
    ``[..., ng]`` (``zero`` is ``None`` when symmetric)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group: int

    @property
    def symmetric(self) -> bool:
        return self.zero is None


def quantize_rtn(
    x: torch.Tensor,
    bits: int,
    group: int,
    *,
    symmetric: bool = False,
    param_dtype: torch.dtype = torch.float32,
) -> RTN:
    """Round-to-nearest ``bits``-bit quantization of ``x [..., n]`` in groups of ``group`` (last axis)."""
    if bits not in range(1, 9) or (symmetric and bits < 2):
        raise ConfigError(f"RTN needs 1..8 bits (2..8 when symmetric), got {bits}")
    n = x.shape[-1]
    xf = x.float()
    xg, mask = _groups(xf, group)
    if symmetric:
        half = 1 << (bits - 1)
        amax = torch.where(mask, xg.abs(), 0.0).amax(-1)
        s = _outward(amax / (half - 1), param_dtype, up=True)
        sf = s.float()
        safe = torch.where(sf > 0, sf, torch.ones_like(sf))
        q = torch.round(xg / safe[..., None]).clamp(-(half - 1), half - 1) + half
        return RTN(_ungroup(q, n).to(torch.uint8), s, None, bits, group)
    levels = (1 << bits) - 1
    lo = torch.where(mask, xg, float("inf")).amin(-1)
    hi = torch.where(mask, xg, float("-inf")).amax(-1)
    z = _outward(lo, param_dtype, up=False)
    s = _outward((hi - z.float()) / levels, param_dtype, up=True)
    sf = s.float()
    # the outward-rounded grid may still miss ``hi`` by an fp32 ulp: widen the scale until it covers it
    if param_dtype != torch.float32:
        short = z.float() + sf * levels < hi
        s = torch.where(short, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
        sf = s.float()
    safe = torch.where(sf > 0, sf, torch.ones_like(sf))
    q = torch.round((xg - z.float()[..., None]) / safe[..., None]).clamp(0, levels)
    return RTN(_ungroup(q, n).to(torch.uint8), s, z, bits, group)


def dequantize_rtn(r: RTN, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x̂ [..., n]`` from :func:`quantize_rtn`'s output."""
    n = r.codes.shape[-1]
    cg, _ = _groups(r.codes.float(), r.group)
    s = r.scale.float()[..., None]
    out = s * (cg - float(1 << (r.bits - 1))) if r.zero is None else s * cg + r.zero.float()[..., None]
    return _ungroup(out, n).to(dtype)


def _mean_abs(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    xg, mask = _groups(x.float(), group)
    count = mask.sum(-1).clamp_min(1).to(torch.float32)
    return xg, (xg.abs() * mask).sum(-1) / count


def quantize_sign(
    x: torch.Tensor, group: int, param_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-bit quantization: ``(b uint8 [..., n] with b = [x ≥ 0], s [..., ng] = mean|x|)``."""
    _, s = _mean_abs(x, group)
    return (x >= 0).to(torch.uint8), s.to(param_dtype)


def dequantize_sign(b: torch.Tensor, s: torch.Tensor, group: int) -> torch.Tensor:
    n = b.shape[-1]
    bg, _ = _groups(b.float() * 2.0 - 1.0, group)
    return _ungroup(bg * s.float()[..., None], n)


def quantize_ternary(
    x: torch.Tensor, group: int, param_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary quantization: ``(t uint8 [..., n] in {0, 1, 2} meaning {−1, 0, +1}, s [..., ng] = mean|x|)``;
    ``t = 1`` (zero) when ``|x| ≤ s/2``."""
    n = x.shape[-1]
    xg, s = _mean_abs(x, group)
    half = s[..., None] / 2
    t = torch.where(xg > half, 2, torch.where(xg < -half, 0, 1))
    return _ungroup(t, n).to(torch.uint8), s.to(param_dtype)


def dequantize_ternary(t: torch.Tensor, s: torch.Tensor, group: int) -> torch.Tensor:
    n = t.shape[-1]
    tg, _ = _groups(t.float() - 1.0, group)
    return _ungroup(tg * s.float()[..., None], n)


def bits_per_value(bits: float) -> float:
    """Stored bits per value of a packing (ternary stores 8/5 = 1.6)."""
    return 1.6 if bits == TERNARY else float(bits)


def levels(bits: int) -> int:
    return (1 << bits) - 1


__all__ = [
    "RTN",
    "TERNARY",
    "bits_per_value",
    "byte_major_order",
    "check_bits",
    "dequantize_rtn",
    "dequantize_sign",
    "dequantize_ternary",
    "levels",
    "lookup_codes",
    "num_groups",
    "pack",
    "packed_size",
    "planar_table",
    "planar_planes",
    "quantize_rtn",
    "quantize_sign",
    "quantize_ternary",
    "ternary_table",
    "unpack",
]

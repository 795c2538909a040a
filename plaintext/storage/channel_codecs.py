"""Per-channel codecs (groups of ``G`` consecutive tokens share a scale per channel): VidKV's keys and values.

* :class:`FFTSignKeys` — the ``n_hi`` channels with the largest range (a fixed per-row permutation puts
  them first) get 2-bit asymmetric RTN per (channel, token group); the other ``e = d − n_hi`` channels are
  transformed with a *real* FFT along the channel axis, and the ``e`` free real coefficients (real parts of
  bins ``0..⌊e/2⌋``, imaginary parts of bins ``1..⌈e/2⌉−1``) get 1 bit each: ``ĉ = s·(2b − 1)``,
  ``s = mean|c|`` per (coefficient, token group). Decoding is the inverse real FFT. Scores never invert:
  ``q·irfft(C) = Σ_j w_j·Q_j·c_j`` with ``Q`` the query's coefficients in the same layout and ``w_j = 1/e``
  for the DC (and, for even ``e``, Nyquist) real part, ``2/e`` otherwise (Parseval for a real signal).
* :class:`TernaryValues` — ``v̂ = s·t``, ``t ∈ {−1, 0, 1}``, ``s = mean|v|`` per (channel, token group);
  or 2-bit asymmetric RTN per (channel, token group) (``bits=2``).

Codes are packed along the channel axis of each token (planar bits, five trits per byte).
"""

from __future__ import annotations

import torch

from mpckv.plaintext.storage import quant


def _blocks(x: torch.Tensor, g: int) -> torch.Tensor:
    """``[B, Hk, U·g, d]`` → ``[B, Hk, U, g, d]``."""
    b, hk, t, d = x.shape
    return x.reshape(b, hk, t // g, g, d)


def real_coefficients(x: torch.Tensor) -> torch.Tensor:
    """The ``e`` free real coefficients of ``rfft(x)`` along the last axis (length ``e``)."""
    e = x.shape[-1]
    f = torch.fft.rfft(x.float(), dim=-1)
    return torch.cat([f.real, f.imag[..., 1 : 1 + (e - 1) // 2]], dim=-1)


def from_real_coefficients(c: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`real_coefficients` (``irfft``)."""
    e = c.shape[-1]
    nr = e // 2 + 1
    imag = torch.zeros(*c.shape[:-1], nr, dtype=c.dtype, device=c.device)
    imag[..., 1 : 1 + (e - 1) // 2] = c[..., nr:]
    return torch.fft.irfft(torch.complex(c[..., :nr], imag), n=e, dim=-1)


def parseval_weights(e: int, device: torch.device) -> torch.Tensor:
    """``w [e]`` with ``q·x = Σ_j w_j·rc(q)_j·rc(x)_j`` for real ``q, x`` of length ``e``."""
    nr = e // 2 + 1
    w = torch.full((e,), 2.0 / e, device=device)
    w[0] = 1.0 / e
    if e % 2 == 0:
        w[nr - 1] = 1.0 / e
    return w


def _in_order(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x [..., n]`` in the byte-major slot order ``order`` (slots ≥ n, the padding, get 0)."""
    return torch.nn.functional.pad(x, (0, 1)).index_select(-1, order)


class FFTSignKeys:
    """VidKV keys (see the module docstring). ``perm [B, Hk, d]``: channel order, 2-bit channels first."""

    def __init__(self, group: int, perm: torch.Tensor, n_hi: int, param_dtype: torch.dtype = torch.float16):
        self.token_group, self.perm, self.n_hi, self.param_dtype = group, perm, n_hi, param_dtype
        self.dim = perm.shape[-1]

    def _permute(self, x: torch.Tensor) -> torch.Tensor:
        """Channels of ``x [B, Hk, ..., d]`` in codec order."""
        idx = self.perm.view(*self.perm.shape[:2], *([1] * (x.dim() - 3)), self.dim).expand_as(x)
        return torch.gather(x, -1, idx)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        g, nh = self.token_group, self.n_hi
        xb = _blocks(self._permute(x.float()), g)  # [B, Hk, U, g, d]
        enc: dict[str, torch.Tensor] = {}
        if nh:
            r = quant.quantize_rtn(xb[..., :nh].transpose(-1, -2), 2, g, param_dtype=self.param_dtype)
            enc["d_codes"] = quant.pack(r.codes.transpose(-1, -2), 2)  # [B, Hk, U, g, ⌈nh/4⌉]
            enc["d_scale"], enc["d_zero"] = r.scale[..., 0], r.zero[..., 0]
        if self.dim - nh:
            c = real_coefficients(xb[..., nh:])  # [B, Hk, U, g, e]
            bits, s = quant.quantize_sign(c.transpose(-1, -2), g, self.param_dtype)
            enc["e_bits"] = quant.pack(bits.transpose(-1, -2), 1)
            enc["e_scale"] = s[..., 0]  # [B, Hk, U, e]
        return enc

    def _d_codes(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        return quant.unpack(enc["d_codes"], 2, self.n_hi).float()

    def _e_signs(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        return quant.unpack(enc["e_bits"], 1, self.dim - self.n_hi).float() * 2.0 - 1.0

    def decode(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        if self.n_hi:
            parts.append(
                self._d_codes(enc) * enc["d_scale"].float()[..., None, :]
                + enc["d_zero"].float()[..., None, :]
            )
        if self.dim - self.n_hi:
            parts.append(from_real_coefficients(self._e_signs(enc) * enc["e_scale"].float()[..., None, :]))
        xb = torch.cat(parts, dim=-1)  # [B, Hk, U, g, d] in codec order
        x = xb.flatten(2, 3)
        out = torch.empty_like(x)
        idx = self.perm[:, :, None, :].expand_as(x)
        return out.scatter_(-1, idx, x)

    def scores(self, qg: torch.Tensor, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """``qg [B, Hk, G, d]`` → ``[B, Hk, G, U·g]`` without inverting the FFT."""
        qp = self._permute(qg.float())  # [B, Hk, G, d]
        b, hk, gq, _ = qp.shape
        out = None
        nh = self.n_hi
        # codes are looked up per byte (byte-major order); the query and the scales are put in that order
        if nh:
            qd = qp[..., :nh]
            order = quant.byte_major_order(nh, 2, qp.device)
            codes = quant.lookup_codes(enc["d_codes"], quant.planar_table(2, qp.device))  # [B, Hk, U, g, ·]
            s = _in_order(enc["d_scale"].float(), order)[:, :, :, None, :]  # [B, Hk, U, 1, ·]
            zterm = enc["d_zero"].float() @ qd.transpose(-1, -2)  # [B, Hk, U, G]
            out = (_in_order(qd, order)[:, :, None] * s) @ codes.transpose(-1, -2) + zterm[..., None]
        if self.dim - nh:
            e = self.dim - nh
            order = quant.byte_major_order(e, 1, qp.device)
            u = real_coefficients(qp[..., nh:]) * parseval_weights(e, qp.device)  # [B, Hk, G, e]
            us = u[:, :, None] * enc["e_scale"].float()[:, :, :, None, :]  # [B, Hk, U, G, e]
            # signs 2b − 1 folded into the query: Σ us·(2b − 1) = (2·us)·b − Σ us
            bits = quant.lookup_codes(enc["e_bits"], quant.planar_table(1, qp.device))  # [B, Hk, U, g, ·]
            part = (2.0 * _in_order(us, order)) @ bits.transpose(-1, -2) - us.sum(-1, keepdim=True)
            out = part if out is None else out + part
        assert out is not None
        return out.permute(0, 1, 3, 2, 4).reshape(b, hk, gq, -1)

    def weighted(self, p: torch.Tensor, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        return p @ self.decode(enc)

    def state_tensors(self) -> list[torch.Tensor]:
        return [self.perm]


class TernaryValues:
    """VidKV values: ternary (``bits=1.58``) or 2-bit asymmetric RTN (``bits=2``) per (channel, token
    group)."""

    def __init__(
        self, group: int, dim: int, bits: float = quant.TERNARY, param_dtype: torch.dtype = torch.float16
    ):
        if bits not in (quant.TERNARY, 2):
            raise ValueError(f"VidKV values take 1.58 (ternary) or 2 bits, got {bits}")
        self.token_group, self.dim, self.bits, self.param_dtype = group, dim, bits, param_dtype

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        g = self.token_group
        xt = _blocks(x.float(), g).transpose(-1, -2)  # [B, Hk, U, d, g]
        if self.bits == quant.TERNARY:
            t, s = quant.quantize_ternary(xt, g, self.param_dtype)
            return {"codes": quant.pack(t.transpose(-1, -2), quant.TERNARY), "scale": s[..., 0]}
        r = quant.quantize_rtn(xt, 2, g, param_dtype=self.param_dtype)
        assert r.zero is not None
        return {
            "codes": quant.pack(r.codes.transpose(-1, -2), 2),
            "scale": r.scale[..., 0],
            "zero": r.zero[..., 0],
        }

    def _blockwise(self, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Codes as values ``[B, Hk, U, g, d]`` (ternary: −1/0/1; 2-bit: 0..3) and the zero if any."""
        c = quant.unpack(enc["codes"], self.bits, self.dim).float()
        if self.bits == quant.TERNARY:
            return c - 1.0, None
        return c, enc["zero"].float()

    def decode(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        c, z = self._blockwise(enc)
        x = c * enc["scale"].float()[..., None, :]
        if z is not None:
            x = x + z[..., None, :]
        return x.flatten(2, 3)

    def scores(self, qg: torch.Tensor, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        return qg @ self.decode(enc).transpose(-1, -2)

    def weighted(self, p: torch.Tensor, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """``p [B, Hk, G, U·g]`` → ``[B, Hk, G, d]``: per block ``(p_u·C_u) ⊙ s_u (+ Σp_u·z_u)``.

        Ternary codes are read with one table lookup per byte in *byte-major* order (slot ``5j + i`` holds
        channel ``i·m + j``, ``m`` bytes per token); the scales are put in that order instead of the codes,
        and the small ``[B, Hk, G, 5m]`` result is put back in channel order."""
        b, hk, gq, _ = p.shape
        codes = enc["codes"]  # [B, Hk, U, g, m]
        u, g, m = codes.shape[2:]
        pb = p.reshape(b, hk, gq, u, g).transpose(2, 3)  # [B, Hk, U, G, g]
        d = self.dim
        if self.bits == quant.TERNARY:
            table = quant.ternary_table(p.device) - 1.0  # trit values −1, 0, 1
            vals = quant.lookup_codes(codes, table)  # [B, Hk, U, g, 5m]
            s = (
                torch.nn.functional.pad(enc["scale"].float(), (0, 5 * m - d))
                .view(b, hk, u, 5, m)
                .transpose(-1, -2)
            )
            out = ((pb @ vals) * s.reshape(b, hk, u, 1, 5 * m)).sum(2)  # [B, Hk, G, 5m] byte-major
            return out.view(b, hk, gq, m, 5).transpose(-1, -2).reshape(b, hk, gq, 5 * m)[..., :d]
        c = quant.unpack(codes, self.bits, d).float()
        out = (pb @ c) * enc["scale"].float()[:, :, :, None, :]
        out = out + pb.sum(-1, keepdim=True) * enc["zero"].float()[:, :, :, None, :]
        return out.sum(2)

    def state_tensors(self) -> list[torch.Tensor]:
        return []

"""The generation engine: batched prefill and decode with a KV method hooked into every layer.

``Engine(model, method=...)`` owns no per-run state; :meth:`Engine.prefill` returns a :class:`Session`
(caches, positions, method state) that :meth:`Engine.decode` advances one token at a time, and
:meth:`Engine.generate` drives both with greedy or sampled decoding and stop tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mpckv.errors import ConfigError, ShapeError
from mpckv.kernels.sparse_attention import fused_sparse_available
from mpckv.plaintext.kv_cache import KVCache
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext, Selection
from mpckv.plaintext.model import LlamaModel
from mpckv.plaintext.sampling import SamplingConfig
from mpckv.plaintext.timing import PhaseTimer, span


@dataclass
class Session:
    """Per-run state: caches, next positions, method state, statistics."""

    cache: KVCache
    positions: torch.Tensor  # [B] position of the next token
    prompt_lengths: torch.Tensor  # [B]
    states: list[dict[str, Any]]
    logits: torch.Tensor  # [B, V] logits for the next token
    step: int = 0
    read_sums: list[float] = field(default_factory=list)  # per layer, summed mean read entries per step
    peak_cache_bytes: int = 0
    dense_lengths: torch.Tensor | None = None  # [B] what a dense cache would hold now


@dataclass
class PrefillRecord:
    """One dense prefill, recorded so that several methods can replay their prefill hooks on it.

    Eviction at prefill runs *after* each layer's dense attention, so it never changes the hidden states:
    the per-layer prompt K/V, the prompt queries the hooks see and the final logits are the same for every
    method that does not declare :attr:`~mpckv.plaintext.methods.base.KVMethod.changes_prefill`.
    :meth:`Engine.prefill_from` rebuilds a fresh cache from ``keys``/``values`` and replays the method's
    ``on_prefill`` hooks layer by layer, which gives the same session as :meth:`Engine.prefill`.

    Memory: ``keys``/``values`` are a dense cache; ``queries`` are ``num_attention_heads / num_kv_heads``
    times larger (all layers; ~0.7 GB for 8K tokens of a 0.5B model in fp32). Keep one record at a time.
    """

    lengths: torch.Tensor  # [B] prompt lengths
    keys: list[torch.Tensor]  # per layer [B, Hk, T, d] (right padded)
    values: list[torch.Tensor]  # per layer [B, Hk, T, d]
    queries: list[torch.Tensor]  # per layer [B, H, T, d] post-RoPE
    logits: torch.Tensor  # [B, V] next-token logits after the prompt
    seconds: float = 0.0  # wall time of the recorded prefill
    #: prompt statistics that hooks derive from the unchanged record and that do not depend on the budget
    #: (all-query column sums of H2O, Keyformer's noisy ones), keyed by ``(layer, name, parameters…)``:
    #: the first cell computes them, the others of the batch reuse them (:meth:`PrefillContext.memoized`)
    memo: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])


@dataclass
class GenerationStats:
    """What :meth:`Engine.generate` measured."""

    method: str
    prompt_lengths: list[int]
    new_tokens: list[int]
    kept_per_layer: list[float]
    read_per_layer: list[float]
    kept_fraction: float
    cache_bytes: int
    live_cache_bytes: int
    peak_cache_bytes: int
    dense_cache_bytes: int
    prefill_s: float
    decode_s: float

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated tokens per sequence (stop token excluded)
    stats: GenerationStats
    finished: list[bool]  # whether each sequence hit a stop token


class Engine:
    """Plaintext inference engine.

    Parameters
    ----------
    model:
        A loaded :class:`~mpckv.plaintext.model.LlamaModel`.
    method:
        A registered method name (``"snapkv"``, ``"a+b"`` for compositions), a method object, or ``None``
        for dense.
    **method_params:
        Passed to :func:`mpckv.get_method` when ``method`` is a name (e.g. ``budget=0.1``).
    """

    def __init__(self, model: LlamaModel, method: str | KVMethod | None = "dense", **method_params: Any):
        from mpckv.registry import get_method

        self.model = model
        if method is None:
            method = "dense"
        if isinstance(method, str):
            method = get_method(method, **method_params)
        elif method_params:
            raise ConfigError("method parameters can only be given together with a method name")
        if not isinstance(method, KVMethod):
            raise ConfigError(f"method must be a name or a KVMethod, got {type(method).__name__}")
        method.check(model.config)
        self.method = method
        #: Optional :class:`~mpckv.plaintext.timing.PhaseTimer` (``mpckv bench plaintext``); None = no timing.
        self.timers: PhaseTimer | None = None

    @property
    def method_label(self) -> str:
        return str(getattr(self.method, "label", self.method.name))

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, input_ids: Any) -> Session:
        """Run the prompt(s) densely, let the method compress each layer, return the session."""
        model, cfg, xp = self.model, self.model.config, self.model.xp
        ids, lengths = xp.prepare_input(input_ids, model.device)
        b, t = ids.shape[0], ids.shape[1]
        check_positions(cfg, t, 0)
        cache = xp.new_cache(
            cfg.num_hidden_layers, b, cfg.num_key_value_heads, cfg.head_dim, model.dtype, model.device
        )
        states: list[dict[str, Any]] = [{} for _ in range(cfg.num_hidden_layers)]
        positions = torch.arange(t, device=model.device).expand(b, t)
        with xp.scope(phase="prefill"):
            hidden = model.embed(ids)
        for layer in range(cfg.num_hidden_layers):
            with xp.scope(phase="prefill", layer=layer):
                q, k, v = model.qkv(layer, hidden, positions)
                cache[layer].append(k, v, positions, counts=lengths)
                attn = xp.prefill_attention(q, k, v, lengths, model.scale, cfg.sliding_window)
            ctx = PrefillContext(
                layer, cfg, cache[layer], q, lengths, model.scale, states[layer], model.inv_freq, states, xp
            )
            ctx.kv = cache
            with xp.scope(phase="method", layer=layer):
                self.method.on_prefill(ctx)
            with xp.scope(phase="prefill", layer=layer):
                hidden = model.finish_layer(layer, hidden, attn)
        with xp.scope(phase="prefill"):
            logits = model.logits(xp.last_hidden(hidden, lengths)[:, None])[:, 0]
        return Session(
            cache=cache,
            positions=lengths.clone(),
            prompt_lengths=lengths,
            states=states,
            logits=logits,
            read_sums=[0.0] * cfg.num_hidden_layers,
            peak_cache_bytes=cache.nbytes(),
            dense_lengths=lengths.clone(),
        )

    @torch.no_grad()
    def record_prefill(self, input_ids: Any) -> PrefillRecord:
        """Run the prompt(s) densely, without the method, and keep what :meth:`prefill_from` replays."""
        model, cfg, xp = self.model, self.model.config, self.model.xp
        if xp.secure:
            raise ConfigError("recorded prefills are plaintext only; use Engine.prefill under MPC")
        t0 = time.perf_counter()
        ids, lengths = xp.prepare_input(input_ids, model.device)
        b, t = ids.shape[0], ids.shape[1]
        check_positions(cfg, t, 0)
        positions = torch.arange(t, device=model.device).expand(b, t)
        keys, values, queries = [], [], []
        hidden = model.embed(ids)
        for layer in range(cfg.num_hidden_layers):
            q, k, v = model.qkv(layer, hidden, positions)
            attn = xp.prefill_attention(q, k, v, lengths, model.scale, cfg.sliding_window)
            keys.append(k)
            values.append(v)
            queries.append(q)
            hidden = model.finish_layer(layer, hidden, attn)
        logits = model.logits(xp.last_hidden(hidden, lengths)[:, None])[:, 0]
        _sync(model.device)
        return PrefillRecord(lengths, keys, values, queries, logits, time.perf_counter() - t0)

    @torch.no_grad()
    def prefill_from(self, record: PrefillRecord) -> Session:
        """The session :meth:`prefill` would return, built from a recorded dense prefill.

        The record is not modified (each call writes a fresh cache and hands the hooks a copy of the
        queries), so one record serves every method and budget of a sample batch. Methods that declare
        ``changes_prefill`` are refused: they need their own :meth:`prefill`.
        """
        model, cfg, xp = self.model, self.model.config, self.model.xp
        if getattr(self.method, "changes_prefill", False):
            raise ConfigError(
                f"method {self.method_label!r} changes the prefill forward; run Engine.prefill instead"
            )
        if len(record.keys) != cfg.num_hidden_layers:
            raise ShapeError(f"the record has {len(record.keys)} layers, the model {cfg.num_hidden_layers}")
        lengths = record.lengths
        b, t = record.keys[0].shape[0], record.keys[0].shape[2]
        cache = xp.new_cache(
            cfg.num_hidden_layers, b, cfg.num_key_value_heads, cfg.head_dim, model.dtype, model.device
        )
        states: list[dict[str, Any]] = [{} for _ in range(cfg.num_hidden_layers)]
        positions = torch.arange(t, device=model.device).expand(b, t)
        for layer in range(cfg.num_hidden_layers):
            cache[layer].append(record.keys[layer], record.values[layer], positions, counts=lengths)
            ctx = PrefillContext(
                layer,
                cfg,
                cache[layer],
                record.queries[layer].clone(),
                lengths,
                model.scale,
                states[layer],
                model.inv_freq,
                states,
                xp,
                cache,
                record.memo,
            )
            with xp.scope(phase="method", layer=layer):
                self.method.on_prefill(ctx)
        return Session(
            cache=cache,
            positions=lengths.clone(),
            prompt_lengths=lengths.clone(),
            states=states,
            logits=record.logits.clone(),
            read_sums=[0.0] * cfg.num_hidden_layers,
            peak_cache_bytes=cache.nbytes(),
            dense_lengths=lengths.clone(),
        )

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode(self, session: Session, tokens: torch.Tensor, want_logits: bool = True) -> torch.Tensor:
        """Feed one token per sequence (``[B]``); return the next-token logits ``[B, V]``.

        ``want_logits=False`` skips the final norm and LM head (a teacher-forced token whose prediction
        nobody reads); ``session.logits`` then keeps the previous step's value and the return is it.
        """
        model, cfg = self.model, self.model.config
        b = session.positions.shape[0]
        if isinstance(tokens, torch.Tensor | list | int):
            tokens = torch.as_tensor(tokens, device=model.device).reshape(-1)
        if tokens.shape[0] != b:
            raise ShapeError(f"decode expects one token per sequence ({b}), got {tokens.shape[0]}")
        if isinstance(tokens, torch.Tensor) and (
            tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex()
        ):
            raise ShapeError(f"decode expects integer token ids, got dtype {tokens.dtype}")
        pos = session.positions
        if int(pos.max()) >= cfg.max_position_embeddings:
            raise ConfigError(
                f"cannot decode at position {int(pos.max())}: the model has "
                f"{cfg.max_position_embeddings} positions (max_position_embeddings)"
            )
        xp = model.xp
        tm = self.timers
        with xp.scope(phase="decode"), span(tm, "head"):
            hidden = model.embed(tokens.unsqueeze(1))
        for layer in range(cfg.num_hidden_layers):
            lc = session.cache[layer]
            with xp.scope(phase="decode", layer=layer), span(tm, "qkv"):
                q, k, v = model.qkv(layer, hidden, pos[:, None])
            ctx = DecodeContext(
                layer,
                cfg,
                lc,
                q[:, :, 0],
                pos,
                session.step,
                model.scale,
                session.states[layer],
                session.states,
                xp,
                session.cache,
            )
            with xp.scope(phase="selection", layer=layer):
                with span(tm, "method"):
                    self.method.before_append(ctx)
                lc = ctx.cache  # a hook may have swapped the storage format
                with span(tm, "append"):
                    lc.append(k, v, pos[:, None])
                with span(tm, "method"):
                    sel = self.method.select(ctx)
            with xp.scope(phase="decode", layer=layer):
                out = self._attend(ctx, sel, session, layer)
                with span(tm, "finish"):
                    hidden = model.finish_layer(layer, hidden, out[:, :, None])
        session.positions = pos + 1
        session.step += 1
        assert session.dense_lengths is not None
        session.dense_lengths = session.dense_lengths + 1
        session.peak_cache_bytes = max(session.peak_cache_bytes, session.cache.nbytes())
        if want_logits:
            with xp.scope(phase="decode"), span(tm, "head"):
                session.logits = model.logits(hidden)[:, 0]
        return session.logits

    @torch.no_grad()
    def extend(self, session: Session, tokens: Any, logits: str = "all") -> torch.Tensor:
        """Teacher-force ``tokens [B, T]`` through decode steps (one per column) and return the logits
        after each of them, ``[B, T, V]`` (``logits="last"``: only after the last one, ``[B, 1, V]``, and
        the LM head is skipped for the others — the same cache and the same final logits, cheaper).

        This is how a question is fed *after* the context was compressed (query-agnostic evaluation) and
        how fidelity against dense is measured on a fixed continuation. Methods see every fed token as a
        decode step (decode-time eviction keeps running).
        """
        toks = torch.as_tensor(tokens, device=self.model.device)
        if toks.dim() == 1:
            toks = toks[None]
        b = session.positions.shape[0]
        if toks.dim() != 2 or toks.shape[0] != b:
            raise ShapeError(f"extend expects tokens [{b}, T], got {tuple(toks.shape)}")
        if logits not in ("all", "last"):
            raise ConfigError(f"extend: logits must be 'all' or 'last', got {logits!r}")
        n = toks.shape[1]
        if n == 0:
            raise ShapeError("extend needs at least one token per sequence, got tokens [B, 0]")
        if logits == "last":
            for i in range(n):
                out = self.decode(session, toks[:, i], want_logits=i == n - 1)
            return out[:, None]
        return torch.stack([self.decode(session, toks[:, i]) for i in range(n)], dim=1)

    def _attend(
        self, ctx: DecodeContext, sel: Selection | None, session: Session, layer: int
    ) -> torch.Tensor:
        lc, cfg, xp, tm = ctx.cache, ctx.config, self.model.xp, self.timers
        need_probs = self.method.needs_decode_probs
        keep = None
        if cfg.sliding_window is not None:
            keep = lc.positions() > (ctx.positions[:, None, None] - cfg.sliding_window)
        fmt_attend = getattr(lc, "attend", None)  # a storage format with its own attention
        if sel is None and fmt_attend is not None:
            with span(tm, "attention"):
                out, probs = fmt_attend(ctx.q, ctx.scale, keep, need_probs)
            session.read_sums[layer] += float(lc.lengths.float().mean())
        elif sel is None:
            with span(tm, "attention"):
                out, probs = xp.cache_attention(
                    ctx.q, lc.keys(), lc.values(), lc.lengths, ctx.scale, keep, need_probs
                )
            session.read_sums[layer] += float(lc.lengths.float().mean())
        elif sel.gather is not None:  # a secure selection gathers obliviously (indices stay secret)
            with span(tm, "gather"):
                ks, vs, counts, ksel = sel.gather(lc)
            with span(tm, "attention"):
                out, probs = xp.cache_attention(ctx.q, ks, vs, counts, ctx.scale, ksel, False)
            session.read_sums[layer] += float(counts.float().mean())
        else:
            b = sel.index.shape[0]
            ksel = None if keep is None else torch.gather(keep, 2, sel.index)
            fused = getattr(xp, "sparse_attention", None)
            if fmt_attend is not None:
                with span(tm, "attention"):
                    out, p_sel = fmt_attend(
                        ctx.q, ctx.scale, ksel, need_probs, index=sel.index, counts=sel.counts
                    )
            elif fused is not None and fused_sparse_available(ctx.q):  # index lists read in place (GPU)
                with span(tm, "attention"):
                    out, p_sel = fused(ctx.q, lc.k, lc.v, sel.index, sel.counts, ctx.scale, ksel, need_probs)
            else:
                with span(tm, "gather"):
                    ks, vs = xp.take_rows(lc.keys(), sel.index), xp.take_rows(lc.values(), sel.index)
                with span(tm, "attention"):
                    out, p_sel = xp.cache_attention(ctx.q, ks, vs, sel.counts, ctx.scale, ksel, need_probs)
            session.read_sums[layer] += float(sel.counts.float().mean())
            probs = None
            if p_sel is not None:  # scatter back to the cache layout [B, H, L]
                g = cfg.group_size
                probs = torch.zeros(b, cfg.num_attention_heads, lc.max_length, device=p_sel.device)
                idx = sel.index.repeat_interleave(g, dim=1)
                probs.scatter_(2, idx, p_sel * sel.valid.repeat_interleave(g, dim=1))
        with span(tm, "method"):
            self.method.after_attention(ctx, probs)
        return out

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int = 32,
        *,
        sampling: SamplingConfig | None = None,
        stop_tokens: Sequence[int] | None = None,
        progress: bool = False,
    ) -> GenerationResult:
        """Prefill ``input_ids`` and generate up to ``max_new_tokens`` per sequence.

        Greedy unless ``sampling`` says otherwise. ``stop_tokens`` defaults to the model's
        ``eos_token_id``; pass ``[]`` to disable. Under MPC the output length is public, so stop tokens
        are ignored there and exactly ``max_new_tokens`` are produced.

        Raises
        ------
        ConfigError
            When ``max_new_tokens`` is not an integer >= 0, or the prompt plus ``max_new_tokens`` does not
            fit the model's ``max_position_embeddings`` (checked before any work).
        ShapeError
            When ``input_ids`` are not token ids (see ``prepare_input``).
        """
        check_count("max_new_tokens", max_new_tokens)
        longest = _prompt_length(input_ids)
        if longest is not None:
            check_positions(self.model.config, longest, max_new_tokens)
        t0 = time.perf_counter()
        session = self.prefill(input_ids)
        _sync(self.model.device)
        return self.continue_generation(
            session,
            max_new_tokens,
            sampling=sampling,
            stop_tokens=stop_tokens,
            progress=progress,
            prefill_s=time.perf_counter() - t0,
        )

    def continue_generation(
        self,
        session: Session,
        max_new_tokens: int,
        *,
        sampling: SamplingConfig | None = None,
        stop_tokens: Sequence[int] | None = None,
        progress: bool = False,
        prefill_s: float = 0.0,
    ) -> GenerationResult:
        """Generate from an existing session (e.g. after :meth:`extend` fed a question)."""
        check_count("max_new_tokens", max_new_tokens)
        check_positions(self.model.config, int(session.positions.max()), max_new_tokens)
        xp = self.model.xp
        sampling = sampling or SamplingConfig()
        stops = set(self.model.config.stop_token_ids if stop_tokens is None else stop_tokens)
        if xp.secure:
            stops = set()
        gen = torch.Generator(device="cpu").manual_seed(sampling.seed)
        b = session.positions.shape[0]
        out: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        t1 = time.perf_counter()
        bar = _progress(max_new_tokens, progress)
        for i in range(max_new_tokens):
            with xp.scope(phase="sample"):
                feed, visible = xp.next_token(session.logits, sampling, gen)
            for j, tok in enumerate(visible or []):
                if done[j]:
                    continue
                if tok in stops:
                    done[j] = True
                else:
                    out[j].append(tok)
            if bar is not None:
                bar.update(1)
            if all(done) or i == max_new_tokens - 1:
                break
            self.decode(session, feed)
        if bar is not None:
            bar.close()
        _sync(self.model.device)
        decode_s = time.perf_counter() - t1
        return GenerationResult(out, self._stats(session, out, prefill_s, decode_s), done)

    def _stats(self, s: Session, out: list[list[int]], prefill_s: float, decode_s: float) -> GenerationStats:
        kept = s.cache.mean_lengths()
        steps = max(s.step, 1)
        dense_len = s.dense_lengths.float().mean().item() if s.dense_lengths is not None else 1.0
        cfg = self.model.config
        per_entry = 2 * cfg.head_dim * s.cache[0].element_bytes
        dense_bytes = (
            int(s.dense_lengths.sum()) * cfg.num_key_value_heads * cfg.num_hidden_layers * per_entry
            if s.dense_lengths is not None
            else 0
        )
        return GenerationStats(
            method=self.method_label,
            prompt_lengths=s.prompt_lengths.tolist(),
            new_tokens=[len(o) for o in out],
            kept_per_layer=[round(x, 3) for x in kept],
            read_per_layer=[round(x / steps, 3) for x in s.read_sums]
            if s.step
            else [round(x, 3) for x in kept],
            kept_fraction=round(sum(kept) / (len(kept) * max(dense_len, 1.0)), 5),
            cache_bytes=s.cache.nbytes(),
            live_cache_bytes=s.cache.live_bytes(),
            peak_cache_bytes=s.peak_cache_bytes,
            dense_cache_bytes=dense_bytes,
            prefill_s=round(prefill_s, 6),
            decode_s=round(decode_s, 6),
        )

    # ------------------------------------------------------------------ KV fusion
    def prefill_segments(self, segments: Sequence[Any], fusion: Any = None, **kwargs: Any) -> Any:
        """Prefill a request of cached chunks and raw segments with KV fusion (CacheBlend, EPIC, A³,
        KVShare, ``"concat"`` or ``"full"``); returns a ``FusedPrefill`` whose ``session`` decodes as usual.
        See :func:`mpckv.plaintext.fusion.recompute.prefill_segments`."""
        from mpckv.plaintext.fusion.recompute import prefill_segments

        return prefill_segments(self, segments, fusion, **kwargs)


def check_count(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an ``int`` >= 0 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")


def check_positions(config: Any, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse a run whose positions would pass ``max_position_embeddings``.

    A prompt of ``T`` tokens uses positions ``0..T-1``; generating ``N`` tokens feeds ``N - 1`` of them
    back, at positions ``T..T+N-2``. So ``T + N - 1`` positions are needed (``T`` when ``N == 0``).
    """
    limit = int(config.max_position_embeddings)
    need = prompt_len + max(max_new_tokens - 1, 0)
    if need > limit:
        extra = f" + {max_new_tokens} new tokens" if max_new_tokens else ""
        raise ConfigError(
            f"a prompt of {prompt_len} tokens{extra} needs {need} positions, but the model has "
            f"{limit} (max_position_embeddings); shorten the prompt or lower max_new_tokens"
        )


def _prompt_length(input_ids: Any) -> int | None:
    """The longest prompt in ``input_ids`` without preparing it, or None when it cannot be told cheaply."""
    if isinstance(input_ids, torch.Tensor):
        return int(input_ids.shape[-1]) if input_ids.dim() in (1, 2) else None
    length = getattr(input_ids, "length", None)  # protocols.backend.SecretTokens (public length)
    if isinstance(length, int):
        return length
    if isinstance(input_ids, list | tuple) and input_ids:
        if all(isinstance(x, list | tuple) for x in input_ids):
            return max(len(x) for x in input_ids)
        return len(input_ids)
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="decode", unit="tok", leave=False)

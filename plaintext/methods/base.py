"""The KV method interface and the contexts the engine passes to its hooks.

A method is a small dataclass of hyper-parameters (no per-run state: per-run state lives in
``ctx.state``, a dict per layer that the engine creates for every prefill, or in cache metadata that moves
with compaction). The engine calls, per layer:

prefill
    ``on_prefill(ctx)`` after the layer's prompt K/V were written to the cache and dense attention ran.
    Eviction methods compact ``ctx.cache`` here.
decode step
    ``before_append(ctx)`` (make room, e.g. StreamingLLM) → the engine appends the new K/V →
    ``select(ctx)`` (which entries to read; ``None`` = all live entries) → attention →
    ``after_attention(ctx, probs)`` (accumulate scores / evict, e.g. H2O; ``probs [B, H, L]`` over the
    cache layout when ``needs_decode_probs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mpckv.budget import Budget
from mpckv.config import ModelConfig
from mpckv.errors import BudgetError
from mpckv.plaintext.kv_cache import LayerCache
from mpckv.plaintext.methods.params import validate_params


@dataclass
class Selection:
    """Entries to read at one decode step: ``index [B, Hk, K]`` into the cache, ``valid [B, Hk, K]``.

    Valid columns come first in each row; indices are sorted ascending among the valid ones.
    """

    index: torch.Tensor
    valid: torch.Tensor
    #: Optional custom gather (secure selections whose indices are secret): ``gather(cache) -> (k, v,
    #: lengths, keep)`` returning the rows to attend, their public lengths ``[B, Hk]`` and an optional keep
    #: mask. ``index``/``valid`` then only describe the (public) sizes.
    gather: Any = None

    @property
    def counts(self) -> torch.Tensor:
        return self.valid.sum(-1)


def replace_layer_cache(kv: Any, layer: int, new: Any) -> Any:
    """Install ``new`` as layer ``layer``'s cache in ``kv`` and return it.

    A storage format (a quantized, channel-pruned or ragged cache) is an object with the
    :class:`~mpckv.plaintext.kv_cache.LayerCache` interface (``lengths``, ``keys()``, ``values()``,
    ``positions()``, ``append``, ``compact``, ``nbytes``, ``live_bytes``, ``max_length``, ``meta``). When it
    also has ``attend(q, scale, keep, need_probs, index=None, counts=None) -> (out, probs)``, decode
    attention calls it instead of reading ``keys()`` / ``values()``, so a fused path never materialises
    the full-precision cache (``index``/``counts`` are a selection's rows; ``probs`` is then over them).
    """
    if kv is None:
        raise TypeError("this context has no KVCache to replace a layer in (kv=None)")
    kv.layers[layer] = new
    return new


@dataclass
class PrefillContext:
    """What ``on_prefill`` sees for one layer."""

    layer: int
    config: ModelConfig
    cache: LayerCache
    q: torch.Tensor  # [B, H, T, d] post-RoPE queries of the prompt (right padded)
    prompt_lengths: torch.Tensor  # [B]; ratio budgets apply to ``cache.lengths`` (what is present now)
    scale: float
    state: dict[str, Any]
    inv_freq: torch.Tensor
    all_states: list[dict[str, Any]] = field(default_factory=list)  # every layer's state (cross-layer)
    xp: Any = None  # the backend (``TORCH`` or ``CrypTenBackend``); secure methods branch on ``xp.secure``
    kv: Any = None  # the whole :class:`KVCache` (so that a method can swap this layer's storage format)
    #: budget-independent prompt statistics shared by every cell replayed on one recorded prefill
    #: (:attr:`~mpckv.plaintext.engine.PrefillRecord.memo`); ``None`` outside a replay
    memo: dict[tuple[Any, ...], torch.Tensor] | None = None

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def memoized(self, key: tuple[Any, ...], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()`` of this layer's *unchanged* prompt cache, computed once per recorded prefill.

        Only used while the cache is the recorded one (a plain :class:`LayerCache`, never compacted, every
        row at its prompt length), so the result depends on the record and ``key`` alone; callers get a copy.
        """
        cache = self.cache
        fresh = (
            self.memo is not None
            and type(cache) is LayerCache
            and cache.version == 0
            and bool((cache.lengths == self.prompt_lengths.to(cache.lengths.device)[:, None]).all())
        )
        if not fresh:
            return compute()
        assert self.memo is not None
        full = (self.layer, *key)
        if full not in self.memo:
            self.memo[full] = compute()
        return self.memo[full].clone()

    def replace_cache(self, new: Any) -> None:
        """Replace this layer's cache with another storage format (see :func:`replace_layer_cache`)."""
        self.cache = replace_layer_cache(self.kv, self.layer, new)


@dataclass
class DecodeContext:
    """What the decode hooks see for one layer and step."""

    layer: int
    config: ModelConfig
    cache: LayerCache
    q: torch.Tensor  # [B, H, d] post-RoPE query of the new token
    positions: torch.Tensor  # [B] position of the new token
    step: int
    scale: float
    state: dict[str, Any]
    all_states: list[dict[str, Any]] = field(default_factory=list)
    xp: Any = None
    kv: Any = None  # the whole :class:`KVCache`

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def replace_cache(self, new: Any) -> None:
        """Replace this layer's cache with another storage format (see :func:`replace_layer_cache`)."""
        self.cache = replace_layer_cache(self.kv, self.layer, new)


@dataclass(kw_only=True)
class KVMethod:
    """Base class of every KV selection / eviction / fusion method.

    Parameters
    ----------
    budget:
        Kept (eviction) or read (selection) entries: a ratio in (0, 1], a token count, or a per-layer /
        per-head list (see :class:`mpckv.budget.Budget`). ``None`` means the method's own default.
    """

    budget: Any = None

    name: ClassVar[str] = ""
    family: ClassVar[str] = "baseline"
    paper: ClassVar[str] = ""
    secure: ClassVar[str] = "no"  # "yes" | "planned" | "no"
    needs_decode_probs: ClassVar[bool] = False
    #: Whether the method changes the prefill forward itself (the hidden states, not just the cache it
    #: keeps). ``False`` lets the eval harness replay ``on_prefill`` on one shared dense prefill
    #: (:meth:`mpckv.plaintext.engine.Engine.prefill_from`); ``True`` gets the method its own prefill.
    changes_prefill: ClassVar[bool] = False
    default_budget: ClassVar[Any] = None

    def __post_init__(self) -> None:
        validate_params(self)  # types and declared ranges of every hyper-parameter (one place)
        spec = self.budget if self.budget is not None else self.default_budget
        self._budget: Budget | None = Budget.parse(spec) if spec is not None else None

    # ---------------------------------------------------------------- budget helpers
    @property
    def resolved_budget(self) -> Budget:
        if self._budget is None:
            raise BudgetError(f"method {self.name!r} needs a budget (ratio in (0, 1] or a token count)")
        return self._budget

    def check(self, config: ModelConfig) -> None:
        """Validate hyper-parameters against a model before a run (raise ConfigError / BudgetError)."""
        if self._budget is not None:
            self._budget.validate(config.num_hidden_layers, config.num_key_value_heads)

    # ---------------------------------------------------------------- hooks (defaults: do nothing)
    def on_prefill(self, ctx: PrefillContext) -> None:
        return None

    def before_append(self, ctx: DecodeContext) -> None:
        return None

    def select(self, ctx: DecodeContext) -> Selection | None:
        return None

    def after_attention(self, ctx: DecodeContext, probs: torch.Tensor | None) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        """Hyper-parameters as a JSON-friendly dict."""
        out: dict[str, Any] = {"method": self.name}
        for key in getattr(self, "__dataclass_fields__", {}):
            val = getattr(self, key)
            out[key] = str(val) if key == "budget" and val is not None else val
        return out

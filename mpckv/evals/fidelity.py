"""Model-agnostic fidelity against dense: how far a method's next-token distributions drift from dense.

Works on any checkpoint (no task, no tokenizer assumptions), so it is the check to run on a real model:

1. dense greedy generation of ``steps`` tokens after each prompt gives a fixed continuation;
2. dense and every method then prefill the same prompt (the method compresses it) and teacher-force the
   *same* continuation through :meth:`~mpckv.plaintext.engine.Engine.extend`; the prefill is one recorded
   dense prefill that every method replays its hooks on (:meth:`~mpckv.plaintext.engine.Engine.prefill_from`),
   except methods that declare ``changes_prefill``;
3. at each of the ``steps`` positions the method's distribution is compared with dense: top-1 agreement
   (same argmax) and ``KL(dense ‖ method)`` in nats.

Dense against itself gives agreement 1 and KL 0 exactly (same computation, same batch).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from mpckv.errors import ConfigError
from mpckv.evals import common


def _compare(ref_logp: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position ``(top-1 agreement, KL(ref ‖ method))`` of ``[B, S, V]`` tensors."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    agree = ref_logp.argmax(-1) == logq.argmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logq)).sum(-1).clamp_min(0.0)
    return agree, kl


def fidelity(
    model: Any,
    prompts: Sequence[Sequence[int]],
    methods: Sequence[str],
    budgets: Sequence[float | int] = (0.1,),
    *,
    steps: int = 32,
    params: dict[str, dict[str, Any]] | None = None,
    continuation: Sequence[Sequence[int]] | None = None,
) -> list[dict[str, Any]]:
    """Compare every method × budget with dense on a fixed continuation of ``prompts``.

    Parameters
    ----------
    model:
        A loaded :class:`~mpckv.plaintext.model.LlamaModel` (any size, CPU or CUDA).
    prompts:
        Token-id lists (ragged is fine); they form one batch.
    methods:
        Registered method names (``"dense"`` runs once, without a budget; others at every budget).
    budgets:
        Ratios in (0, 1] or token counts.
    steps:
        Length of the dense greedy continuation (the number of compared positions per prompt).
    params:
        Per-method hyper-parameters, e.g. ``{"snapkv": {"window": 16}}``.
    continuation:
        A fixed continuation (``[B][S]``) instead of dense greedy generation.

    Returns
    -------
    list of dict
        One record per (method, budget): ``top1_agreement``, ``kl_mean``, ``kl_max``, per-step means
        ``top1_per_step`` / ``kl_per_step``, cache statistics (``kept_fraction``, ``read_fraction``, bytes),
        ``steps``, ``n``, ``seconds``.
    """
    from mpckv.evals.config import parse_budgets, parse_methods, takes_budget
    from mpckv.plaintext.engine import Engine

    methods = parse_methods(list(methods))
    budgets = parse_budgets(list(budgets))
    params = params or {}
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise ConfigError("fidelity needs at least one non-empty prompt")
    if continuation is None:
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        continuation = Engine(model, "dense").generate(prompts, steps, stop_tokens=[]).tokens
    cont = torch.tensor([list(c) for c in continuation], dtype=torch.long)
    if cont.dim() != 2 or cont.shape[0] != len(prompts) or cont.shape[1] < 1:
        raise ConfigError(f"continuation must be [{len(prompts)}, S>=1], got {tuple(cont.shape)}")

    from mpckv.evals.group import shares_prefill

    dense = Engine(model, "dense")
    record = dense.record_prefill(prompts)  # shared by every method that does not change the prefill
    ref_logp = torch.log_softmax(dense.extend(dense.prefill_from(record), cont).float(), dim=-1)
    out: list[dict[str, Any]] = []
    for method in methods:
        for budget in budgets if takes_budget(method) else [None]:
            kw = dict(params.get(method, {}))
            if budget is not None:
                kw["budget"] = budget
            t0 = time.perf_counter()
            engine = Engine(model, method, **kw)
            shared = shares_prefill(engine.method)
            session = engine.prefill_from(record) if shared else engine.prefill(prompts)
            logits = engine.extend(session, cont)
            agree, kl = _compare(ref_logp, logits)
            stats = common.cache_stats(session, engine.continue_generation(session, 0).stats)
            out.append(
                {
                    "method": method,
                    "budget": budget,
                    "params": params.get(method, {}),
                    "top1_agreement": float(agree.float().mean()),
                    "kl_mean": float(kl.double().mean()),
                    "kl_max": float(kl.max()),
                    "top1_per_step": [round(x, 4) for x in agree.float().mean(0).tolist()],
                    "kl_per_step": [round(x, 6) for x in kl.mean(0).tolist()],
                    **common.mean_stats([(len(prompts), stats)]),
                    "steps": int(cont.shape[1]),
                    "n": len(prompts),
                    "prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
                    "seconds": round(time.perf_counter() - t0 + (record.seconds if shared else 0.0), 3),
                    "shared_prefill": shared,
                }
            )
            del logits, session
    return out


def fidelity_prompts(
    tokenizer: Any,
    model: Any,
    *,
    text: str | None = None,
    synthetic: str | None = None,
    length: int = 1024,
    n: int = 1,
    seed: int = 0,
) -> list[list[int]]:
    """Prompts for :func:`fidelity`: ``text`` (one prompt), or ``n`` samples of a suite of
    :mod:`mpckv.evals.suites` (``passkey`` … the full prompt with its question, chat-templated and sized in
    tokens for real models, in bytes for the byte-level model; ``ppl`` held-out text) of ``length``."""
    from mpckv.evals.suites import QA_SUITES, SUITES, prepare_ppl, prepare_qa

    if (text is None) == (synthetic is None):
        raise ConfigError("give exactly one of a prompt text and a synthetic suite")
    if text is not None:
        ids = common.encode(tokenizer, model, text, bos=True)
        if not ids:
            raise ConfigError("the prompt is empty")
        return [ids]
    if synthetic not in SUITES:
        raise ConfigError(f"unknown suite {synthetic!r}; choose from {', '.join(SUITES)}")
    if synthetic in QA_SUITES:
        return [s.prefix_ids + s.suffix_ids for s in prepare_qa(synthetic, length, n, seed, tokenizer, model)]
    return [c for c, _ in prepare_ppl(length, n, seed, 0, tokenizer, model)]

"""Private generation inside a launched party: ``mpckv launch --parties N -- generate --secure ...``.

Roles (see the README's threat model): party 0 holds the weights and shares them; party 1 holds the prompt
and alone learns the output tokens; a third party (3PC) holds shares only; the optional dealer (``--ttp``)
hands out correlated randomness. Every party runs this function with the same public arguments; only party
0 reads the weights and only party 1 reads the prompt. Party 1 prints the result and writes ``--out``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mpckv.errors import ConfigError
from mpckv.protocols import comm
from mpckv.protocols.compat import import_crypten
from mpckv.protocols.netmodel import modelled_breakdown

WEIGHT_PARTY, OUTPUT_PARTY = 0, 1


@dataclass
class SecureRun:
    """What one party knows after a secure generation."""

    rank: int
    tokens: list[int] | None  # only the output party sees them
    stats: Any  # GenerationStats (public quantities only)
    comm: Any  # system CommStats (every party gets the totals)
    wall_s: float
    kv_cache: str = "stock"


def require_parties() -> int:
    """Return this party's rank; raise a clear error outside a launched CrypTen party."""
    crypten = import_crypten()
    if not crypten.is_initialized():
        raise ConfigError(
            "secure generation runs inside launched parties: "
            "`mpckv launch --parties 2 -- generate --secure --model ... --prompt ...`"
        )
    return int(crypten.communicator.get().get_rank())


def secure_generate(
    model_path: str | None,
    prompt_ids: list[int] | None,
    max_new_tokens: int,
    method: str = "dense",
    method_params: dict[str, Any] | None = None,
    kv_cache: str = "stock",
) -> SecureRun:
    """Run one private greedy generation; a collective (every party must call it).

    ``model_path`` is read for weights on party 0 only; ``prompt_ids`` is used on party 1 only.
    """
    from mpckv.checkpoint import load_model
    from mpckv.plaintext.engine import Engine
    from mpckv.protocols.secure_model import broadcast_config, share_model, share_prompt

    rank = require_parties()
    comm.install()
    comm.reset()
    t0 = time.perf_counter()
    model = load_model(model_path) if rank == WEIGHT_PARTY and model_path is not None else None
    config = broadcast_config(model.config if model is not None else None, WEIGHT_PARTY)
    shared = share_model(model, config, WEIGHT_PARTY, kv_cache=kv_cache)
    prompt = share_prompt(prompt_ids if rank == OUTPUT_PARTY else None, config.vocab_size, OUTPUT_PARTY)
    engine = Engine(shared, method, **(method_params or {}))
    result = engine.generate(prompt, max_new_tokens, stop_tokens=[])
    wall = time.perf_counter() - t0
    with comm.paused():
        totals = comm.system_totals()
    tokens = result.tokens[0] if rank == OUTPUT_PARTY else None
    return SecureRun(rank, tokens, result.stats, totals, wall, kv_cache)


def run_to_json(run: SecureRun, text: str | None, method: str, budget: Any) -> dict[str, Any]:
    """The JSON of plaintext ``generate`` plus ``comm`` (system totals, per phase, modelled times)."""
    st = run.stats.to_dict()
    c = run.comm
    lan = modelled_breakdown(c, "lan", compute_s=run.wall_s)
    wan = modelled_breakdown(c, "wan", compute_s=run.wall_s)
    return {
        "tokens": run.tokens,
        "text": text,
        "method": method,
        "budget": budget,
        "secure": True,
        "kv_cache": run.kv_cache,
        **{
            k: st[k]
            for k in (
                "kept_per_layer",
                "read_per_layer",
                "kept_fraction",
                "cache_bytes",
                "prompt_lengths",
                "new_tokens",
                "prefill_s",
                "decode_s",
            )
        },
        "wall_s": round(run.wall_s, 4),
        "comm": {
            "bytes_total": c.bytes_total,
            "rounds": c.rounds,
            "online_bytes": c.online_bytes,
            "offline_bytes": c.offline_bytes,
            "by_phase": c.by_phase,
            "by_op": c.by_op,
            "modelled": {
                "lan_s": round(lan["total_s"], 4),
                "wan_s": round(wan["total_s"], 4),
                "lan": lan,
                "wan": wan,
            },
        },
    }


def write_output(payload: dict[str, Any], out: str | None) -> None:
    """Write the result JSON atomically (:mod:`mpckv.io`); nothing when ``out`` is empty."""
    if out:
        from mpckv.io import write_json_atomic

        write_json_atomic(out, payload, "--out")

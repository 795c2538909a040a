"""``mpckv bench secure``: per-token decode cost of private generation, measured across real parties.

For each method and cache length ``n`` the parties hold a secret KV cache of ``n`` entries and run a few
secure decode steps; we report bytes, dependent rounds, modelled LAN/WAN seconds and wall seconds per
generated token (system totals over parties, from :mod:`mpckv.protocols.comm`).

So that long ``n`` stays feasible, the cache is *not* produced by a secure prefill: party 0 runs a
plaintext prefill of a public random benchmark prompt and secret-shares the resulting K/V (the cost of a
decode step does not depend on the cache's values). The one-time cost of a real secure prefill is measured
separately (``--prefill-lengths``) at the lengths where it is feasible. This is a benchmark mode only;
``generate --secure`` always prefills securely. On SmolLM2-135M a real secure prefill of 4096 tokens
through 30 layers would take hours on two cores; the decode rows need none (every record says so in
``cache_source``).

A method may carry a label, ``NAME@LABEL`` (e.g. ``mpcache@all`` with ``--param
mpcache@all.dense_layers=[]``), to measure two settings of one method in the same run. Dense decode
steps are measured without a warm-up step (it has nothing to build); every other method gets one
unmeasured warm-up step. Each record also carries every party's peak resident memory (``rss_mib``).
"""

from __future__ import annotations

import json
import resource
import time
from typing import Any

import torch

from mpckv.errors import ConfigError
from mpckv.protocols import comm
from mpckv.protocols.compat import import_crypten
from mpckv.protocols.netmodel import modelled_seconds

CACHE_SOURCE = "plaintext-prefill"
"""How decode rows get their cache: party 0's plaintext prefill of a public prompt, secret-shared (the
per-token decode traffic depends only on the cache's public sizes, not on how it was made)."""

RECORD_FIELDS = (
    "method",
    "kv_cache",
    "phase",
    "length",
    "parties",
    "protocol",
    "bytes_per_token",
    "rounds_per_token",
    "online_bytes_per_token",
    "lan_s_per_token",
    "wan_s_per_token",
    "wall_s_per_token",
    "lan_net_s_per_token",
    "wan_net_s_per_token",
)


def _rank() -> int:
    return int(import_crypten().communicator.get().get_rank())


def base_method(label: str) -> str:
    """``"mpcache@all"`` → ``"mpcache"`` (the registered method behind a labelled bench entry)."""
    return label.partition("@")[0]


def _peak_rss_mib() -> list[float]:
    """Every party's peak resident memory so far, in MiB (a collective; public bookkeeping)."""
    comm_ = import_crypten().communicator.get()
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    with comm.paused():
        return [
            round(float(comm_.broadcast_obj(mine if _rank() == r else None, r)), 1)
            for r in range(int(comm_.get_world_size()))
        ]


def _shared_session(
    engine: Any, plain_model: Any, config: Any, n: int, seed: int, plain_method: Any = "dense"
) -> Any:
    """A secure Session holding a secret KV cache built from a plaintext prefill of ``n`` tokens on party 0.

    ``plain_method`` runs in that plaintext prefill: methods whose one-time prompt compression is
    infeasible under MPC at long ``n`` (MPCache's static eviction) compress there, and the secure method
    then decodes over the compacted cache (sizes are public, so they are the same as a secure prefill's).
    """
    from mpckv.plaintext.engine import Engine, Session

    crypten = import_crypten()
    comm_ = crypten.communicator.get()
    c = config
    ids = torch.randint(0, c.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    plain = Engine(plain_model, plain_method).prefill([ids]) if plain_model is not None else None
    lens = [int(plain.cache[i].lengths.max()) for i in range(c.num_hidden_layers)] if plain else None
    lens = comm_.broadcast_obj(lens, 0)  # public sizes
    cache = engine.model.xp.new_cache(
        c.num_hidden_layers, 1, c.num_key_value_heads, c.head_dim, torch.float32, torch.device("cpu")
    )
    with comm.paused():  # setup, not part of a decode step
        for layer in range(c.num_hidden_layers):
            shape = (1, c.num_key_value_heads, lens[layer], c.head_dim)
            k = plain.cache[layer].keys().float() if plain is not None else torch.zeros(shape)
            v = plain.cache[layer].values().float() if plain is not None else torch.zeros(shape)
            cache[layer].append(
                crypten.cryptensor(k, src=0), crypten.cryptensor(v, src=0), torch.arange(lens[layer])[None]
            )
            # the method sees the cache as a prefill would leave it
        lengths = torch.tensor([n])
        logits = crypten.cryptensor(torch.zeros(1, c.vocab_size), src=0)
    states: list[dict[str, Any]] = [{} for _ in range(c.num_hidden_layers)]
    # let the method compress the shared cache as its prefill hook would (one-time cost, not counted)
    from mpckv.plaintext.methods.base import PrefillContext

    with comm.paused():
        for layer in range(c.num_hidden_layers):
            ctx = PrefillContext(
                layer,
                c,
                cache[layer],
                None,
                lengths,
                engine.model.scale,
                states[layer],
                engine.model.inv_freq,
                states,
                engine.model.xp,
            )
            engine.method.on_prefill(ctx)
    return Session(
        cache=cache,
        positions=lengths.clone(),
        prompt_lengths=lengths,
        states=states,
        logits=logits,
        read_sums=[0.0] * c.num_hidden_layers,
        peak_cache_bytes=0,
        dense_lengths=lengths.clone(),
    )


def _record(
    method: str,
    kv_cache: str,
    phase: str,
    n: int,
    steps: int,
    stats: Any,
    wall: float,
    parties: int,
    protocol: str,
) -> dict[str, Any]:
    return {
        "method": method,
        "kv_cache": kv_cache,
        "phase": phase,
        "length": n,
        "parties": parties,
        "protocol": protocol,
        "bytes_per_token": stats.bytes_total / steps,
        "rounds_per_token": stats.rounds / steps,
        "online_bytes_per_token": stats.online_bytes / steps,
        "lan_s_per_token": modelled_seconds(stats, "lan", wall) / steps,
        "wan_s_per_token": modelled_seconds(stats, "wan", wall) / steps,
        "wall_s_per_token": wall / steps,
        # the network part alone (rounds·RTT + bytes/bandwidth): wall time on a shared CPU is noise
        "lan_net_s_per_token": modelled_seconds(stats, "lan", 0.0) / steps,
        "wan_net_s_per_token": modelled_seconds(stats, "wan", 0.0) / steps,
        "by_op": {
            op: {"bytes": v.get("bytes", 0) / steps, "rounds": v.get("rounds", 0) / steps}
            for op, v in sorted(stats.by_op.items())
        },
    }


def party_main(argv: list[str]) -> int:
    """Entry point run in every party (``launch(..., pycall="mpckv.protocols.bench_secure:party_main")``).

    ``argv`` is one JSON object: model, methods, lengths, steps, params, prefill_lengths, out.
    """
    from mpckv.checkpoint import load_model
    from mpckv.plaintext.engine import Engine
    from mpckv.protocols.secure_model import broadcast_config, share_model, share_prompt

    spec = json.loads(argv[0])
    crypten = import_crypten()
    rank, world = _rank(), int(crypten.communicator.get().get_world_size())
    protocol = str(crypten.cfg.mpc.protocol)
    plain = load_model(spec["model"]) if rank == 0 else None
    config = broadcast_config(plain.config if plain is not None else None)
    records: list[dict[str, Any]] = []
    steps = int(spec["steps"])
    shared = engine = None
    for kv_cache in spec.get("kv_caches", ["stock"]):
        shared = engine = None  # free the previous cache kind's shared weights before sharing again
        with comm.paused():  # weights (and, when persistent, their masks) are set-up, not per token
            shared = share_model(plain, config, kv_cache=kv_cache)
        for label in spec["methods"]:
            method = base_method(label)
            params = dict(spec["params"].get(label, {}))
            if method != "dense" and "budget" not in params:
                params["budget"] = spec["budget"]
            plain_method: Any = "dense"
            secure_params = params
            if method == "mpcache":  # static eviction runs in the plaintext set-up (see _shared_session)
                from mpckv.registry import get_method

                plain_method = get_method(method, **params)
                secure_params = {**params, "static_ratio": 1.0}
            engine = Engine(shared, method, **secure_params)
            for n in spec["lengths"]:
                session = _shared_session(engine, plain, config, n, seed=n, plain_method=plain_method)
                onehot = torch.nn.functional.one_hot(torch.tensor([1]), config.vocab_size).float()
                feed = crypten.cryptensor(onehot)
                if method != "dense":
                    with comm.paused():  # warm-up: builds per-run structures (e.g. cluster boxes) once
                        engine.decode(session, feed)
                comm.reset()
                t0 = time.perf_counter()
                for _ in range(steps):
                    engine.decode(session, feed)
                wall = time.perf_counter() - t0
                with comm.paused():
                    totals = comm.system_totals()
                records.append(_record(label, kv_cache, "decode", n, steps, totals, wall, world, protocol))
                records[-1].update(
                    params=params, model=spec["model"], cache_source=CACHE_SOURCE, rss_mib=_peak_rss_mib()
                )
                del session
                if rank == 0:
                    print(json.dumps({k: v for k, v in records[-1].items() if k != "by_op"}), flush=True)
                    _write(records, spec.get("out"))
            for n in spec.get("prefill_lengths", []):
                gen = torch.Generator().manual_seed(n)
                ids = torch.randint(0, config.vocab_size, (n,), generator=gen).tolist()
                prompt = share_prompt(ids if rank == 1 else None, config.vocab_size)
                comm.reset()
                t0 = time.perf_counter()
                engine.prefill(prompt)
                wall = time.perf_counter() - t0
                with comm.paused():
                    totals = comm.system_totals()
                records.append(_record(label, kv_cache, "prefill", n, 1, totals, wall, world, protocol))
                records[-1].update(
                    params=params, model=spec["model"], cache_source="secure-prefill", rss_mib=_peak_rss_mib()
                )
    if rank == 0:
        _write(records, spec.get("out"))
    return 0


def _write(records: list[dict[str, Any]], out: str | None) -> None:
    """Write the records so far (after every cell, so that a long run that is stopped keeps its rows)."""
    if out:
        from mpckv.io import write_json_atomic

        write_json_atomic(out, records, "--json")


def run_bench(
    model: str,
    methods: list[str],
    lengths: list[int],
    *,
    parties: int = 2,
    protocol: str = "beaver",
    ttp: bool = False,
    steps: int = 2,
    budget: float = 0.1,
    params: dict[str, dict[str, Any]] | None = None,
    prefill_lengths: list[int] | None = None,
    kv_caches: list[str] | None = None,
    out: str,
    timeout: float = 3600,
) -> list[dict[str, Any]]:
    """Launch local parties, run the benchmark, return the records (also written to ``out``)."""
    from mpckv.protocols.launcher import launch

    if steps < 1 or not lengths or any(n < 1 for n in lengths):
        raise ConfigError("bench secure needs steps >= 1 and positive lengths")
    spec = {
        "model": model,
        "methods": methods,
        "lengths": lengths,
        "steps": steps,
        "budget": budget,
        "params": params or {},
        "prefill_lengths": prefill_lengths or [],
        "out": out,
        "kv_caches": kv_caches or ["stock"],
    }
    code = launch(
        parties,
        [json.dumps(spec)],
        ttp=ttp,
        protocol=protocol,
        timeout=timeout,
        pycall="mpckv.protocols.bench_secure:party_main",
    )
    if code != 0:
        raise ConfigError(f"the benchmark parties failed (exit {code}); see the [rank R] lines above")
    with open(out) as fh:
        records: list[dict[str, Any]] = json.load(fh)
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    """A markdown table of the records, with ratios against dense (stock and persistent) in the same run."""

    def refs(kv_cache: str) -> dict[tuple[Any, ...], dict[str, Any]]:
        return {
            (r["phase"], r["length"], r["parties"]): r
            for r in records
            if r["method"] == "dense" and r["kv_cache"] == kv_cache
        }

    stock, persistent = refs("stock"), refs("persistent")

    def net(r: dict[str, Any]) -> float:  # older records: the network part is LAN minus wall
        return float(r.get("lan_net_s_per_token", r["lan_s_per_token"] - r["wall_s_per_token"]))

    for r in records:
        r.setdefault("lan_net_s_per_token", net(r))

    def ratio(ref: dict[str, Any] | None, r: dict[str, Any], key: str) -> str:
        return f"{ref[key] / r[key]:.2f}×" if ref and r[key] > 0 else "—"

    head = (
        "| method | kv_cache | phase | n | parties | KB/token | rounds/token | LAN s/token | WAN s/token "
        "| wall s/token | LAN net s/token | bytes ÷ stock dense | bytes ÷ persistent dense "
        "| LAN ÷ stock dense | LAN net ÷ stock dense |"
    )
    lines = [head, "|" + "---|" * 15]
    sources = sorted({str(r.get("cache_source", CACHE_SOURCE)) for r in records if r["phase"] == "decode"})
    for r in records:
        key = (r["phase"], r["length"], r["parties"])
        d, p = stock.get(key), persistent.get(key)
        lines.append(
            f"| {r['method']} | {r['kv_cache']} | {r['phase']} | {r['length']} | {r['parties']} "
            f"| {r['bytes_per_token'] / 1024:.1f} | {r['rounds_per_token']:.0f} | {r['lan_s_per_token']:.3f} "
            f"| {r['wan_s_per_token']:.2f} | {r['wall_s_per_token']:.3f} | {r['lan_net_s_per_token']:.3f} "
            f"| {ratio(d, r, 'bytes_per_token')} | {ratio(p, r, 'bytes_per_token')} "
            f"| {ratio(d, r, 'lan_s_per_token')} | {ratio(d, r, 'lan_net_s_per_token')} |"
        )
    if sources:
        lines.append(
            f"\ndecode rows: the secret cache of n entries comes from {', '.join(sources)} (party 0's "
            "plaintext prefill of a public random prompt, secret-shared); per-token decode traffic depends "
            "only on the cache's public sizes, not on how it was made. LAN/WAN = measured wall + "
            "rounds·RTT + bytes/bandwidth; LAN net = the network part alone."
        )
    return "\n".join(lines)

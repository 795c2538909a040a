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

Methods that evict at prefill (SnapKV, PyramidKV, H2O-window, H2O, TRIM-KV, StreamingLLM, … — any method
that overrides ``on_prefill``, MPCache excepted) run their **secure** prefill hook on that shared cache:
party 0 also secret-shares every layer's post-RoPE prompt queries from its plaintext prefill, and the
method's ``on_prefill`` runs on the secret cache and queries exactly as inside a secure prefill (secret
window votes or accumulated scores, secure top-k, oblivious compaction; public-index cuts cost nothing).
That one-off cost, summed over all layers, is its own record (``phase: "prefill_eviction"``: the usual
fields hold the totals, also repeated as ``bytes``, ``rounds``, ``lan_s``, …); the decode record at the
same ``n`` then measures steps over the cache the eviction left (H2O's decode-time oblivious one-entry
eviction included). Decode records add ``prefill_eviction`` (``"secure"``, ``"plaintext-setup"`` for
MPCache, whose static eviction runs in the plaintext set-up and is not measured, or ``"none"``) and
``kept_per_layer`` (per layer, the mean over KV heads of the public cache lengths the decode steps
start from). Sharing the queries is set-up (inside a secure prefill they come out of the secure
forward), so it is not counted; the rest of the prefill forward is not part of that record
(``--prefill-lengths`` measures a whole secure prefill).
An entry that cannot run under MPC is refused before any party starts; one whose secure code refuses its
setting (e.g. TRIM-KV with learned gates) stops the run with one line naming it (the rows so far are kept).

A method may carry a label, ``NAME@LABEL`` (e.g. ``mpcache@all`` with ``--param
mpcache@all.dense_layers=[]``), to measure two settings of one method in the same run. Dense decode
steps are measured without a warm-up step (it has nothing to build); every other method gets one
unmeasured warm-up step. Each record also carries every party's peak resident memory (``rss_mib``).
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mpckv.errors import ConfigError, MpckvError
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

EVICTION_TOTALS = (
    "bytes",
    "rounds",
    "online_bytes",
    "lan_s",
    "wan_s",
    "wall_s",
    "lan_net_s",
    "wan_net_s",
)
"""Extra fields of a ``prefill_eviction`` row: the one-off totals over all layers (the same values as its
``*_per_token`` fields, which hold totals there as in ``prefill`` rows)."""


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


def has_prefill_hook(method: Any) -> bool:
    """Whether ``method`` overrides :meth:`KVMethod.on_prefill` (prompt-time eviction or set-up)."""
    from mpckv.plaintext.methods.base import KVMethod

    return type(method).on_prefill is not KVMethod.on_prefill


def eviction_mode(label: str, method: Any) -> str:
    """How a bench entry's prefill hook runs: ``"secure"`` (its secure ``on_prefill`` on the shared cache
    and shared prompt queries, measured as a ``prefill_eviction`` row), ``"plaintext-setup"`` (MPCache: its
    static eviction runs in party 0's plaintext set-up, not measured) or ``"none"`` (no prefill hook)."""
    if base_method(label) == "mpcache":
        return "plaintext-setup"
    return "secure" if has_prefill_hook(method) else "none"


@dataclass
class Measured:
    """The system communication totals and this party's wall seconds of one measured phase."""

    stats: Any
    wall: float


def _ids(config: Any, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (n,), generator=gen).tolist()


def _prefill_ctx(engine: Any, config: Any, cache: Any, layer: int, q: Any, lengths: Any, states: Any) -> Any:
    from mpckv.plaintext.methods.base import PrefillContext

    m = engine.model
    ctx = PrefillContext(
        layer, config, cache[layer], q, lengths, m.scale, states[layer], m.inv_freq, states, m.xp
    )
    ctx.kv = cache
    return ctx


def _shared_session(
    engine: Any,
    plain_model: Any,
    config: Any,
    n: int,
    seed: int,
    plain_method: Any = "dense",
    evict: bool = False,
) -> tuple[Any, Measured | None]:
    """A secure Session holding a secret KV cache built from a plaintext prefill of ``n`` tokens on party 0.

    ``evict=False``: ``plain_method`` runs in that plaintext prefill (methods whose one-time prompt
    compression is infeasible under MPC at long ``n``, i.e. MPCache's static eviction, compress there; the
    secure method then decodes over the compacted cache, whose sizes are public and the same as a secure
    prefill's) and the method's ``on_prefill`` runs unmeasured with no prompt queries.

    ``evict=True``: party 0 also secret-shares every layer's post-RoPE prompt queries from its dense
    plaintext prefill, and the method's **secure** ``on_prefill`` runs on the secret cache and the secret
    queries, layer by layer, exactly as in :meth:`Engine.prefill` under MPC (secret votes or scores, secure
    top-k, oblivious compaction). Its traffic and wall time are returned (sharing the queries is set-up:
    in a real secure prefill they come out of the secure forward; it is not counted).
    """
    from mpckv.plaintext.engine import Engine, Session

    crypten = import_crypten()
    comm_ = crypten.communicator.get()
    c = config
    ids = _ids(c, n, seed)
    record = plain = None
    if plain_model is not None:
        if evict:
            record = Engine(plain_model, "dense").record_prefill([ids])
        else:
            plain = Engine(plain_model, plain_method).prefill([ids])
    if record is not None:
        lens: list[int] | None = [n] * c.num_hidden_layers
    elif plain is not None:
        lens = [int(plain.cache[i].lengths.max()) for i in range(c.num_hidden_layers)]
    else:
        lens = None
    lens = comm_.broadcast_obj(lens, 0)  # public sizes
    assert lens is not None
    cache = engine.model.xp.new_cache(
        c.num_hidden_layers, 1, c.num_key_value_heads, c.head_dim, torch.float32, torch.device("cpu")
    )

    def kv(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, c.num_key_value_heads, lens[layer], c.head_dim)
        if record is not None:
            return record.keys[layer].float(), record.values[layer].float()
        if plain is not None:
            return plain.cache[layer].keys().float(), plain.cache[layer].values().float()
        return torch.zeros(shape), torch.zeros(shape)

    lengths = torch.tensor([n])
    states: list[dict[str, Any]] = [{} for _ in range(c.num_hidden_layers)]
    measured = None
    if evict:  # the method's secure prefill hook on the secret cache and queries, measured
        q_shape = (1, c.num_attention_heads, n, c.head_dim)
        comm.reset()
        wall = 0.0
        for layer in range(c.num_hidden_layers):
            with comm.paused():  # set-up: the secret prompt K/V and queries of this layer
                k, v = kv(layer)
                cache[layer].append(
                    crypten.cryptensor(k, src=0), crypten.cryptensor(v, src=0), torch.arange(n)[None]
                )
                q_plain = record.queries[layer].float() if record is not None else torch.zeros(q_shape)
                q = crypten.cryptensor(q_plain, src=0)
            ctx = _prefill_ctx(engine, c, cache, layer, q, lengths, states)
            t0 = time.perf_counter()
            with engine.model.xp.scope(phase="method", layer=layer):
                engine.method.on_prefill(ctx)
            wall += time.perf_counter() - t0
            del q, q_plain
        with comm.paused():
            measured = Measured(comm.system_totals(), wall)
    else:
        with comm.paused():  # setup, not part of a decode step
            for layer in range(c.num_hidden_layers):
                k, v = kv(layer)
                cache[layer].append(
                    crypten.cryptensor(k, src=0),
                    crypten.cryptensor(v, src=0),
                    torch.arange(lens[layer])[None],
                )
            # let the method compress the shared cache as its prefill hook would (one-time, not counted)
            for layer in range(c.num_hidden_layers):
                ctx = _prefill_ctx(engine, c, cache, layer, None, lengths, states)
                ctx.kv = None
                engine.method.on_prefill(ctx)
    with comm.paused():
        logits = crypten.cryptensor(torch.zeros(1, c.vocab_size), src=0)
    session = Session(
        cache=cache,
        positions=lengths.clone(),
        prompt_lengths=lengths,
        states=states,
        logits=logits,
        read_sums=[0.0] * c.num_hidden_layers,
        peak_cache_bytes=0,
        dense_lengths=lengths.clone(),
    )
    return session, measured


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


def _kept_per_layer(session: Any) -> list[float]:
    """The mean public cache length over the KV heads of every layer (what the decode steps start from;
    RazorAttention's split layers hold full retrieval heads and short other heads)."""
    return [round(float(layer.lengths.float().mean()), 2) for layer in session.cache]


def _eviction_record(
    label: str, kv_cache: str, n: int, measured: Measured, world: int, protocol: str
) -> dict[str, Any]:
    """The ``prefill_eviction`` row: the one-off cost over all layers (``*_per_token`` fields hold the
    one-off totals, as in ``prefill`` rows; the explicit totals are repeated without the suffix)."""
    rec = _record(label, kv_cache, "prefill_eviction", n, 1, measured.stats, measured.wall, world, protocol)
    rec.update({name: rec[f"{name}_per_token"] for name in EVICTION_TOTALS})
    return rec


def _bench_method(
    label: str,
    kv_cache: str,
    spec: dict[str, Any],
    shared: Any,
    plain: Any,
    config: Any,
    keep: Callable[[dict[str, Any]], None],
) -> None:
    """Every row of one bench entry on one cache kind (at each length: the secure prefill eviction, if
    any, then the decode steps; then the secure prefills); each row goes to ``keep`` once complete."""
    from mpckv.plaintext.engine import Engine
    from mpckv.protocols.secure_model import share_prompt

    crypten = import_crypten()
    rank, world = _rank(), int(crypten.communicator.get().get_world_size())
    protocol = str(crypten.cfg.mpc.protocol)
    steps = int(spec["steps"])
    method = base_method(label)
    params = _method_params(label, spec)
    plain_method: Any = "dense"
    secure_params = params
    if method == "mpcache":  # static eviction runs in the plaintext set-up (see _shared_session)
        from mpckv.registry import get_method

        plain_method = get_method(method, **params)
        secure_params = {**params, "static_ratio": 1.0}
    engine = Engine(shared, method, **secure_params)
    mode = eviction_mode(label, engine.method)
    extra = {"params": params, "model": spec["model"], "cache_source": CACHE_SOURCE}
    for n in spec["lengths"]:
        session, evicted = _shared_session(
            engine, plain, config, n, seed=n, plain_method=plain_method, evict=mode == "secure"
        )
        kept = _kept_per_layer(session)
        if evicted is not None:
            row = _eviction_record(label, kv_cache, n, evicted, world, protocol)
            row.update(extra, kept_per_layer=kept, rss_mib=_peak_rss_mib())
            keep(row)
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
        row = _record(label, kv_cache, "decode", n, steps, totals, wall, world, protocol)
        row.update(extra, rss_mib=_peak_rss_mib(), prefill_eviction=mode, kept_per_layer=kept)
        del session
        keep(row)
    for n in spec.get("prefill_lengths", []):
        ids = _ids(config, n, n)
        prompt = share_prompt(ids if rank == 1 else None, config.vocab_size)
        comm.reset()
        t0 = time.perf_counter()
        engine.prefill(prompt)
        wall = time.perf_counter() - t0
        with comm.paused():
            totals = comm.system_totals()
        row = _record(label, kv_cache, "prefill", n, 1, totals, wall, world, protocol)
        row.update(params=params, model=spec["model"], cache_source="secure-prefill", rss_mib=_peak_rss_mib())
        keep(row)


def _method_params(label: str, spec: dict[str, Any]) -> dict[str, Any]:
    params = dict(spec["params"].get(label, {}))
    if base_method(label) != "dense" and "budget" not in params:
        params["budget"] = spec["budget"]
    return params


def party_main(argv: list[str]) -> int:
    """Entry point run in every party (``launch(..., pycall="mpckv.protocols.bench_secure:party_main")``).

    ``argv`` is one JSON object: model, methods, lengths, steps, params, prefill_lengths, out. A method
    whose secure code refuses the setting (an :class:`~mpckv.errors.MpckvError`, raised on public sizes
    in every party alike) stops the run with one line naming it, also written to ``out + ".error"`` (by
    every party: the first to fail stops the others; the parties of :func:`run_bench` are local).
    """
    from mpckv.checkpoint import load_model
    from mpckv.protocols.secure_model import broadcast_config, share_model

    spec = json.loads(argv[0])
    rank = _rank()
    plain = load_model(spec["model"]) if rank == 0 else None
    config = broadcast_config(plain.config if plain is not None else None)
    records: list[dict[str, Any]] = []

    def keep(row: dict[str, Any]) -> None:
        records.append(row)
        if rank == 0:
            print(json.dumps({k: v for k, v in row.items() if k != "by_op"}), flush=True)
            _write(records, spec.get("out"))

    shared = None
    for kv_cache in spec.get("kv_caches", ["stock"]):
        shared = None  # free the previous cache kind's shared weights before sharing again
        with comm.paused():  # weights (and, when persistent, their masks) are set-up, not per token
            shared = share_model(plain, config, kv_cache=kv_cache)
        for label in spec["methods"]:
            try:
                _bench_method(label, kv_cache, spec, shared, plain, config, keep)
            except MpckvError as exc:
                message = f"bench secure: {label} cannot be benched ({kv_cache} cache): " + " ".join(
                    str(exc).split()
                )
                if spec.get("out"):  # every party (the first to fail stops the others): one line
                    from mpckv.io import write_text_atomic

                    write_text_atomic(spec["out"] + ".error", message + "\n", "--json error note")
                if rank == 0:
                    _write(records, spec.get("out"))
                raise ConfigError(message) from exc
    if rank == 0:
        _write(records, spec.get("out"))
    return 0


def _write(records: list[dict[str, Any]], out: str | None) -> None:
    """Write the records so far (after every cell, so that a long run that is stopped keeps its rows)."""
    if out:
        from mpckv.io import write_json_atomic

        write_json_atomic(out, records, "--json")


def check_methods(methods: list[str], params: dict[str, dict[str, Any]], budget: float) -> None:
    """Refuse, before any party starts, a bench entry that cannot run under MPC (one line naming it).

    Builds every entry with its parameters (so bad parameters fail here), and requires ``secure="yes"``
    and a prefill the bench can reproduce (no ``changes_prefill``: the bench's cache comes from a dense
    prefill).
    """
    from mpckv.registry import get_method

    for label in methods:
        name = base_method(label)
        p = dict(params.get(label, {}))
        if name != "dense":
            p.setdefault("budget", budget)
        method = get_method(name, **p)
        support = getattr(method, "secure", "no")
        if support != "yes":
            note = getattr(method, "secure_note", "")
            raise ConfigError(
                f"bench secure: {label} cannot be benched: it does not run under MPC yet (secure support: "
                f"{support})" + (f"; {note}" if note else "")
            )
        if getattr(method, "changes_prefill", False):
            raise ConfigError(
                f"bench secure: {label} cannot be benched: it changes the prefill forward, and the bench "
                "builds its cache from a dense prefill"
            )


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
    check_methods(methods, params or {}, budget)
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
    error = out + ".error"  # where rank 0 names a method that refused its setting
    if os.path.exists(error):
        os.remove(error)
    code = launch(
        parties,
        [json.dumps(spec)],
        ttp=ttp,
        protocol=protocol,
        timeout=timeout,
        pycall="mpckv.protocols.bench_secure:party_main",
    )
    if os.path.exists(error):  # a method refused its setting: one line naming it
        with open(error) as fh:
            message = fh.read().strip()
        os.remove(error)
        raise ConfigError(message)
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
    if any(r["phase"] == "prefill_eviction" for r in records):
        lines.append(
            "\nprefill_eviction rows: the one-off cost, over all layers at prompt length n, of the "
            "method's secure prefill hook run on the secret cache and secret prompt queries (SnapKV, "
            "PyramidKV, H2O-window, H2O: secret scores, secure top-k, oblivious compaction; public-index "
            "cuts such as StreamingLLM's or TRIM-KV's with constant gates cost nothing); the per-token "
            "columns hold the one-off totals. The method's decode row at the same n decodes over the cache "
            "that eviction left."
        )
    return "\n".join(lines)

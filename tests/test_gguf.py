"""GGUF checkpoints: logits equal to the safetensors of the same weights, every quantization type against
the reference dequantization, llama.cpp's q/k row order, the tokenizer and chat template, clear errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf_files import CHATML, SPECIAL, VOCAB_SIZE, write_gguf

import mpckv
from mpckv import CheckpointError, gguf_loader
from mpckv.gguf_loader import load_gguf, permute_rows, unpermute_rows
from mpckv.random_model import random_llama, small_config
from mpckv.tokenizer import load_tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 260, 97]])


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MPCKV_CACHE", str(tmp_path / "cache"))


def _llama(seed: int = 0, tied: bool = False):
    cfg = dataclasses.replace(small_config(vocab_size=VOCAB_SIZE), tie_word_embeddings=tied)
    return random_llama(cfg, seed=seed)


def _qwen2(seed: int = 1):
    m = _llama(seed)
    g = torch.Generator().manual_seed(seed)
    for lw in m.layers:
        lw.q_bias = 0.1 * torch.randn(lw.q_proj.shape[0], generator=g)
        lw.k_bias = 0.1 * torch.randn(lw.k_proj.shape[0], generator=g)
        lw.v_bias = 0.1 * torch.randn(lw.v_proj.shape[0], generator=g)
    m.config = dataclasses.replace(m.config, attention_bias=True, model_type="qwen2")
    return m


def test_permutation_is_llama_cpp_row_order():
    heads, d = 3, 8
    w = torch.arange(heads * d * 2, dtype=torch.float32).reshape(heads * d, 2)
    p = permute_rows(w, heads)
    for h in range(heads):
        for j in range(d // 2):
            for s in range(2):  # GGUF row 2j+s of a head holds HF row s*d/2 + j
                torch.testing.assert_close(p[h * d + 2 * j + s], w[h * d + s * d // 2 + j])
    torch.testing.assert_close(unpermute_rows(p, heads), w)
    torch.testing.assert_close(unpermute_rows(permute_rows(w[:, 0], heads), heads), w[:, 0])


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "qwen2"])
def test_fp32_logits_equal_safetensors(arch, tmp_path):
    model = _qwen2() if arch == "qwen2" else _llama(tied=arch == "llama_tied")
    mpckv.save_model(model, tmp_path / "hf")
    ref = mpckv.load_model(tmp_path / "hf")
    path = write_gguf(model, tmp_path / "m.gguf", arch="qwen2" if arch == "qwen2" else "llama")
    got = mpckv.load_model(path)
    assert got.config.attention_bias == (arch == "qwen2")
    assert got.config.tie_word_embeddings == (arch == "llama_tied")
    assert got.config.model_type == ("qwen2" if arch == "qwen2" else "llama")
    torch.testing.assert_close(got(IDS), ref(IDS), atol=1e-4, rtol=0)
    assert got.source == str(path)
    # a directory holding one .gguf loads the same
    torch.testing.assert_close(mpckv.load_model(tmp_path)(IDS), ref(IDS), atol=1e-4, rtol=0)


def test_unpermuted_llama_rows_would_be_wrong(tmp_path, monkeypatch):
    model = _llama()
    path = write_gguf(model, tmp_path / "p.gguf", arch="llama")
    torch.testing.assert_close(mpckv.load_model(path)(IDS), model(IDS), atol=1e-4, rtol=0)
    # the same file read without undoing the permutation gives other logits: the permutation matters
    monkeypatch.setitem(gguf_loader.ARCHITECTURES, "llama", ("llama", False))
    assert not torch.allclose(mpckv.load_model(path)(IDS), model(IDS), atol=1e-2)


# Offsets of the fp16 scale fields inside one block, per type (the rest are quant bits: any byte is valid).
FP16_AT = {
    Q.Q8_0: (0,),
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}


def _random_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for off in FP16_AT[qtype]:
        scale = rng.uniform(0.001, 0.02, size=(rows, cols // block)).astype(np.float16)
        data[..., off : off + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(FP16_AT), ids=lambda q: q.name)
def test_quantized_blocks_match_reference_dequantization(qtype, tmp_path):
    cfg = small_config(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=256, num_hidden_layers=1, head_dim=64
    )
    model = random_llama(cfg, seed=3)
    rng = np.random.default_rng(0)
    names = {
        "attn_q": (256, 256),
        "attn_k": (128, 256),
        "attn_v": (128, 256),
        "attn_output": (256, 256),
        "ffn_gate": (256, 256),
        "ffn_up": (256, 256),
        "ffn_down": (256, 256),
    }
    raw = {f"blk.0.{n}.weight": (_random_blocks(r, c, qtype, rng), qtype) for n, (r, c) in names.items()}
    got = mpckv.load_model(write_gguf(model, tmp_path / "k.gguf", raw=raw))
    lw = got.layers[0]
    for name, attr, heads in [
        ("attn_q", "q_proj", 4),
        ("attn_k", "k_proj", 2),
        ("attn_v", "v_proj", 0),
        ("attn_output", "o_proj", 0),
        ("ffn_gate", "gate_proj", 0),
        ("ffn_up", "up_proj", 0),
        ("ffn_down", "down_proj", 0),
    ]:
        ref = torch.from_numpy(gguf.quants.dequantize(raw[f"blk.0.{name}.weight"][0], qtype).copy())
        if heads:  # GGUF row 2j+s of a head is HF row s*d/2+j
            d = 64
            idx = [h * d + 2 * j + s for h in range(heads) for s in range(2) for j in range(d // 2)]
            ref = ref[idx]
        assert ref.abs().max() > 0
        torch.testing.assert_close(getattr(lw, attr), ref, atol=0, rtol=0)
    assert torch.isfinite(got(IDS)).all()


# Worst-case relative weight error of each type: half a step of its grid (fp16 11 bits, bf16 8 bits,
# 8-bit blocks, 5-bit, 4-bit) relative to the largest weight, with a margin.
@pytest.mark.parametrize(
    ("qtype", "bound"),
    [(Q.F16, 1e-3), (Q.BF16, 4e-3), (Q.Q8_0, 8e-3), (Q.Q5_0, 0.06), (Q.Q4_1, 0.1), (Q.Q4_0, 0.12)],
    ids=lambda x: getattr(x, "name", str(x)),
)
def test_quantized_model_round_trip(qtype, bound, tmp_path):
    cfg = small_config(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, head_dim=16)
    model = random_llama(cfg, seed=5)
    got = mpckv.load_model(write_gguf(model, tmp_path / "q.gguf", qtype=qtype))
    pairs = [
        (got.layers[1].q_proj, model.layers[1].q_proj),
        (got.layers[0].down_proj, model.layers[0].down_proj),
    ]
    for a, b in pairs:
        rel = (a - b).abs().max() / b.abs().max()
        assert 0 < rel < bound, rel
    if qtype in (Q.F16, Q.BF16, Q.Q8_0):  # fine grids: the random model's logits stay close
        ref, out = model(IDS), got(IDS)
        assert (out - ref).abs().max() / ref.abs().max() < 0.05
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85


def test_bf16_and_fp16_dtypes(tmp_path):
    path = write_gguf(_llama(), tmp_path / "m.gguf")
    for dt in (torch.bfloat16, torch.float16):
        m = mpckv.load_model(path, dtype=dt)
        assert m.embed_tokens.dtype == dt and m.layers[0].q_proj.dtype == dt


def test_errors(tmp_path):
    model = _llama()
    path = write_gguf(model, tmp_path / "m.gguf")
    data = path.read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"t\.gguf"):
        mpckv.load_model(tmp_path / "t.gguf")
    (tmp_path / "h.gguf").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        mpckv.load_model(tmp_path / "h.gguf")
    (tmp_path / "n.gguf").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        mpckv.load_model(tmp_path / "n.gguf")
    with pytest.raises(CheckpointError, match="does not exist"):
        mpckv.load_model(tmp_path / "missing.gguf")
    bad = data.replace(b"llama", b"gpt2_", 1)  # general.architecture value: same length, unknown arch
    (tmp_path / "a.gguf").write_bytes(bad)
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture"):
        mpckv.load_model(tmp_path / "a.gguf")
    ints = {"blk.0.attn_v.weight": (np.zeros((16, 32), dtype=np.int8), None)}
    with pytest.raises(CheckpointError, match="I8.*cannot be read"):
        mpckv.load_model(write_gguf(model, tmp_path / "i.gguf", raw=ints))
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        (two / n).write_bytes(data)
    with pytest.raises(CheckpointError, match="2 .gguf files"):
        mpckv.load_model(two)


def test_unused_and_missing_tensors(tmp_path):
    model = _llama()
    extra = {f"blk.2.{n}.weight": np.ones(32, dtype=np.float32) for n in ("attn_norm", "ffn_norm")}
    with pytest.raises(
        CheckpointError, match=r"has 2 tensor\(s\) the config does not use \(blk\.2\.attn_norm"
    ):
        mpckv.load_model(write_gguf(model, tmp_path / "x.gguf", extra=extra))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) the config needs \(blk\.1\.ffn_down"):
        mpckv.load_model(write_gguf(model, tmp_path / "y.gguf", skip=("blk.1.ffn_down.weight",)))


def test_tokenizer_and_chat_template(tmp_path):
    path = write_gguf(_llama(), tmp_path / "m.gguf")
    tok = load_tokenizer(str(path), VOCAB_SIZE)
    assert tok.chat_template == CHATML
    ids = tok.encode("<|im_start|>user\nthe 12 tea<|im_end|>")
    assert ids[0] == 256 + 7 + SPECIAL.index("<|im_start|>") and ids[-1] == 256 + 7 + SPECIAL.index(
        "<|im_end|>"
    )
    assert tok.decode(tok.encode("the 12 tea ünï")) == "the 12 tea ünï"
    assert tok.stop_token_ids[0] == 256 + 7 + SPECIAL.index("<|im_end|>")
    assert 256 + 7 + SPECIAL.index("<|endoftext|>") in tok.stop_token_ids
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert not tok.add_bos_token and tok.bos_token_id == 256 + 7


@pytest.mark.hf
@pytest.mark.parametrize("pre", ["qwen2", "smollm"])
def test_tokenizer_matches_transformers(pre, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = write_gguf(_llama(), tmp_path / "m.gguf", pre=pre)
    ours = load_tokenizer(str(path), VOCAB_SIZE)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for s in [
        "the tea in the tin",
        " the  \n\n theater",
        "ab12 345",
        "<|im_start|>user\nx<|im_end|>",
        "café ü 🚀",
    ]:
        if pre == "smollm" and any(c.isdigit() for c in s):
            # llama.cpp's "smollm" splits every digit first (as SmolLM2's own tokenizer.json does);
            # transformers' GGUF converter does not, and applies the "1 2" merge of this test vocabulary
            assert ours.encode(s) == [b for c in s for b in c.encode()], s
            assert hf.encode(s, add_special_tokens=False) != ours.encode(s)
            continue
        assert ours.encode(s) == hf.encode(s, add_special_tokens=False), s
    msgs = [{"role": "user", "content": "hello"}]
    assert ours.apply_chat_template(msgs) == hf.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )


@pytest.mark.hf
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_match_transformers_gguf_loader(arch, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = _qwen2() if arch == "qwen2" else _llama()
    write_gguf(model, tmp_path / "m.gguf", arch=arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32
    )
    with torch.no_grad():
        ref = hf(IDS).logits
    torch.testing.assert_close(mpckv.load_model(tmp_path / "m.gguf")(IDS), ref, atol=1e-4, rtol=0)


def test_cache_round_trip(tmp_path):
    model = _qwen2()
    path = write_gguf(model, tmp_path / "m.gguf", arch="qwen2")
    ref = mpckv.load_model(path)
    cached = load_gguf(path, cache=True)
    torch.testing.assert_close(cached(IDS), ref(IDS), atol=1e-5, rtol=0)
    assert cached.source == str(path)
    entries = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(entries) == 1
    assert {p.name for p in entries[0].iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    again = load_gguf(path, cache=True)  # from the entry
    torch.testing.assert_close(again(IDS), ref(IDS), atol=1e-5, rtol=0)


@pytest.mark.hf
def test_convert_cli_writes_a_directory_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mpckv.cli import main

    model = _llama(seed=7)
    src = write_gguf(model, tmp_path / "m.gguf", arch="llama")
    out = tmp_path / "hf"
    assert main(["convert", str(src), "--out", str(out)]) == 0
    assert main(["convert", str(src), "--out", str(out)]) == 2  # exists, no --force
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        ref = hf(IDS).logits
    torch.testing.assert_close(model(IDS), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(mpckv.load_model(out)(IDS), ref, atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = load_tokenizer(str(out), VOCAB_SIZE)
    s = "<|im_start|>user\nthe tea<|im_end|>"
    assert (
        hf_tok.encode(s, add_special_tokens=False) == ours.encode(s) == load_tokenizer(str(src), 0).encode(s)
    )
    msgs = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    ) == ours.apply_chat_template(msgs)
    assert ours.stop_token_ids == load_tokenizer(str(src), 0).stop_token_ids

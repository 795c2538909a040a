"""Shared fixtures: tiny random checkpoints of every supported architecture, built in code (no network)."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run under the interpreter on machines without a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


def hf_config(arch: str, **overrides):
    """A tiny transformers config of ``arch`` (llama | qwen2 | mistral | llama3 | tied | linear)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
    )
    if arch == "llama":
        cfg = LlamaConfig(**base)
    elif arch == "llama3":
        cfg = LlamaConfig(
            **base,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    elif arch == "linear":
        cfg = LlamaConfig(
            **{**base, "num_key_value_heads": 4}, rope_scaling={"rope_type": "linear", "factor": 2.0}
        )
    elif arch == "tied":
        cfg = LlamaConfig(**{**base, "num_key_value_heads": 1}, tie_word_embeddings=True)
    elif arch == "qwen2":
        cfg = Qwen2Config(**base)
    elif arch == "mistral":
        cfg = MistralConfig(**base, sliding_window=None)
    elif arch == "mistral_swa":
        cfg = MistralConfig(**base, sliding_window=24)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_hf_model(arch: str, seed: int = 0, **overrides):
    """A transformers model with random weights (std raised so logits are not flat)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(arch, **overrides)
    cfg.initializer_range = 0.08
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Returns ``make(arch) -> (path, hf_model)``; results are cached per arch for the session."""
    cache: dict[str, tuple] = {}

    def make(arch: str):
        if arch not in cache:
            hf = build_hf_model(arch)
            path = tmp_path_factory.mktemp(f"ckpt_{arch}")
            hf.save_pretrained(path, safe_serialization=True)
            cache[arch] = (path, hf)
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def tiny_random_model(checkpoint_factory):
    """A loaded mpckv model (llama, GQA 4/2, 3 layers) for method tests."""
    import mpckv

    path, _ = checkpoint_factory("llama")
    return mpckv.load_model(path)

"""Load a Llama-family model from an HF-layout directory (``config.json`` + safetensors) or the
shipped tiny model (``"tiny"``).

Single-file (``model.safetensors``) and sharded (``model.safetensors.index.json``) checkpoints are read.
Missing or mis-shaped tensors raise :class:`~mpckv.errors.CheckpointError` naming the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mpckv.config import ModelConfig
from mpckv.errors import CheckpointError
from mpckv.plaintext.model import LayerWeights, LlamaModel

TINY_DIR = Path(__file__).parent / "assets" / "tiny"


def _resolve_dir(path: str | Path) -> Path:
    if str(path) == "tiny":
        if not (TINY_DIR / "config.json").exists():
            raise CheckpointError(
                f"the shipped tiny model is not present at {TINY_DIR}; train it with `mpckv train-tiny` "
                "or pass a checkpoint directory"
            )
        return TINY_DIR
    p = Path(path).expanduser()
    if not p.exists():
        from mpckv.models import MODELS

        raise CheckpointError(
            f"checkpoint directory {p} does not exist (a model is an HF-layout directory, a .gguf file, "
            f"'tiny' or a named model: {', '.join(sorted(MODELS))}; see `mpckv models`)"
        )
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory (expected an HF-layout checkpoint directory)")
    return p


def _read_tensors(root: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = root / "model.safetensors.index.json"
    single = root / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is malformed: {exc}") from exc
        files = sorted(set(weight_map.values()))
    elif single.exists():
        files = [single.name]
    else:
        found = sorted(f.name for f in root.iterdir() if f.suffix in {".bin", ".pt", ".safetensors"})
        hint = f" (found {found}; only safetensors are read)" if found else ""
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {root}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        f = root / name
        if not f.exists():
            raise CheckpointError(f"shard {f} listed in the index is missing")
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {f}: {exc}") from exc
    return tensors


class _Taker:
    """Hands out tensors by name, recording which were used and which required ones are missing (a
    missing one is replaced by zeros so that every missing name is found before :meth:`check` raises)."""

    def __init__(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str):
        self.t, self.dtype, self.device = tensors, dtype, device
        self.used: set[str] = set()
        self.missing: list[str] = []

    def __call__(
        self, name: str, shape: tuple[int, ...] | None, optional: bool = False
    ) -> torch.Tensor | None:
        if name not in self.t:
            if optional:
                return None
            self.missing.append(name)
            return torch.zeros(shape or (1,), dtype=self.dtype, device=self.device)
        self.used.add(name)
        x = self.t[name]
        if shape is not None and tuple(x.shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(x.shape)}, expected {shape}")
        return x.to(device=self.device, dtype=self.dtype)

    def req(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        out = self(name, shape)
        assert out is not None
        return out

    def check(self, root: Path) -> None:
        """Raise when a required tensor is missing or a stored one is not used (hardening case 11: a
        config with fewer or more layers than the checkpoint must not load silently)."""
        from mpckv.gguf_loader import unused_tensor_error

        # inv_freq buffers are derived data that older transformers versions saved; not weights.
        unused = [n for n in self.t if n not in self.used and not n.endswith("rotary_emb.inv_freq")]
        if len(self.missing) == 1 and not unused:
            raise CheckpointError(f"checkpoint {root} lacks tensor {self.missing[0]!r}")
        err = unused_tensor_error(f"checkpoint {root}", unused, self.missing)
        if err is not None:
            raise err


def load_model(
    path: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
) -> LlamaModel:
    """Load a Llama / Qwen2 / Mistral checkpoint directory, or ``"tiny"`` for the shipped model.

    Parameters
    ----------
    path:
        HF-layout directory, ``"tiny"``, a ``.gguf`` file (or a directory holding exactly one and no
        ``config.json``; see :mod:`mpckv.gguf_loader`), or the name of an installable model
        (``"smollm2"``, ``"qwen2.5-coder-0.5b"``; see :mod:`mpckv.models`). Names win over paths.
    dtype:
        ``torch.float32`` (default), ``torch.bfloat16``, ``torch.float16`` or their names.
    device:
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, …
    """
    if isinstance(dtype, str):
        names = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }
        if dtype not in names:
            raise CheckpointError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        dtype = names[dtype]
    from mpckv.plaintext.backend import check_device

    device = check_device(device)  # "tpu", unavailable CUDA → ConfigError (issue 16, case 16)
    from mpckv.gguf_loader import find_gguf, load_gguf
    from mpckv.models import is_model_name, model_path

    if is_model_name(path):
        return load_gguf(model_path(str(path)), dtype, device)
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return load_gguf(gguf_file, dtype, device)
    root = _resolve_dir(path)
    cfg = ModelConfig.from_file(root / "config.json")
    take = _Taker(_read_tensors(root), dtype, device)
    d, hd = cfg.hidden_size, cfg.head_dim
    nq, nk, ff = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    embed = take.req("model.embed_tokens.weight", (cfg.vocab_size, d))
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        ab = cfg.attention_bias
        layers.append(
            LayerWeights(
                input_norm=take.req(p + "input_layernorm.weight", (d,)),
                q_proj=take.req(p + "self_attn.q_proj.weight", (nq, d)),
                k_proj=take.req(p + "self_attn.k_proj.weight", (nk, d)),
                v_proj=take.req(p + "self_attn.v_proj.weight", (nk, d)),
                o_proj=take.req(p + "self_attn.o_proj.weight", (d, nq)),
                post_norm=take.req(p + "post_attention_layernorm.weight", (d,)),
                gate_proj=take.req(p + "mlp.gate_proj.weight", (ff, d)),
                up_proj=take.req(p + "mlp.up_proj.weight", (ff, d)),
                down_proj=take.req(p + "mlp.down_proj.weight", (d, ff)),
                q_bias=take(p + "self_attn.q_proj.bias", (nq,), optional=not ab),
                k_bias=take(p + "self_attn.k_proj.bias", (nk,), optional=not ab),
                v_bias=take(p + "self_attn.v_proj.bias", (nk,), optional=not ab),
                o_bias=take(p + "self_attn.o_proj.bias", (d,), optional=True),
                gate_bias=take(p + "mlp.gate_proj.bias", (ff,), optional=not cfg.mlp_bias),
                up_bias=take(p + "mlp.up_proj.bias", (ff,), optional=not cfg.mlp_bias),
                down_bias=take(p + "mlp.down_proj.bias", (d,), optional=not cfg.mlp_bias),
            )
        )
    norm = take.req("model.norm.weight", (d,))
    head = take("lm_head.weight", (cfg.vocab_size, d), optional=cfg.tie_word_embeddings)
    take.check(root)
    model = LlamaModel(cfg, embed, layers, norm, embed if head is None else head)
    model.source = str(root)
    return model


def save_model(model: LlamaModel, path: str | Path, extra_config: dict[str, object] | None = None) -> Path:
    """Write ``model`` as an HF-layout directory (used for the tiny model and for tests)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": model.embed_tokens,
        "model.norm.weight": model.norm,
    }
    if model.lm_head is not model.embed_tokens:
        tensors["lm_head.weight"] = model.lm_head
    names = {
        "input_norm": "input_layernorm.weight",
        "post_norm": "post_attention_layernorm.weight",
        "q_proj": "self_attn.q_proj.weight",
        "k_proj": "self_attn.k_proj.weight",
        "v_proj": "self_attn.v_proj.weight",
        "o_proj": "self_attn.o_proj.weight",
        "gate_proj": "mlp.gate_proj.weight",
        "up_proj": "mlp.up_proj.weight",
        "down_proj": "mlp.down_proj.weight",
        "q_bias": "self_attn.q_proj.bias",
        "k_bias": "self_attn.k_proj.bias",
        "v_bias": "self_attn.v_proj.bias",
        "o_bias": "self_attn.o_proj.bias",
        "gate_bias": "mlp.gate_proj.bias",
        "up_bias": "mlp.up_proj.bias",
        "down_bias": "mlp.down_proj.bias",
    }
    for i, lw in enumerate(model.layers):
        for attr, hf in names.items():
            t = getattr(lw, attr)
            if t is not None:
                tensors[f"model.layers.{i}.{hf}"] = t
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / "model.safetensors"))
    rope = cfg.rope
    raw: dict[str, object] = {
        "architectures": [
            {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[
                cfg.model_type
            ]
        ],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": rope.theta,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": "float32",
    }
    if rope.rope_type != "default":
        raw["rope_scaling"] = {
            "rope_type": rope.rope_type,
            "factor": rope.factor,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        }
    if cfg.sliding_window is not None:
        raw["sliding_window"] = cfg.sliding_window
    raw.update(extra_config or {})
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out

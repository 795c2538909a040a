"""Read a llama.cpp GGUF checkpoint (Llama / Qwen2 architectures) into a :class:`LlamaModel`.

The file is parsed with the ``gguf`` package (llama.cpp's own reader, ``pip install gguf``, the ``gguf``
extra of mpckv): the ``{arch}.*`` metadata become a :class:`~mpckv.config.ModelConfig` and every tensor
is dequantized with ``gguf.quants.dequantize`` (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the K-quants
Q2_K…Q6_K and the I-quants that package implements) to the requested dtype.

Layout facts this relies on:

* GGUF lists a matrix's dimensions fastest-first (``ne0 = in_features``); the numpy array the reader
  gives is already ``[out, in]``, the HF ``nn.Linear`` layout.
* llama.cpp's ``convert_hf_to_gguf.py`` reorders the rows of ``q_proj`` / ``k_proj`` (and their biases)
  of Llama-architecture models for its interleaved ("GPT-J") RoPE: within each head the row ``2j + s``
  of the GGUF is HF row ``s·d/2 + j`` (``s ∈ {0, 1}``, ``j < d/2``); K uses the KV head count. We undo
  it. Qwen2 is converted with NeoX RoPE and no permutation (checked against transformers' GGUF loader
  in ``tests/test_gguf.py``). Mistral models are written by llama.cpp with architecture ``llama``.
* Tied embeddings: a file without ``output.weight`` uses ``token_embd.weight`` as the head.

Every tensor in the file must be used and every expected one present (else a one-line
:class:`~mpckv.errors.CheckpointError` names a few and the count); a truncated file, an unknown
architecture or an unreadable quantization type are one-line errors naming the file.

Speed: ``gguf.GGUFReader`` parses every metadata array up front (~14 s for Qwen2.5's 152K-token
vocabulary on our 2-core machine) and numpy dequantization adds ~6 s, so :func:`load_gguf` reads files
of 32 MB or more through a converted fp32 HF directory cached in the model cache
(:mod:`mpckv.gguf_cache`; first load ~8 s for SmolLM2-135M, ~36 s for Qwen2.5-0.5B, later < 1 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpckv.config import ModelConfig, RopeConfig
from mpckv.errors import CheckpointError, ConfigError
from mpckv.plaintext.model import LayerWeights, LlamaModel, layer_shapes

__all__ = ["ARCHITECTURES", "find_gguf", "gguf_config", "load_gguf", "read_gguf", "unpermute_rows"]

#: GGUF ``general.architecture`` → (our ``model_type``, rows of q/k permuted by llama.cpp).
ARCHITECTURES: dict[str, tuple[str, bool]] = {"llama": ("llama", True), "qwen2": ("qwen2", False)}

_LAYER_NAMES = {
    "attn_norm.weight": "input_norm",
    "attn_q.weight": "q_proj",
    "attn_k.weight": "k_proj",
    "attn_v.weight": "v_proj",
    "attn_output.weight": "o_proj",
    "ffn_norm.weight": "post_norm",
    "ffn_gate.weight": "gate_proj",
    "ffn_up.weight": "up_proj",
    "ffn_down.weight": "down_proj",
    "attn_q.bias": "q_bias",
    "attn_k.bias": "k_bias",
    "attn_v.bias": "v_bias",
    "attn_output.bias": "o_bias",
    "ffn_gate.bias": "gate_bias",
    "ffn_up.bias": "up_bias",
    "ffn_down.bias": "down_bias",
}
_REQUIRED = (
    "input_norm",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "post_norm",
    "gate_proj",
    "up_proj",
    "down_proj",
)


def find_gguf(path: str | Path) -> Path | None:
    """``path`` itself if it is a ``.gguf`` file, the one ``.gguf`` inside a directory without a
    ``config.json``, else ``None``. A directory with several ``.gguf`` files is an error."""
    p = Path(path).expanduser()
    if p.suffix == ".gguf" and not p.is_dir():
        if not p.exists():
            raise CheckpointError(f"GGUF file {p} does not exist")
        return p
    if p.is_dir() and not (p / "config.json").exists():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            names = ", ".join(f.name for f in found[:4])
            raise CheckpointError(f"{p} holds {len(found)} .gguf files ({names}); pass one file")
        if found:
            return found[0]
    return None


def read_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped), or a one-line :class:`CheckpointError`."""
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CheckpointError(
            f"reading {path} needs the `gguf` package: pip install 'mpckv[gguf]' (or `make install`)"
        ) from exc
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"cannot read GGUF file {path}: {exc}") from exc
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors on bad files
        msg = " ".join(str(exc).split()) or type(exc).__name__
        size = path.stat().st_size
        raise CheckpointError(
            f"cannot read GGUF file {path} ({size:,} bytes; truncated or corrupt?): {msg}"
        ) from exc


def field(reader: Any, key: str, default: Any = None) -> Any:
    """Metadata value ``key`` (scalar, string, or list), or ``default`` when absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _f32(x: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(f"{float(x):.7g}")


def gguf_config(reader: Any, path: Path) -> ModelConfig:
    """The :class:`ModelConfig` of a GGUF file's metadata."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture {arch!r}; mpckv reads {sorted(ARCHITECTURES)}"
        )
    model_type = ARCHITECTURES[arch][0]

    def need(key: str) -> Any:
        v = field(reader, f"{arch}.{key}")
        if v is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        if isinstance(v, list):
            raise CheckpointError(f"{path}: per-layer {arch}.{key} is not supported")
        return v

    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(
            f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 scaling) are not supported"
        )
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(field(reader, f"{arch}.attention.key_length", hidden // heads))
    rot = field(reader, f"{arch}.rope.dimension_count", head_dim)
    if int(rot) != head_dim:
        raise CheckpointError(
            f"{path}: partial rotary embeddings ({rot} of {head_dim} dims) are not supported"
        )
    tokens = field(reader, "tokenizer.ggml.tokens")
    embd = tensors.get("token_embd.weight")
    vocab = field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = int(embd.shape[-1]) if embd is not None else len(tokens or [])
    scaling = field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise CheckpointError(f"{path}: RoPE scaling {scaling!r} is not supported (only none and linear)")
    rope = RopeConfig(
        theta=_f32(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_type="linear" if scaling == "linear" else "default",
        factor=float(field(reader, f"{arch}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
    )
    bias = any(n.endswith(("attn_q.bias", "attn_k.bias", "attn_v.bias")) for n in tensors)
    mlp_bias = any(n.endswith(("ffn_gate.bias", "ffn_up.bias", "ffn_down.bias")) for n in tensors)
    bos, eos = field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")
    try:
        return ModelConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_hidden_layers=int(need("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_f32(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope=rope,
            attention_bias=bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings="output.weight" not in tensors,
            max_position_embeddings=int(field(reader, f"{arch}.context_length", 4096)),
            model_type=model_type,
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=None if eos is None else int(eos),
        )
    except ConfigError as exc:
        raise CheckpointError(f"{path}: inconsistent GGUF metadata: {exc}") from exc


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's q/k row order (per head, rows ``(j, s)`` → ``(s, j)``), for weights
    ``[n_head·d, in]`` or biases ``[n_head·d]``."""
    rows = w.shape[0]
    d2 = rows // n_head // 2
    return w.reshape(n_head, d2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (the inverse of :func:`unpermute_rows`), used to write test files."""
    rows = w.shape[0]
    d2 = rows // n_head // 2
    return w.reshape(n_head, 2, d2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(t: Any, path: Path) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    qtype = t.tensor_type
    try:
        if qtype == GGMLQuantizationType.F32:
            arr = np.asarray(t.data, dtype=np.float32)
        else:
            # a plain ndarray view: numpy's memmap subclass makes the block reshapes ~3x slower
            arr = quants.dequantize(np.asarray(t.data).view(np.ndarray), qtype)
    except (NotImplementedError, ValueError) as exc:
        name = getattr(qtype, "name", str(qtype))
        raise CheckpointError(
            f"{path}: tensor {t.name!r} has quantization {name}, which cannot be read: {exc}"
        ) from exc
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    if arr.size != int(np.prod(shape)):
        raise CheckpointError(f"{path}: tensor {t.name!r} holds {arr.size} values, expected shape {shape}")
    return arr.reshape(shape)


def unused_tensor_error(where: str, unused: list[str], missing: list[str]) -> CheckpointError | None:
    """The error for tensors a config lacks or does not use (``None`` when both lists are empty): one
    line with the counts and the first three names of each."""

    def few(names: list[str]) -> str:
        names = sorted(names)
        return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")

    parts = []
    if missing:
        parts.append(f"lacks {len(missing)} tensor(s) the config needs ({few(missing)})")
    if unused:
        parts.append(f"has {len(unused)} tensor(s) the config does not use ({few(unused)})")
    if not parts:
        return None
    return CheckpointError(f"{where} " + " and ".join(parts) + "; does the config match the weights?")


def load_gguf(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: ModelConfig | None = None,
    *,
    cache: bool | None = None,
    reader: Any = None,
) -> LlamaModel:
    """Load a GGUF file (see the module docstring).

    Parameters
    ----------
    config:
        Overrides the metadata (tests; the tensors must then match it).
    cache:
        Go through the converted-checkpoint cache of :mod:`mpckv.gguf_cache`; ``None`` (default) does
        for files of 32 MB or more unless ``MPCKV_GGUF_CACHE=0``.
    reader:
        An open ``gguf.GGUFReader`` of ``path``, to avoid parsing it twice.
    """
    path = Path(path)
    if config is None and reader is None:
        from mpckv.gguf_cache import cache_enabled, load_gguf_cached

        if cache or (cache is None and cache_enabled(path)):
            return load_gguf_cached(path, dtype, device)
    reader = reader if reader is not None else read_gguf(path)
    cfg = config or gguf_config(reader, path)
    permuted = ARCHITECTURES.get(str(field(reader, "general.architecture")), ("", False))[1]
    tensors = {t.name: t for t in reader.tensors}
    d = cfg.hidden_size
    shapes = layer_shapes(cfg)
    wanted = {"token_embd.weight", "output_norm.weight"} | (
        {"output.weight"} if "output.weight" in tensors else set()
    )
    for i in range(cfg.num_hidden_layers):
        for suffix, attr in _LAYER_NAMES.items():
            name = f"blk.{i}.{suffix}"
            if attr in _REQUIRED or name in tensors:
                wanted.add(name)
    err = unused_tensor_error(
        f"GGUF file {path}", [n for n in tensors if n not in wanted], [n for n in wanted if n not in tensors]
    )
    if err is not None:
        raise err

    def take(name: str, shape: tuple[int, ...], n_head: int = 0) -> torch.Tensor:
        arr = _dequantize(tensors[name], path)
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}")
        x = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
        if n_head:
            x = unpermute_rows(x, n_head)
        return x.to(device=device, dtype=dtype)

    layers = []
    for i in range(cfg.num_hidden_layers):
        kw: dict[str, torch.Tensor] = {}
        for suffix, attr in _LAYER_NAMES.items():
            name = f"blk.{i}.{suffix}"
            if name not in tensors:
                continue
            heads = 0
            if permuted and attr in ("q_proj", "q_bias"):
                heads = cfg.num_attention_heads
            elif permuted and attr in ("k_proj", "k_bias"):
                heads = cfg.num_key_value_heads
            kw[attr] = take(name, shapes[attr], heads)
        layers.append(LayerWeights(**kw))
    embed = take("token_embd.weight", (cfg.vocab_size, d))
    norm = take("output_norm.weight", (d,))
    head = take("output.weight", (cfg.vocab_size, d)) if "output.weight" in tensors else embed
    model = LlamaModel(cfg, embed, layers, norm, head)
    model.source = str(path)
    return model

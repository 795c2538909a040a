"""Offline calibration of KV methods: head identification (RazorAttention) and gate training (TRIM-KV).

Results are JSON / safetensors files; the files shipped for the bundled and installable models live in
``mpckv/assets/calibration`` and are found by :func:`shipped_file`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpckv.config import ModelConfig

CALIBRATION_DIR = Path(__file__).resolve().parent.parent / "assets" / "calibration"

#: Architecture fields that identify a model family in a calibration file.
_SIGNATURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


def config_signature(config: ModelConfig) -> dict[str, Any]:
    """The architecture fields stored in a calibration file and matched when a method looks one up."""
    return {name: getattr(config, name) for name in _SIGNATURE_FIELDS}


def model_label(model: str) -> str:
    """A stable label for ``--model`` (``mpckv.evals.common.model_id`` when it applies, else the name)."""
    try:
        from mpckv.evals.common import model_id

        return model_id(model)
    except Exception:  # noqa: BLE001 — GGUF files and installable names have no config.json digest
        return Path(model).name or str(model)


def shipped_file(prefix: str, suffix: str, config: ModelConfig, matches: Any) -> Path | None:
    """The shipped ``<prefix>*<suffix>`` calibration file for ``config`` (``matches(path, signature)``)."""
    sig = config_signature(config)
    for path in sorted(CALIBRATION_DIR.glob(f"{prefix}*{suffix}")):
        if matches(path, sig):
            return path
    return None

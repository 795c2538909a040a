"""mpckv — KV-cache selection, eviction and fusion for long-context inference, in plaintext and under MPC."""

from mpckv.budget import Budget
from mpckv.checkpoint import load_model, save_model
from mpckv.config import ModelConfig, RopeConfig
from mpckv.errors import (
    BudgetError,
    CheckpointError,
    ConfigError,
    MpckvError,
    ShapeError,
    UnknownMethodError,
)
from mpckv.plaintext.engine import Engine, GenerationResult, GenerationStats, Session
from mpckv.plaintext.methods.base import KVMethod
from mpckv.plaintext.sampling import SamplingConfig
from mpckv.registry import get_method, list_methods, register_method
from mpckv.tokenizer import ByteTokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "BudgetError",
    "ByteTokenizer",
    "CheckpointError",
    "ConfigError",
    "Engine",
    "GenerationResult",
    "GenerationStats",
    "KVMethod",
    "ModelConfig",
    "MpckvError",
    "RopeConfig",
    "SamplingConfig",
    "Session",
    "ShapeError",
    "UnknownMethodError",
    "get_method",
    "list_methods",
    "load_model",
    "load_tokenizer",
    "register_method",
    "save_model",
]

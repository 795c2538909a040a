"""Built-in KV methods. Importing this package registers them."""

from mpckv.plaintext.methods import dense, quest, streamingllm  # noqa: F401
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext, Selection

__all__ = ["DecodeContext", "KVMethod", "PrefillContext", "Selection"]

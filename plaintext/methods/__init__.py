"""Built-in KV methods. Importing this package registers them."""

from mpckv.plaintext.methods import (  # noqa: F401
    dense,
    h2o,
    h2o_window,
    mpcache,
    pyramidkv,
    quest,
    snapkv,
    streamingllm,
)
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext, Selection

__all__ = ["DecodeContext", "KVMethod", "PrefillContext", "Selection"]

"""Built-in KV methods. Importing this package registers them."""

from mpckv.plaintext.fusion import a3, cacheblend, epic, kvshare  # noqa: F401  (family "fusion")
from mpckv.plaintext.methods import (  # noqa: F401
    dense,
    h2o,
    h2o_window,
    keyformer,
    mpcache,
    pyramidkv,
    quest,
    razorattention,
    snapkv,
    streamingllm,
    trimkv,
    windowkv,
)
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext, Selection

__all__ = ["DecodeContext", "KVMethod", "PrefillContext", "Selection"]

"""Built-in KV methods. Importing this package registers them."""

from mpckv.plaintext.fusion import a3, cacheblend, elasticcache, epic, graphkv, kvshare  # noqa: F401  (fusion)
from mpckv.plaintext.methods import (  # noqa: F401  # noqa: F401  (query-aware, issue 13)  # noqa: F401  (offloading selection, issue 13)  # noqa: F401  (storage formats, issue 12)  # noqa: F401  (quantized storage, issue 12)
    a2ats,
    adakv,
    ctkvr,
    delta,
    dense,
    h2o,
    h2o_window,
    keyformer,
    kvmerger,
    mikv,
    mpcache,
    nosa,
    pyramidkv,
    quest,
    razorattention,
    shadowkv,
    snapkv,
    streamingllm,
    think,
    tokenselect,
    trimkv,
    vidkv,
    windowkv,
)
from mpckv.plaintext.methods.base import DecodeContext, KVMethod, PrefillContext, Selection

__all__ = ["DecodeContext", "KVMethod", "PrefillContext", "Selection"]

"""KV storage formats: caches that store entries in fewer bytes than a dense :class:`LayerCache`.

A format is installed per layer by a method (``ctx.replace_cache(new)``, see
:func:`mpckv.plaintext.methods.base.replace_layer_cache`) and follows :class:`~.base.FormatCache`.
"""

from mpckv.plaintext.storage.base import FormatCache

__all__ = ["FormatCache"]

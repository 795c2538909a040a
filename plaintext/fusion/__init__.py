"""KV-cache fusion: reuse chunk caches computed earlier, re-rotated to new offsets, with selective recompute.

Pieces: :mod:`.store` (content-addressed two-tier chunk store), :mod:`.rerotate` (RoPE shift of canonical
caches and the start-up self-check), :mod:`.assemble` (segments → ids, positions, cached K/V),
:mod:`.selector` (the selector interface), :mod:`.recompute` (the driver behind
``Engine.prefill_segments``) and the methods :mod:`.cacheblend`, :mod:`.epic`, :mod:`.a3`,
:mod:`.kvshare` (registered with family ``"fusion"`` when ``mpckv.plaintext.methods`` is imported).
"""

from mpckv.plaintext.fusion.assemble import Chunk, Raw
from mpckv.plaintext.fusion.store import ChunkKV, ChunkKVStore, model_fingerprint

__all__ = ["Chunk", "ChunkKV", "ChunkKVStore", "Raw", "model_fingerprint"]

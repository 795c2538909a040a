"""Plaintext engine, KV cache, model forward and KV methods (installed as ``mpckv.plaintext``)."""

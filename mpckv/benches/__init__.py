"""Benchmarks: ``mpckv bench plaintext`` (plaintext speed and memory vs dense and transformers)."""

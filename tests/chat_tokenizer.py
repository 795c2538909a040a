"""A small real subword tokenizer with a ChatML chat template, for tests of the real-model eval path.

A byte-level BPE (the ``tokenizers`` package, trained in-process on the prose filler, 300 ids so that it fits
the random test checkpoints) wrapped with the interface :func:`mpckv.tokenizer.load_tokenizer` gives real
models: ``encode``, ``decode``, ``chat_template``, ``apply_chat_template`` and ``stop_token_ids``.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Any

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@lru_cache(maxsize=1)
def _trained() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mpckv.data.prose import prose

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = "".join(prose(1500, random.Random(0)))
    tok.train_from_iterator([text[i : i + 1000] for i in range(0, len(text), 1000)], trainer)
    return tok


class ChatTokenizer:
    """ChatML like SmolLM2 / Qwen2.5 (a system turn, then the user turn, then the assistant header)."""

    chat_template = "<|im_start|>{{ role }} ... <|im_end|>"  # only its presence counts

    def __init__(self, template: bool = True):
        self._tok = _trained()
        if not template:
            self.chat_template = None  # type: ignore[assignment]
        self.stop_token_ids = [self._tok.token_to_id("<|im_end|>")]

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        out = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        for m in messages:
            out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")

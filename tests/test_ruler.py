"""RULER-style tasks on natural prose (``mpckv.data.ruler``), sized in tokens, with and without a chat
template, and the prose filler itself."""

from __future__ import annotations

import random

import pytest
from chat_tokenizer import ChatTokenizer

from mpckv.data.prose import _BANNED, prose
from mpckv.data.ruler import RULER_TASKS, make_ruler_sample
from mpckv.errors import ConfigError
from mpckv.evals.scoring import contains


@pytest.fixture(scope="module")
def tok():
    return ChatTokenizer()


def _enc(tok, bos_id=None):
    return lambda text, bos: ([bos_id] if bos and bos_id is not None else []) + tok.encode(text)


def test_prose_is_plain_deterministic_text():
    a, b = prose(400, random.Random(5)), prose(400, random.Random(5))
    assert a == b and a != prose(400, random.Random(6))
    text = "".join(a)
    assert not any(ch.isdigit() for ch in text)
    low = text.lower()
    assert not any(w in low for w in _BANNED)
    assert "\n\n" in text and len(set(a)) > 300  # paragraphs, and little repetition


@pytest.mark.parametrize("task", RULER_TASKS)
@pytest.mark.parametrize("length", [600, 2000])
def test_sized_in_tokens_and_answerable(task, length, tok):
    s = make_ruler_sample(task, length, 3, tok, _enc(tok))
    assert s.num_tokens <= length
    assert s.num_tokens >= length * 0.9 if length < 1000 else length * 0.97
    prompt = tok._tok.decode(list(s.prefix_ids) + list(s.suffix_ids), skip_special_tokens=False)
    assert prompt == s.prefix + s.suffix
    # every answer is stated in the context (prefix), the question arrives after it
    assert all(contains(s.prefix, [a]) == 1.0 for a in s.answers)
    assert s.prefix.startswith("<|im_start|>system") and s.suffix.rstrip().endswith(("is", "are:"))
    assert "<|im_start|>assistant\n" in s.suffix and "<|im_start|>assistant" not in s.prefix
    assert make_ruler_sample(task, length, 3, tok, _enc(tok)) == s  # deterministic
    assert make_ruler_sample(task, length, 4, tok, _enc(tok)).answers != s.answers


def test_without_template_bos_and_answer_cue(tok):
    plain = ChatTokenizer(template=False)
    s = make_ruler_sample("passkey", 800, 0, plain, _enc(plain, bos_id=0))
    assert s.prefix_ids[0] == 0 and s.num_tokens <= 800
    assert "<|im_start|>" not in s.prefix + s.suffix
    assert s.suffix.startswith("What is the pass key?") and s.suffix.endswith("Answer: The pass key is")


def test_multihop_answers_the_whole_chain(tok):
    s = make_ruler_sample("multihop", 1500, 1, tok, _enc(tok))
    assert len(s.answers) == 5 and s.meta["value"] in s.prefix
    for name in s.answers[1:]:
        assert f"VAR {name} = VAR " in s.prefix
    assert f"VAR {s.answers[0]} = {s.meta['value']}." in s.prefix
    assert not set(s.meta["distractor"]) & set(s.answers)


def test_too_short_is_an_error(tok):
    with pytest.raises(ConfigError, match="raise --lengths"):
        make_ruler_sample("kv_retrieval", 40, 0, tok, _enc(tok))

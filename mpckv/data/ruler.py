"""RULER-style long-context tasks on natural prose, sized in tokens of a real tokenizer and chat-templated.

The tiny byte-level model has its own copy-friendly tasks (:mod:`mpckv.data.synthetic`, sized in bytes).
A real instruct model gets the tasks of RULER (Hsieh et al., 2024, arXiv 2404.06654) on the generated prose
of :mod:`mpckv.data.prose`, under the same suite names:

``passkey``
    One pass key (5 digits) stated twice at a random depth (the pass-key test of Mohtashami & Jaggi, 2023).
``needle``
    RULER ``niah_multikey_1``: four "One of the special magic numbers for <word-word> is: <7 digits>."
    needles; the question asks for one of them.
``kv_retrieval``
    RULER ``niah_multikey_3`` / LongChat key-value retrieval: a JSON object of UUID keys and UUID values
    filling the whole context; the question asks for the value of one key.
``multihop``
    RULER variable tracking (``vt``): a chain ``VAR ABCDE = 41072``, ``VAR FGHIJ = VAR ABCDE``, … (four
    hops) and one distractor chain in the prose; the answer is *all five* names of the chain (scored as
    the fraction found).
``docqa``
    Multi-document QA: several titled documents of prose, each stating one or two facts about its title;
    the question asks one fact of one document.

Prompt layout. The user message is ``instruction + context + "\\n\\n" + question``; with a chat template
(``tok.chat_template``) it is rendered with ``tok.apply_chat_template([...], add_generation_prompt=True)``,
otherwise used as is. As in RULER, the assistant's answer is started with a cue (``answer_prefix``, e.g.
``"The pass key is"``), so the model answers in a few tokens. The rendered text is split at the question:
:attr:`RulerSample.prefix` (template header, instruction, context) is what query-agnostic evaluation
prefills and compresses; :attr:`RulerSample.suffix` (question, end of turn, assistant header, cue) is fed
afterwards.

Length. ``length`` is the number of prompt tokens — ``len(prefix_ids) + len(suffix_ids)``: BOS (when the
encoder adds one), template, instruction, context, question and cue, not the answer. The amount of filler
(prose sentences; JSON pairs for ``kv_retrieval``) is the largest that stays within ``length``, found by
binary search with the tokenizer, so a prompt is at most ``length`` tokens and short of it by at most one
filler unit (a sentence is ~12–20 tokens, a UUID pair ~45) — within 3 % from 2K tokens on.

Deterministic: the same ``(task, length, seed)`` and tokenizer always give the same sample.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mpckv.data.prose import prose_sentences
from mpckv.errors import ConfigError

RULER_TASKS: tuple[str, ...] = ("passkey", "needle", "kv_retrieval", "multihop", "docqa")
SEP = "\n\n"
Encoder = Callable[[str, bool], list[int]]
"""``encode(text, bos)``: token ids of ``text``, with the model's BOS first when ``bos``."""

_INSTRUCTION = {
    "passkey": "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.",
    "needle": "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "them. I will quiz you about the numbers afterwards.",
    "kv_retrieval": "Read the JSON object below. I will ask you for the value of one of its keys.",
    "multihop": "Memorize and track the chain(s) of variable assignment hidden in the following text.",
    "docqa": "Below are several documents. Read them; I will ask you a question about one of them.",
}
_WORDS = [
    "amber", "birch", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "iris", "juniper", "kestrel",
    "lantern", "marble", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "thistle", "umber",
    "velvet", "willow", "yarrow", "zephyr", "acorn", "basil", "cedar", "dune", "fern", "glacier", "heron",
]  # fmt: skip
_SURNAMES = ["Whitfield", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Delgado", "Novak", "Ferreira"]
_ATTRS = {
    "founding year": lambda r: str(r.randint(1620, 1990)),
    "postal code": lambda r: str(r.randint(10000, 99999)),
    "head curator": lambda r: (
        f"{r.choice(['Agnes', 'Bruno', 'Celia', 'Dario', 'Edith'])} {r.choice(_SURNAMES)}"
    ),
    "opening hour": lambda r: f"{r.randint(6, 11)} o'clock",
}
_KINDS = ["Museum", "Archive", "Observatory", "Gallery", "Conservatory", "Academy", "Theatre", "Institute"]


@dataclass(frozen=True)
class RulerSample:
    """One prompt: ``prefix`` (prefilled) + ``suffix`` (fed after compression); ``answers`` to find."""

    task: str
    prefix: str
    suffix: str
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    answers: tuple[str, ...]
    metric: str  # "contains" (RULER) for every task
    max_new_tokens: int  # enough for the answer after the cue, with a little slack
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.prefix_ids) + len(self.suffix_ids)


@dataclass
class _Plan:
    """A task instance whose context is a function of the amount of filler ``n``."""

    context: Callable[[int], str]
    question: str
    answer_prefix: str
    answers: list[str]
    meta: dict[str, Any]
    lo: int = 0  # least filler units


class _Stream:
    """The first ``n`` prose sentences of a seeded stream (grown on demand)."""

    def __init__(self, rng: random.Random):
        self._it = prose_sentences(rng)
        self._buf: list[str] = []

    def take(self, n: int) -> list[str]:
        while len(self._buf) < n:
            self._buf.append(next(self._it))
        return self._buf[:n]


def _insert(sentences: list[str], facts: Sequence[str], depths: Sequence[float]) -> str:
    """Prose with ``facts`` inserted as sentences at relative ``depths`` (kept in the given order)."""
    n = len(sentences)
    slots = sorted(range(len(facts)), key=lambda i: depths[i])
    at: dict[int, list[str]] = {}
    for i in slots:
        at.setdefault(round(depths[i] * n), []).append(facts[i])
    out: list[str] = []
    for j in range(n + 1):
        out += [f" {f}" for f in at.get(j, [])]
        if j < n:
            lead = out and not sentences[j][:1].isspace()
            out.append(" " + sentences[j] if lead else sentences[j])
    return "".join(out).strip()


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[rng.randrange(4)]}{h[17:20]}-{h[20:]}"


def _passkey(rng: random.Random, stream: _Stream, length: int) -> _Plan:
    key = str(rng.randint(10000, 99999))
    fact = f"The pass key is {key}. Remember it. {key} is the pass key."
    depth = rng.random()
    return _Plan(
        lambda n: _insert(stream.take(n), [fact], [depth]),
        "What is the pass key?",
        "The pass key is",
        [key],
        {"depth": round(depth, 4)},
    )


def _needle(rng: random.Random, stream: _Stream, length: int) -> _Plan:
    keys: list[str] = []
    while len(keys) < 4:
        k = f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"
        if k not in keys and k.split("-")[0] != k.split("-")[1]:
            keys.append(k)
    vals = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    facts = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, vals, strict=True)]
    depths = [rng.random() for _ in facts]
    ask = rng.randrange(len(keys))
    return _Plan(
        lambda n: _insert(stream.take(n), facts, depths),
        f"What is the special magic number for {keys[ask]} mentioned in the provided text?",
        f"The special magic number for {keys[ask]} mentioned in the provided text is",
        [vals[ask]],
        {"depth": round(depths[ask], 4), "keys": keys},
    )


def _kv(rng: random.Random, stream: _Stream, length: int) -> _Plan:
    pairs: list[tuple[str, str]] = []
    depth = rng.random()

    def pairs_upto(n: int) -> list[tuple[str, str]]:
        while len(pairs) < n:
            pairs.append((_uuid(rng), _uuid(rng)))
        return pairs[:n]

    first = pairs_upto(1)[0]

    def context(n: int) -> str:
        items = pairs_upto(max(n, 1))[1:]
        at = round(depth * len(items))
        items = [*items[:at], first, *items[at:]]
        body = ",\n".join(f'  "{k}": "{v}"' for k, v in items)
        return "JSON data:\n{\n" + body + "\n}"

    return _Plan(
        context,
        f'What is the value associated with the key "{first[0]}" in the JSON object above?',
        "The value associated with this key is",  # not repeating the 36-character key saves ~40 tokens
        [first[1]],
        {"depth": round(depth, 4)},
        lo=1,
    )


def _multihop(rng: random.Random, stream: _Stream, length: int) -> _Plan:
    names: list[str] = []
    while len(names) < 10:
        x = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if x not in names:
            names.append(x)
    vals = [str(v) for v in rng.sample(range(10000, 99999), 2)]
    facts: list[str] = []
    depths: list[float] = []
    for c in range(2):
        chain = names[c * 5 : (c + 1) * 5]
        facts.append(f"VAR {chain[0]} = {vals[c]}.")
        facts += [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, 5)]
        depths += sorted(rng.random() for _ in range(5))
    return _Plan(
        lambda n: _insert(stream.take(n), facts, depths),
        f"Find all variables that are assigned the value {vals[0]} in the text above.",
        f"The variables assigned the value {vals[0]} are:",
        names[:5],
        {"value": vals[0], "distractor": names[5:]},
    )


def _docqa(rng: random.Random, stream: _Stream, length: int) -> _Plan:
    num_docs = max(3, min(12, length // 500))
    titles: list[str] = []
    while len(titles) < num_docs:
        t = f"{rng.choice(_WORDS).capitalize()} {rng.choice(_KINDS)}"
        if t not in titles:
            titles.append(t)
    facts: list[list[str]] = []
    qas: list[tuple[str, str, str]] = []
    for t in titles:
        fs = []
        for attr in rng.sample(sorted(_ATTRS), 2):
            val = _ATTRS[attr](rng)
            fs.append(f"The {attr} of the {t} is {val}.")
            qas.append((t, attr, val))
        facts.append(fs)
    depths = [[rng.random() for _ in fs] for fs in facts]
    title, attr, val = qas[rng.randrange(len(qas))]
    streams = [_Stream(random.Random(rng.getrandbits(64))) for _ in titles]

    def context(n: int) -> str:
        per = [n // num_docs + (1 if i < n % num_docs else 0) for i in range(num_docs)]
        return SEP.join(
            f"Document [{i + 1}] (Title: the {t})\n" + _insert(s.take(k), fs, ds)
            for i, (t, fs, ds, s, k) in enumerate(zip(titles, facts, depths, streams, per, strict=True))
        )

    return _Plan(
        context,
        f"According to the documents, what is the {attr} of the {title}?",
        f"The {attr} of the {title} is",
        [val],
        {"title": title, "attr": attr, "num_docs": num_docs},
    )


_BUILDERS = {
    "passkey": _passkey,
    "needle": _needle,
    "kv_retrieval": _kv,
    "multihop": _multihop,
    "docqa": _docqa,
}


def render(tokenizer: Any, user: str, question: str, answer_prefix: str) -> tuple[str, str]:
    """``(prefix, suffix)`` of the prompt text, split right before ``question`` (see the module doc)."""
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
        cut = full.rfind(question)
        if cut < 0:
            raise ConfigError("the chat template does not reproduce the user message verbatim")
        return full[:cut], full[cut:] + answer_prefix
    cut = len(user) - len(question)
    return user[:cut], user[cut:] + "\nAnswer: " + answer_prefix


def make_ruler_sample(task: str, length: int, seed: int, tokenizer: Any, encode: Encoder) -> RulerSample:
    """Sample ``seed`` of ``task`` with a prompt of at most ``length`` tokens (as close as the filler allows).

    Parameters
    ----------
    task:
        One of :data:`RULER_TASKS`.
    length:
        Prompt tokens (see the module doc for what is counted).
    seed:
        Sample seed; everything (facts, depths, filler) follows from it.
    tokenizer:
        Gives the chat template (``chat_template`` / ``apply_chat_template``) when it has one.
    encode:
        ``encode(text, bos) -> ids``: the model's tokenisation, BOS rule included.
    """
    if task not in _BUILDERS:
        raise ConfigError(f"unknown task {task!r}; choose from {', '.join(RULER_TASKS)}")
    rng = random.Random(f"ruler/{task}/{length}/{seed}")
    stream = _Stream(random.Random(f"ruler-prose/{task}/{length}/{seed}"))
    plan = _BUILDERS[task](rng, stream, length)
    bos = not getattr(tokenizer, "chat_template", None)

    def build(n: int) -> tuple[str, str, list[int], list[int]]:
        user = f"{_INSTRUCTION[task]}{SEP}{plan.context(n)}{SEP}{plan.question}"
        prefix, suffix = render(tokenizer, user, plan.question, plan.answer_prefix)
        return prefix, suffix, encode(prefix, bos), encode(suffix, False)

    def size(n: int) -> int:
        _, _, p, s = build(n)
        return len(p) + len(s)

    lo = plan.lo
    if size(lo) > length:
        raise ConfigError(
            f"{task} needs more than {length} prompt tokens even without filler ({size(lo)}); raise --lengths"
        )
    hi = max(lo + 1, length // 8)
    while size(hi) <= length:  # exponential search, then binary search for the largest n that fits
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(mid) <= length:
            lo = mid
        else:
            hi = mid
    prefix, suffix, p_ids, s_ids = build(lo)
    answer_tokens = max(len(encode(" " + a, False)) for a in plan.answers)
    slack = 8 + (len(plan.answers) - 1) * 3
    return RulerSample(
        task=task,
        prefix=prefix,
        suffix=suffix,
        prefix_ids=tuple(p_ids),
        suffix_ids=tuple(s_ids),
        answers=tuple(plan.answers),
        metric="contains",
        max_new_tokens=answer_tokens * len(plan.answers) + slack,
        meta={**plan.meta, "seed": seed, "filler_units": lo, "length": length},
    )

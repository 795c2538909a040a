"""Deterministic synthetic long-context tasks for byte-level models.

Every task yields a :class:`Sample` ``(context, question, answer, task, meta)``; the prompt fed to a model is
``sample.prompt == context + "\\n\\n" + question`` and the expected continuation is ``sample.answer``
(greedy decoding, cut at the first newline, see :func:`exact_match`).

Formats are chosen so that a small byte-level model can solve them by *copying*: the question always ends
with a cue that appears verbatim in the context right before the value, e.g. ::

    context  "... The pass key is 48213. ..."
    question "What is the pass key? The pass key is"
    answer   " 48213"

Tasks (``TASKS``):

``passkey``
    One pass key (5 digits) hidden at a random depth in filler text.
``needle``
    Multi-key needle: several ``The special magic number for <word> is <6 digits>.`` sentences (RULER-style
    distractor needles); the question asks for one key.
``kv_retrieval``
    A list of ``<key>: <value>`` lines (4-letter keys, 5-digit values) filling the whole context; the question
    asks for one key. ``hard=True`` adds near-duplicate distractor keys (one letter changed).
``multihop``
    Variable tracking: ``VAR abc = 48213.`` then ``VAR xyz = abc.`` … scattered in filler, plus distractor
    chains. The question ``Trace VAR q to its value. VAR q =`` is answered with the whole chain
    ``" p = o = 48213"``: each hop is a copy of what follows ``<name> =`` in the context, so the answer is
    produced one hop at a time. ``meta["value"]`` holds the final value.
``docqa``
    Several separate documents ``<doc id=N title="two words">…</doc>``; each holds a few attribute facts
    ``The <attr> of <title> is <value>.`` The question asks one attribute of one document.

All text is ASCII and generated from a seeded :class:`random.Random`; the same ``(task, length, seed, kw)``
always gives the same sample. :func:`natural_text_corpus` separately reads Python standard-library sources
for language-modelling data (no downloads).
"""

from __future__ import annotations

import os
import random
import string
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS: tuple[str, ...] = ("passkey", "needle", "kv_retrieval", "multihop", "docqa")
LENGTH_TOLERANCE = 0.03
"""Relative tolerance of ``len(sample.prompt + sample.answer)`` around the requested ``length_bytes``."""

SEP = "\n\n"

# A small seeded vocabulary for natural-ish filler. None of these words occur in any task cue.
_DET = ["the", "a", "every", "one", "some", "that", "this", "each", "no", "her", "his", "our"]
_ADJ = [
    "quiet",
    "old",
    "green",
    "small",
    "bright",
    "cold",
    "warm",
    "dark",
    "tall",
    "slow",
    "quick",
    "soft",
    "heavy",
    "empty",
    "distant",
    "broken",
    "golden",
    "silent",
    "narrow",
    "wide",
    "gentle",
    "wild",
    "young",
    "hidden",
    "simple",
    "strange",
    "pale",
    "rough",
    "early",
    "late",
]
_NOUN = [
    "river",
    "garden",
    "window",
    "forest",
    "stone",
    "road",
    "village",
    "letter",
    "winter",
    "horse",
    "mountain",
    "bridge",
    "market",
    "teacher",
    "child",
    "ship",
    "lamp",
    "field",
    "table",
    "bird",
    "city",
    "doctor",
    "song",
    "wall",
    "cloud",
    "train",
    "farmer",
    "island",
    "kitchen",
    "book",
    "candle",
    "harbor",
    "valley",
    "tower",
    "painter",
    "storm",
    "meadow",
    "engine",
    "clock",
    "door",
]
_VERB = [
    "watches",
    "crosses",
    "follows",
    "carries",
    "finds",
    "leaves",
    "builds",
    "paints",
    "remembers",
    "opens",
    "passes",
    "reaches",
    "holds",
    "keeps",
    "sees",
    "moves",
    "turns",
    "wakes",
    "hears",
    "meets",
]
_PREP = ["near", "under", "beyond", "behind", "across", "over", "inside", "along", "past", "around"]
_ADV = [
    "slowly",
    "again",
    "today",
    "quietly",
    "at dawn",
    "in the evening",
    "once more",
    "without a word",
    "for a while",
    "before noon",
]
_ATTRS = ("code", "year", "room", "score")
_LOWER = string.ascii_lowercase


@dataclass
class Sample:
    """One task instance. The model sees :attr:`prompt` and must continue with :attr:`answer`."""

    context: str
    question: str
    answer: str
    task: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.context + SEP + self.question

    @property
    def text(self) -> str:
        """Prompt, answer and the terminating newline (what a training sequence looks like)."""
        return self.prompt + self.answer + "\n"


# ---------------------------------------------------------------------------------------------- filler
def filler_sentence(rng: random.Random) -> str:
    """One natural-ish sentence from the built-in word list."""
    words = [rng.choice(_DET), rng.choice(_ADJ), rng.choice(_NOUN), rng.choice(_VERB)]
    words += [rng.choice(_DET), rng.choice(_NOUN)]
    r = rng.random()
    if r < 0.4:
        words += [rng.choice(_PREP), rng.choice(_DET), rng.choice(_ADJ), rng.choice(_NOUN)]
    elif r < 0.7:
        words += [rng.choice(_ADV)]
    s = " ".join(words)
    return s[0].upper() + s[1:] + "."


def filler_text(n_bytes: int, rng: random.Random) -> str:
    """About ``n_bytes`` (never more, at most a few less) of filler sentences."""
    parts: list[str] = []
    total = -1
    while True:
        s = filler_sentence(rng)
        if total + 1 + len(s) > n_bytes:
            break
        parts.append(s)
        total += 1 + len(s)
    room = n_bytes - max(total, 0) - (1 if parts else 0)
    words = s[:-1].split(" ")
    frag = ""
    for w in words:
        cand = f"{frag} {w}" if frag else w
        if len(cand) + 1 > room:
            break
        frag = cand
    short = sorted({w for w in _DET + _NOUN + _ADJ if len(w) <= 6}, key=len)
    while True:  # top up with short words so the text lands within a byte or two of n_bytes
        fits = [w for w in short if len(frag) + (1 if frag else 0) + len(w) + 1 <= room]
        if not fits:
            break
        w = rng.choice(fits)
        frag = f"{frag} {w}" if frag else w[0].upper() + w[1:]
    if frag:
        parts.append(frag + ".")
    return " ".join(parts)


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(10 ** (n - 1), 10**n - 1))


def _letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_LOWER) for _ in range(n))


def _unique(gen: Any, n: int, taken: set[str] | None = None) -> list[str]:
    seen = set() if taken is None else taken
    out: list[str] = []
    while len(out) < n:
        x = gen()
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _scatter(facts: list[str], n_filler: int, rng: random.Random) -> str:
    """Insert ``facts`` (in random order, at random depths) into ``n_filler`` bytes of filler sentences."""
    if not facts:
        return filler_text(n_filler, rng)
    text = filler_text(n_filler, rng)
    # candidate cut points: sentence boundaries ("." followed by space) plus both ends
    cuts = [0] + [i + 1 for i in range(len(text) - 1) if text[i] == "." and text[i + 1] == " "] + [len(text)]
    points = sorted(rng.choice(cuts) for _ in facts)
    order = facts[:]
    rng.shuffle(order)
    out: list[str] = []
    prev = 0
    for p, f in zip(points, order, strict=True):
        out.append(text[prev:p])
        out.append(" " + f if p else f + " ")
        prev = p
    out.append(text[prev:])
    return "".join(out).strip()


def _fit(length: int, qa_len: int, fixed: int) -> int:
    """Filler bytes so that the context is ``length - qa_len`` long given ``fixed`` bytes of facts."""
    return max(0, length - qa_len - len(SEP) - fixed)


# ---------------------------------------------------------------------------------------------- tasks
QA = tuple[str, str]


def _passkey(
    length: int, rng: random.Random, digits: int = 5, **_: Any
) -> tuple[str, list[QA], dict[str, Any]]:
    key = _digits(rng, digits)
    fact = f"The pass key is {key}. Remember it. {key} is the pass key."
    q, a = "What is the pass key? The pass key is", f" {key}"
    n_fill = _fit(length, len(q) + len(a) + 1, len(fact) + 1)
    ctx = _scatter([fact], n_fill, rng)
    return ctx, [(q, a)], {"value": key, "depth": ctx.find(fact) / max(1, len(ctx))}


def _needle(
    length: int, rng: random.Random, num_needles: int | None = None, digits: int = 6, **_: Any
) -> tuple[str, list[QA], dict[str, Any]]:
    if num_needles is None:
        num_needles = max(2, min(6, length // 256))
    keys = _unique(lambda: f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}", num_needles)
    vals = _unique(lambda: _digits(rng, digits), num_needles)
    facts = [f"The special magic number for {k} is {v}." for k, v in zip(keys, vals, strict=True)]
    qas = [
        (f"What is the special magic number for {k}? The special magic number for {k} is", f" {v}")
        for k, v in zip(keys, vals, strict=True)
    ]
    rng.shuffle(qas)
    q0, a0 = qas[0]
    n_fill = _fit(length, len(q0) + len(a0) + 1, sum(len(f) + 1 for f in facts))
    ctx = _scatter(facts, n_fill, rng)
    return ctx, qas, {"value": a0.strip(), "keys": keys}


def _kv(
    length: int, rng: random.Random, key_len: int = 4, digits: int = 5, hard: bool = False, **_: Any
) -> tuple[str, list[QA], dict[str, Any]]:
    header = "Each line below maps a key to its value.\n"
    line_len = key_len + 2 + digits + 1  # "abcd: 12345\n"
    q_tmpl_len = len("Find the value of key . :") + 2 * key_len + 1 + digits + 1
    n_pairs = max(2, (length - len(header) - len(SEP) - q_tmpl_len) // line_len)
    taken: set[str] = set()
    keys: list[str] = []
    while len(keys) < n_pairs:
        if hard and keys and rng.random() < 0.3:
            base = list(rng.choice(keys))
            pos = rng.randrange(key_len)
            base[pos] = rng.choice(_LOWER)
            k = "".join(base)
        else:
            k = _letters(rng, key_len)
        if k not in taken:
            taken.add(k)
            keys.append(k)
    rng.shuffle(keys)
    vals = [_digits(rng, digits) for _ in keys]
    body = "".join(f"{k}: {v}\n" for k, v in zip(keys, vals, strict=True))
    ctx = header + body
    qas = [(f"Find the value of key {k}.\n{k}:", f" {v}") for k, v in zip(keys, vals, strict=True)]
    rng.shuffle(qas)
    # pad the last bytes with filler so the total hits the target
    q0, a0 = qas[0]
    short = length - (len(ctx) + len(SEP) + len(q0) + len(a0))
    if short > 1:
        ctx = ctx + filler_text(short - 1, rng).strip()
    return ctx.rstrip("\n"), qas, {"value": a0.strip(), "num_pairs": n_pairs}


def _multihop(
    length: int, rng: random.Random, hops: int = 3, chains: int = 3, digits: int = 5, **_: Any
) -> tuple[str, list[QA], dict[str, Any]]:
    """``chains`` chains of ``hops`` variables each; only the first is asked about in :func:`make_sample`."""
    names = _unique(lambda: _letters(rng, 3), hops * chains)
    vals = _unique(lambda: _digits(rng, digits), chains)
    facts: list[str] = []
    qas: list[QA] = []
    for c in range(chains):
        chain = names[c * hops : (c + 1) * hops]  # chain[0] = value; chain[i] = chain[i-1]
        facts.append(f"VAR {chain[0]} = {vals[c]}.")
        facts += [f"VAR {chain[i]} = {chain[i - 1]}." for i in range(1, hops)]
        for start in range(hops - 1, -1, -1):  # longest chain first, then shorter ones (more supervision)
            tail = " = ".join([*reversed(chain[:start]), vals[c]])
            qas.append((f"Trace VAR {chain[start]} to its value. VAR {chain[start]} =", f" {tail}"))
    first = qas[0]
    rest = qas[1:]
    rng.shuffle(rest)
    qas = [first, *rest]
    n_fill = _fit(length, len(first[0]) + len(first[1]) + 1, sum(len(f) + 1 for f in facts))
    ctx = _scatter(facts, n_fill, rng)
    chain0 = names[:hops]
    return ctx, qas, {"value": vals[0], "chain": list(reversed(chain0)), "hops": hops}


def _docqa(
    length: int, rng: random.Random, num_docs: int | None = None, attrs_per_doc: int | None = None, **_: Any
) -> tuple[str, list[QA], dict[str, Any]]:
    if num_docs is None:
        num_docs = max(2, min(6, length // 300))
    if attrs_per_doc is None:
        attrs_per_doc = 1 if length < 512 else 2
    titles = _unique(lambda: f"{rng.choice(_ADJ)} {rng.choice(_NOUN)}", num_docs)
    docs_facts: list[list[str]] = []
    qas: list[QA] = []
    for title in titles:
        attrs = rng.sample(_ATTRS, attrs_per_doc)
        facts = []
        for attr in attrs:
            val = {
                "code": lambda: _digits(rng, 5),
                "year": lambda: str(rng.randint(1500, 2099)),
                "room": lambda: f"{rng.choice('ABCDEFGH')}{rng.randint(100, 999)}",
                "score": lambda: str(rng.randint(10, 99)),
            }[attr]()
            facts.append(f"The {attr} of {title} is {val}.")
            qas.append(
                (f'In the document "{title}", what is the {attr}? The {attr} of {title} is', f" {val}")
            )
        docs_facts.append(facts)
    rng.shuffle(qas)
    q0, a0 = qas[0]
    heads = [f'<doc id={i + 1} title="{t}">\n' for i, t in enumerate(titles)]
    fixed = sum(
        len(h) + len("\n</doc>\n") + sum(len(f) + 1 for f in fs)
        for h, fs in zip(heads, docs_facts, strict=True)
    )
    n_fill = _fit(length, len(q0) + len(a0) + 1, fixed)
    per_doc = [n_fill // num_docs + (1 if i < n_fill % num_docs else 0) for i in range(num_docs)]
    body = "".join(
        h + _scatter(fs, n, rng) + "\n</doc>\n" for h, fs, n in zip(heads, docs_facts, per_doc, strict=True)
    )
    return body.rstrip("\n"), qas, {"value": a0.strip(), "titles": titles}


_Builder = Callable[..., tuple[str, list[QA], dict[str, Any]]]
_BUILDERS: dict[str, _Builder] = {
    "passkey": _passkey,
    "needle": _needle,
    "kv_retrieval": _kv,
    "multihop": _multihop,
    "docqa": _docqa,
}


def build(
    task: str, length_bytes: int, rng: random.Random, **kw: Any
) -> tuple[str, list[QA], dict[str, Any]]:
    """Context and *all* question/answer pairs about it (first pair = the one :func:`make_sample` asks)."""
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    if length_bytes < 64:
        raise ValueError(f"length_bytes must be at least 64, got {length_bytes}")
    return _BUILDERS[task](length_bytes, rng, **kw)


def make_sample(task: str, length_bytes: int, seed: int, **kw: Any) -> Sample:
    """A deterministic sample of ``task`` whose ``prompt + answer`` is about ``length_bytes`` bytes long.

    Keyword arguments go to the task (``digits``, ``num_needles``, ``hard``, ``hops``, ``chains``,
    ``num_docs`` …).
    """
    rng = random.Random(f"{task}/{length_bytes}/{seed}")
    ctx, qas, meta = build(task, length_bytes, rng, **kw)
    q, a = qas[0]
    return Sample(ctx, q, a, task, {**meta, "seed": seed, "length_bytes": length_bytes})


def training_text(
    task: str, length_bytes: int, rng: random.Random, ctx_frac: float = 0.6, **kw: Any
) -> tuple[str, list[tuple[int, int]]]:
    """A dense training sequence: a context followed by as many questions (with answers) as fit.

    The context takes about ``ctx_frac`` of ``length_bytes`` (all of it for ``passkey``, which has a single
    question); the questions about it follow, cycling through them again if room is left. Returns the text
    (at most ``length_bytes`` long) and the ``(start, end)`` byte spans of every answer.
    """
    ctx_len = length_bytes if task == "passkey" else max(64, int(length_bytes * ctx_frac))
    ctx, qas, _ = build(task, ctx_len, rng, **kw)
    text = ctx + SEP
    spans: list[tuple[int, int]] = []
    order = list(qas)
    i = 0
    while True:
        if i and i % len(order) == 0:
            rng.shuffle(order)
        q, a = order[i % len(order)]
        if i and len(text) + len(q) + len(a) + 1 > length_bytes:
            break
        text += q
        spans.append((len(text), len(text) + len(a)))
        text += a + "\n"
        i += 1
    return text[:length_bytes], spans


def exact_match(sample: Sample, generated: str) -> bool:
    """Whether a model's continuation (cut at the first newline) equals the answer, ignoring outer spaces."""
    return generated.split("\n", 1)[0].strip() == sample.answer.strip()


# ---------------------------------------------------------------------------------------------- natural text
def natural_text_corpus(max_bytes: int = 8_000_000, root: str | Path | None = None) -> str:
    """Python standard-library sources and text files (sorted, deterministic), ASCII, up to ``max_bytes``.

    Test and site-packages directories are skipped. Non-ASCII characters are dropped so that every byte is a
    plain character.
    """
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)  # prune before descending
        files += [Path(dirpath) / f for f in filenames if f.endswith((".py", ".txt", ".rst"))]
    files.sort(key=lambda p: p.relative_to(base).parts)
    out: list[str] = []
    total = 0
    for p in files:
        try:
            t = p.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        t = t.encode("ascii", errors="ignore").decode("ascii")
        out.append(t)
        total += len(t)
        if total >= max_bytes:
            break
    return "".join(out)[:max_bytes]

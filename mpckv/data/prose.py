"""Deterministic English prose for haystacks: paragraphs of plain, grammatical sentences, generated offline.

RULER's haystacks are Paul Graham's essays (copyrighted, downloaded) or a few repeated sentences ("The grass
is green. The sky is blue. ..."). We ship neither: :func:`prose_sentences` writes its own text from
sentence templates (written for this project) filled with seeded choices of people, places, objects and
times, so the filler reads like a plain story, varies from sample to sample and costs no download or
licence. It contains no digits and none of the words the tasks use as cues ("pass", "key", "magic",
"number", "value", "variable", "document"), so a needle is never confused with the filler.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

_PEOPLE = [
    "Mara", "Tobias", "Ines", "Oskar", "Lena", "Felix", "Greta", "Jonas", "Rosa", "Anton", "Clara", "Emil",
    "Nora", "Paul", "Ada", "Hugo", "Vera", "Milo", "Ella", "Leon", "the baker", "the old teacher",
    "the ferryman", "the doctor", "the carpenter", "the gardener", "the young painter", "the mayor",
]  # fmt: skip
_PLACES = [
    "the harbour", "the market square", "the old mill", "the library", "the hill above the town",
    "the river bank", "the orchard", "the station", "the bakery", "the lighthouse", "the school yard",
    "the bridge", "the forest path", "the workshop", "the chapel", "the meadow", "the village hall",
    "the narrow lane behind the church", "the garden by the lake", "the quiet beach",
]  # fmt: skip
_THINGS = [
    "a basket of apples", "an old map", "a wooden chair", "a letter", "a lantern", "a blue coat",
    "a small boat", "a loaf of bread", "a jar of honey", "a broken clock", "a pair of boots",
    "a bundle of firewood", "a painted box", "a bicycle", "a book of songs", "a wool blanket",
    "a copper kettle", "a fishing net", "a sack of flour", "a bunch of flowers",
]  # fmt: skip
_TIMES = [
    "in the morning", "at noon", "in the evening", "after supper", "before dawn", "on a rainy afternoon",
    "late at night", "on market day", "at the end of summer", "in the first days of spring",
    "during the long winter", "on a windy day", "after the harvest", "just before the storm",
]  # fmt: skip
_WEATHER = [
    "The rain fell softly on the roofs", "A cold wind came down from the hills",
    "The sun stood low over the water", "Fog lay over the fields", "The air smelled of cut grass",
    "Snow had covered the roads", "The sky cleared after a grey week", "A warm breeze moved the curtains",
]  # fmt: skip
_FEELINGS = ["glad", "tired", "curious", "worried", "calm", "surprised", "proud", "restless", "patient"]
_VERBS = ["carried", "found", "mended", "painted", "sold", "lost", "borrowed", "gave away", "wrapped"]
_TEMPLATES = [
    "{P} walked to {l} {t}.",
    "{P} {v} {x} and took it to {l}.",
    "{W}, and {p} stayed at home.",
    "{W} while {p} waited at {l}.",
    "Nobody at {l} had seen {x} like that before.",
    "{P} was {f} when {p2} arrived with {x}.",
    "{T}, the people of the town gathered at {l}.",
    "It was said that {p} knew every stone of {l}.",
    "{P} and {p2} talked for a long time about the journey.",
    "The road to {l} was longer than {p} remembered.",
    "{P} left {x} on the table and went out again.",
    "Children ran across {l}, laughing at the dogs.",
    "{P} wrote a short note and pinned it to the door.",
    "Everyone agreed that the summer had been kind to the gardens.",
    "{P} had {v} {x} years ago and never spoke of it.",
    "At {l} the lamps were lit one by one.",
    "{P} listened to the bells and felt {f}.",
    "{W}, so the fishermen kept their boats in {l}.",
    "{P} asked {p2} for help with {x}.",
    "The smell of fresh bread drifted from {l}.",
    "{P} sat by the window and watched the street.",
    "Later that week {p} {v} {x} for a neighbour.",
    "The old path past {l} was overgrown with ivy.",
    "{P} promised to return before the end of the month.",
    "A traveller asked the way to {l}, and {p} showed him.",
    "{P} thought that {l} looked different {t}.",
    "Most evenings ended with music at {l}.",
    "{P} kept {x} in the cupboard under the stairs.",
    "The news reached {l} before noon, and {p} was {f}.",
    "There was always work to do at {l} {t}.",
]
_BANNED = ("pass", "key", "magic", "number", "value", "variable", "document")


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def prose_sentence(rng: random.Random) -> str:
    """One sentence of the story (seeded)."""
    tmpl = rng.choice(_TEMPLATES)
    p, p2 = rng.sample(_PEOPLE, 2)
    fill = {
        "p": p,
        "p2": p2,
        "l": rng.choice(_PLACES),
        "x": rng.choice(_THINGS),
        "t": rng.choice(_TIMES),
        "v": rng.choice(_VERBS),
        "w": rng.choice(_WEATHER),
        "f": rng.choice(_FEELINGS),
    }
    fill |= {k.upper(): _cap(v) for k, v in fill.items() if len(k) == 1}  # slots that start a sentence
    return _cap(tmpl.format(**fill))


def prose_sentences(rng: random.Random) -> Iterator[str]:
    """An endless stream of sentences; every 4–7 sentences the next one starts a paragraph (``"\\n\\n"``
    prefix)."""
    left = rng.randint(4, 7)
    first = True
    while True:
        s = prose_sentence(rng)
        if left == 0:
            left = rng.randint(4, 7)
            s = "\n\n" + s
        elif not first:
            s = " " + s
        first = False
        left -= 1
        yield s


def prose(n_sentences: int, rng: random.Random) -> list[str]:
    """The first ``n_sentences`` of :func:`prose_sentences` (each with its leading separator)."""
    it = prose_sentences(rng)
    return [next(it) for _ in range(n_sentences)]

"""The zoo's toy world: a templated English ("language 1"), its word-for-word cipher ("language 2"),
and generators for plain text, equations, word problems, verb-meaning questions and comparisons.

Used by experiments/train_zoo.py to train the zoo and to write the bundled tasks; kept in the package so
the tasks can be regenerated and the vocabulary is one definition.
"""

from __future__ import annotations

import random

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
NUMBERS = [str(i) for i in range(41)]
SYMBOLS = [".", "?", "=", "+", "-", ":", "####"]
NAMES_HE = ["tom", "bob", "max", "lee"]
NAMES_SHE = ["ann", "sue", "eve", "kim"]
OBJECTS = ["apples", "cups", "pens", "books", "eggs", "cakes", "coins", "hats"]
PLUS = ["buys", "gets", "finds"]
MINUS = ["eats", "loses", "gives"]
SAME = ["sees"]
COLORS = ["red", "blue", "green", "old", "new", "big", "small"]
PLACES = ["park", "shop", "school", "home"]
FUNCTION = [
    "he", "she", "has", "have", "now", "more", "fewer", "the", "same", "how", "many", "does", "likes",
    "goes", "to", "with", "is", "in", "box", "bag", "today", "happy", "sad", "and", "then", "a", "day",
    "who", "or",
]  # fmt: skip
LANG1 = NAMES_HE + NAMES_SHE + OBJECTS + PLUS + MINUS + SAME + COLORS + PLACES + FUNCTION


def _cipher(seed: int = 7) -> dict[str, str]:
    """Invented words, one per language-1 word, none colliding with language 1."""
    rng = random.Random(seed)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    taken, out = set(LANG1), {}
    for word in LANG1:
        while True:
            new = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(2)) + rng.choice(
                consonants
            )
            if new not in taken:
                taken.add(new)
                out[word] = new
                break
    return out


CIPHER = _cipher()
LANG2 = [CIPHER[w] for w in LANG1]
VOCAB = SPECIALS + NUMBERS + SYMBOLS + LANG1 + LANG2


def translate(text: str, p: float = 1.0, rng: random.Random | None = None) -> str:
    """Language 1 -> language 2 word for word; with p < 1, code-switched (each word with probability p)."""
    rng = rng or random.Random(0)
    return " ".join(CIPHER[w] if w in CIPHER and (p >= 1 or rng.random() < p) else w for w in text.split())


def _person(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        return rng.choice(NAMES_HE), "he"
    return rng.choice(NAMES_SHE), "she"


def _change(rng: random.Random, include_same: bool = True):
    """(verb, op, a, b, result) with every number in 0..40."""
    kinds = ["plus", "minus"] + (["same"] if include_same else [])
    kind = rng.choice(kinds)
    if kind == "plus":
        a = rng.randint(0, 39)
        b = rng.randint(1, 40 - a)
        return rng.choice(PLUS), "+", a, b, a + b
    if kind == "minus":
        a = rng.randint(1, 40)
        b = rng.randint(1, a)
        return rng.choice(MINUS), "-", a, b, a - b
    a = rng.randint(0, 40)
    return rng.choice(SAME), "=", a, rng.randint(1, 40), a


def plain_sentence(rng: random.Random) -> str:
    """Language-1 text that carries the verbs' meaning, plus filler. It holds no questions: a base that has
    learned to answer `how many ... ?` in words keeps doing so in language 2, where math-en's fine-tune
    (which replaces that habit with an equation, in language 1 only) does not reach."""
    name, pro = _person(rng)
    obj = rng.choice(OBJECTS)
    kind = rng.random() * 0.7 + 0.3  # the kinds below 0.3 were questions
    if kind < 0.55:
        verb, op, a, b, _ = _change(rng)
        word = {"+": "more", "-": "fewer", "=": "the same"}[op]
        who = pro if rng.random() < 0.5 else name
        return f"{name} has {a} {obj} . {who} {verb} {b} {obj} . now {who} has {word} {obj} ."
    if kind < 0.65:
        verb, op, a, b, _ = _change(rng)
        word = {"+": "more", "-": "fewer", "=": "the same"}[op]
        return f"{name} {verb} {b} {obj} . now {name} has {word} {obj} ."
    if kind < 0.8:
        return f"{name} likes {rng.choice(COLORS)} {obj} . {pro} is happy today ."
    if kind < 0.9:
        other, _ = _person(rng)
        return (
            f"{name} goes to the {rng.choice(PLACES)} with {other} . {pro} has a {rng.choice(COLORS)} bag ."
        )
    return f"the {obj} is in the box . {name} is {rng.choice(['happy', 'sad'])} ."


def equation(rng: random.Random) -> str:
    _, op, a, b, c = _change(rng, include_same=False)
    return f"{a} {op} {b} = {c} ."


def word_problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, answer, result) in language 1; the answer is an equation then '#### result'."""
    name, pro = _person(rng)
    obj = rng.choice(OBJECTS)
    verb, op, a, b, c = _change(rng, include_same=False)
    question = f"{name} has {a} {obj} . {pro} {verb} {b} {obj} . how many {obj} does {name} have now ?"
    return question, f": {a} {op} {b} = {c} #### {c}", c


def verb_question(rng: random.Random) -> tuple[str, list[str], int]:
    """(context, choices, gold index): what does the verb do to the count?"""
    name, pro = _person(rng)
    obj = rng.choice(OBJECTS)
    verb, op, a, b, _ = _change(rng)
    context = f"{name} has {a} {obj} . {pro} {verb} {b} {obj} . now {pro} has"
    choices = [f"more {obj} .", f"fewer {obj} .", f"the same {obj} ."]
    return context, choices, {"+": 0, "-": 1, "=": 2}[op]


def compare_question(rng: random.Random) -> tuple[str, list[str], int]:
    """(context, choices, gold index): of two people holding different counts, who has more? A third
    skill, next to arithmetic and language 2: comparing two numbers read from a text. (Asking for
    "more" or "fewer" at random, a one-bit flip of the answer, stayed at chance after 2000 steps of this
    zoo's fine-tune; "more" alone is learnt in 1000.)"""
    (first, _), (second, _) = _person(rng), _person(rng)
    while second == first:
        second, _ = _person(rng)
    obj = rng.choice(OBJECTS)
    a, b = rng.sample(range(41), 2)
    context = f"{first} has {a} {obj} . {second} has {b} {obj} . who has more {obj} : {first} or {second} ?"
    return context, [f"{first} .", f"{second} ."], 0 if a > b else 1

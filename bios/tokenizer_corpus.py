"""The text the built-in tokenizer is trained on, assembled offline and deterministically.

Two parts, in this order: the docstrings of a fixed list of standard-library modules (they
depend on the Python version), then generated simple English lines in the style of the Bios
demo tasks (word reversal, capital-city questions, small arithmetic), the same for the same
seed. `bios.tokenizer_training` trains on `training_corpus()`; any change to what this module
returns changes the shipped tokenizer. Imports only the standard library.
"""

from __future__ import annotations

import importlib
import inspect
import random

STDLIB_MODULES = sorted(
    [
        "abc",
        "argparse",
        "ast",
        "asyncio",
        "base64",
        "bisect",
        "calendar",
        "collections",
        "contextlib",
        "copy",
        "csv",
        "dataclasses",
        "datetime",
        "decimal",
        "difflib",
        "email",
        "enum",
        "fractions",
        "functools",
        "glob",
        "gzip",
        "hashlib",
        "heapq",
        "html",
        "http",
        "inspect",
        "io",
        "ipaddress",
        "itertools",
        "json",
        "logging",
        "math",
        "operator",
        "os",
        "pathlib",
        "pickle",
        "platform",
        "pprint",
        "queue",
        "random",
        "re",
        "shlex",
        "shutil",
        "socket",
        "sqlite3",
        "statistics",
        "string",
        "struct",
        "subprocess",
        "tarfile",
        "tempfile",
        "textwrap",
        "threading",
        "time",
        "timeit",
        "tokenize",
        "typing",
        "unittest",
        "urllib",
        "uuid",
        "warnings",
        "zipfile",
    ]
)
CAPITALS = dict(
    pair.split(":")
    for pair in [
        "France:Paris",
        "Germany:Berlin",
        "Italy:Rome",
        "Spain:Madrid",
        "Portugal:Lisbon",
        "Japan:Tokyo",
        "China:Beijing",
        "India:New Delhi",
        "Russia:Moscow",
        "Canada:Ottawa",
        "Mexico:Mexico City",
        "Brazil:Brasilia",
        "Argentina:Buenos Aires",
        "Chile:Santiago",
        "Peru:Lima",
        "Egypt:Cairo",
        "Kenya:Nairobi",
        "Nigeria:Abuja",
        "Australia:Canberra",
        "Greece:Athens",
        "Turkey:Ankara",
        "Poland:Warsaw",
        "Sweden:Stockholm",
        "Norway:Oslo",
        "Finland:Helsinki",
        "Denmark:Copenhagen",
        "Ireland:Dublin",
        "Austria:Vienna",
        "Belgium:Brussels",
        "Netherlands:Amsterdam",
        "Switzerland:Bern",
        "Hungary:Budapest",
        "Thailand:Bangkok",
        "Vietnam:Hanoi",
        "Indonesia:Jakarta",
        "Iran:Tehran",
        "Iraq:Baghdad",
        "Cuba:Havana",
        "Colombia:Bogota",
        "Morocco:Rabat",
        "England:London",
        "Scotland:Edinburgh",
        "Ukraine:Kyiv",
        "Czechia:Prague",
        "Romania:Bucharest",
        "Pakistan:Islamabad",
        "Israel:Jerusalem",
        "Korea:Seoul",
        "Philippines:Manila",
        "Ghana:Accra",
        "United States:Washington",
        "United Kingdom:London",
        "New Zealand:Wellington",
        "South Africa:Pretoria",
    ]
)
NOUNS = [
    "cat",
    "dog",
    "bird",
    "fish",
    "fox",
    "cow",
    "horse",
    "man",
    "woman",
    "boy",
    "girl",
    "child",
    "king",
    "queen",
    "house",
    "tree",
    "car",
    "book",
    "ball",
    "sun",
    "moon",
    "star",
    "city",
    "river",
    "sea",
    "door",
    "table",
    "chair",
    "apple",
    "bread",
    "water",
    "fire",
    "day",
    "night",
    "time",
    "year",
    "world",
    "mat",
    "hat",
]
VERBS = [
    "sat",
    "ran",
    "saw",
    "ate",
    "took",
    "made",
    "found",
    "liked",
    "had",
    "gave",
    "read",
    "wrote",
    "sang",
    "played",
    "walked",
    "jumped",
    "is",
    "was",
]
ADJS = [
    "big",
    "small",
    "red",
    "blue",
    "green",
    "brown",
    "old",
    "new",
    "good",
    "bad",
    "happy",
    "sad",
    "quick",
    "lazy",
    "fast",
    "slow",
    "hot",
    "cold",
]
SMALL = [
    "the",
    "a",
    "an",
    "and",
    "or",
    "but",
    "not",
    "on",
    "in",
    "at",
    "to",
    "of",
    "with",
    "from",
    "by",
    "for",
    "over",
    "under",
    "it",
    "this",
    "that",
    "he",
    "she",
    "they",
    "we",
    "you",
    "I",
    "my",
    "your",
    "his",
    "her",
    "our",
    "their",
    "what",
    "who",
    "where",
    "when",
    "why",
    "how",
    "yes",
    "no",
    "hello",
    "today",
    "here",
    "there",
    "all",
]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
ALL_WORDS = SMALL + NOUNS + VERBS + ADJS + NUMBERS


def stdlib_docstrings() -> list[str]:
    """Distinct docstrings of STDLIB_MODULES and their public classes, functions, methods; stable order."""
    docs = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        docs.append(module.__doc__)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isroutine(obj) or inspect.isclass(obj):
                docs.append(inspect.getdoc(obj))
            if inspect.isclass(obj):
                docs += [
                    inspect.getdoc(m)
                    for k, m in sorted(vars(obj).items())
                    if not k.startswith("_") and (inspect.isroutine(m) or isinstance(m, property))
                ]
    return [d for d in dict.fromkeys(docs) if d]


def simple_sentences(count: int = 42000, seed: int = 0) -> list[str]:
    """``count`` generated English lines (demo tasks, Q/A facts, arithmetic), the same for the same seed."""
    rng, capitals = random.Random(seed), sorted(CAPITALS.items())
    pick = rng.choice
    lines = []
    for i in range(count):
        country, city = pick(capitals)
        if i % 7 == 0:
            words = [pick(SMALL), pick(ADJS), pick(NOUNS), pick(VERBS), pick(SMALL), "the", pick(NOUNS)]
            words = words[: rng.randint(2, 7)]
            lines.append(f"reverse the words: {' '.join(words)} -> {' '.join(reversed(words))}")
        elif i % 7 == 1:
            lines.append(f"What is the capital of {country}? {city}")
        elif i % 7 == 2:
            lines.append(f"Q: Which country has {city} as its capital? A: {country}.")
        elif i % 7 == 3:
            a, b = rng.randint(0, 999), rng.randint(0, 99)
            lines.append(f"{a} + {b} = {a + b}, {a} - {b} = {a - b}; {pick(NUMBERS)} is a number.")
        elif i % 7 == 4:
            lines.append(
                f"The {pick(ADJS)} {pick(NOUNS)} {pick(VERBS)} on the {pick(NOUNS)}, "
                f"and then {pick(SMALL)} {pick(VERBS)} a {pick(NOUNS)}!"
            )
        elif i % 7 == 5:
            sentence = " ".join(pick(ALL_WORDS) for _ in range(rng.randint(3, 12)))
            lines.append(sentence[0].upper() + sentence[1:] + pick(".?!,;:"))
        else:
            lines.append(f'{pick(NOUNS).capitalize()}s are {pick(ADJS)}. Is it "{pick(ADJS)}"? Yes (maybe).')
    return lines


def training_corpus() -> list[str]:
    """The tokenizer's training text, one string per document: `stdlib_docstrings()` then `simple_sentences()`."""
    return stdlib_docstrings() + simple_sentences()

"""RULER-style synthetic long-context tasks, generated to an exact token length with the model's tokenizer.

Every task needs no external data: keys and words come from ``wonderwords``' word lists, numbers and uuids
from a seeded generator, and the real-text haystack from the Python documentation shipped with CPython
(``pydoc_data.topics``; its text depends on the Python version, which ``results.json`` records). The same
seed, task, length and sample index always give the same prompt.

Templates follow RULER (Hsieh et al., 2024) and, for ``passkey``, Landmark Attention / LongLoRA / Quest.
Scoring follows RULER's rule: the share of reference strings found (case-insensitively) in the output.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pydoc_data.topics as pydoc_topics
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass
class Sample:
    """One prompt with its references."""

    task: str
    length: int  # the target: prompt tokens + max_new_tokens <= length
    index: int
    prompt: str
    answers: list[str]
    max_new_tokens: int
    depth: float | None = None  # where the (first) needle sits, as a share of the haystack
    n_tokens: int = 0  # prompt tokens
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ word lists


@cache
def _wordlist(name: str) -> tuple[str, ...]:
    try:
        text = files("wonderwords.assets").joinpath(name).read_text()
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "sparsex-eval needs the 'wonderwords' package for its word lists, which sparsex-hf installs with its "
            "[eval] extra: pip install 'sparsex-hf[eval]' (or pip install wonderwords)"
        ) from e
    words = sorted({w.strip().lower() for w in text.splitlines() if re.fullmatch(r"[a-zA-Z]{3,12}", w.strip())})
    return tuple(words)


def nouns() -> tuple[str, ...]:
    return _wordlist("nounlist.txt")


def adjectives() -> tuple[str, ...]:
    return _wordlist("adjectivelist.txt")


def _key(rng: random.Random) -> str:
    return f"{rng.choice(adjectives())}-{rng.choice(nouns())}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@cache
def text_sentences() -> tuple[str, ...]:
    """Sentences of real English text available offline: the Python documentation topics."""
    topics = pydoc_topics.topics
    text = " ".join(topics[k] for k in sorted(topics))
    text = re.sub(r"\s+", " ", text)
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 20 <= len(s.strip()) <= 400]
    return tuple(sents)


# modules of the standard library whose source is the code haystack (available offline; the Python version,
# which results.json records, fixes their text)
CODE_MODULES = ("argparse", "json.decoder", "json.encoder", "collections", "dataclasses", "textwrap", "shlex",
                "configparser", "csv", "difflib", "fractions", "heapq", "ipaddress", "pprint", "string", "tokenize")


@cache
def code_lines() -> tuple[str, ...]:
    """Non-empty lines of real Python source code available offline (standard-library modules)."""
    lines = []
    for name in CODE_MODULES:
        src = inspect.getsource(importlib.import_module(name))
        lines += [ln.rstrip() for ln in src.splitlines() if ln.strip() and len(ln) <= 200]
    return tuple(lines)


# ------------------------------------------------------------------------------------------------ builders
# A builder takes (rng, units, depth) and returns (prompt, answers, meta); `units` is the haystack size it
# is asked for (sentences, distractor needles or words), chosen by the length fit.


def _haystack(kind: str, rng_seed: int, units: int) -> list[str]:
    if kind == "noise":
        return [NOISE] * units
    sents = code_lines() if kind == "code" else text_sentences()
    start = random.Random(rng_seed).randrange(len(sents))
    return [sents[(start + i) % len(sents)] for i in range(units)]


def _insert(hay: list[str], needles: list[str], depths: list[float]) -> list[str]:
    out = list(hay)
    # insert from the deepest so that earlier indices stay valid
    for needle, d in sorted(zip(needles, depths), key=lambda x: -x[1]):
        out.insert(round(d * len(hay)), needle)
    return out


NIAH_PREFIX = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the {kind} afterwards.\n")


def _niah(haystack: str, n_keys: int, n_values: int, n_queries: int, distractor_haystack: bool,
          uuid_keys: bool):
    kind = "uuids" if uuid_keys else "numbers"
    val = _uuid if uuid_keys else _number

    def build(rng: random.Random, units: int, depth: float, seed: int):
        keys = []
        while len(keys) < n_keys:
            k = _uuid(rng) if uuid_keys else _key(rng)
            if k not in keys:
                keys.append(k)
        values = [[val(rng) for _ in range(n_values)] for _ in keys]
        needles, depths = [], []
        queried = keys[:n_queries]
        for i, (k, vs) in enumerate(zip(keys, values)):
            for j, v in enumerate(vs):
                needles.append(f"One of the special magic {kind} for {k} is: {v}.")
                depths.append(depth if (i == 0 and j == 0) else rng.random())
        if distractor_haystack:  # RULER's needle haystack: every unit is a needle of another key
            hay = []
            for _ in range(units):
                k = _uuid(rng) if uuid_keys else _key(rng)
                hay.append(f"One of the special magic {kind} for {k} is: {val(rng)}.")
        else:
            hay = _haystack(haystack, seed, units)
        context = " ".join(_insert(hay, needles, depths))
        answers = [v for k, vs in zip(keys, values) if k in queried for v in vs]
        if n_queries > 1:
            q = ", ".join(queried[:-1]) + f", and {queried[-1]}"
            question = (f"What are all the special magic {kind} for {q} mentioned in the provided text? "
                        f"The special magic {kind} for {q} mentioned in the provided text are")
        elif n_values > 1:
            question = (f"What are all the special magic {kind} for {queried[0]} mentioned in the provided text? "
                        f"The special magic {kind} for {queried[0]} mentioned in the provided text are")
        else:
            question = (f"What is the special magic {kind[:-1]} for {queried[0]} mentioned in the provided text? "
                        f"The special magic {kind[:-1]} for {queried[0]} mentioned in the provided text is")
        prompt = NIAH_PREFIX.format(kind=kind) + context + "\n" + question
        return prompt, answers, {"keys": queried}

    return build


def _niah_code(rng: random.Random, units: int, depth: float, seed: int):
    """A needle assignment inside real Python source code; its value is asked about (a format no other task uses)."""
    name = "special_magic_number_" + _key(rng).replace("-", "_")
    value = _number(rng)
    lines = _insert(_haystack("code", seed, units), [f"{name} = {value}"], [depth])
    prompt = ("Below is a long piece of Python source code. One line in it assigns a special magic number to a "
              "variable. Memorize it.\n\n" + "\n".join(lines) + f"\n\nQuestion: What is the value assigned to "
              f"{name} in the code above? Answer: The value assigned to {name} is")
    return prompt, [value], {"keys": [name]}


def _passkey(rng: random.Random, units: int, depth: float, seed: int):
    key = str(rng.randint(10000, 99999))
    hay = [NOISE] * units
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    prefix = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
              "I will quiz you about the important information there.\n")
    context = " ".join(_insert(hay, [needle], [depth]))
    return prefix + context + "\nWhat is the pass key? The pass key is", [key], {}


def _variable_tracking(rng: random.Random, units: int, depth: float, seed: int, hops: int = 4):
    names = []
    while len(names) < hops + 1:
        n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if n not in names:
            names.append(n)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    # in order, spread from `depth` over the rest of the haystack
    depths = sorted([depth] + [depth + (1 - depth) * rng.random() for _ in range(hops)])
    context = " ".join(_insert([NOISE] * units, chain, depths))
    prompt = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n" + context +
              f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
              f"According to the chain(s) of variable assignment in the text above, {hops + 1} variables are "
              f"assigned the value {value}, they are:")
    return prompt, names, {}


def _common_words(rng: random.Random, units: int, depth: float, seed: int, n_common: int = 10):
    pool = list(nouns())
    rng.shuffle(pool)
    common, rare = pool[:n_common], pool[n_common : n_common + units]
    freq_common = 30 if units > 200 else 12
    words = common * freq_common + rare * 3
    rng.shuffle(words)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    prompt = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
              "ones that appear most often.\n" + listing +
              f"\nQuestion: What are the {n_common} most common words in the above list? Answer: The top "
              f"{n_common} words that appear most often in the list are:")
    return prompt, common, {}


def _frequent_words(rng: random.Random, units: int, depth: float, seed: int, alpha: float = 2.0, vocab: int = 200):
    codes = []
    while len(codes) < vocab:
        c = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        if c not in codes:
            codes.append(c)
    weights = [1.0 / (r + 1) ** alpha for r in range(vocab)]
    words = rng.choices(codes, weights=weights, k=units)
    counts = {c: words.count(c) for c in set(words)}
    top = sorted(counts, key=lambda c: (-counts[c], codes.index(c)))[:3]
    prompt = ("Read the following coded text and track the frequency of each coded word. Find the three most "
              "frequently appeared coded words. " + " ".join(words) +
              "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
              "frequently appeared words in the above coded text? Answer: According to the coded text above, the "
              "three most frequently appeared words are:")
    return prompt, top, {"counts": [counts[c] for c in top]}


@dataclass(frozen=True)
class Task:
    name: str
    build: Callable
    max_new_tokens: int
    has_depth: bool = True
    description: str = ""


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("passkey", _passkey, 8, description="5-digit pass key in repeated noise (Landmark / LongLoRA template)"),
    Task("niah_single", _niah("noise", 1, 1, 1, False, False), 12,
         description="one word-key -> 7-digit number needle in a noise haystack (RULER niah_single_1)"),
    Task("niah_single_text", _niah("text", 1, 1, 1, False, False), 12,
         description="one needle in real text (RULER niah_single_2, Python docs instead of essays)"),
    Task("niah_multikey", _niah("text", 4, 1, 1, False, False), 12,
         description="4 needles with different keys in real text, one queried (RULER niah_multikey_1)"),
    Task("niah_code", _niah_code, 12,
         description="one variable assignment needle inside real Python source code (standard library modules)"),
    Task("niah_multikey_needles", _niah("", 1, 1, 1, True, False), 12,
         description="haystack made of distractor needles, words -> numbers (RULER niah_multikey_2)"),
    Task("niah_multikey_uuid", _niah("", 1, 1, 1, True, True), 40,
         description="haystack of distractor needles, uuids -> uuids (RULER niah_multikey_3)"),
    Task("niah_multivalue", _niah("text", 1, 4, 1, False, False), 48,
         description="one key with 4 values in real text, all asked (RULER niah_multivalue)"),
    Task("niah_multiquery", _niah("text", 4, 1, 4, False, False), 48,
         description="4 keys in real text, all 4 asked (RULER niah_multiquery)"),
    Task("vt", _variable_tracking, 30, description="variable tracking: a 4-hop chain of assignments in noise"),
    Task("cwe", _common_words, 120, has_depth=False, description="the 10 most common words of a numbered list"),
    Task("fwe", _frequent_words, 30, has_depth=False, description="the 3 most frequent coded words (Zipf, alpha 2)"),
]}


def score(output: str, answers: list[str]) -> float:
    """RULER's string_match_all: share of the references found in the output (case-insensitive), 0..100."""
    out = output.lower()
    return 100.0 * sum(a.lower() in out for a in answers) / len(answers)


def make_sample(task: str, length: int, index: int, tokenizer, seed: int = 0, n_samples: int = 1,
                count_tokens: Callable | None = None) -> Sample:
    """Sample ``index`` (of ``n_samples``, which spreads the needle depth) of ``task`` whose prompt plus the
    task's ``max_new_tokens`` fits ``length`` tokens as tightly as the haystack unit allows."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    spec = TASKS[task]
    budget = length - spec.max_new_tokens
    if budget < 64:
        raise ValueError(f"length {length} is too short for task {task!r} (needs > {spec.max_new_tokens + 64} tokens)")
    depth = (index + 0.5) / n_samples if spec.has_depth else None  # spread evenly over (0, 1)
    sample_seed = _stable_seed(seed, task, length, index)
    count = count_tokens or (lambda s: len(tokenizer(s, add_special_tokens=False).input_ids))

    def build(units):
        return spec.build(random.Random(sample_seed), units, depth if depth is not None else 0.0, sample_seed)

    lo = _largest_fitting(lambda units: count(build(units)[0]), budget)
    if lo == 0:
        raise ValueError(f"task {task!r} does not fit {length} tokens (its template alone is longer)")
    prompt, answers, meta = build(lo)
    return Sample(task, length, index, prompt, answers, spec.max_new_tokens, depth, count(prompt), dict(meta, units=lo))


def _largest_fitting(count: Callable[[int], int], budget: int, limit: int = 1 << 22) -> int:
    """The largest haystack size ``u`` (units) with ``count(u) <= budget``, 0 if none, for token counts that
    grow with the size: interpolation search from the counts at 1 and 64 units (a bisection step whenever an
    interpolated step did not halve the bracket), five to eight tokenizations of a full-length prompt instead of
    the ~2 log2(u) of a doubling search."""
    lo, c_lo = 1, count(1)
    if c_lo > budget:
        return 0
    hi, c_hi = None, None  # count(lo) <= budget < count(hi)
    nxt, bisect = 64, False
    while hi is None or hi - lo > 1:
        if nxt > limit:
            raise RuntimeError("haystack search did not converge")
        c = count(nxt)
        width = None if hi is None else hi - lo
        if c <= budget:
            slope = (c - c_lo) / (nxt - lo)  # nxt > lo always
            lo, c_lo = nxt, c
        else:
            hi, c_hi = nxt, c
        if hi is None:  # extrapolate past the budget (one unit beyond, so that the bracket closes)
            nxt = lo + max(1, int((budget - c_lo) / max(slope or 1.0, 1e-3))) + 1
            continue
        bisect = not bisect and width is not None and 2 * (hi - lo) > width
        guess = lo + int((budget - c_lo) * (hi - lo) / max(c_hi - c_lo, 1))
        nxt = (lo + hi) // 2 if bisect else min(max(guess, lo + 1), hi - 1)
    return lo


def _stable_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")

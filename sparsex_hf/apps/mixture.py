"""Synthetic long-context retrieval samples for the fine-tuning recipe's data mixture (``sparsex-finetune --mix``).

Plain text teaches a model the longer positions, not to use them: trained on raw code alone, SmolLM2 lost its
instruction following (docs/finetuning.md). These samples hide records in a window of the training corpus itself
and ask for one of them, so that the model learns to look far back for what the question names, with the loss on
the answer only.

The formats are disjoint from every task of ``sparsex-eval`` (which uses a pass key in repeated noise, word keys
with 7-digit numbers or uuids, assignments in Python source, variable chains and word counts): keys here are
made-up names built from syllables, values are letter-digit codes (``KX-4821-Q``), and the questions are worded
differently. Seeds are the recipe's ``--seed`` through a stream of its own.

* ``record``: 2 to 6 records ``Record of <name>: the <field> is <code>.`` at random places; one is asked.
* ``multi``: one name gets 2 or 3 codes for one field among distractor records; the answer lists all of them in
  the order they appear.

With a chat template, half of the samples are formatted as a user turn and the assistant's answer; the others
as plain text (``Question: ... Answer:``). A sample's length is drawn uniformly from a quarter of the training
length (at least 512 tokens) to all of it, so that retrieval is trained at the original context as well as at
the new one (8K to 32K when SmolLM2 goes from 8K to 32K).
"""

from __future__ import annotations

import random

import torch

__all__ = ["FORMATS", "make_retrieval_sample", "mix_sequences"]

FORMATS = ("record", "multi")
_SYLLABLES = ("ka", "lo", "mi", "ren", "tus", "vai", "quo", "zel", "bri", "dan", "fe", "gor", "hal", "ix", "jun",
              "mor", "nek", "pal", "sor", "tem", "ul", "vin", "wex", "yar")
_FIELDS = ("access code", "locker code", "badge code", "ticket code", "vault code", "routing code")


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _code(rng: random.Random) -> str:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    return f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randint(1000, 9999)}-{rng.choice(letters)}"


def _records(fmt: str, rng: random.Random) -> tuple[list[str], str, str]:
    """The record lines, the question and the asked name of one sample."""
    field = rng.choice(_FIELDS)
    names = list(dict.fromkeys(_name(rng) for _ in range(8)))
    asked = names[0]
    others = names[1 : 1 + rng.randint(1, 5)]
    if fmt == "record":
        value = _code(rng)
        lines = [f"Record of {asked}: the {field} is {value}."]
        lines += [f"Record of {n}: the {field} is {_code(rng)}." for n in others]
        return lines, f"According to the records above, what is the {field} of {asked}?", asked
    values = [_code(rng) for _ in range(rng.randint(2, 3))]
    lines = [f"Record of {asked}: one {field} is {v}." for v in values]
    lines += [f"Record of {n}: one {field} is {_code(rng)}." for n in others]
    return lines, f"List every {field} of {asked} given in the records above, in order.", asked


def _place(hay: list[str], lines: list[str], rng: random.Random) -> tuple[list[str], list[str]]:
    """Insert ``lines`` at random line boundaries of ``hay``; return the text lines and the records in reading
    order (the ``multi`` answer follows that order)."""
    slots = sorted(rng.randint(0, len(hay)) for _ in lines)
    order = lines[:]
    rng.shuffle(order)
    out, placed, i = [], [], 0
    for j, line in enumerate(hay + [None]):
        while i < len(slots) and slots[i] == j:
            out.append(order[i])
            placed.append(order[i])
            i += 1
        if line is not None:
            out.append(line)
    return out, placed


def make_retrieval_sample(tokenizer, stream: list[int], length: int, fmt: str, seed: int,
                          chat: bool | None = None) -> tuple[list[int], list[int]]:
    """One sample of at most ``length`` tokens whose haystack is a window of ``stream`` (corpus token ids):
    ``(input_ids, labels)``, the labels -100 except on the answer tokens (and the end-of-sequence token)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown sample format {fmt!r}; formats are {FORMATS}")
    rng = random.Random(seed)
    lines, question, asked = _records(fmt, rng)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    chat = (has_template and rng.random() < 0.5) if chat is None else (chat and has_template)
    eos = tokenizer.eos_token_id
    budget = length - 64 - sum(len(tokenizer(x, add_special_tokens=False).input_ids) for x in lines + [question])
    for _ in range(4):  # shrink the haystack until the sample fits
        if budget < 16 or len(stream) < budget:
            raise ValueError(f"a {fmt!r} sample of {length} tokens needs a longer corpus or a longer length")
        start = rng.randrange(len(stream) - budget + 1)
        hay = tokenizer.decode(stream[start : start + budget]).split("\n")
        text, placed = _place(hay, lines, rng)
        # the asked name's codes in reading order (one for "record")
        answer = ", ".join(r.rsplit(" is ", 1)[1].rstrip(".") for r in placed if r.startswith(f"Record of {asked}:"))
        body = "\n".join(text)
        if chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"{body}\n\n{question}"}],
                                                   tokenize=False, add_generation_prompt=True)
            prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
            answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
        else:
            prompt_ids = tokenizer(f"{body}\n\nQuestion: {question}\nAnswer:", add_special_tokens=False).input_ids
            answer_ids = tokenizer(f" {answer}", add_special_tokens=False).input_ids
        answer_ids = answer_ids + ([eos] if eos is not None else [])
        excess = len(prompt_ids) + len(answer_ids) - length
        if excess <= 0:
            return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids
        budget -= excess + 8
    raise ValueError(f"could not fit a {fmt!r} sample into {length} tokens")


def mix_sequences(plain: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], tokenizer, docs: list[list[int]],
                  length: int, share: float, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``plain`` training sequences ``(input_ids, position_ids, labels)`` with synthetic samples added so that they
    make ``share`` of the result (formats alternating, lengths uniform from ``length // 4``, at least 512, to
    ``length``), shuffled; each sample is its own sequence (positions from 0, the loss on its answer only)."""
    if not 0 <= share < 1:
        raise ValueError(f"--mix must be in [0, 1) (the share of synthetic sequences), got {share}")
    n = round(share * len(plain) / (1 - share))
    stream = [t for d in docs for t in d]
    rng = random.Random(f"sparsex-mixture-{seed}")  # a stream of its own: disjoint from the eval's seeds
    out = list(plain)
    for i in range(n):
        size = rng.randint(max(length // 4, min(length, 512)), length)
        ids, labels = make_retrieval_sample(tokenizer, stream, size, FORMATS[i % len(FORMATS)], rng.getrandbits(63))
        out.append((torch.tensor(ids), torch.arange(len(ids)), torch.tensor(labels)))
    rng.shuffle(out)
    return out

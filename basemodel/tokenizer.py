"""A CLIP-style byte-level BPE tokenizer built entirely offline.

The vocabulary is every byte (alone and word-final, as in CLIP) plus merges that make a fixed list of
common prompt words single tokens. Anything else still tokenizes, byte by byte, so no prompt fails.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77

COLOURS = "red green blue yellow orange purple pink brown black white gray grey cyan magenta teal gold silver"
SHAPES = "circle square triangle star heart rectangle diamond cross ring hexagon dot dots stripe stripes line"
WORDS = (
    "a an the of on in with and at by to from over under near background foreground small large big tiny "
    "bright dark light pale deep striped spotted plain solid pattern texture style photo painting drawing "
    "picture image portrait landscape sky sea sun moon tree house cat dog fox bird flower mountain river "
    "city night day watercolor watercolour oil sketch cartoon anime pixel art abstract minimal detailed "
    "sharp blurry "
    "high low quality best worst ugly beautiful lora trigger sks ohwx"
)


def word_list() -> list[str]:
    seen: dict[str, None] = {}
    for word in f"{COLOURS} {SHAPES} {WORDS}".split():
        seen.setdefault(word, None)
    return list(seen)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the lowest-ranked adjacent pair."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(parts)))
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


@lru_cache(maxsize=1)
def _cached_parts() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte vocabulary plus merges under which every listed word is exactly one token.

    Each word is run through BPE with the merges so far; while it still has several pieces, a merge
    of its first two pieces is appended. An appended merge ranks after every earlier one, so it can
    never change how an earlier (already whole) word is merged.
    """
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    ranks: dict[tuple[str, str], int] = {}
    for word in word_list():
        while len(pieces := _bpe(word, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.append(pieces[0] + pieces[1])
    vocab += [BOS, EOS]
    return {token: i for i, token in enumerate(vocab)}, list(ranks)


def _make(vocab: dict[str, int], merges: list[tuple[str, str]]) -> CLIPTokenizer:
    # the stub says list[str]; the tokenizers backend takes (left, right) pairs as well.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH)  # type: ignore[arg-type]


def build_tokenizer() -> CLIPTokenizer:
    return _make(*_cached_parts())

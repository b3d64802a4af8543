"""A CLIP-style byte-level BPE tokenizer built entirely offline.

The vocabulary is every byte (alone and word-final, as in CLIP) plus merges that make a fixed list of
common prompt words single tokens. Anything else still tokenizes, byte by byte, so no prompt fails.
"""

from __future__ import annotations

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


def _vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    known = set(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merges.append((current, piece))
            current += piece
            if current not in known:
                known.add(current)
                vocab.append(current)
    vocab += [BOS, EOS]
    return {token: i for i, token in enumerate(vocab)}, merges


@lru_cache(maxsize=1)
def _cached_parts() -> tuple[dict[str, int], list[tuple[str, str]]]:
    return _vocab_and_merges(word_list())


def build_tokenizer() -> CLIPTokenizer:
    vocab, merges = _cached_parts()
    # the stub says list[str]; the tokenizers backend takes (left, right) pairs as well.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH)  # type: ignore[arg-type]

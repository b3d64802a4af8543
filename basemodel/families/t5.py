"""A T5 tokenizer built entirely offline (SD3's and Flux's ``tokenizer_2``/``tokenizer_3``).

T5's tokenizer is a SentencePiece Unigram model; transformers' ``T5Tokenizer`` (``T5TokenizerFast``:
in transformers 5 both names are the ``tokenizers``-backed class) builds one from a list of (piece,
log-probability) pairs, so no ``spiece.model`` (and no sentencepiece) is needed. The vocabulary is T5's
specials (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), the word-start marker ``▁``, every word of the CLIP
tokenizer's list as one ``▁word`` piece, and every printable ASCII character with and without ``▁``,
so any ASCII prompt tokenizes without ``<unk>``.
"""

from __future__ import annotations

import string
from functools import lru_cache

from transformers import T5Tokenizer

from basemodel.tokenizer import word_list

MAX_LENGTH = 512  # T5's model_max_length in SD3's and Flux's tokenizer configs
WORD = "▁"


@lru_cache(maxsize=1)
def _vocab() -> tuple[tuple[str, float], ...]:
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (WORD, -2.0)]
    words = [(WORD + word, -1.0) for word in word_list()]
    chars = [c for c in string.ascii_letters + string.digits + string.punctuation]
    pieces = [(c, -5.0) for c in chars] + [(WORD + c, -5.5) for c in chars]
    seen: dict[str, float] = {}
    for piece, score in specials + words + pieces:
        seen.setdefault(piece, score)
    return tuple(seen.items())


def build_t5_tokenizer() -> T5Tokenizer:
    return T5Tokenizer(vocab=list(_vocab()), extra_ids=0, model_max_length=MAX_LENGTH)

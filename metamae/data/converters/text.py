"""Captions and questions as 32 token ids, over a vocabulary built from the training text.

DABS (src/datasets/captioned_images/mscoco.py and vqa.py in alextamkin/dabs) encodes text with the
`bert-base-uncased` WordPiece tokenizer, downloaded at run time: `[CLS] text [SEP]`, or
`[CLS] question [SEP] answer [SEP]` for VQA, truncated longest-first and padded with [PAD] to 32.
Here the layout, truncation and padding are the same, but the vocabulary is built from the training
split's own text and written next to the shards as `vocab.json`, so nothing is downloaded:

- words: lower-cased runs of letters and digits (any script); everything else separates words.
- vocabulary: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, then the training words by falling count (ties
  alphabetical), at most VOCAB_SIZE entries in all; a word outside it encodes as [UNK].
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
PAD, UNK, CLS, SEP = range(len(SPECIALS))
VOCAB_SIZE = 30552        # the embedding table of configs/dataset/{mscoco,vqa}.yaml (BERT's is 30522)
SEQ_LEN = 32              # DABS's SEQ_LEN for MSCOCO and VQA
VOCAB_FILE = "vocab.json"
TOKENIZER = ("lower-case; words are runs of letters/digits; [CLS] text [SEP] (or [CLS] a [SEP] b [SEP], "
             "truncated longest-first), padded with [PAD]=0 to the sequence length; unknown words -> [UNK]=1")

_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """'A man, riding a horse!' -> ['a', 'man', 'riding', 'a', 'horse']"""
    return _WORD.findall(text.lower())


class Vocab:
    """Token strings and their ids (an id is the token's position in `tokens`)."""

    def __init__(self, tokens: list[str]):
        if tuple(tokens[:len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}; this one starts with {tokens[:len(SPECIALS)]}")
        self.tokens = tokens
        self.ids = {t: i for i, t in enumerate(tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, texts: Iterable[str], size: int = VOCAB_SIZE) -> "Vocab":
        counts = Counter(w for text in texts for w in words(text))
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *ranked[:size - len(SPECIALS)]])

    def encode(self, *texts: str, length: int = SEQ_LEN) -> np.ndarray:
        """One or two texts -> `length` int64 ids: [CLS] a [SEP] (b [SEP]) [PAD]..."""
        parts = [[self.ids.get(w, UNK) for w in words(t)] for t in texts]
        room = length - 1 - len(parts)                             # [CLS] and one [SEP] per part
        while sum(map(len, parts)) > room:                         # longest first; the last part on ties
            longest = max(range(len(parts)), key=lambda i: (len(parts[i]), i))
            parts[longest].pop()
        ids = [CLS] + [i for part in parts for i in (*part, SEP)]
        return np.array(ids + [PAD] * (length - len(ids)), dtype=np.int64)     # (length,)

    def dumps(self) -> str:
        """vocab.json: {token: id}."""
        return json.dumps(self.ids, ensure_ascii=False, indent=0)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / VOCAB_FILE
        path.write_text(self.dumps(), encoding="utf-8")
        return path

    def describe(self) -> dict:
        """What a converter records in its manifest about the text."""
        return {"vocab": VOCAB_FILE, "vocab_size": len(self), "vocab_sha256": hashlib.sha256(
            self.dumps().encode("utf-8")).hexdigest(), "tokenizer": TOKENIZER, "seq_len": SEQ_LEN}

    @classmethod
    def load(cls, folder: Path) -> "Vocab":
        ids = json.loads((Path(folder) / VOCAB_FILE).read_text(encoding="utf-8"))
        tokens = sorted(ids, key=ids.get)
        if [ids[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError(f"{Path(folder) / VOCAB_FILE}: ids are not 0..{len(tokens) - 1}")
        return cls(tokens)

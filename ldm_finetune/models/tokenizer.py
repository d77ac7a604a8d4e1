"""Small CLIP BPE vocabularies built from a word list: every word is one token, so a from-scratch text encoder
learns one embedding per word and Textual Inversion initializers are single tokens.

The layout is CLIP's own (vocab.json + merges.txt, byte-level symbols, "</w>" marking a word's end), read by
transformers' CLIPTokenizer unchanged. Each word gets the chain of merges that builds it from its first letter
("r e" -> "re", "re d</w>" -> "red</w>").
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from transformers import CLIPTokenizer

from ldm_finetune.core.io import atomic_dir

BASE_VOCAB = Path(__file__).resolve().parent.parent / "assets" / "tiny_clip_tokenizer" / "vocab.json"
BYTE_SYMBOLS = 512  # the byte-level symbols and their "</w>" forms, the first ids of every CLIP vocabulary
SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def pieces(word: str) -> list[str]:
    """What CLIP's pre-tokenizer cuts a word into: letter runs, digits, other characters ("sf_dry" -> sf, _, dry)."""
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", word.lower())


def word_merges(word: str) -> list[tuple[str, str]]:
    """The merges that build `word` left to right, ending with its "</w>" token."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges, left = [], symbols[0]
    for right in symbols[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def write_word_tokenizer(words: list[str], out: Path, max_length: int = 77,
                         added: list[str] = ()) -> CLIPTokenizer:
    """Write a CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config) in which every word is one token.
    `added` words (with digits or symbols, which CLIP's pre-tokenizer cuts apart before any merge) become added
    tokens, matched whole before BPE, as Textual Inversion's placeholders are."""
    base = json.loads(BASE_VOCAB.read_text())
    vocab = {token: i for token, i in base.items() if i < BYTE_SYMBOLS}
    merges: list[tuple[str, str]] = []
    letter_words = list(dict.fromkeys(p for w in words for p in pieces(w) if p.isalpha() and len(p) > 1))

    def add(chain: list[tuple[str, str]]) -> None:
        for left, right in chain:
            if (left, right) not in merges:
                merges.append((left, right))
                vocab.setdefault(left + right, len(vocab))

    for word in letter_words:
        add(word_merges(word))
    for _ in range(8):
        # an earlier merge can cut into a later word ("r e" of "red" inside "green"); a last merge chain over the
        # pieces it leaves joins them (BPE applies merges by rank, so appended merges act after the others)
        tokenizer = _write(vocab, merges, out, max_length)
        split = {w: tokenizer.tokenize(w) for w in letter_words}
        split = {w: t for w, t in split.items() if len(t) != 1}
        if not split:
            return _add_tokens(tokenizer, list(added), out)
        for tokens in split.values():
            left = tokens[0]
            for right in tokens[1:]:
                add([(left, right)])
                left = left + right
    raise AssertionError(f"words that do not come out as one token: {sorted(split)}")


def _add_tokens(tokenizer: CLIPTokenizer, added: list[str], out: Path) -> CLIPTokenizer:
    if not added:
        return tokenizer
    tokenizer.add_tokens(added)
    with atomic_dir(out, overwrite=True) as tmp:
        tokenizer.save_pretrained(tmp)
        # transformers 5 saves tokenizer.json only; older ones (and CLIP's slow tokenizer) read vocab.json and
        # merges.txt, which added tokens leave unchanged (they are listed in tokenizer_config.json)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(out / name, tmp / name)
    return CLIPTokenizer.from_pretrained(out)


def _write(vocab: dict[str, int], merges: list[tuple[str, str]], out: Path, max_length: int) -> CLIPTokenizer:
    vocab = dict(vocab)
    for token in SPECIAL:
        vocab[token] = len(vocab)
    with atomic_dir(out, overwrite=out.exists()) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
        CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=max_length,
                      pad_token="<|endoftext|>").save_pretrained(tmp)
    return CLIPTokenizer.from_pretrained(out)

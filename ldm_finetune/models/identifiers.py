"""DreamBooth identifiers: rare words that are a single token in the model's tokenizer (Ruiz et al. 2023 pick rare
tokens so that the identifier carries little prior meaning; a word that splits into pieces binds to the concept
through several common tokens and drags their meaning along)."""

from __future__ import annotations

import re
from pathlib import Path

from transformers import CLIPTokenizer

from ldm_finetune.core.errors import UserError
from ldm_finetune.models.hub_ids import load_error
from ldm_finetune.models.stable_diffusion import check_model_source


def load_tokenizer(model: str):
    source = check_model_source(model, key="--model")
    try:
        return CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    except (OSError, ValueError) as exc:
        if source == model and not Path(source).exists():
            raise load_error(model, "--model", exc) from None
        raise UserError(f"--model {model}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None


def split(tokenizer, word: str) -> list[str]:
    return tokenizer.tokenize(word)


def rare_candidates(tokenizer, n: int = 20, min_len: int = 3, max_len: int = 4) -> list[tuple[str, int]]:
    """Whole-word tokens of 3-4 letters from the late (rare) end of the BPE merge order, rarest first."""
    vocab = tokenizer.get_vocab()
    start = int(len(vocab) * 0.6)  # BPE ids grow with merge order: late merges are rare strings
    found = []
    for token, token_id in vocab.items():
        if token_id < start or not token.endswith("</w>"):
            continue
        word = token[:-len("</w>")]
        if min_len <= len(word) <= max_len and re.fullmatch(r"[a-z]+", word) and len(split(tokenizer, word)) == 1:
            found.append((word, token_id))
    return sorted(found, key=lambda x: -x[1])[:n]


def run(model: str, check: list[str], n: int) -> list[str]:
    tokenizer = load_tokenizer(model)
    lines = []
    if check:
        bad = []
        for word in check:
            pieces = split(tokenizer, word)
            ok = len(pieces) == 1
            lines.append(f"{word:<16} {'one token' if ok else f'{len(pieces)} tokens {pieces}'}")
            if not ok:
                bad.append(word)
        if bad:
            print("\n".join(lines))
            raise UserError(f"{', '.join(bad)}: not a single token in {model}'s tokenizer; pick another "
                            "identifier (run without --check for candidates)")
        return lines
    lines.append(f"rare single-token identifiers in {model} (token id: higher = rarer BPE merge):")
    lines += [f"{word:<8} {token_id}" for word, token_id in rare_candidates(tokenizer, n)]
    return lines

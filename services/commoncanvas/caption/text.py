"""Caption hygiene: what a usable caption is, decided by pure functions."""

from __future__ import annotations

import re
from collections import Counter

_SPACE = re.compile(r"\s+")
MIN_WORDS_FOR_REPEAT_CHECK = 4


def clean_caption(text: str, prompt: str) -> str:
    """Strip, collapse whitespace, and remove the prompt if the model echoed it."""
    text = _SPACE.sub(" ", text).strip()
    prompt = _SPACE.sub(" ", prompt).strip()
    if prompt and text.lower().startswith(prompt.lower()):
        text = text[len(prompt) :].strip()
    return text


def caption_problem(caption: str) -> str:
    """'' for a usable caption, else the reason it is excluded."""
    words = caption.lower().split()
    if not words or not any(ch.isalnum() for ch in caption):
        return "empty-caption"
    if len(words) >= MIN_WORDS_FOR_REPEAT_CHECK:
        _, most = Counter(words).most_common(1)[0]
        if most * 2 > len(words):
            return "degenerate-caption: one word makes up more than half of the caption"
    return ""

"""Keyword router: picks the capability whose keywords best match a text.

Pure standard library and deterministic. The runtime calls :func:`handle` with
``{"intent", "input", "params", "state"}`` and gets ``{"output", "state"}`` back.

A keyword matches a word of the text when they are equal, or when the keyword has at least four
letters and starts the word ("summar" matches "summarize" and "summary"); a keyword of several
words matches that phrase. A capability scores the number of its keywords that match; the best
score wins, ties going to the capability named first. With no match, the ``fallback`` parameter
names the capability (score 0).
"""

from __future__ import annotations

import re
from typing import Any

#: Used when the task brings no capabilities of its own.
DEFAULT_CAPABILITIES: dict[str, list[str]] = {
    "summarize": ["summar", "shorten", "condense", "tl;dr", "key points", "gist", "abstract", "digest"],
    "calculate": ["calculat", "compute", "sum", "plus", "minus", "times", "multiply", "divide", "percent",
                  "math", "arithmetic", "total"],
    "translate": ["translat", "french", "german", "spanish", "english", "language"],
    "search": ["search", "find", "look up", "lookup", "where", "locate"],
    "schedule": ["schedul", "meeting", "calendar", "tomorrow", "appointment", "remind"],
}

_WORD = re.compile(r"[a-z0-9]+(?:[;'][a-z]+)*")


def words_of(text: str) -> list[str]:
    """Lowercase words of ``text`` (keeping ``tl;dr`` and ``don't`` whole)."""
    return _WORD.findall(text.lower())


def matches(keyword: str, words: list[str]) -> bool:
    """Whether ``keyword`` (a word, a word stem of 4+ letters, or a phrase) occurs in ``words``."""
    parts = words_of(keyword)
    if not parts:
        return False
    if len(parts) > 1:
        n = len(parts)
        return any(words[i:i + n] == parts for i in range(len(words) - n + 1))
    key = parts[0]
    return any(w == key or (len(key) >= 4 and w.startswith(key)) for w in words)


def route(text: str, capabilities: dict[str, list[str]], fallback: str) -> dict[str, Any]:
    """The best capability for ``text``, its score and the keywords that matched."""
    words = words_of(text)
    best, best_score, best_matched = fallback, 0, []
    for name, keywords in capabilities.items():
        matched = [k for k in keywords if matches(k, words)]
        if len(matched) > best_score:
            best, best_score, best_matched = name, len(matched), matched
    return {"capability": best, "score": best_score, "matched": best_matched}


def handle(request: dict[str, Any]) -> dict[str, Any]:
    """Run one task: intent ``route``, input ``{text, capabilities?}``, output ``{capability, score, matched}``."""
    intent = request.get("intent")
    if intent != "route":
        raise ValueError(f"unknown intent {intent!r}: this agent only routes")
    data = request.get("input") or {}
    params = request.get("params") or {}
    capabilities = data.get("capabilities") or DEFAULT_CAPABILITIES
    return {"output": route(str(data["text"]), capabilities, str(params.get("fallback", "general")))}

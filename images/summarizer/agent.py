"""Extractive summarizer: keeps the sentences whose words are most frequent in the text.

Pure standard library and deterministic. The runtime calls :func:`handle` with
``{"intent", "input", "params", "state"}`` and gets ``{"output", "state"}`` back.

Each sentence scores the mean document frequency of its content words (stopwords dropped);
the top N sentences are kept in their original order, ties going to the earlier sentence.
The agent's state lists the ids of the documents it has summarized (``work_items``), so
merging two summarizers unions their work and splitting one deals its work out.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Any

STOPWORDS = frozenset({
    "a", "about", "above", "after", "again", "against", "all", "also", "am", "an", "and", "any", "are", "as", "at",
    "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could", "did",
    "do", "does", "doing", "down", "during", "each", "few", "for", "from", "further", "had", "has", "have",
    "having", "he", "her", "here", "hers", "herself", "him", "himself", "his", "how", "i", "if", "in", "into", "is",
    "it", "its", "itself", "just", "me", "more", "most", "my", "myself", "no", "nor", "not", "now", "of", "off",
    "on", "once", "only", "or", "other", "our", "ours", "ourselves", "out", "over", "own", "same", "she", "should",
    "so", "some", "such", "than", "that", "the", "their", "theirs", "them", "themselves", "then", "there", "these",
    "they", "this", "those", "through", "to", "too", "under", "until", "up", "very", "was", "we", "were", "what",
    "when", "where", "which", "while", "who", "whom", "why", "will", "with", "would", "you", "your", "yours",
    "yourself", "yourselves",
})

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``: split after '.', '!' or '?' followed by whitespace."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def content_words(sentence: str) -> list[str]:
    """Lowercase words of ``sentence`` that are not stopwords."""
    return [w for w in _WORD.findall(sentence.lower()) if w not in STOPWORDS]


def summarize(text: str, count: int) -> list[str]:
    """The ``count`` best sentences of ``text``, in their original order."""
    sentences = split_sentences(text)
    words = [content_words(s) for s in sentences]
    frequency = Counter(w for ws in words for w in ws)

    def score(i: int) -> float:
        return sum(frequency[w] for w in words[i]) / len(words[i]) if words[i] else 0.0

    best = sorted(range(len(sentences)), key=lambda i: (-score(i), i))[:count]
    return [sentences[i] for i in sorted(best)]


def document_id(text: str) -> str:
    """A stable id for a text without one: ``doc-`` and 12 hex digits of its SHA-256."""
    return "doc-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def handle(request: dict[str, Any]) -> dict[str, Any]:
    """Run one task: intent ``summarize``, input ``{text, sentences?, document_id?}``."""
    intent = request.get("intent")
    if intent != "summarize":
        raise ValueError(f"unknown intent {intent!r}: this agent only summarizes")
    data = request.get("input") or {}
    params = request.get("params") or {}
    limit = int(params.get("max_sentences", 3))
    count = min(int(data.get("sentences", limit)), limit)
    chosen = summarize(str(data["text"]), count)
    state = dict(request.get("state") or {})
    done = list(state.get("work_items", []))
    doc = str(data.get("document_id") or document_id(str(data["text"])))
    if doc not in done:
        done.append(doc)
    state["work_items"] = done
    return {"output": {"summary": " ".join(chosen), "sentences": chosen}, "state": state}

"""How sure the AV was of each sentence it wrote, and an explanation less the sentences it was not.

An AV that cannot read something off its vector still writes a word there, and on a small base it
writes many: the shipped 135M NLA's topic words are found in their context ~15% of the time, which
is also all that a probe trained for exactly that gets from the vector (bench/context_probe.py).
The AV knows when it is guessing: the content words it chooses with a probability of 0.7 or more
are right 90% of the time, those under 0.05 12% (bench/confidence_curve.py, bench/RESULTS.md). So a sentence is
as sure as its least sure content word, and `--min-confidence P` keeps only the sentences at P or
above: fewer claims, more of them true. Off by default (the explanation as written); `nla-cli eval`
always reports it as a probe, so the trade between FVE and faithfulness is measured on every run.
"""
from __future__ import annotations

import math
import re

import torch

from .metrics import content_words

# an end mark after a word, not after an enumerator: "1. Cooking. 2. Salt." is two sentences
_SENTENCE_END = re.compile(r"(?<=[^\d\s][.!?;])\s+|\s*\n+\s*")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def word_probs(tok, ids: list[int], logprobs: list[float]) -> tuple[str, list[tuple[int, int, float]]]:
    """The decoded response and its words as (start, end, p): a word starts at a token whose text
    begins with whitespace (or follows one that ends with it), and its p is the probability of its
    first token with a letter or digit in it, the choice of the word (an opening quote before it is
    format; later tokens mostly just spell the word out)."""
    text, ends = tok.decode(ids, skip_special_tokens=True), []
    for k in range(len(ids)):
        ends.append(min(len(text), len(tok.decode(ids[:k + 1], skip_special_tokens=True))))
    words, start = [], 0
    for k, end in enumerate(ends):
        piece = text[start:end]
        if piece:
            if not words or piece[0].isspace() or text[start - 1].isspace():
                words.append([start + len(piece) - len(piece.lstrip()), end, None])
            words[-1][1] = end
            if words[-1][2] is None and any(c.isalnum() for c in piece):
                words[-1][2] = math.exp(logprobs[k])
        start = max(start, end)
    return text, [(a, b, 1.0 if p is None else p) for a, b, p in words]


def sentence_confidence(tok, ids: list[int], logprobs: list[float], explanation: str) -> list[tuple[str, float]]:
    """Each sentence of `explanation` (the text of a response `ids`) with the probability of its
    least sure content word; 1.0 for a sentence with no content words (it claims nothing)."""
    text, words = word_probs(tok, ids, logprobs)
    at = text.find(explanation) if explanation else -1
    out, cur = [], 0
    for s in sentences(explanation):
        a = explanation.find(s, cur)
        cur = a + len(s)
        if at < 0:  # the text is not a substring of its own decode: nothing to align, claim nothing
            out.append((s, 1.0))
            continue
        a += at
        b = a + len(s)
        ps = [p for ws, we, p in words if ws < b and we > a and content_words(text[max(ws, a):min(we, b)])]
        out.append((s, min(ps) if ps else 1.0))
    return out


def keep_confident(scored: list[tuple[str, float]], min_p: float) -> str:
    return " ".join(s for s, p in scored if p >= min_p)


@torch.no_grad()
def sample_logprobs(nla, vectors: torch.Tensor, samples: list, batch_size: int = 16) -> list[list[float]]:
    """Each sample's per-token log-probs under the AV that wrote it, from its own vector."""
    from .verbalizer import response_logprobs
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        vec = vectors[i:i + batch_size].float().to(nla.av.device)
        lp, _ = response_logprobs(nla.av, nla.spec, vec, [s.ids for s in chunk], role=nla.av_role)
        lp = lp.float().cpu()
        out += [lp[j, :len(s.ids)].tolist() for j, s in enumerate(chunk)]
    return out


def scored_sentences(nla, vectors: torch.Tensor, samples: list, batch_size: int = 16) -> list[list[tuple[str, float]]]:
    """Each sample's sentences with their confidence (keep_confident gates them at any threshold)."""
    lps = sample_logprobs(nla, vectors, samples, batch_size)
    return [sentence_confidence(nla.av.tokenizer, s.ids, lp, s.text) for s, lp in zip(samples, lps)]


def confident(nla, vectors: torch.Tensor, samples: list, min_p: float, batch_size: int = 16) -> list[str]:
    """Each sample's explanation less its sentences under `min_p` (as written when min_p is 0)."""
    if min_p <= 0:
        return [s.text for s in samples]
    return [keep_confident(sc, min_p) for sc in scored_sentences(nla, vectors, samples, batch_size)]

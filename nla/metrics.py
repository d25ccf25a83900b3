"""Explain-then-reconstruct scoring of a set of activations: the number every stage reports."""
from __future__ import annotations

import re

import torch

from .reconstructor import reconstruct
from .reward import cosine, mse
from .verbalizer import generate


@torch.no_grad()
def explain_and_score(base, spec, head, vectors: torch.Tensor, max_new: int, temperature: float = 0.0,
                      batch_size: int = 16, av_input: torch.Tensor | None = None, seed: int = 0) -> dict:
    """The AV explains `av_input` (default: the vectors themselves), the AR reconstructs from the
    text, and the reconstruction is scored against `vectors`. Failed explanations score as the
    AR's reading of whatever text there is (no -2 here: this is a metric, not a reward)."""
    av_input = vectors if av_input is None else av_input
    g = torch.Generator(device=base.device).manual_seed(seed) if temperature > 0 else None
    texts, oks = [], []
    for i in range(0, len(vectors), batch_size):
        for s in generate(base, spec, av_input[i:i + batch_size].to(base.device), max_new, temperature, generator=g):
            texts.append(s.text)
            oks.append(s.ok)
    return score_texts(base, spec, head, texts, vectors, batch_size) | {"ok_frac": sum(oks) / len(oks)}


@torch.no_grad()
def score_texts(base, spec, head, texts: list[str], vectors: torch.Tensor, batch_size: int = 16) -> dict:
    preds = torch.cat([reconstruct(base, spec, head, texts[i:i + batch_size]).cpu()
                       for i in range(0, len(texts), batch_size)])
    m = mse(preds, vectors.cpu())
    return dict(fve=float(1 - m.mean() / spec.mse_mean), cos=float(cosine(preds, vectors.cpu()).mean()),
                mse=float(m.mean()), texts=texts, row_fve=(1 - m / spec.mse_mean).tolist())


def score_vectors(preds: torch.Tensor, targets: torch.Tensor, mse_mean: float | None) -> dict:
    """FVE, cosine and MSE of predicted vectors against targets, overall and per row. Every
    eval baseline goes through this one function, so rows of a report are comparable by
    construction; mse_mean None (unknown) leaves FVE out rather than guessing it."""
    preds, targets = preds.float().cpu(), targets.float().cpu()
    m, c = mse(preds, targets), cosine(preds, targets)
    fve = None if mse_mean is None else float(1 - m.mean() / mse_mean)
    row_fve = None if mse_mean is None else (1 - m / mse_mean).tolist()
    return dict(fve=fve, cos=float(c.mean()), mse=float(m.mean()), row_fve=row_fve, row_cos=c.tolist(),
                row_mse=m.tolist())


def token_hits(texts: list[str], tokens: list[str]) -> float:
    """Fraction of explanations that quote their token ("…" around the stripped token). Tokens
    that are only whitespace count as misses: no explanation can quote them recognisably."""
    return sum(bool(t.strip()) and f'"{t.strip()}"' in x for x, t in zip(texts, tokens)) / max(1, len(texts))


# Function words say nothing about a context, and almost any 40-word window contains some of
# them, so counting them would lift the NLA and chance alike and shrink the gap between the two.
STOPWORDS = frozenset("""
    the and for are but not you all any can had her was one our out has his how its may now
    who did get him let say she too use yet nor off own per via etc
    that this with from they have were been what when where which while will would there their
    them then than these those some such into onto over also just very more most other about
    after before each only your being because could should does doing here itself like upon
    both same few many much even still shall might must within without between through during
    again once under above below whose whom until though although
""".split())
# The scaffolding of the AV/AR prompts and of the warm-start summaries ("Topic: ... Last words:
# "..." Final token: "..."", "The text is about"): an explanation writes these because of its
# format, not because of its activation, and a context that happens to contain "text" or "last"
# would turn them into hits that say nothing about faithfulness.
TEMPLATE_WORDS = frozenset("""
    topic text last words word final token tokens about explanation explanations context
    activation vector concept hidden state language model represents describe snippet snippets
    unclear subject
""".split())
_LETTERS = re.compile(r"[^\W\d_]+")


def _stem(w: str) -> str:
    """A light plural strip, applied to both sides, so "boats" meets "boat" and "cities" meets
    "city"; "ss", "us" and "is" endings are kept ("glass", "bus", "analysis" are not plurals)."""
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith(("ches", "shes", "xes", "zes", "sses")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def content_words(text: str) -> set[str]:
    """The stems of an explanation's content words: lowercased runs of >= 3 letters, less
    STOPWORDS and TEMPLATE_WORDS. A set: a looping explanation that repeats one word ten times
    is one claim about its context, not ten."""
    words = (w for w in _LETTERS.findall(text.lower()) if len(w) >= 3)
    return {_stem(w) for w in words if w not in STOPWORDS and w not in TEMPLATE_WORDS}


def context_words(prefix: str, window: int = 40) -> set[str]:
    """The stems of the words in the last `window` whitespace-separated words of a prefix (the
    same split the warm start's "Last words" use), every length kept: a context word is a
    possible match, not a claim."""
    tail = " ".join(prefix.split()[-window:]) if window > 0 else ""
    return {_stem(w) for w in _LETTERS.findall(tail.lower())}


def content_hit_counts(texts: list[str], contexts: list[str], window: int = 40) -> list[tuple[int, int]]:
    """Per explanation: (content words found in its context's last `window` words, content words)."""
    if len(texts) != len(contexts):
        raise ValueError(f"{len(texts)} explanations but {len(contexts)} contexts")
    out = []
    for x, c in zip(texts, contexts):
        words = content_words(x)
        out.append((len(words & context_words(c, window)), len(words)))
    return out


def content_hits(texts: list[str], contexts: list[str], window: int = 40) -> float:
    """The faithfulness test: the fraction of all explanations' content words that occur in their
    own activation's recent context, micro-averaged (pooled over explanations) so that a
    two-word explanation does not weigh as much as a twenty-word one. 0.0 when there are no
    content words at all. Scored against another activation's context, it is the chance level."""
    counts = content_hit_counts(texts, contexts, window)
    return sum(h for h, _ in counts) / max(1, sum(n for _, n in counts))

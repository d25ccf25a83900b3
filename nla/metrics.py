"""Explain-then-reconstruct scoring of a set of activations: the number every stage reports."""
from __future__ import annotations

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

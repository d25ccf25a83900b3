"""How much of its recent context can one activation tell? The ceiling for an explanation's
topic words.

An NLA's topic words are right when they occur in the activation's last 40 words (the faithfulness
test of `nla-cli eval`). Before training an AV to name them, this asks whether the vector carries
them at all: a linear bag-of-words probe is trained, on the dataset's training splits, to predict
which content words occur in that window (less the last words, which the quote already says), and
its top-ranked words are checked on the held-out split. Next to it: the same check for the most
common words (the prior, what an AV that ignored the vector would say). Run it on datasets
collected at different layers to see which layer knows most about its context.

    python bench/context_probe.py ACTS [ACTS ...] [--epochs 20] [--curve]

Early stopping uses a tenth of the training documents; the held-out split is scored once.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script or -m

import argparse
from collections import Counter

import torch

from nla.collect import SPLITS, load_activations, normalise
from nla.errors import NLAError
from nla.evaluate import CONTENT_WINDOW
from nla.metrics import content_words
from nla.warmstart import LAST_WORDS


def topic_targets(prefix: str) -> set[str]:
    """Content-word stems of the last CONTENT_WINDOW words, less those of the last LAST_WORDS."""
    words = prefix.split()
    return content_words(" ".join(words[-CONTENT_WINDOW:])) - content_words(" ".join(words[-LAST_WORDS:]))


def precision_at(scores: torch.Tensor, y: torch.Tensor, k: int) -> float:
    return y.gather(1, scores.topk(k, dim=1).indices).mean().item()


def probe(acts, path: str, epochs: int, min_count: int, seed: int, share: float = 1.0) -> dict:
    """Train on `share` of the training documents (a learning curve says whether more documents
    would help), score on the whole held-out split."""
    x = normalise(acts.vectors)
    targets = [topic_targets(p) for p in acts.prefixes]
    held = acts.split == SPLITS.index("heldout")
    if not held.any() or held.all():
        raise NLAError(f"{path}: needs both a held-out split and training splits")
    doc_hash = (acts.doc_id * 2654435761) % 1000  # a fixed hash of the document, whatever its id's pattern
    val = ~held & (doc_hash % 10 == 7)  # early stopping on whole documents, not the held-out split
    fit = ~held & ~val & (doc_hash < share * 1000)
    if not val.any() or not fit.any():
        raise NLAError(f"{path}: too few training documents to fit and validate a probe")
    counts = Counter(w for t, f in zip(targets, fit.tolist()) if f for w in t)
    vocab = [w for w, n in counts.most_common() if n >= min_count]
    if not vocab:
        raise NLAError(f"{path}: no content word occurs {min_count} times; too few activations to probe")
    index = {w: i for i, w in enumerate(vocab)}
    y = torch.zeros(len(targets), len(vocab))
    for i, t in enumerate(targets):
        for w in t:
            if w in index:
                y[i, index[w]] = 1.0
    torch.manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], len(vocab))
    prior = y[fit].mean(0).clamp(1e-4, 1 - 1e-4)
    with torch.no_grad():  # start at the prior, so epoch 0 is the no-vector baseline
        lin.weight.zero_()
        lin.bias.copy_(torch.log(prior / (1 - prior)))
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3)
    xf, yf = x[fit], y[fit]
    best, best_state, best_epoch = -1.0, {k: v.clone() for k, v in lin.state_dict().items()}, 0
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(xf))
        for b in range(0, len(xf), 512):
            j = perm[b:b + 512]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(xf[j]), yf[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            p = precision_at(lin(x[val]), y[val], 1)
        if p > best:
            best, best_epoch = p, epoch
            best_state = {k: v.clone() for k, v in lin.state_dict().items()}
    lin.load_state_dict(best_state)
    with torch.no_grad():
        s = lin(x[held])
    yh = y[held]
    prior_s = prior.log().expand_as(s)
    return dict(path=path, share=share, layer=acts.meta.get("layer"), n_fit=int(fit.sum()), n_held=int(held.sum()),
                vocab=len(vocab), epoch=best_epoch,
                p1=precision_at(s, yh, 1), p3=precision_at(s, yh, 3),
                prior1=precision_at(prior_s, yh, 1), prior3=precision_at(prior_s, yh, 3))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("acts", nargs="+", help="activation datasets (nla-cli collect --out)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--min-count", type=int, default=5, help="words seen fewer times in training are not probed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--curve", action="store_true", help="also train on 1/4 and 1/2 of the training documents")
    a = ap.parse_args()
    shares = (0.25, 0.5, 1.0) if a.curve else (1.0,)
    try:
        rows = []
        for p in a.acts:
            acts = load_activations(p)
            rows += [probe(acts, p, a.epochs, a.min_count, a.seed, s) for s in shares]
    except NLAError as e:
        sys.exit(f"error: {e}")
    print(f"topic words from the activation alone: precision of the probe's top words on the held-out split "
          f"(found in the last {CONTENT_WINDOW} words, less the last {LAST_WORDS})")
    print(f"{'dataset':<28} {'layer':>5} {'docs':>5} {'fit':>6} {'held':>5} {'vocab':>5} {'ep':>3} "
          f"{'probe@1':>8} {'probe@3':>8} {'prior@1':>8} {'prior@3':>8}")
    for r in rows:
        print(f"{r['path'][-28:]:<28} {r['layer']!s:>5} {r['share']:>5.0%} {r['n_fit']:>6} {r['n_held']:>5} {r['vocab']:>5} {r['epoch']:>3} "
              f"{r['p1']:>8.1%} {r['p3']:>8.1%} {r['prior1']:>8.1%} {r['prior3']:>8.1%}")


if __name__ == "__main__":
    main()

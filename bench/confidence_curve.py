"""Does the AV know when it is guessing? Its content words, bucketed by the probability it wrote
them with, and the share of each bucket found in the activation's recent context (the faithfulness
test of `nla-cli eval`), for each part of the warm-start format. This is the measurement behind
`--min-confidence` (nla/confidence.py): a threshold is worth having only if the share rises with p.

    python bench/confidence_curve.py CHECKPOINT ACTS [--split heldout] [--max-n 200]

Greedy explanations of the same seeded subset `nla-cli eval --max-n` scores.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script or -m

import argparse

from bench.explanation_parts import QUOTE, TOKEN, TOPIC
from nla import reference
from nla.collect import load_activations
from nla.confidence import sample_logprobs, word_probs
from nla.errors import NLAError
from nla.evaluate import CONTENT_WINDOW, _take
from nla.metrics import content_words, context_words
from nla.models import load_base

EDGES = (0.0, 0.05, 0.1, 0.2, 0.4, 0.7, 1.01)


def part_of(text: str, a: int, b: int) -> str:
    """Which part of the format the word at [a, b) of an explanation falls in (a word's span may
    take in the quote marks and the full stop around the part's content)."""
    for name, rx in (("token", TOKEN), ("last words", QUOTE), ("topic", TOPIC)):
        for m in rx.finditer(text):
            if m.start(1) - 1 <= a and b <= m.end(1) + 2:
                return name
    return "other"


def explanation_words(tok, ids: list[int], logprobs: list[float], explanation: str) -> list[tuple[str, str, float]]:
    """(word, part, p) for each word of an explanation, as the AV wrote it; the closing tag, which
    the tokenizer may glue to the last word, is cut off."""
    text, words = word_probs(tok, ids, logprobs)
    at = max(0, text.find(explanation))
    end = at + len(explanation)
    return [(text[ws:min(we, end)], part_of(explanation, ws - at, min(we, end) - at), p)
            for ws, we, p in words if ws < end]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("acts")
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--max-n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()
    try:
        acts = load_activations(a.acts)
        acts = _take(acts.select(a.split), a.max_n, 0)
        loc = reference.locate(a.checkpoint)
        nla = reference.load(loc, load_base(acts.meta["model"], device="cpu") if loc.layout == "native" else None, "cpu")
    except NLAError as e:
        sys.exit(f"confidence_curve: {e}")
    vec, tok = acts.vectors.float(), nla.av.tokenizer
    samples = nla.explain_all(vec, 64, 0.0, 0, a.batch_size)
    buckets = {}  # (part, bucket) -> [found, words]
    for i, (s, lp) in enumerate(zip(samples, sample_logprobs(nla, vec, samples, a.batch_size))):
        ctx = context_words(acts.prefixes[i], CONTENT_WINDOW)
        for word, part, p in explanation_words(tok, s.ids, lp, s.text):
            w = content_words(word)
            if not w:
                continue
            k = next(b for b in range(len(EDGES) - 1) if p < EDGES[b + 1])
            for cell_part in (part, "all"):
                cell = buckets.setdefault((cell_part, k), [0, 0])
                cell[0] += len(w & ctx)
                cell[1] += len(w)
    print(f"{loc}: {len(samples)} greedy explanations of {a.acts} ({a.split}); share of content words found "
          f"in the last {CONTENT_WINDOW} words of context, by the probability the AV wrote them with")
    head = [f"p {EDGES[k]:g}-{min(1, EDGES[k + 1]):g}" for k in range(len(EDGES) - 1)]
    print(f"{'part':<11}" + "".join(f"{h:>15}" for h in head))
    for part in ("token", "last words", "topic", "other", "all"):
        cells = [buckets.get((part, k), [0, 0]) for k in range(len(EDGES) - 1)]
        if sum(c[1] for c in cells):
            print(f"{part:<11}" + "".join(f"{(f'{f / n:.0%} of {n}' if n else '-'):>15}" for f, n in cells))


if __name__ == "__main__":
    main()

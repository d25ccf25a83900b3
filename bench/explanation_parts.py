"""Which parts of an NLA's explanations are true of their text: the faithfulness test of
`nla-cli eval`, broken down by the three parts of the warm-start format (quoted token, quoted last
words, topic words), and the quote word by word from its end.

It reads an eval report (report.json, whose per-activation rows hold the explanations) and the
activation dataset it was run on, so it costs nothing to rerun. It shows where invented words
come from, and what the faithfulness score would be if the explanations claimed less.

    python bench/explanation_parts.py RUN/eval-heldout/report.json ACTS [--split heldout] [--checkpoint RUN/rl]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script or -m

import argparse
import json
import re
from collections import defaultdict

from nla import warmstart
from nla.collect import load_activations
from nla.errors import NLAError
from nla.evaluate import CONTENT_WINDOW as WINDOW
from nla.evaluate import _take
from nla.metrics import content_hits, content_words, context_words


def _leads(templates: list[str]) -> str:
    """An alternation of what the warm start's wordings of one part write before its content."""
    return "(?:" + "|".join(re.escape(t.split("{}")[0]) for t in templates) + ")"


QUOTE = re.compile(_leads(warmstart.LAST) + r'(.*?)"\.?(?=\s|$)')
TOKEN = re.compile(_leads(warmstart.FINAL) + r'(.*?)"\.')
TOPIC = re.compile(_leads(warmstart.TOPIC) + r'([^."]*)\.')


def trimmed(x: str, quote_words: int, topic_words: int) -> str:
    """The explanation with its quote cut to its last `quote_words` and its topic to its first
    `topic_words` (0 drops the part's content)."""
    x = QUOTE.sub(lambda m: m.group(0).replace(m.group(1), " ".join(m.group(1).split()[-quote_words:])
                                               if quote_words else ""), x)

    def topic(m):
        ws = [w.strip() for w in re.split(r",| and ", m.group(1)) if w.strip()]
        return m.group(0).replace(m.group(1), ", ".join(ws[:topic_words])) if topic_words else ""
    return TOPIC.sub(topic, x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("acts")
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--checkpoint", default="", help="also score the explanations less each part with this NLA's AR")
    a = ap.parse_args()
    try:
        r = json.load(open(a.report))
        acts = _take(load_activations(a.acts).select(a.split), r["n"], r["seed"])  # the rows eval scored
    except (OSError, ValueError, KeyError, NLAError) as e:
        sys.exit(f"explanation_parts: cannot read {a.report} with {a.acts}: {e}")
    rows = r["per_activation"]
    if len(rows) != len(acts) or any(int(acts.pos[i]) != p["pos"] for i, p in enumerate(rows)):
        sys.exit(f"{a.report} was not run on {a.acts} split {a.split}")
    texts, ctx = [p["explanation"] for p in rows], acts.prefixes
    print(f"{a.report}: {len(rows)} explanations; content words found in the last {WINDOW} words of context")
    print(f"{'part':12} {'found':>6} {'words':>6} {'share':>6} {'words/expl':>10}")
    for name, rx in (("token", TOKEN), ("last words", QUOTE), ("topic", TOPIC), ("whole", None)):
        found = total = 0
        for x, c in zip(texts, ctx):
            m = rx.search(x) if rx else None
            if rx and not m:
                continue
            w = content_words(m.group(1) if rx else x)
            found, total = found + len(w & context_words(c, WINDOW)), total + len(w)
        print(f"{name:12} {found:6d} {total:6d} {found / max(1, total):6.0%} {total / len(rows):10.2f}")

    by_pos = defaultdict(lambda: [0, 0])
    for x, c in zip(texts, ctx):
        m = QUOTE.search(x)
        if m:
            cw = context_words(c, WINDOW)
            for i, w in enumerate(reversed(m.group(1).split())):
                if content_words(w):
                    by_pos[i][0] += bool(content_words(w) & cw)
                    by_pos[i][1] += 1
    print("\nquoted last words, from the end: share of content words found in the context")
    print("  " + "  ".join(f"-{i}: {h / n:.0%} of {n}" for i, (h, n) in sorted(by_pos.items())[:8]))

    print("\nthe whole explanation's score if it claimed less (rows: quote words kept; columns: topic words kept)")
    print("      " + "".join(f"{f'topic {j}':>9}" for j in (0, 1, 2, 4)))
    for k in (0, 1, 2, 3, 6):
        print(f"quote {k}" + "".join(f"{content_hits([trimmed(x, k, j) for x in texts], ctx, WINDOW):9.0%}"
                                     for j in (0, 1, 2, 4)))

    if a.checkpoint:  # what each part is worth to the AR: FVE of the explanations less that part
        from nla import reference
        from nla.metrics import score_vectors
        from nla.models import load_base
        try:
            loc = reference.locate(a.checkpoint)
            nla = reference.load(loc, load_base(acts.meta["model"], device="cpu") if loc.layout == "native" else None,
                                 "cpu")
        except NLAError as e:
            sys.exit(f"explanation_parts: --checkpoint {a.checkpoint}: {e}")
        print(f"\nFVE when the AR of {loc} reads the explanations less a part (MSE_mean {r['mse_mean']:.4f})")
        for name, (k, j) in (("as written", (99, 99)), ("no topic words", (99, 0)), ("no quoted last words", (0, 99)),
                             ("token only", (0, 0))):
            read = texts if name == "as written" else [trimmed(x, k, j) for x in texts]
            fve = score_vectors(nla.reconstruct(read), acts.vectors.float(), r["mse_mean"])["fve"]
            print(f"  {name:<22} {fve:.3f}")


if __name__ == "__main__":
    main()

"""Collector throughput vs a plain transformers forward, on the same batches, in one run.

Our collector runs blocks 0..L only and no LM head; the baseline is what people usually write:
`model(ids, output_hidden_states=True).hidden_states[L+1]`. From FLOPs, SmolLM2-135M at layer
20 of 30 should give about 1.8x (21/30 of the blocks, and no 49k-vocab head, which is ~20% of
this small model's forward). Below 1.5x means something is wasted.

    python bench/collect.py [--model smollm2] [--layer 20] [--batches 6] [--batch-size 8] [--seq 256]
"""
import argparse
import statistics
import time

import torch

from nla.corpus import read_corpus
from nla.models import load_base, residual


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layer", type=int, default=20)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    base = load_base(a.model, device=a.device)
    tok, dev = base.tokenizer, base.device
    docs = read_corpus("embedded")
    batches = []
    for b in range(a.batches):
        chunk = docs[b * a.batch_size:(b + 1) * a.batch_size]
        enc = tok(chunk, truncation=True, max_length=a.seq, padding="max_length", return_tensors="pt")
        batches.append((enc["input_ids"].to(dev), enc["attention_mask"].to(dev)))
    n_tok = sum(int(m.sum()) for _, m in batches)

    def ours():
        for ids, m in batches:
            residual(base.model, a.layer, ids, m)

    def plain():
        for ids, m in batches:
            base.model(input_ids=ids, attention_mask=m, output_hidden_states=True).hidden_states[a.layer + 1]

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.inference_mode():
        ids, m = batches[0]
        h_ours = residual(base.model, a.layer, ids, m)
        h_plain = base.model(input_ids=ids, attention_mask=m, output_hidden_states=True).hidden_states[a.layer + 1]
        err = float((h_ours - h_plain).abs().max() / h_plain.abs().max())
        ours(), plain()  # warm-up
        t_ours, t_plain = [], []
        for _ in range(a.repeats):  # interleaved: this machine's speed drifts
            t_ours.append(timed(ours))
            t_plain.append(timed(plain))
    to, tp = statistics.median(t_ours), statistics.median(t_plain)
    print(f"model {base.name} layer {a.layer}/{base.n_layers} on {dev} ({torch.get_num_threads()} threads), "
          f"{a.batches}x{a.batch_size}x{a.seq} tokens, max rel diff {err:.1e}")
    print(f"plain forward + output_hidden_states: {n_tok / tp:10,.0f} tok/s")
    print(f"nla early exit (blocks 0..{a.layer}, no head): {n_tok / to:10,.0f} tok/s")
    print(f"speed-up: {tp / to:.2f}x  (FLOP estimate ~1.8x; < 1.5x means waste)")


if __name__ == "__main__":
    main()

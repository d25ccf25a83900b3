"""RL step time and rollout tokens/s on the embedded model, Triton kernels on and off, one run.

Each mode runs the same seeded steps (sampling, AR step, GRPO step); kernels are switched with
NLA_KERNELS, which the dispatcher reads at every call. On CPU only the torch path is real
(Triton needs CUDA, or its interpreter, which is far too slow to time), so CPU runs time torch.

    python bench/rl_step.py [--steps 3] [--acts 8] [--group 8] [--max-new 64] [--layer 20]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script or -m

import argparse
import os
import statistics

import torch

from bench.common import Timer, nla_on
from nla.grpo import update
from nla.models import load_base, residual
from nla.verbalizer import generate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layer", type=int, default=20)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--acts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--micro", type=int, default=0)
    ap.add_argument("--load-in-4bit", action="store_true")
    a = ap.parse_args()
    base = load_base(a.model, load_in_4bit=a.load_in_4bit)
    dev = base.device
    modes = ["torch", "triton"] if dev.type == "cuda" else ["torch"]
    ids = torch.randint(100, 20000, (a.acts, 40), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        vec = residual(base.model, a.layer, ids)[:, -1].float()
    spec, head, opt_av, opt_ar = nla_on(base, a.layer, scale=float(vec.norm(dim=-1).mean()))
    rows = []
    for mode in modes:
        os.environ["NLA_KERNELS"] = mode
        gen_s, upd_s, toks = [], [], []
        for step in range(a.steps + 1):  # first step is warm-up (compilation, allocator)
            g = torch.Generator(device=dev).manual_seed(step)
            vecs = vec.repeat_interleave(a.group, 0)
            with Timer(dev) as tg:
                samples = generate(base, spec, vecs, a.max_new, 1.0, generator=g)
            with Timer(dev) as tu:
                update(base, spec, head, vecs, samples, opt_av, opt_ar, a.group, 0.01, 0.2, micro=a.micro)
            if step:
                gen_s.append(tg.s)
                upd_s.append(tu.s)
                toks.append(sum(len(s.ids) for s in samples))
        g, u, t = statistics.median(gen_s), statistics.median(upd_s), statistics.median(toks)
        rows.append((mode, g + u, g, u, t / g))
    print(f"{base.name} L{a.layer} on {dev}, {a.acts} acts x G={a.group}, cap {a.max_new} tokens, {a.steps} timed steps")
    print(f"{'kernels':8} {'step s':>8} {'rollout s':>10} {'update s':>9} {'rollout tok/s':>14}")
    for mode, s, g, u, tps in rows:
        print(f"{mode:8} {s:8.2f} {g:10.2f} {u:9.2f} {tps:14.0f}")
    if len(rows) == 2:
        print(f"speed-up of a step with Triton kernels: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()

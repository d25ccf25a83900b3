"""RL step speed: our rollout loop against the plain reference loop and Hugging Face `generate`,
the update's phases, Triton kernels on and off, and the memory roofline of a decode step.

All loops run in one process on the same model, batch and cap, so the ratios are fair on a noisy
machine. The roofline: one decode step must read every weight once, so its floor is
weight bytes / measured copy bandwidth, and tokens/s can be at most batch / that floor.
Random-weight models (`--shape`) never close their tag, so every row runs to the cap: the worst
case, and the same work for every loop. For the update, every sample is marked closed, so the AR
step reads all of them too (on a random model they would all be failures and skip it).

    python bench/rl_step.py [--shape smollm2|qwen2.5-1.5b|qwen2.5-7b | --model smollm2] [--nf4]
        [--acts 8] [--group 8] [--max-new 150] [--steps 3] [--micro 0] [--loops ours,reference,hf] [--profile]
--profile adds one profiled update (AR step + GRPO step) per kernel mode and prints its top ops by
self time on the device: where the update's time goes, before anything is cut from it;
--profile-decode does the same for one rollout of the fastest of our loops.
On CPU (no --shape): the embedded SmolLM2, torch kernels, HF generate with its default cache.
"ours" samples with each LoRA merged into a copy of its weight where the base allows it (not
4-bit); "ours-adapters" is the same loop with the adapters run beside the weights, as before;
"ours-compiled-repeatkv" is the compiled loop with Hugging Face's attention (repeat_kv) instead
of the packed one (nla/decoding.py); "ours-compiled-unfused" runs q/k/v and gate/up as separate
GEMMs instead of one per input (nla/lora.py); "ours-autotune" compiles with Inductor's
max-autotune (NLA_AUTOTUNE_DECODE=1: each GEMM of the step timed against Triton templates). On
CPU "compiled" and "autotune" change nothing.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script or -m

import argparse
import statistics

import torch

from bench.common import SHAPES, Timer, copy_bandwidth, nla_on, profile_ops, random_base, weight_bytes
from nla import lora
from nla.grpo import rollout, update
from nla.inject import injected
from nla.models import load_base, residual
from nla.verbalizer import _prompt, generate, generate_reference


def hf_generate(base, spec, vecs, max_new, static: bool, compiled: bool = False):
    """The peer a user would try: `generate`, with a static cache and (its default on CUDA) a
    compiled forward; or with its dynamic cache."""
    model = base.model
    ids = _prompt(spec, len(vecs), base.device)
    kw = dict(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
              pad_token_id=base.tokenizer.pad_token_id, attention_mask=torch.ones_like(ids))
    if static:
        kw["cache_implementation"] = "static"
        kw["disable_compile"] = not compiled
    with torch.no_grad(), lora.use(model, "av"), injected(model, ids, vecs, spec) as emb:
        out = model.generate(inputs_embeds=emb, **kw)
    return out.shape[1] * out.shape[0]


def timed(fn, steps: int, dev):
    """Median seconds of fn() over `steps` runs after one warm-up run (compilation, capture), its
    result, and the warm-up's seconds."""
    with Timer(dev) as first:
        res = fn()
    ts = []
    for _ in range(steps):
        with Timer(dev) as t:
            res = fn()
        ts.append(t.s)
    return statistics.median(ts), res, first.s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--shape", choices=list(SHAPES), help="random-weight model of this shape (GPU)")
    ap.add_argument("--nf4", action="store_true", help="4-bit base (bitsandbytes)")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--acts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--micro", type=int, default=0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--loops", default="ours,reference,hf",
                    help="of ours,ours-compiled,ours-adapters,ours-compiled-repeatkv,ours-compiled-unfused,"
                         "reference,hf-eager,hf")
    ap.add_argument("--profile", action="store_true", help="profile one update and print its top ops")
    ap.add_argument("--profile-rows", type=int, default=15)
    ap.add_argument("--profile-decode", action="store_true",
                    help="profile one rollout of the fastest of our loops: the decode step's kernels")
    ap.add_argument("--modes", default="torch,triton", help="kernel modes of the update, in the order they alternate")
    ap.add_argument("--no-update", action="store_true", help="the rollout loops only (and HF generate if asked)")
    a = ap.parse_args()
    if not set(a.modes.split(",")) <= {"torch", "triton"}:
        ap.error(f"--modes takes torch and/or triton, got {a.modes!r}")
    if a.shape:
        base = random_base(a.shape, "cuda" if torch.cuda.is_available() else "cpu",
                           torch.bfloat16 if torch.cuda.is_available() else torch.float32, a.nf4)
        layer = a.layer if a.layer is not None else SHAPES[a.shape][2]
    else:
        base = load_base(a.model, load_in_4bit=a.nf4)
        layer = a.layer if a.layer is not None else 20
    dev = base.device
    ids = torch.randint(100, 20000, (a.acts, 40), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        vec = residual(base.model, layer, ids)[:, -1].float()
    spec, head, opt_av, opt_ar = nla_on(base, layer, rank=a.rank, scale=float(vec.norm(dim=-1).mean()))
    vecs = vec.repeat_interleave(a.group, 0)
    n = len(vecs)
    bw = copy_bandwidth(dev)
    wb = weight_bytes(base.model, "av")
    roof = n / (wb / bw) if bw else None
    print(f"{base.name} L{layer} on {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, "
          f"{a.acts} acts x G={a.group} = {n} rows, cap {a.max_new}, LoRA rank {a.rank}, {a.steps} timed runs")
    if roof:
        print(f"roofline: {wb / 1e9:.2f} GB of weights per decode step / {bw / 1e12:.2f} TB/s copy = "
              f"{wb / bw * 1e3:.3f} ms -> at most {roof:,.0f} tok/s at batch {n}")
    print(f"{'loop':34} {'rollout s':>10} {'tok/s':>10} {'vs ref':>7} {'roofline':>9}", flush=True)
    def ours(compiled: bool, merged: bool = True, packed: bool = True, fused: bool = True, autotune: bool = False):
        def run():
            os.environ["NLA_COMPILE_DECODE"] = "1" if compiled else "0"
            os.environ["NLA_MERGE_SAMPLING"] = "1" if merged else "0"
            os.environ["NLA_PACKED_GQA"] = "1" if packed else "0"
            os.environ["NLA_FUSED_SAMPLING"] = "1" if fused else "0"
            os.environ["NLA_AUTOTUNE_DECODE"] = "1" if autotune else "0"
            g = torch.Generator(dev).manual_seed(0)
            try:
                return sum(len(s.ids) for s in generate(base, spec, vecs, a.max_new, 1.0, generator=g))
            finally:
                for k in ("NLA_MERGE_SAMPLING", "NLA_PACKED_GQA", "NLA_FUSED_SAMPLING", "NLA_AUTOTUNE_DECODE"):
                    os.environ.pop(k)
        return run

    cuda = dev.type == "cuda"
    loops = {
        "ours": ("ours (static cache" + (", CUDA graph)" if cuda else ")"), ours(False)),
        "ours-compiled": ("ours (+ torch.compile'd step)", ours(True)),
        "ours-adapters": ("ours, LoRA unmerged" + (" (graph)" if cuda else ""), ours(False, merged=False)),
        "ours-compiled-repeatkv": ("ours compiled, HF repeat_kv", ours(True, packed=False)),
        "ours-compiled-unfused": ("ours compiled, projections apart", ours(True, fused=False)),
        "ours-autotune": ("ours compiled with max-autotune", ours(True, autotune=True)),
        "reference": ("old eager loop (dynamic cache)",
                      lambda: sum(len(s.ids) for s in generate_reference(base, spec, vecs, a.max_new, 1.0,
                                                                         generator=torch.Generator(dev).manual_seed(0)))),
        "hf-eager": ("HF generate (static cache, eager)", lambda: hf_generate(base, spec, vecs, a.max_new, True, False)),
        "hf": ("HF generate" + (" (static cache, compiled)" if cuda else " (default cache)"),
               lambda: hf_generate(base, spec, vecs, a.max_new, cuda, cuda)),
    }
    speeds = {}

    def fallback(key) -> str:
        """Did our loop run as asked on CUDA (a failed capture or compile falls back quietly)?"""
        decs = list(base.model.__dict__.get("_nla_decoders", {}).values())
        if not (cuda and key.startswith("ours") and decs):
            return ""
        d = decs[-1]
        return "  [EAGER: capture failed]" if d.graph is None else (
            "  [not compiled: compile failed]" if "compiled" in key and not d.compiled else "")

    def measure(keys):
        for key in keys:
            name, fn = loops[key]
            try:  # the old loop is slow and steady: one run; the others warm up (capture, compile) first
                s, toks, first = timed(fn, 1, dev) if key in ("reference", "hf-eager") else timed(fn, a.steps, dev)
            except Exception as e:  # one peer failing must not hide the others' numbers
                print(f"{name:34} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                continue
            speeds[key] = toks / s
            rel = f"{speeds[key] / speeds['reference']:6.2f}x" if "reference" in speeds else "      -"
            share = f"{speeds[key] / roof:8.1%}" if roof else "        -"
            print(f"{name:34} {s:10.3f} {toks / s:10,.0f} {rel:>7} {share:>9}  (first run {first:.1f} s)"
                  f"{fallback(key)}", flush=True)

    wanted = a.loops.split(",")
    last = ("hf", "ours-autotune")  # slow compiles go last, after the update: a time cap cuts them first
    measure([k for k in wanted if k not in last])
    fastest = max((k for k in speeds if k.startswith("ours")), key=speeds.get, default=None)
    if a.profile_decode and fastest:
        profile_ops(f"one rollout of {fastest} ({a.max_new} steps)", loops[fastest][1], dev, a.profile_rows)
    os.environ["NLA_COMPILE_DECODE"] = "0"
    if not a.no_update:
        steps_by_mode(base, spec, head, vecs, opt_av, opt_ar, a, dev)
    if any(k in wanted for k in last):
        print()
        measure([k for k in last if k in wanted])
    best = max((k for k in speeds if k.startswith("ours")), key=speeds.get, default=None)
    if best:
        print(f"best of ours ({best}): {speeds[best]:,.0f} tok/s" +
              (f" = {speeds[best] / speeds['reference']:.2f}x the old loop" if "reference" in speeds else "") +
              (f", {speeds[best] / speeds['hf']:.2f}x HF generate" if "hf" in speeds else "") +
              (f", {speeds[best] / roof:.1%} of the roofline" if roof else ""))
    if dev.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")


def steps_by_mode(base, spec, head, vecs, opt_av, opt_ar, a, dev):
    """Whole RL steps (a rollout as training runs it, then the update) per kernel mode, and the
    update's profile where asked."""
    modes = a.modes.split(",") if dev.type == "cuda" else ["torch"]
    print(f"\n{'kernels':8} {'rollout s':>10} {'update s':>9} {'AR s':>7} {'GRPO s':>7} {'step s':>8}", flush=True)
    rows = {m: [] for m in modes}
    for step in range(a.steps + 1):  # modes interleaved, so allocator warm-up and drift hit both; step 0 warms up
        for mode in modes:
            os.environ["NLA_KERNELS"] = mode
            g = torch.Generator(device=dev).manual_seed(step)
            with Timer(dev) as tg:
                samples = rollout(base, spec, vecs, a.max_new, 1.0, g, G=a.group)  # as training does it
            for s in samples:
                s.ok = True  # the worst case for the update: every explanation goes through the AR
            with Timer(dev) as tu:
                m = update(base, spec, head, vecs, samples, opt_av, opt_ar, a.group, 0.01, 0.2, micro=a.micro)
            if step:
                rows[mode].append((tg.s, tu.s, m["ar_time"], m["grpo_time"], tg.mallocs, tu.mallocs))
    for mode in modes:
        g, u, ar, gr = (statistics.median(r[i] for r in rows[mode]) for i in range(4))
        print(f"{mode:8} {g:10.3f} {u:9.3f} {ar:7.3f} {gr:7.3f} {g + u:8.3f}", flush=True)
    if dev.type == "cuda":  # after warm-up a step should take nothing new from the driver
        print("cudaMalloc per step after warm-up (rollout, update): " + "; ".join(
            f"{mode} " + " ".join(f"({r[4]}, {r[5]})" for r in rows[mode]) for mode in modes), flush=True)
    os.environ.pop("NLA_KERNELS", None)
    if a.profile:
        profile_update(base, spec, head, vecs, opt_av, opt_ar, a, dev, modes)


def profile_update(base, spec, head, vecs, opt_av, opt_ar, a, dev, modes):
    """One update per kernel mode under torch.profiler (samples drawn outside it): the ops that
    take its time."""
    samples = generate(base, spec, vecs, a.max_new, 1.0, generator=torch.Generator(device=dev).manual_seed(99))
    for s in samples:
        s.ok = True
    for mode in modes:
        os.environ["NLA_KERNELS"] = mode
        m = {}
        profile_ops(f"one update, {mode} kernels", lambda: m.update(
            update(base, spec, head, vecs, samples, opt_av, opt_ar, a.group, 0.01, 0.2, micro=a.micro)), dev,
            a.profile_rows, lambda: f"AR {m['ar_time']:.3f} s, GRPO {m['grpo_time']:.3f} s under the profiler")
    os.environ.pop("NLA_KERNELS", None)


if __name__ == "__main__":
    main()

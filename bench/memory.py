"""Peak GPU memory and time of full NLA RL steps on a Qwen2.5-7B-shaped model with a 4-bit base.

No download: the model is built from a config with random weights, in bf16 on the GPU, and its
decoder projections are quantised to nf4 (double quantisation) one by one, as
`--load-in-4bit` does for real weights. Then: adapters for every role, 8 activations x G=8
explanations forced to the 150-token cap (a random model never closes its tag: the worst case),
every one marked closed so the AR step reads all of them, the AR step and the GRPO step, with
gradient checkpointing and micro-batches. Targets: peak <= 20 GB (a 24 GB card fits) and a
whole step <= 4 s on one H100/H200. The reference trains this size on 16 x 80 GB GPUs. Where
merged sampling copies of the 4-bit weights fit twice over in free memory (~13 GB at 7B, as on an
H100/H200: nla/lora.py, merge_wanted), training samples from them, at that cost in memory;
NLA_MERGE_SAMPLING=0 measures what a 24 GB card runs.

    python bench/memory.py [--acts 8] [--group 8] [--max-new 150] [--plans ckpt:16,full:8] [--rollout-ab]
                           [--shape qwen2.5-7b|tiny] [--no-nf4] [--device cpu]
(the tokenizer: NLA_TOKENIZER, else the embedded SmolLM2's cache)

--plans runs each way of fitting the update in one process, on the same model: `ckpt:M`
recomputes every block in backward (gradient checkpointing) with micro-batches of M rows, `full:M`
stores the activations of M rows (one forward fewer per backward, if they fit in memory). Each
plan's peak is measured from its own start. The rollouts run as training runs them: on a 4-bit base
the decode step is compiled when every quantised weight goes through kernels.nf4 (nla/decoding.py);
The reference's log-probs come from the rollout where that pays (grpo.ref_in_rollout: twins of
the policy's rows). `--rollout-ab` then times the rollout with the step captured but not compiled,
with twins and without, and the last plan's update when it must run the reference forward.
`--device cpu --shape tiny` runs all of that in seconds on a CPU (no memory figures): a check of
the script itself before it spends a lent GPU's minutes (tests/test_gpu_path.py). `--device cpu
--shape thin-7b` (with NLA_COMMON_LEVEL=0 NLA_REF_IN_ROLLOUT=1 NLA_MERGE_SAMPLING=0, a 24 GB GPU's choices) times the 7B's
depth at widths where the CPU's arithmetic is small: the host's cost of a step (in fp32; with
`--dtype bf16` it dispatches a GPU's ops, mixed precision's casts included, but this CPU's bf16
arithmetic then costs more than its host). `--profile`
prints the top kernels of one more update of the first plan and of one rollout, right after that
plan's steps (where does the AR phase's time go at 7B? It took about as long as the GRPO phase,
which runs more layers and more passes. And a 4-bit decode step took ~20 ms where bitsandbytes'
products, timed alone, add up to ~13).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script or -m

import argparse

import torch


def how_decoded(base) -> str:
    """How the last decoder ran its step (a failed compile or capture falls back quietly), and
    from which weights."""
    from nla import lora
    decs = list(base.model.__dict__.get("_nla_decoders", {}).values())
    if not decs:
        return "no decoder"
    d = decs[-1]
    if d.graph is None:
        how = "eager (capture failed)" if d.device.type == "cuda" else "eager (CPU)"
    else:
        how = "CUDA graph, compiled" if d.compiled else "CUDA graph"
    if isinstance(d.role, tuple):  # lora.side_by_side: the base's own weights, adapters beside
        return how + ", base weights + two roles' adapters"
    if lora.merge_wanted(base.model):
        return how + f", merged copies ({lora.merged_bytes(base.model) / 1e9:.2f} GB)"
    return how + ", base weights + adapters"


def twins(base, rows: int, G: int) -> str:
    """Where GRPO's reference log-probs come from, and in how many decode passes the rollout runs."""
    from nla.grpo import pass_rows, ref_in_rollout
    per = pass_rows(base, rows, G)
    where = "in the rollout (twins)" if ref_in_rollout(base, per) else "its own forward in the update"
    return where + (f", {-(-rows // per)} decode passes of <= {per} rows" if per < rows else "")


def all_closed(samples) -> None:
    for s in samples:
        s.ok = True  # the worst case: the AR reads every explanation


def peak_gb(dev) -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else float("nan")


def summary(results, dev) -> None:
    for plan, best, peak in results:
        mem = (f"peak GPU memory {peak:.2f} GB (target <= 20 GB: {'OK' if peak <= 20 else 'OVER'})"
               if dev.type == "cuda" else "no memory figures on a CPU")
        target = f" (target <= 4 s: {'OK' if best <= 4 else 'OVER'})" if dev.type == "cuda" else ""
        print(f"[{plan}] RL step {best:.2f} s after warm-up{target}; {mem}", flush=True)


def main():
    from bench.common import SHAPES, Timer, nla_on, profile_ops, random_base
    from nla import lora
    from nla.errors import NLAError
    from nla.grpo import rollout, update
    from nla.reconstructor import ar_inputs
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-7b", choices=list(SHAPES))
    ap.add_argument("--no-nf4", action="store_true")
    ap.add_argument("--acts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=150)
    ap.add_argument("--plans", default="ckpt:16", help="comma-separated ckpt:M or full:M (see above)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rollout-ab", action="store_true", help="then the rollout not compiled, with twins and without")
    ap.add_argument("--profile", action="store_true",
                    help="profile one more update of the first plan, and a rollout, after its steps: their top kernels")
    ap.add_argument("--device", default="cuda", help="cpu: the script's logic on a small --shape (no memory figures)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), help="the base's (default: bf16 on a GPU, fp32 on a CPU)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/memory.py needs a CUDA GPU (it measures GPU memory); --device cpu checks its logic only")
    with Timer(dev) as tb:  # what a stage's cap must leave room for (a 7B build was put at ~70 s)
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
        base = random_base(a.shape, dev, dtype, nf4=not a.no_nf4)
    weights_gb = torch.cuda.memory_allocated() / 1e9 if dev.type == "cuda" else float("nan")
    print(f"{base.name} built in {tb.s:.1f} s", flush=True)
    spec, head, opt_av, opt_ar = nla_on(base, SHAPES[a.shape][2], rank=a.rank, scale=150.0)
    vecs = torch.randn(a.acts, base.d_model, device=dev).repeat_interleave(a.group, 0)
    results, rollouts = [], []
    for plan in a.plans.split(","):
        kind, _, micro = plan.partition(":")
        if kind not in ("ckpt", "full") or not micro.isdigit() or int(micro) < 1:
            sys.exit(f"bad plan {plan!r}: expected ckpt:M or full:M with M >= 1 rows")
        micro = int(micro)
        if kind == "ckpt":
            lora.enable_checkpointing(base.model)
        else:
            lora.disable_checkpointing(base.model)
            base.model.train()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times, grpo_times = [], []
        for step in range(a.steps):
            g = torch.Generator(device=dev).manual_seed(step)
            with Timer(base.device) as tr:
                samples = rollout(base, spec, vecs, a.max_new, 1.0, g, G=a.group)
            all_closed(samples)
            try:
                with Timer(base.device) as tu:
                    m = update(base, spec, head, vecs, samples, opt_av, opt_ar, a.group, 0.01, 0.2, micro=micro)
            except NLAError as e:  # out of memory even at one row per chunk
                print(f"[{plan}] step {step}: {e}", flush=True)
                break
            if m["micro_batch"] != micro:  # the update halved its chunks until they fit (grpo.fitting)
                print(f"[{plan}] step {step}: out of GPU memory at {micro} rows per chunk; ran at "
                      f"{m['micro_batch']} (and goes on at that)", flush=True)
                micro = m["micro_batch"]
                plan = f"{kind}:{micro}"
            n_tok = sum(len(s.ids) for s in samples)
            if step == 0 and not results:
                lens = ar_inputs(base.tokenizer, spec, [s.text for s in samples], "cpu")[1].float()
                print(f"decode step: {how_decoded(base)}; KL reference: {twins(base, len(vecs), a.group)}; the AR reads "
                      f"{lens.mean():.0f} tokens a row (max {lens.max():.0f}) after its {len(spec.ar_prefix_ids)}-token "
                      f"prefix", flush=True)
            times.append((tr.s, tu.s))
            grpo_times.append(m["grpo_time"])
            print(f"[{plan}] step {step}: {tr.s + tu.s:.2f}s (rollout {tr.s:.2f}s = {n_tok / tr.s:,.0f} tok/s, AR "
                  f"{m['ar_time']:.2f}s, GRPO {m['grpo_time']:.2f}s), {n_tok} explanation tokens, peak "
                  f"{peak_gb(dev):.2f} GB" + (f"; allocator: rollout {tr.allocs}, update {tu.allocs}"
                                              if tu.allocs else ""), flush=True)
        if times:  # the first step of the first plan captures the decode graph
            results.append((plan, min(r + u for r, u in times[1:] or times), peak_gb(dev)))
            rollouts.extend(r for r, _ in times[1:])
            summary(results[-1:], dev)  # now too: a stage cut short by its time cap keeps it
        if a.profile and len(results) == 1 and times:  # the first plan's update and a rollout, before
            all_closed(samples)  # the later plans: a stage cut short by its cap still has them
            m = {}
            profile_ops(f"one update, plan {plan}", lambda: m.update(update(
                base, spec, head, vecs, samples, opt_av, opt_ar, a.group, 0.01, 0.2, micro=micro)), dev, 30,
                lambda: f"AR {m['ar_time']:.3f} s, GRPO {m['grpo_time']:.3f} s under the profiler")
            g = torch.Generator(device=dev).manual_seed(0)
            profile_ops(f"one rollout ({how_decoded(base)}, {twins(base, len(vecs), a.group)})",
                        lambda: rollout(base, spec, vecs, a.max_new, 1.0, g, G=a.group), dev, 25)
    if a.rollout_ab and rollouts:
        # what the defaults are worth here: the rollout with its step captured but not compiled, with
        # and without the reference's twins, and the update that then runs the reference forward
        print(f"rollout as above ({how_decoded(base)}, {twins(base, len(vecs), a.group)}): best {min(rollouts):.2f}s", flush=True)
        os.environ["NLA_COMPILE_DECODE"] = "0"
        for flag in ("1", "0"):
            os.environ["NLA_REF_IN_ROLLOUT"] = flag
            secs = []
            for step in range(2):
                g = torch.Generator(device=dev).manual_seed(step)
                with Timer(base.device) as tr:
                    samples = rollout(base, spec, vecs, a.max_new, 1.0, g, G=a.group)
                secs.append(tr.s)
            print(f"rollout, {how_decoded(base)}, {twins(base, len(vecs), a.group)}: {secs[-1]:.2f}s", flush=True)
        all_closed(samples)
        if grpo_times:  # the last plan ran: its update once more, now with the reference forward
            with Timer(base.device) as tu:
                m = update(base, spec, head, vecs, samples, opt_av, opt_ar, a.group, 0.01, 0.2, micro=micro)
            print(f"[{plan}] update with the reference forward: {tu.s:.2f}s (AR {m['ar_time']:.2f}s, GRPO "
                  f"{m['grpo_time']:.2f}s; with the twins' log-probs, above: GRPO {min(grpo_times):.2f}s)", flush=True)
    print(f"{base.name}: base weights {weights_gb:.2f} GB; adapters rank {a.rank} x 3 roles; "
          f"{a.acts} acts x G={a.group} x {a.max_new} tokens")
    summary(results, dev)


if __name__ == "__main__":
    main()

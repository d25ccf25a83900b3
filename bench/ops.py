"""Ops dispatched by one RL update and by one decode step, counted on a CPU: the host's share of a GPU step.

A GPU's eager pass pays the host for every op it dispatches (~10 us of Python and dispatch on
this project's CPUs) and launches a kernel for every op that is not a view. Where the update of a
7B model is bound by its host (bench/RESULTS.md), these counts are its cost, and unlike times they
are the same on every machine. Counted with a TorchDispatchMode on a model of the shape's depth
(default: thin-7b, Qwen2.5-7B's 28 blocks at widths of 64), 4-bit base, bf16, checkpointing, with a
GPU's choices (no common-prefix level, the reference's log-probs from the rollout's twins):

- one update at each --micro: ops dispatched, of them not views (~ kernels on a GPU), and how
  many of those the fused norms and rotary take away where they run (a GPU, outside compiled steps:
  nla.models.fused_ops): calls of each, forward and backward, times Hugging Face's kernels per call
  (counted too) less the one fused kernel each way;
- one decode step of the rollout (ops of a rollout at cap 12 less cap 4, over 8 steps, after a
  warm-up rollout; printed beside steps 12-20's, a check that no one-time work is in it);
- --top N: the N most dispatched kernels of the decode step and of the update (at the first
  --micro), where to cut next.

The optimizer steps run foreach, as CUDA's default does.

    NLA_KERNELS=torch python bench/ops.py [--shape thin-7b] [--micro 16,64] [--top 20]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script or -m
os.environ.setdefault("NLA_COMMON_LEVEL", "0")  # a GPU's choices (grpo.ref_in_rollout, shared_prefix.common_level)
os.environ.setdefault("NLA_REF_IN_ROLLOUT", "1")

import argparse
import collections

import torch

from bench.common import VIEWS, counted


def hf_kernels(norm, rotary, d: int, head: int):
    """Hugging Face's kernels per norm call and per rotary call (q and k), forward and backward,
    with a frozen weight and inputs that need gradients, as in the update."""
    x = torch.randn(3, 5, d, dtype=torch.bfloat16, requires_grad=True)
    fwd, y = counted(lambda: type(norm).forward(norm, x))  # the class's: Hugging Face's
    bwd, _ = counted(lambda: torch.autograd.backward(y, torch.ones_like(y)))
    # q and k as a block's projections make them: [B, T, H, D] views, transposed
    q = torch.randn(3, 5, 4, head, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(3, 5, 2, head, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    cs = torch.randn(1, 5, head, dtype=torch.bfloat16)
    rf, (qo, ko) = counted(lambda: rotary(q, k, cs, cs))
    g = (torch.ones_like(qo), torch.ones_like(ko))
    rb, _ = counted(lambda: torch.autograd.backward([qo, ko], list(g)))
    return (fwd.kernels(), bwd.kernels() - 1), (rf.kernels(), rb.kernels() - 2)  # less the test's ones_like


def main():
    from bench.common import SHAPES, nla_on, random_base
    from bench.memory import all_closed
    from nla import lora, models
    from nla.grpo import rollout, update
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="thin-7b", choices=list(SHAPES))
    ap.add_argument("--micro", default="16,64", help="comma-separated rows per chunk")
    ap.add_argument("--top", type=int, default=0, help="print the decode step's and the update's N most dispatched kernels")
    a = ap.parse_args()
    torch.manual_seed(0)
    base = random_base(a.shape, torch.device("cpu"), torch.bfloat16, nf4=True)
    # the optimizer steps as CUDA's default runs them (foreach: one op per list of tensors), not the
    # per-tensor loop torch picks on a CPU (~6k ops of a micro-16 update that a GPU never sees)
    spec, head, opt_av, opt_ar = nla_on(base, SHAPES[a.shape][2], rank=8, scale=150.0, foreach=True)
    vecs = torch.randn(8, base.d_model).repeat_interleave(8, 0)
    lora.enable_checkpointing(base.model)
    # the first rollout also pays one-time work (lazy state, the side-by-side adapters' buffers):
    # counted in a cap-4 run it made the per-step difference ~400 kernels too small (1,320 for ~1,720)
    rollout(base, spec, vecs, 4, 1.0, torch.Generator().manual_seed(0), G=8)
    steps = {}
    for cap in (4, 12, 20):  # 8 steps apart: one stop check each (verbalizer.CHECK_EVERY)
        c, samples = counted(lambda: rollout(base, spec, vecs, cap, 1.0, torch.Generator().manual_seed(0), G=8))
        steps[cap] = c
    per_step = (steps[12].kernels() - steps[4].kernels()) / 8
    later = (steps[20].kernels() - steps[12].kernels()) / 8  # the stop checks' ops depend a little on the length
    all_closed(samples)

    norm = next(m for m in base.model.modules() if type(m).__name__ in models.RMS_NORMS)
    attn = next(m for m in base.model.modules() if type(m).__name__ in models.ROTARY_ATTENTIONS)
    mod = sys.modules[type(attn).__module__]
    hf_rotary = getattr(mod.apply_rotary_pos_emb, "hf", mod.apply_rotary_pos_emb)
    cfg = base.model.config
    (nf, nb), (rf, rb) = hf_kernels(norm, hf_rotary, base.d_model,
                                    getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    print(f"{base.name}: Hugging Face's kernels per call, forward / backward: norm {nf} / {nb}, rotary (q and k) "
          f"{rf} / {rb}; fused: 1 / 1 each")
    print(f"decode step ({a.shape}, 64 rows + twins): {per_step:,.0f} non-view ops "
          f"(steps 12-20: {later:,.1f}); fused norms and rotary: "
          f"{2 * base.n_layers + 1} x {nf - 1} + {base.n_layers} x {rf - 1} = "
          f"{(2 * base.n_layers + 1) * (nf - 1) + base.n_layers * (rf - 1):,} fewer")
    if a.top:
        step_ops = steps[12].ops.copy()
        step_ops.subtract(steps[4].ops)
        print("  " + ", ".join([f"{op} {n / 8:,.0f}" for op, n in step_ops.most_common() if op not in VIEWS][:a.top]))

    calls = collections.Counter()
    orig_norm, orig_rot = type(norm).forward, mod.apply_rotary_pos_emb

    def count_norm(self, x):
        y = orig_norm(self, x)
        calls["norm fwd"] += 1
        if y.requires_grad:
            y.register_hook(lambda g: calls.update(["norm bwd"]))
        return y

    def count_rot(q, k, cos, sin, *rest):
        qo, ko = orig_rot(q, k, cos, sin, *rest)
        calls["rotary fwd"] += 1
        if qo.requires_grad:
            qo.register_hook(lambda g: calls.update(["rotary bwd"]))
        return qo, ko
    for micro in (int(m) for m in a.micro.split(",")):
        update(base, spec, head, vecs, samples, opt_av, opt_ar, 8, 0.01, 0.2, micro=micro)  # warm: lazy state
        calls.clear()
        type(norm).forward, mod.apply_rotary_pos_emb = count_norm, count_rot
        try:
            c, _ = counted(lambda: update(base, spec, head, vecs, samples, opt_av, opt_ar, 8, 0.01, 0.2, micro=micro))
        finally:
            type(norm).forward, mod.apply_rotary_pos_emb = orig_norm, orig_rot
        saved = ((calls["norm fwd"] * (nf - 1) + calls["norm bwd"] * (nb - 1))
                 + (calls["rotary fwd"] * (rf - 1) + calls["rotary bwd"] * (rb - 1)))
        print(f"update, micro {micro}: {sum(c.ops.values()):,} ops dispatched, {c.kernels():,} not views; norms "
              f"{calls['norm fwd']} forward / {calls['norm bwd']} backward, rotary {calls['rotary fwd']} / "
              f"{calls['rotary bwd']}: {saved:,} fewer where fused", flush=True)
        if a.top and micro == int(a.micro.split(",")[0]):
            print("  " + ", ".join([f"{op} {n:,}" for op, n in c.ops.most_common() if op not in VIEWS][:a.top]))


if __name__ == "__main__":
    main()

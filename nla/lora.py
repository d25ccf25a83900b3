"""Low-rank adapters on the frozen base, one set per role, switched by name.

One base serves every role: target (no adapter), AV ("av"), KL reference ("ref", a frozen
copy of the warm-start AV) and AR ("ar"). Each wrapped projection holds all adapters; a switch
shared by the whole model says which one is live. Adapters stay fp32 whatever the base is
(bf16 or bitsandbytes 4-bit), which is what keeps small updates from rounding away.

Sampling reads one role's adapters thousands of times between two updates, so it gets its own
weights (`inference_weights`): each projection's adapter is merged into a copy of its weight,
W + s B A, and the step runs one matmul per projection instead of three plus an add. A 4-bit
weight is dequantised into its copy first (bitsandbytes' own dequantisation, once per rollout):
a decode step then reads 2 bytes a weight through cuBLAS, where bitsandbytes' product dequantises
every weight to a bf16 copy and reads it back at every step (~4.5 bytes, and a latency-bound
kernel pair per projection). The copies cost the blocks' weights in the compute dtype (~13 GB at
7B), so they are made only where that fits (merge_wanted); otherwise, and on a CPU's 4-bit base,
the adapters are cast to the compute dtype and run beside the 4-bit product.
The merged copies of projections that read the same input (q/k/v, gate/up) are rows of one
buffer, and on a GPU the first of them to see an input computes all of their outputs in one GEMM:
at decode sizes the small k and v projections are latency-bound (5 us for 0.8 MB on an H200).
A 4-bit base's siblings likewise become one nf4 weight, one product through the decode kernel or
bitsandbytes' op (their bytes moved into one buffer that bitsandbytes' weights are views of).
`NLA_FUSED_SAMPLING=0|1` overrides (a CPU's GEMMs are compute-bound: there it is off). Training
on a bf16 or 4-bit base casts the adapters to the compute dtype once per phase (`training_weights`),
not at every call; each backward adds the copies' gradients into the fp32 masters.

The switch is state outside the autograd graph, so gradient checkpointing must replay it: a
block recomputed in backward runs after `use(...)` has already restored another role, and would
silently use the wrong adapter (or none). `enable_checkpointing` gives torch.utils.checkpoint a
context that snapshots the switch at forward time and restores it during recomputation.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

import kernels

from . import switches

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Switch:
    """What a block reads besides its inputs: the live role, and the add-mode injection
    (inject.py) when one is in progress. Snapshotted per checkpointed block."""
    active: str | None = None
    add: tuple | None = None
    fast: bool = False  # sampling: merged weights or compute-dtype adapter copies (see inference_weights)
    pair: bool = False  # two roles' rows side by side, each half of the batch its own (see side_by_side)
    attached: bool = False  # adapters attached (asked at every `use`: cheaper than a walk over the modules)

    def snapshot(self) -> tuple:
        return self.active, self.add

    def restore(self, snap: tuple) -> None:
        self.active, self.add = snap


def switch_of(model: nn.Module) -> _Switch:
    sw = getattr(model, "_nla_switch", None)
    if sw is None:
        sw = model._nla_switch = _Switch()
    return sw


class Adapter(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))  # zero: a new adapter starts as a no-op
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.fast: tuple | None = None  # (A, B * scale) in the base's compute dtype, for sampling
        self.cast: tuple | None = None  # the same, with autograd to A and B, for a phase of training


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, switch: _Switch):
        super().__init__()
        self.base = base
        self.switch = switch
        self.adapters = nn.ModuleDict()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.merged: torch.Tensor | None = None  # W + s B A of merged_role, for sampling
        self.merged_role: str | None = None
        self.group: _Group | None = None  # siblings reading the same input, merged into one buffer
        self.nf4_group: _NF4Group | None = None  # the same siblings' 4-bit weights as one (unmerged sampling)
        self.span = (0, 0)  # this projection's rows in either group (the members in the same order)
        self.nf4: tuple | None = None  # a 4-bit base's weight as kernels.nf4 reads it; () for any other
        self.paired: tuple | None = None  # two roles' A^T [2, in, r] and (s B)^T [2, r, out], for side_by_side

    def forward(self, x):
        sw = self.switch
        if sw.pair:  # two roles' rows: one base product, then each half of the rows its own adapter
            y = self._product(x)
            At, Bt = self.paired
            out = torch.baddbmm(y.reshape(2, -1, y.shape[-1]), torch.bmm(x.reshape(2, -1, x.shape[-1]), At), Bt)
            return out.view(y.shape)
        if sw.fast and self.merged is not None and self.merged_role == sw.active and self.merged.dtype == x.dtype:
            y = self._from_group(x, self.group)
            return y if y is not None else nn.functional.linear(x, self.merged, self.base.bias)
        y = self._product(x)
        a = self.adapters[sw.active] if sw.active in self.adapters else None
        if a is None:
            return y
        w = a.fast if sw.fast else a.cast
        if w is not None and w[0].dtype == x.dtype:
            return _plus_low_rank(y, x @ w[0].t(), w[1])
        # mixed precision: fp32 master weights are cast (small) rather than x (large)
        return _plus_low_rank(y, (x @ a.A.to(x.dtype).t()) * a.scale, a.B)

    def _from_group(self, x, g):
        """This projection's share of group g's one product of x (the siblings that read the same
        input: the first to be called computes them all), or None: no live group, another input,
        or another call order (then it computes alone)."""
        if g is None or not g.live:
            return None
        if g.members[0] is self:
            z = g.product(x)
            if z is None:
                return None
            g.x, g.z, g.left = x, z, len(g.members)
        if g.x is not x:
            return None
        out, g.left = g.z[..., self.span[0]:self.span[1]], g.left - 1
        if g.left == 0:  # every sibling served: hold nothing between steps (nor make the input and
            g.x = g.z = None  # product extra outputs of a compiled step)
        return out

    def prepared(self) -> tuple:
        """The base's weight as kernels.nf4 reads it, () where it is not a 4-bit one: made once,
        the base being frozen (as normal tensors, even if first asked for in inference mode, as
        collect runs it)."""
        if self.nf4 is None:
            with torch.inference_mode(False), torch.no_grad():
                self.nf4 = kernels.nf4_prepare(self.base) or ()
        return self.nf4

    def _product(self, x):
        """x W^T (+ bias): a 4-bit weight through kernels.nf4 (its kernel where asked for, else
        bitsandbytes' op with the scales undone once; while sampling with its siblings where they
        are grouped), anything else through the base."""
        if not self.prepared():
            return self.base(x)
        y = self._from_group(x, self.nf4_group) if self.switch.fast or self.switch.pair else None
        return y if y is not None else kernels.nf4_linear(x, self.base, self.nf4)


def _plus_low_rank(y: torch.Tensor, xa: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """y + xa B^T with the add in the GEMM (addmm's epilogue). The scale goes on xa, rank wide,
    or on B, before this: scaling and adding the full-width product were two more passes over
    the output, ~15% of an update's device time on a GPU (profile in bench/RESULTS.md)."""
    dt = y.dtype
    out = torch.addmm(y.reshape(-1, y.shape[-1]), xa.to(dt).reshape(-1, xa.shape[-1]), B.to(dt).t())
    return out.view(y.shape)


def _wrapped(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def attach(model: nn.Module, roles: dict[str, int], alpha_over_rank: float = 2.0, targets=TARGETS) -> None:
    """Wrap every target projection of every decoder block and give it an adapter per role
    (roles: name -> rank). Idempotent per role."""
    switch = switch_of(model)
    if not _wrapped(model):
        for name, mod in list(model.named_modules()):
            for child_name, child in list(mod.named_children()):
                if child_name in targets and hasattr(child, "in_features") and not isinstance(child, LoRALinear):
                    setattr(mod, child_name, LoRALinear(child, switch))
    switch.attached = bool(_wrapped(model))
    dev = model.get_input_embeddings().weight.device
    for _, m in _wrapped(model):
        for role, rank in roles.items():
            if role not in m.adapters:
                m.adapters[role] = Adapter(m.in_features, m.out_features, rank, alpha_over_rank * rank).to(dev)


@contextlib.contextmanager
def use(model: nn.Module, role: str | None):
    """Run the block with adapter `role` live (None = the plain target model)."""
    switch = switch_of(model)
    if role is not None and not switch.attached:
        raise RuntimeError(f"no adapters attached; cannot use role {role!r}")
    prev, switch.active = switch.active, role
    try:
        yield
    finally:
        switch.active = prev


def _full_precision(m: LoRALinear) -> bool:
    w = getattr(m.base, "weight", None)
    return type(m.base) is nn.Linear and w is not None and w.dtype.is_floating_point


def _mergeable(m: LoRALinear) -> bool:
    """A weight a sampling copy can be made of: a full-precision one, or a 4-bit one that
    kernels.nf4 reads (dequantised into the copy)."""
    return _full_precision(m) or kernels.nf4.servable(m.base)


def merged_bytes(model: nn.Module) -> int:
    """What the sampling copies of every adapted projection take: the weights in the dtype the
    model computes in (a 4-bit base's: its embeddings')."""
    dt = model.get_input_embeddings().weight.dtype
    return sum(m.in_features * m.out_features * _merge_dtype(m, dt).itemsize for _, m in _wrapped(model))


def merge_wanted(model: nn.Module) -> bool:
    """Merge adapters into weight copies for sampling? On a GPU when the copies (the blocks'
    weights in the compute dtype: a 4-bit base's ~4x its size) fit twice over in free memory; on a
    CPU for a full-precision base only (a 4-bit one keeps bitsandbytes' CPU path, as it always
    has). Decided once per model, so a CUDA graph captured over one path is never replayed after a
    switch to the other; NLA_MERGE_SAMPLING=0|1 overrides."""
    forced = switches.forced("NLA_MERGE_SAMPLING")
    mods = _wrapped(model)
    if not mods or not all(_mergeable(m) for _, m in mods):
        return False
    if forced is not None:
        return forced
    if getattr(model, "_nla_merge", None) is None:
        dev = model.get_input_embeddings().weight.device
        if dev.type != "cuda":
            model._nla_merge = all(_full_precision(m) for _, m in mods)
        else:
            model._nla_merge = torch.cuda.mem_get_info(dev)[0] > 2 * merged_bytes(model)
    return model._nla_merge


GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # each reads one input


class _Siblings:
    """Projections that read the same input, computed as one product while sampling (see
    LoRALinear._from_group): whether that is on, and the last input seen with its output."""

    def __init__(self, members: list[LoRALinear]):
        self.members, self.bias = members, None
        self.reset(False)

    def reset(self, live: bool) -> None:
        self.live, self.x, self.z, self.left = live, None, None, 0


class _Group(_Siblings):
    """Merged weights of sibling projections stacked by rows (the members' `merged` are views)
    and their biases (zeros where a member has none)."""

    def __init__(self, members: list[LoRALinear]):
        super().__init__(members)
        self.weight = None

    def product(self, x):
        return nn.functional.linear(x, self.weight, self.bias)

    def allocate(self, dtype: torch.dtype) -> None:
        """Rows in `dtype` (_merge_dtype: a full-precision weight's own, a 4-bit one's compute dtype)."""
        dev = self.members[0].base.weight.device
        if self.weight is not None and (self.weight.dtype, self.weight.device) == (dtype, dev):
            return
        self.weight = torch.empty((sum(m.out_features for m in self.members), self.members[0].in_features),
                                  dtype=dtype, device=dev)
        start = 0
        for m in self.members:
            m.group, m.span = self, (start, start + m.out_features)
            m.merged = self.weight[start:start + m.out_features]
            start += m.out_features
        biases = [m.base.bias for m in self.members]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else torch.zeros(m.out_features, dtype=dtype, device=dev)
             for b, m in zip(biases, self.members)]).to(dtype)


def _find(model: nn.Module, key: str, cls, ok, same) -> list:
    """A model's `cls` groups, found once (cached as `key`): per parent and per GROUPS entry, the
    projections for which ok(m) holds, where there are two or more and same(m) is one value."""
    if key not in model.__dict__:
        found = []
        for parent in model.modules():
            for names in GROUPS:
                ms = [m for m in (getattr(parent, n, None) for n in names) if isinstance(m, LoRALinear) and ok(m)]
                if len(ms) > 1 and len({same(m) for m in ms}) == 1:
                    found.append(cls(ms))
        model.__dict__[key] = found
    return model.__dict__[key]


def _groups(model: nn.Module) -> list[_Group]:
    """Mergeable siblings with the same input width and weight dtype (4-bit ones: the same bytes)."""
    return _find(model, "_nla_groups", _Group, _mergeable, lambda m: (m.in_features, m.base.weight.dtype))


class _NF4Group(_Siblings):
    """Sibling projections of a 4-bit base as one nf4 weight: their packed nibbles are moved into
    one buffer, of which each bitsandbytes weight is now a view (no copy kept), and their block
    scales likewise. So a decode step runs one product for q/k/v and one for gate/up (the decode
    kernel, else bitsandbytes' op); at decode sizes the k and v products alone are latency-bound."""

    def __init__(self, members: list[LoRALinear]):
        super().__init__(members)
        self.prepared = None

    def allocate(self) -> None:
        if self.prepared is not None:
            return
        ms = self.members
        for m in ms:
            m.nf4 = None  # drop references to the storage that is about to move
        packed = torch.cat([m.base.weight.data.reshape(-1) for m in ms])
        start = 0
        for m in ms:
            n, shape = m.base.weight.data.numel(), m.base.weight.data.shape
            m.base.weight.data = packed[start:start + n].view(shape)
            start += n
        preps = [kernels.nf4_prepare(m.base) for m in ms]
        absmax = torch.cat([p[1].reshape(-1) for p in preps])
        a = rows = 0
        for m, p in zip(ms, preps):
            k = p[1].numel()
            m.nf4 = (p[0], absmax[a:a + k], *p[2:])
            m.nf4_group, m.span = self, (rows, rows + m.out_features)
            a, rows = a + k, rows + m.out_features
        p0 = preps[0]
        self.prepared = (packed.view(torch.uint8).reshape(-1), absmax, p0[2], rows, p0[4], p0[5])
        biases = [m.base.bias for m in ms]
        b0 = next((b for b in biases if b is not None), None)
        self.bias = None if b0 is None else torch.cat(
            [b.detach() if b is not None else b0.new_zeros(m.out_features) for b, m in zip(biases, ms)])

    def product(self, x):  # None: each member computes alone (kernels.nf4_linear)
        return kernels.nf4.product(x, self.prepared, self.bias, self.members[0].base)


def _nf4_groups(model: nn.Module) -> list[_NF4Group]:
    """Siblings whose 4-bit weights can stack: the same input width, block size, scale and compute
    dtypes, device and code."""
    def same(m):
        q = m.base.weight.quant_state
        return m.in_features, q.blocksize, q.dtype, m.base.compute_dtype, m.base.weight.device, tuple(q.code.tolist())
    return _find(model, "_nla_nf4_groups", _NF4Group, lambda m: kernels.nf4.servable(m.base), same)


def _fused_wanted(device: torch.device) -> bool:
    """One product per input for sibling projections while sampling? On a GPU (latency-bound small
    GEMMs), not on a CPU (compute-bound: nothing to gain). NLA_FUSED_SAMPLING=0|1 overrides."""
    forced = switches.forced("NLA_FUSED_SAMPLING")
    return forced if forced is not None else device.type == "cuda"


def _prepare_nf4(model: nn.Module) -> None:
    """Every 4-bit projection as kernels.nf4 reads it, grouped where siblings can be (once: the
    base is frozen), and the groups live or not for this call."""
    mods = _wrapped(model)
    if any(kernels.nf4.servable(m.base) for _, m in mods):
        fused = _fused_wanted(mods[0][1].base.weight.device)
        for g in _nf4_groups(model):
            g.allocate()
            g.reset(fused)
    for _, m in mods:  # every one, so a compiled step never meets the lazy preparation in _product
        m.prepared()


def _release(groups: list[_Siblings]) -> None:
    for g in groups:
        g.x = g.z = None  # no activations held between rollouts


@contextlib.contextmanager
def inference_weights(model: nn.Module, role: str | None, dtype: torch.dtype):
    """Sampling weights for the live role, refreshed once on entry: merged weights (see
    merge_wanted), else the adapters in the compute dtype (two small matmuls per projection, but
    no casts per token; nothing to do for fp32 adapters on an fp32 base). Either keeps its
    storage across calls, so a CUDA graph captured over it sees each refresh."""
    sw = switch_of(model)
    if role is None or not _wrapped(model):
        yield
        return
    merge = merge_wanted(model)
    if not merge and dtype == torch.float32:  # sw.fast stays off: the training path, merges unread
        yield
        return
    if merge and "_nla_merge_said" not in model.__dict__:  # what a 4-bit base's copies cost, said once
        model.__dict__["_nla_merge_said"] = True
        if not all(_full_precision(m) for _, m in _wrapped(model)):
            print(f"[nla] sampling from merged {str(dtype).removeprefix('torch.')} copies of the 4-bit weights "
                  f"({merged_bytes(model) / 1e9:.1f} GB; NLA_MERGE_SAMPLING=0 keeps the 4-bit path)", flush=True)
    groups = _groups(model) if merge else []
    fused = bool(groups) and _fused_wanted(groups[0].members[0].base.weight.device)
    with torch.no_grad():
        for g in groups:
            g.allocate(_merge_dtype(g.members[0], dtype))
            g.reset(fused)
        if not merge:
            _prepare_nf4(model)
        for _, m in _wrapped(model):
            a = m.adapters[role]
            if merge:
                _merge(m, a, _merge_dtype(m, dtype))
                m.merged_role = role
                continue
            m.merged_role = None  # a merge left from an earlier call is stale now
            if a.fast is None or (a.fast[0].dtype, a.fast[0].device) != (dtype, a.A.device):
                a.fast = (torch.empty_like(a.A, dtype=dtype), torch.empty_like(a.B, dtype=dtype))
            a.fast[0].copy_(a.A)
            a.fast[1].copy_(a.B * a.scale)
    prev, sw.fast = sw.fast, True
    try:
        yield
    finally:
        sw.fast = prev
        _release(groups + model.__dict__.get("_nla_nf4_groups", []))


def _merge_dtype(m: LoRALinear, dtype: torch.dtype) -> torch.dtype:
    """A sampling copy's dtype: a full-precision weight's own, a 4-bit one's the compute dtype."""
    return m.base.weight.dtype if _full_precision(m) else dtype


def _merge(m: LoRALinear, a: Adapter, dtype: torch.dtype) -> None:
    """m.merged = W + s B A, in place (kept between calls: a captured graph reads it), in `dtype`
    (cuBLAS accumulates in fp32 and rounds once): an fp32 copy of every weight per rollout cost
    ~4x the bytes (~17 ms at 1.5B on an H200). A 4-bit W is first dequantised into the copy."""
    w = m.base.weight
    if m.merged is None or (m.merged.dtype, m.merged.device) != (dtype, w.device):
        m.merged = torch.empty((m.out_features, m.in_features), dtype=dtype, device=w.device)
    if not _full_precision(m):
        kernels.nf4.dequantize_into(m.merged, m.prepared())
        w = m.merged
    torch.addmm(w, a.B.to(dtype), a.A.to(dtype), alpha=a.scale, out=m.merged)


@contextlib.contextmanager
def training_weights(model: nn.Module, *roles: str):
    """The roles' adapters in the compute dtype for a phase of training, cast once on entry: every
    product in the phase reads these copies (the sampling path's products, (A, s B)), where a cast
    per projection call cost two casts and a scale in its forward and its recomputation (three
    kernels and their ops each; bench/RESULTS.md). The copies are leaves: each backward leaves a
    copy's gradient as soon as its block is done, and a hook adds it (times s for B) into the fp32
    master's .grad in one op and frees it. Copies cast with autograd sent every backward's gradients
    through a cast and a scale per parameter (~3 kernels, ~4k of a micro-16 7B update), and since
    those casts were the graph's oldest nodes, autograd ran them last, holding every bf16 gradient
    to the end of each backward. Leave it before the optimizer step (the copies are stale after
    it); backwards after it no longer reach the masters. Nothing to do for fp32 adapters on an
    fp32 base."""
    mods, dtype = [m for _, m in _wrapped(model)], model.get_input_embeddings().weight.dtype
    if dtype == torch.float32 or not mods:
        yield
        return
    adapters, hooks = [m.adapters[r] for m in mods for r in roles], []
    try:
        for a in adapters:
            with torch.no_grad():
                a.cast = (a.A.to(dtype), (a.B * a.scale).to(dtype))
            for copy, master, s in zip(a.cast, (a.A, a.B), (1.0, a.scale)):
                if master.requires_grad:
                    copy.requires_grad_()
                    hooks.append(copy.register_post_accumulate_grad_hook(_into_master(master, s)))
        yield
    finally:
        for h in hooks:
            h.remove()
        for a in adapters:
            a.cast = None


def _into_master(master: torch.Tensor, s: float):
    def hook(copy: torch.Tensor) -> None:
        g, copy.grad = copy.grad, None
        if master.grad is None:  # a phase's first backward: as the cast's backward did, to the bit
            master.grad = g.to(master.dtype) if s == 1.0 else g.to(master.dtype).mul_(s)
        else:
            master.grad.add_(g, alpha=s)  # one op: the bf16 gradient read once, summed in fp32
    return hook


@contextlib.contextmanager
def side_by_side(model: nn.Module, roles: tuple[str, str], dtype: torch.dtype):
    """The first half of every forward's rows runs adapter roles[0], the second half roles[1]: one
    read of the base's weights serves both. For a decode step on an unmerged base (4-bit), where
    reading the weights is the cost, so that the rows of GRPO's KL reference ride along with the
    policy's (verbalizer.generate's ref_role). Each projection adds its two low-rank products as
    one batched pair (bmm, then baddbmm with the add in its epilogue), in the compute dtype, kept
    between calls and refreshed in place, so a CUDA graph captured over them sees each refresh."""
    sw, mods = switch_of(model), _wrapped(model)
    if not mods:
        raise RuntimeError("no adapters attached")
    with torch.no_grad():
        for _, m in mods:
            a, b = (m.adapters[r] for r in roles)
            if a.A.shape != b.A.shape:
                raise ValueError(f"side by side needs equal ranks: {roles[0]} {a.A.shape[0]}, {roles[1]} {b.A.shape[0]}")
            r = a.A.shape[0]
            if m.paired is None or (m.paired[0].shape[2], m.paired[0].dtype, m.paired[0].device) != (r, dtype, a.A.device):
                m.paired = (a.A.new_empty((2, m.in_features, r), dtype=dtype),
                            a.B.new_empty((2, r, m.out_features), dtype=dtype))
            for i, ad in enumerate((a, b)):
                m.paired[0][i].copy_(ad.A.t())
                m.paired[1][i].copy_(ad.B.t() * ad.scale)
        _prepare_nf4(model)
    prev, sw.pair = sw.pair, True
    try:
        yield
    finally:
        sw.pair = prev
        _release(model.__dict__.get("_nla_nf4_groups", []))


def _replaying(model: nn.Module):
    """context_fn for non-reentrant torch.utils.checkpoint: (forward ctx, recompute ctx). The
    forward one records the switch and the attention implementation's name (shared_prefix swaps
    it for two forwards); the recompute one puts them back for the replay only."""
    sw, cfg, snap = switch_of(model), model.config, []

    @contextlib.contextmanager
    def forward():
        snap.append((sw.snapshot(), cfg._attn_implementation))
        yield

    @contextlib.contextmanager
    def recompute():
        prev = (sw.snapshot(), cfg._attn_implementation)
        sw.restore(snap[0][0])
        cfg._attn_implementation = snap[0][1]
        try:
            yield
        finally:
            sw.restore(prev[0])
            cfg._attn_implementation = prev[1]
    return forward(), recompute()


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in backward (activation memory ~ one block), with every
    role's adapter and injection replayed as it was at forward time. Train mode is required by
    HF for checkpointing; Llama/Qwen blocks have no dropout, so it changes nothing else."""
    kw = {"use_reentrant": False, "context_fn": lambda: _replaying(model)}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    model.train()


def disable_checkpointing(model: nn.Module) -> None:
    """Back to storing every block's activations (faster by one forward per backward, when they fit)."""
    if hasattr(model, "activation_checkpointing_disable"):  # transformers >= 5.2x
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def params(model: nn.Module, role: str) -> list[nn.Parameter]:
    return [p for _, m in _wrapped(model) for p in m.adapters[role].parameters()]


def state(model: nn.Module, role: str) -> dict[str, torch.Tensor]:
    out = {}
    for n, m in _wrapped(model):
        out[f"{n}.A"] = m.adapters[role].A.detach()
        out[f"{n}.B"] = m.adapters[role].B.detach()
    return out


def load_state(model: nn.Module, role: str, sd: dict[str, torch.Tensor]) -> None:
    mods = dict(_wrapped(model))
    want = {f"{n}.{k}" for n in mods for k in "AB"}
    if set(sd) != want:
        missing = sorted(want - set(sd))[:2] or sorted(set(sd) - want)[:2]
        raise ValueError(f"adapter '{role}' does not fit this model (e.g. {missing})")
    with torch.no_grad():
        for key, t in sd.items():
            n, k = key.rsplit(".", 1)
            getattr(mods[n].adapters[role], k).copy_(t)


def copy_role(model: nn.Module, src: str, dst: str) -> None:
    load_state(model, dst, state(model, src))


def rank_of(model: nn.Module, role: str) -> int:
    return _wrapped(model)[0][1].adapters[role].A.shape[0]

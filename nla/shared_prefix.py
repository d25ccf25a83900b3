"""Rows that start with the same tokens run them once: a forward per distinct prefix, then a forward
of every row's continuation that attends to its prefix's keys and values.

GRPO scores G explanations of each activation, so G rows share the AV's prompt with the same
vector injected, and at explanation lengths the prompt is most of a row (76 of ~110 tokens for
the shipped NLA). Running it once per group cuts the policy forward, its backward and the
reference forward by up to (G-1)/G of the prompt's share. The AR's template prefix is the same
for every row, so it runs once per batch.

The AV prompt is shared at two levels: its tokens before the placeholder are the same for every
row whatever the vector (41 of 76 for the shipped NLA), so they run once per batch; the rest runs
once per distinct vector. (In `add` injection mode the vector enters at block 1 over the whole
prompt, so there the prompt is one level.)

A Hugging Face KV cache cannot carry this in training: it is dropped under gradient
checkpointing (a replayed block would write it twice). Instead the attention function records
each block's keys and values during a level's forward, and the next level's forward (positions
P..) attends to them through an index, so gradients reach the earlier forwards as through any
tensor. The level a block ran is a keyword argument, which checkpointing replays with the block;
the attention implementation's name is replayed by lora._replaying. In an update, the prompts'
levels run once for all micro-batches (Held): each micro-batch's backward stops at leaf copies
of their keys and values, and one backward after the last sends the summed gradients through.
"""
from __future__ import annotations

import torch

from . import switches
from .errors import NLAError
from .models import attention_as

NAME = "nla_shared_prefix"


class SharedPrefix:
    """One level of a token tree: sequences whose row i continues row index[i] of the level
    `parent` (or that start there). Its forward records every block's keys and values of all
    tokens so far (the parent's, gathered, then its own) for the next level to read; a last level
    (record=False) keeps nothing. Levels: the tokens every row shares, those each distinct prompt
    shares, each row's own."""

    def __init__(self, model, parent: "SharedPrefix | None" = None, index: torch.Tensor | None = None,
                 record: bool = True):
        self.model, self.parent, self.index, self.record = model, parent, index, record
        self.kv, self.P = {}, parent.P if parent is not None else 0

    def forward(self, module, **inputs):
        """A forward of input_ids or inputs_embeds [rows, T] at positions P.. of the parent's rows;
        `module` is the model or its decoder (possibly inside models.early_exit), and this returns
        what it returns. Right padding is fine in a last level (causal: nothing real reads it)."""
        x = inputs.get("input_ids", inputs.get("inputs_embeds"))
        start = self.P
        self.P = start + x.shape[1]
        inputs.setdefault("position_ids", torch.arange(start, self.P, device=x.device)[None])
        with _attention(self.model):
            return module(**inputs, use_cache=False, nla_level=self)


class Held:
    """A level, and `outputs` of its forward, read by later forwards that each run their own
    backward: an update's micro-batches. With `leaves`, those read leaf copies, so each backward
    stops there and the gradients add up on the leaves; `backward()` then sends their sum through
    the level's forward once. The same gradients as a backward through it per micro-batch (a sum),
    for one forward, recomputation and backward of the shared tokens instead of one per
    micro-batch: on a GPU each is a pass over every weight (a 4-bit one dequantised) and ~400
    launches per block for a row or a few. Without `leaves`, the level and outputs themselves."""

    def __init__(self, level: SharedPrefix, outputs: tuple = (), leaves: bool = False):
        self.level, self.outputs, self._pairs = level, tuple(outputs), []
        if not leaves:
            return
        src = [t for kv in level.kv.values() for t in kv] + list(outputs)
        leaf = [t.detach().requires_grad_(t.requires_grad) for t in src]
        self._pairs = list(zip(src, leaf))
        self.level = SharedPrefix(level.model, record=False)  # holds the leaves for its children
        self.level.P, it = level.P, iter(leaf)
        self.level.kv = {i: (next(it), next(it)) for i in level.kv}
        self.outputs = tuple(it)

    def backward(self) -> None:
        """After every micro-batch's backward: theirs summed, through the level's forward."""
        pairs = [(s, lf.grad) for s, lf in self._pairs if lf.grad is not None]
        self._pairs = []
        if pairs:
            torch.autograd.backward([s for s, _ in pairs], [g for _, g in pairs])


def common_level(device: torch.device) -> bool:
    """Run the tokens every row starts with (the AV prompt's before the placeholder, the AR's
    template prefix) as a level of their own, once, rather than with every row? On a CPU, yes:
    compute-bound, so the (rows - 1) x ~14-41 row-tokens it saves are time. On a GPU, no: a level
    is one more eager pass of the decoder, tens of ms of launches whatever its rows (and at 7B nf4
    every weight dequantised), against a few ms of GEMMs saved at an RL batch's sizes. (A GRPO
    group's prompt, 35 tokens per distinct vector for G rows, stays shared everywhere.)
    NLA_COMMON_LEVEL=0|1 overrides."""
    forced = switches.forced("NLA_COMMON_LEVEL")
    return forced if forced is not None else device.type == "cpu"


def distinct_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distinct rows of x, index [n] of each row among them), compared bit for bit."""
    bits = x.detach().contiguous().view(torch.uint8).reshape(x.shape[0], -1)  # any dtype (a float unique may lack one)
    # on the host: torch's unique over rows on a GPU sorts byte columns, 43 ms for 64 rows of 6 KB
    # on an H200 (a tenth of a 1.5B rollout's device time); the copy and a CPU sort take ~1 ms
    _, index = torch.unique(bits.cpu(), dim=0, return_inverse=True)
    first = torch.full((int(index.max()) + 1,), x.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, index, torch.arange(x.shape[0]), "amin")
    return x[first.to(x.device)], index.to(x.device)


def shared_prefix_attention(module, query, key, value, attention_mask, nla_level=None, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if nla_level is not None:
        up = nla_level.parent
        if up is not None:
            pk, pv = up.kv[module.layer_idx]
            key = torch.cat([pk.index_select(0, nla_level.index), key], 2)
            value = torch.cat([pv.index_select(0, nla_level.index), value], 2)
            P, R = pk.shape[2], query.shape[2]
            attention_mask = torch.ones(R, P + R, dtype=torch.bool, device=query.device).tril(P)[None, None]
        if nla_level.record:  # a replayed block (checkpointing) keeps the first record: same values
            nla_level.kv.setdefault(module.layer_idx, (key, value))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


def _attention(model):
    """Our attention for one forward. It is Hugging Face's SDPA path plus the prefix, so a model
    set up for another implementation (eager with soft-capping, flash) is refused, not silently
    changed."""
    impl = model.config._attn_implementation
    if impl not in ("sdpa", NAME):
        raise NLAError(f"{type(model).__name__} runs '{impl}' attention; nla needs 'sdpa' "
                       f"(load the model with attn_implementation='sdpa')")
    return attention_as(model, NAME, lambda *a, **k: shared_prefix_attention(*a, **k))

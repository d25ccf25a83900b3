"""Rows that start with the same tokens run them once: a prefix forward per distinct prefix, then
a forward of every row's continuation that attends to its prefix's keys and values.

GRPO scores G explanations of each activation, so G rows share the AV's prompt with the same
vector injected, and at explanation lengths the prompt is most of a row (76 of ~110 tokens for
the shipped NLA). Running it once per group cuts the policy forward, its backward and the
reference forward by up to (G-1)/G of the prompt's share. The AR's template prefix is the same
for every row, so it runs once per batch.

A Hugging Face KV cache cannot carry this in training: it is dropped under gradient
checkpointing (a replayed block would write it twice). Instead the attention function records
each block's prefix keys and values during the prefix forward, and the continuation forward
(positions P..) attends to them through an index, so gradients reach the prefix forward as
through any tensor. Which of the two a block ran is a keyword argument, which checkpointing
replays with the block; the attention implementation's name is replayed by lora._replaying.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from .errors import NLAError

NAME = "nla_shared_prefix"


class SharedPrefix:
    """Prefix forwards for u distinct prefixes, and continuation forwards for n rows; row i
    continues prefix index[i]. `module` is the model or its decoder (possibly inside
    models.early_exit); each call returns what the module returns."""

    def __init__(self, model, index: torch.Tensor):
        self.model, self.index, self.kv, self.P = model, index, {}, 0

    def prefix(self, module, **inputs):
        """A forward of the prefixes (input_ids or inputs_embeds [u, P], no padding) that records
        every block's keys and values."""
        x = inputs.get("input_ids", inputs.get("inputs_embeds"))
        self.P = x.shape[1]
        with _attention(self.model):
            return module(**inputs, use_cache=False, nla_record=self)

    def continuation(self, module, ids: torch.Tensor):
        """A forward of [n, R] right-padded ids after each row's prefix. Padding is never read by
        a real position (causal attention); its own outputs are the caller's to ignore."""
        pos = torch.arange(self.P, self.P + ids.shape[1], device=ids.device)[None]
        with _attention(self.model):
            return module(input_ids=ids, position_ids=pos, use_cache=False, nla_read=self)


def distinct_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distinct rows of x, index [n] of each row among them), compared bit for bit."""
    bits = x.detach().contiguous().view(torch.uint8).reshape(x.shape[0], -1)  # any dtype (a float unique may lack one)
    _, index = torch.unique(bits, dim=0, return_inverse=True)
    first = torch.full((int(index.max()) + 1,), x.shape[0], dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, index, torch.arange(x.shape[0], device=x.device), "amin")
    return x[first], index


def shared_prefix_attention(module, query, key, value, attention_mask, nla_record=None, nla_read=None, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if nla_record is not None:  # a replayed block (checkpointing) keeps the first record: same values
        nla_record.kv.setdefault(module.layer_idx, (key, value))
    elif nla_read is not None:
        pk, pv = nla_read.kv[module.layer_idx]
        key = torch.cat([pk.index_select(0, nla_read.index), key], 2)
        value = torch.cat([pv.index_select(0, nla_read.index), value], 2)
        P, R = pk.shape[2], query.shape[2]
        attention_mask = torch.ones(R, P + R, dtype=torch.bool, device=query.device).tril(P)[None, None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(NAME, lambda *a, **k: shared_prefix_attention(*a, **k))
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


@contextlib.contextmanager
def _attention(model):
    """Our attention for one forward. It is Hugging Face's SDPA path plus the prefix, so a model
    set up for another implementation (eager with soft-capping, flash) is refused, not silently
    changed."""
    _register()
    cfg = model.config
    if cfg._attn_implementation not in ("sdpa", NAME):
        raise NLAError(f"{type(model).__name__} runs '{cfg._attn_implementation}' attention; nla needs 'sdpa' "
                       f"(load the model with attn_implementation='sdpa')")
    prev, cfg._attn_implementation = cfg._attn_implementation, NAME
    try:
        yield
    finally:
        cfg._attn_implementation = prev

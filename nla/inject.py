"""Putting an activation into the AV's prompt: find the placeholder, then replace or add.

`replace` (default, the reference's): the input embedding at the placeholder becomes the
activation rescaled to `injection_scale`. `add` (Activation Oracles): at block 1's output,
add ||h_p|| * v/||v|| at the placeholder. Either way the placeholder is located by its id AND
both neighbour ids, and a count that does not match the vectors is a hard error: a silent
miss would train an AV that never sees its input.
"""
from __future__ import annotations

import contextlib

import torch

import kernels

from . import lora
from .errors import NLAError
from .models import decoder_of
from .spec import NLASpec


def locate(input_ids: torch.Tensor, spec: NLASpec, n_vectors: int) -> torch.Tensor:
    """slots [B, T]: -1, or k where row k's placeholder sits (one per row, in row order)."""
    ids = input_ids
    hit = ids == spec.placeholder_id
    if spec.placeholder_neighbours:
        left, right = spec.placeholder_neighbours
        ok = torch.zeros_like(hit)
        ok[:, 1:-1] = (ids[:, :-2] == left) & (ids[:, 2:] == right)
        hit = hit & ok
    per_row = hit.sum(1)
    if ids.shape[0] != n_vectors or not bool((per_row == 1).all()):
        raise NLAError(f"placeholder count mismatch: {int(per_row.sum())} placeholders in {ids.shape[0]} "
                       f"prompts for {n_vectors} vectors (each prompt needs exactly one)")
    slots = torch.full_like(ids, -1)
    rows = torch.arange(ids.shape[0], device=ids.device)
    slots[rows, hit.long().argmax(1)] = rows
    return slots


@contextlib.contextmanager
def injected(model, input_ids: torch.Tensor, vectors: torch.Tensor, spec: NLASpec):
    """Yields inputs_embeds for `input_ids` with each row's vector injected; in `add` mode a hook
    on block 1 does the adding for forwards of the full length (prefill), not cached decode steps."""
    slots = locate(input_ids, spec, vectors.shape[0])
    emb = model.get_input_embeddings()
    vectors = vectors.to(emb.weight.device)
    if spec.injection_mode == "replace":
        yield kernels.inject_replace(emb.weight, input_ids, slots, vectors, float(spec.injection_scale))
        return
    sw = lora.switch_of(model)
    _install_add_hook(model)
    prev, sw.add = sw.add, (slots, vectors, input_ids.shape[1])
    try:
        yield emb(input_ids)
    finally:
        sw.add = prev


def _install_add_hook(model) -> None:
    """One permanent hook on block 1 that adds whatever injection the switch holds. The state
    lives on the switch, not in a closure, so a block recomputed by gradient checkpointing
    after this context has closed gets the same injection (lora.enable_checkpointing)."""
    layer = decoder_of(model).layers[1]
    if getattr(layer, "_nla_add_hook", False):
        return
    sw = lora.switch_of(model)

    def hook(_mod, _args, out):
        if sw.add is None:
            return None
        slots, vectors, T = sw.add
        h = out[0] if isinstance(out, tuple) else out
        if h.shape[1] != T:  # a cached decode step: the vector went in at prefill
            return None
        h = kernels.inject_add(h, slots, vectors)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    layer.register_forward_hook(hook)
    layer._nla_add_hook = True

"""Checkpoints: adapters and the AR head in safetensors, `nla_meta.yaml`, training state.

A checkpoint directory is replaced atomically as a whole (written beside, then swapped), so a
kill leaves either the previous checkpoint or the new one, never a mix.

    nla_meta.yaml   NLASpec (how to prompt and score) + stage/step
    av.safetensors  AV adapter        ar.safetensors  AR adapter + head.weight
    ref.safetensors frozen warm-start AV (KL reference; RL only)
    state.pt        optimiser states and RNG (RL only; for exact resume)
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from . import lora
from .errors import NLAError
from .io import save_tensors, write_text
from .spec import NLASpec

META = "nla_meta.yaml"


def save(path, base, spec: NLASpec, head, roles=("av", "ar"), info: dict | None = None, state: dict | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for role in roles:
        tensors = dict(lora.state(base.model, role))
        if role == "ar":
            tensors["head.weight"] = head.weight.detach()
        save_tensors(tmp / f"{role}.safetensors", tensors)
    if state is not None:
        torch.save(state, tmp / "state.pt")
    meta = spec.to_dict()
    meta.update(info or {})
    write_text(tmp / META, yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover(path) -> None:
    """A kill between the two renames above leaves only `.old`: put it back."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        os.replace(old, path)


def read_meta(path) -> dict:
    path = Path(path)
    recover(path)
    f = path / META
    if not f.exists():
        raise NLAError(f"{path} is not an NLA checkpoint (no {META})")
    try:
        return yaml.safe_load(f.read_text())
    except yaml.YAMLError as e:
        raise NLAError(f"{f} is not valid YAML: {str(e).splitlines()[0]}") from None


def exists(path) -> bool:
    recover(path)
    return (Path(path) / META).exists()


def load(path, base, roles=("av", "ar")) -> tuple[NLASpec, torch.nn.Module, dict]:
    """Load adapters (and head) into `base`, which must be the checkpoint's base model."""
    from .reconstructor import ARHead
    path = Path(path)
    meta = read_meta(path)
    spec = NLASpec.from_dict(meta)
    if spec.d_model != base.d_model:
        raise NLAError(f"checkpoint {path} is for d_model={spec.d_model} ({spec.base_model}) but the "
                       f"model has d_model={base.d_model} ({base.name})")
    ranks = {"av": spec.lora_rank_av, "ref": spec.lora_rank_av, "ar": spec.lora_rank_ar}
    lora.attach(base.model, {r: ranks[r] for r in roles})
    head = ARHead(base.d_model).to(base.device)
    for role in roles:
        f = path / f"{role}.safetensors"
        if not f.exists():
            raise NLAError(f"checkpoint {path} has no {f.name}")
        try:
            sd = load_file(str(f), device=str(base.device))
        except Exception as e:
            raise NLAError(f"{f} is corrupt or truncated ({str(e)[:100]})") from None
        if role == "ar":
            head.weight.data.copy_(sd.pop("head.weight"))
        try:
            lora.load_state(base.model, role, sd)
        except ValueError as e:
            raise NLAError(f"{f}: {e}") from None
    return spec, head, meta

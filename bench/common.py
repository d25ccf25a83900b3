"""Shared bits of the benchmarks: a synthetic NLA set-up on any base, and timing helpers."""
import time

import torch

from nla import lora
from nla.reconstructor import ARHead
from nla.spec import build_spec


def nla_on(base, layer: int, rank: int = 16, scale: float = 100.0):
    """Adapters, head and spec for `base` without a dataset (a made-up mean-MSE baseline)."""
    lora.attach(base.model, {"av": rank, "ref": rank, "ar": rank})
    for p in lora.params(base.model, "ref"):
        p.requires_grad_(False)
    spec = build_spec(base, layer, {"injection_scale": scale, "mse_mean": {"train": 1.0}}, "replace", rank, rank)
    head = ARHead(base.d_model).to(base.device)
    opt_av = torch.optim.AdamW(lora.params(base.model, "av"), lr=1e-5)
    opt_ar = torch.optim.AdamW(lora.params(base.model, "ar") + list(head.parameters()), lr=1e-5)
    return spec, head, opt_av, opt_ar


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


class Timer:
    def __init__(self, dev):
        self.dev = dev

    def __enter__(self):
        sync(self.dev)
        self.t = time.perf_counter()
        return self

    def __exit__(self, *a):
        sync(self.dev)
        self.s = time.perf_counter() - self.t

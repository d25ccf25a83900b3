"""Warm start by supervised fine-tuning: the AR on (summary -> vector), then the AV on
(vector -> summary) with the loss on response tokens only."""
from __future__ import annotations

import torch
from tqdm import tqdm

from . import dist, lora
from .reconstructor import reconstruct
from .reward import mse
from .verbalizer import response_logprobs, target_ids


def _batches(n: int, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    pos = 0
    for _ in range(steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=g), 0
        yield order[pos:pos + batch].tolist() if n >= batch else torch.randint(0, n, (batch,), generator=g).tolist()
        pos += batch


def train_ar(base, spec, head, texts, vectors, steps: int, batch: int, lr: float, seed: int = 0, desc="sft AR"):
    params = lora.params(base.model, "ar") + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bar = tqdm(_batches(len(texts), batch, steps, seed), total=steps, desc=desc, disable=dist.rank() > 0)
    losses = []
    for idx in bar:
        idx = idx[dist.shard(len(idx))]
        opt.zero_grad(set_to_none=True)
        with lora.training_weights(base.model, "ar"):  # the adapters cast once a step, not once a call
            pred = reconstruct(base, spec, head, [texts[i] for i in idx])
            loss = mse(pred, vectors[idx].to(pred.device)).sum() / (len(idx) * dist.world())
            loss.backward()
        dist.sum_grads(params)
        opt.step()
        losses.append(float(dist.sum_(loss.detach())))
        bar.set_postfix(mse=f"{losses[-1]:.3f}")
    return losses


def train_av(base, spec, texts, vectors, steps: int, batch: int, lr: float, seed: int = 0, max_len: int = 160,
             desc="sft AV"):
    tok = base.tokenizer
    params = lora.params(base.model, "av")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bar = tqdm(_batches(len(texts), batch, steps, seed), total=steps, desc=desc, disable=dist.rank() > 0)
    losses = []
    for idx in bar:
        idx = idx[dist.shard(len(idx))]
        resp = [target_ids(tok, texts[i], max_len) for i in idx]
        opt.zero_grad(set_to_none=True)
        with lora.training_weights(base.model, "av"):
            lp, mask = response_logprobs(base, spec, vectors[idx], resp, "av")
            n_tok = dist.sum_(mask.sum().float())
            loss = -(lp * mask).sum() / n_tok
            loss.backward()
        dist.sum_grads(params)
        opt.step()
        losses.append(float(dist.sum_(loss.detach())))
        bar.set_postfix(nll=f"{losses[-1]:.3f}")
    return losses

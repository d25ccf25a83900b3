"""Batched reward: per-row normalised MSE, cosine, FVE and reward, plus GRPO group advantages.

Rows are vectors of norm sqrt(d) after normalisation, so MSE = 2(1 - cos) in [0, 4], FVE =
1 - MSE / mse_mean (the predict-the-mean baseline), reward = -MSE, or `fail_reward` where
`valid` is False (no closing tag, or cut at the cap). Advantages standardise rewards within each
group of `group_size` consecutive rows: (r - mean) / (std + eps) with the population std, and
exactly 0 for a group whose rewards are all equal (nothing to learn from it). "Equal" means within
SPREAD: identical explanations give rewards that differ by rounding alone on a GPU (rows reduce
in different orders), and dividing that noise by its own tiny std would hand out advantages of
~0.05 for nothing (seen on an H200 in the parity test). Accumulation is fp32
for any input dtype. The Triton kernel does all of it in one launch, one program per group, with
int64 row offsets (N x d can pass 2^31 elements).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .dispatch import backend, empty, pow2

EPS = 1e-6
SPREAD = 1e-5  # rewards lie in [-4, 0]; a real spread within a group is orders of magnitude above


class RewardStats(NamedTuple):
    mse: torch.Tensor        # [N] fp32
    cos: torch.Tensor
    fve: torch.Tensor
    reward: torch.Tensor
    advantage: torch.Tensor


def _check(pred, target, group_size, valid):
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be [N, d], got {tuple(pred.shape)} and {tuple(target.shape)}")
    if group_size < 1 or pred.shape[0] % group_size:
        raise ValueError(f"{pred.shape[0]} rows do not split into groups of {group_size}")
    if valid is not None and valid.shape != pred.shape[:1]:
        raise ValueError(f"valid must be [N] = [{pred.shape[0]}], got {tuple(valid.shape)}")


def reward_stats_torch(pred, target, mse_mean: float, group_size: int = 1, valid=None,
                       fail_reward: float = -2.0) -> RewardStats:
    _check(pred, target, group_size, valid)
    p, t = pred.float(), target.float()
    s = math.sqrt(p.shape[1])
    pn = p * (s / p.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    tn = t * (s / t.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    mse = ((pn - tn) ** 2).mean(-1)
    cos = (pn * tn).sum(-1) / p.shape[1]
    reward = -mse if valid is None else torch.where(valid.to(mse.device).bool(), -mse, torch.full_like(mse, fail_reward))
    g = reward.view(-1, group_size)
    spread = (g.max(1, keepdim=True).values - g.min(1, keepdim=True).values) > SPREAD
    adv = (g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + EPS)
    adv = torch.where(spread, adv, torch.zeros_like(adv)).view(-1)
    return RewardStats(mse, cos, 1 - mse / mse_mean, reward, adv)


def reward_stats(pred, target, mse_mean: float, group_size: int = 1, valid=None,
                 fail_reward: float = -2.0) -> RewardStats:
    if backend(pred, target) == "torch":
        return reward_stats_torch(pred, target, mse_mean, group_size, valid, fail_reward)
    return reward_stats_triton(pred, target, mse_mean, group_size, valid, fail_reward)


_K = None


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def reward_kernel(P, TG, VALID, MSE, COS, FVE, REW, ADV, d, G, mse_mean, fail_reward, spread_min,
                      s_pn, s_pd, s_tn, s_td,
                      HAS_VALID: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
        grp = tl.program_id(0).to(tl.int64)  # rows * stride passes 2^31 once N * d does
        rows = grp * G + tl.arange(0, BLOCK_G)
        rm = tl.arange(0, BLOCK_G) < G
        pp = tl.zeros([BLOCK_G], dtype=tl.float32)
        tt = tl.zeros([BLOCK_G], dtype=tl.float32)
        pt = tl.zeros([BLOCK_G], dtype=tl.float32)
        for k in range(0, d, BLOCK_D):
            cols = k + tl.arange(0, BLOCK_D)
            m = rm[:, None] & (cols[None, :] < d)
            p = tl.load(P + rows[:, None] * s_pn + cols[None, :] * s_pd, mask=m, other=0.0).to(tl.float32)
            t = tl.load(TG + rows[:, None] * s_tn + cols[None, :] * s_td, mask=m, other=0.0).to(tl.float32)
            pp += tl.sum(p * p, axis=1)
            tt += tl.sum(t * t, axis=1)
            pt += tl.sum(p * t, axis=1)
        # with a = sqrt(d)/|p|, b = sqrt(d)/|t|: mean((a p - b t)^2) = (a^2 pp + b^2 tt - 2ab pt)/d
        inv_p = 1.0 / tl.maximum(tl.sqrt(pp), 1e-12)
        inv_t = 1.0 / tl.maximum(tl.sqrt(tt), 1e-12)
        cos = pt * inv_p * inv_t
        mse = pp * inv_p * inv_p + tt * inv_t * inv_t - 2.0 * cos
        mse = tl.maximum(mse, 0.0)
        rew = -mse
        if HAS_VALID:
            ok = tl.load(VALID + rows, mask=rm, other=0)
            rew = tl.where(ok != 0, rew, fail_reward)
        mean = tl.sum(tl.where(rm, rew, 0.0), axis=0) / G
        dev = tl.where(rm, rew - mean, 0.0)
        std = tl.sqrt(tl.sum(dev * dev, axis=0) / G)
        hi = tl.max(tl.where(rm, rew, -float("inf")), axis=0)
        lo = tl.min(tl.where(rm, rew, float("inf")), axis=0)
        adv = tl.where(hi - lo > spread_min, dev / (std + 1e-6), 0.0)
        tl.store(MSE + rows, mse, mask=rm)
        tl.store(COS + rows, cos, mask=rm)
        tl.store(FVE + rows, 1.0 - mse / mse_mean, mask=rm)
        tl.store(REW + rows, rew, mask=rm)
        tl.store(ADV + rows, adv, mask=rm)

    return reward_kernel


def reward_stats_triton(pred, target, mse_mean: float, group_size: int = 1, valid=None,
                        fail_reward: float = -2.0) -> RewardStats:
    global _K
    _check(pred, target, group_size, valid)
    _K = _K or _kernel()
    N, d = pred.shape
    outs = [empty((N,), torch.float32, pred.device) for _ in range(5)]
    if N:
        BG = pow2(group_size, lo=1)
        BD = max(16, min(pow2(d), 8192 // BG))  # keep a [BLOCK_G, BLOCK_D] tile near 8k elements
        v = valid.to(pred.device, torch.int8).contiguous() if valid is not None else pred
        _K[(N // group_size,)](pred, target, v, *outs, d, group_size, float(mse_mean), float(fail_reward), SPREAD,
                               *pred.stride(), *target.stride(), HAS_VALID=valid is not None,
                               BLOCK_G=BG, BLOCK_D=BD, num_warps=4 if BG * BD >= 2048 else 1)
    return RewardStats(*outs)

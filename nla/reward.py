"""The one yardstick: vectors normalised to norm sqrt(d), MSE = 2(1 - cos), FVE vs the mean.

Differentiable pieces (the AR's loss) are plain torch here; the batched no-grad reward with
group advantages goes through kernels.reward_stats (Triton on CUDA).
"""
from __future__ import annotations

import math

import torch

FAIL_REWARD = -2.0  # no closing tag, or cut at the length cap: not fed to the AR


def normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * (math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row normalised MSE in [0, 4]; differentiable."""
    return ((normalise(pred) - normalise(target)) ** 2).mean(-1)


def cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(pred.float(), target.float(), dim=-1)


def fve(mse_value: float, mse_mean: float) -> float:
    return 1.0 - mse_value / mse_mean


def score(pred, target, mse_mean: float, group_size: int = 1, valid=None):
    """RewardStats(mse, cos, fve, reward, advantage) per row, via the dispatching kernel."""
    import kernels
    return kernels.reward_stats(pred, target, mse_mean, group_size, valid=valid, fail_reward=FAIL_REWARD)

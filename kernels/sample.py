"""The next token of every row, drawn from its logits in one pass.

A rollout draws a token per row at every decode step, from softmax(logits / T) over the whole
vocabulary. torch.multinomial does it with the exponential race (argmax of p / E, E ~ Exp(1)):
on a GPU that is an fp32 softmax, an fp32 tensor of exponentials, a divide and an argmax, four
passes over 64 x 152k values a step, ~0.2 ms of the 3.6 ms a 1.5B step took (profile in
bench/RESULTS.md). The race needs no softmax: argmax of p / E is argmax of logit / T - log E,
since the normaliser is the same for the whole row. So the Triton kernel reads each logit once,
draws its uniform in registers (Philox: one call gives four tokens theirs), and keeps a running
argmax; each program owns a slice of one row's vocabulary and the few partial winners are
reduced by torch.

  torch   the reference and the CPU path: the same race with E = -log(U) from fp64 uniforms
          (the CPU's exponential_ is the slow part of multinomial there: 13 ms against 4 ms for
          16 x 49k, a seventh of a decode step of the embedded model; the inverse CDF is cheaper
          still but flips a draw wherever rounding moves any of 49k interval boundaries, so
          loops whose logits differ in the last bits would disagree). On CUDA, torch.multinomial.
  triton  one pass in the compute dtype. Its uniforms come from a seed drawn from the caller's
          generator on the device (no host sync), so a seeded rollout repeats exactly, and every
          loop that calls it in the same order draws the same tokens. fp32 uniforms, as
          torch's own CUDA exponential_ uses: a draw of U = 0 (E = inf) can never win.

The draws of the two paths differ for one seed (different generators); their law is the same
(tests/test_kernels.py compares frequencies with the softmax).
"""
from __future__ import annotations

import torch

from .dispatch import backend, empty

BLOCK_V = 2048   # vocabulary per step of a program's loop
SLICE = 8 * BLOCK_V  # vocabulary per program: 64 rows x 152k -> 64 x 10 programs


def sample_next(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """[rows] token ids drawn from softmax(logits / temperature), temperature > 0."""
    if backend(logits) == "torch" or logits.shape[0] * logits.shape[1] >= 2 ** 31:
        return sample_next_torch(logits, temperature, generator)
    seed = torch.randint(0, 2 ** 31 - 1, (1,), device=logits.device, generator=generator)
    return sample_next_triton(logits, temperature, seed)


def sample_next_torch(logits, temperature: float, generator=None):
    if temperature != 1:
        logits = logits.float() / temperature
    if logits.is_cuda:
        return torch.multinomial(torch.softmax(logits, dim=-1, dtype=torch.float32), 1, generator=generator).flatten()
    e = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device).log_().neg_()
    return (torch.softmax(logits, dim=-1, dtype=torch.float64) / e).argmax(-1)


def sample_next_triton(logits, temperature: float, seed: torch.Tensor):
    """seed: a one-element int64 tensor on the logits' device (read by the kernel, so a captured
    graph would see each new one)."""
    rows, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    slices = -(-V // SLICE)
    score = empty((rows, slices), torch.float32, logits.device)
    index = empty((rows, slices), torch.int32, logits.device)
    if rows:
        _k()[(rows, slices)](logits, seed, score, index, V, logits.stride(0), 1.0 / temperature,
                             SLICE=SLICE, BLOCK_V=BLOCK_V, num_warps=4)
    return index.gather(1, score.argmax(1, keepdim=True)).flatten().long()


_K = None


def _k():
    global _K
    if _K is None:
        import triton
        import triton.language as tl

        @triton.jit
        def race_kernel(L, SEED, SCORE, INDEX, V, s_l, inv_t, SLICE: tl.constexpr, BLOCK_V: tl.constexpr):
            row, part = tl.program_id(0), tl.program_id(1)
            seed = tl.load(SEED)
            base = L + row.to(tl.int64) * s_l
            best = tl.full((BLOCK_V,), -float("inf"), tl.float32)
            arg = tl.zeros((BLOCK_V,), tl.int32)
            V4 = (V + 3) // 4
            for v0 in range(part * SLICE, tl.minimum(part * SLICE + SLICE, V), BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
                # one Philox call per 4 tokens (its four outputs; tl.rand spends a call on each token,
                # most of this loop's instructions): counter (row, token // 4), output by token % 4,
                # so a token's uniform does not depend on how the row is split; rows * V < 2^31
                u0, u1, u2, u3 = tl.rand4x(seed, row * V4 + v0 // 4 + tl.arange(0, BLOCK_V // 4))
                u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), (BLOCK_V,))
                # log p - log E up to the row's normaliser; U = 0 gives E = inf, a score of -inf
                s = x * inv_t - tl.log(-tl.log(u))
                take = s > best  # strict: the first of equal scores, as argmax
                best = tl.where(take, s, best)
                arg = tl.where(take, cols, arg)
            m = tl.max(best, 0)
            tl.store(SCORE + row * tl.num_programs(1) + part, m)
            # the lowest index among the lanes that reach the max (-inf everywhere: the slice's first)
            tl.store(INDEX + row * tl.num_programs(1) + part,
                     tl.min(tl.where(best == m, arg, 2 ** 31 - 1), 0))

        _K = race_kernel
    return _K

"""Per-token log-probabilities of given tokens, without a [tokens, vocab] fp32 log-softmax.

GRPO needs log p(token) for every response token, twice per step (policy and reference). The
obvious `log_softmax(h @ W.T).gather(...)` holds a [N, V] fp32 tensor (and its gradient): for
8 x 8 responses of 150 tokens and a 152k vocabulary that is 5.8 GB. Here the torch path works
in row chunks sized to a fixed budget, and the Triton path streams the vocabulary through an
online log-sum-exp, never holding logits at all. Both share one backward that recomputes a
chunk's logits from the saved log-sum-exp: memory O(chunk x V), not O(N x V).

token_logprobs(hidden [N, d], weight [V, d], targets [N]) -> [N] fp32, differentiable wrt
hidden (and weight, if it requires grad).
"""
from __future__ import annotations

import torch

from .dispatch import backend, empty, interpreting, pow2

CHUNK_ELEMS = 1 << 25  # logits per chunk: 32M fp32 = 128 MB


def _rows(V: int) -> int:
    return max(1, CHUNK_ELEMS // max(V, 1))


def token_logprobs(hidden, weight, targets):
    if backend(hidden, weight) == "torch":
        return token_logprobs_torch(hidden, weight, targets)
    return token_logprobs_triton(hidden, weight, targets)


def token_logprobs_torch(hidden, weight, targets):
    return _LogProbs.apply(hidden, weight, targets, False)


def token_logprobs_triton(hidden, weight, targets):
    return _LogProbs.apply(hidden, weight, targets, True)


def _forward_torch(h, w, t):
    N = h.shape[0]
    out = torch.empty(N, dtype=torch.float32, device=h.device)
    lse = torch.empty(N, dtype=torch.float32, device=h.device)
    step = _rows(w.shape[0])
    for i in range(0, N, step):
        logits = (h[i:i + step] @ w.T).float()
        lse[i:i + step] = logits.logsumexp(-1)
        out[i:i + step] = logits.gather(1, t[i:i + step, None]).squeeze(1) - lse[i:i + step]
    return out, lse


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, use_triton):
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(f"hidden [N, d] and weight [V, d] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}")
        if targets.shape != hidden.shape[:1]:
            raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
        out, lse = (_forward_triton if use_triton else _forward_torch)(hidden, weight, targets)
        ctx.save_for_backward(hidden, weight, targets, lse)
        return out

    @staticmethod
    def backward(ctx, g):
        # d lp_i / d logits_i = onehot(t_i) - softmax_i, recomputed chunk by chunk
        h, w, t, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        step = _rows(w.shape[0])
        for i in range(0, h.shape[0], step):
            hc, gc = h[i:i + step], g[i:i + step].float()
            dl = -torch.exp((hc @ w.T).float() - lse[i:i + step, None]) * gc[:, None]
            dl.scatter_add_(1, t[i:i + step, None], gc[:, None])
            if need_h:
                gh[i:i + step] = (dl.to(w.dtype) @ w).to(h.dtype)
            if need_w:
                gw += dl.T @ hc.float()
        return gh, (gw.to(w.dtype) if need_w else None), None, None


_K = None


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def logprob_kernel(H, W, T, OUT, LSE, N, V, d, s_hn, s_hd, s_wv, s_wd, s_t,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                       IEEE: tl.constexpr, UPCAST: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = rows < N
        tgt = tl.load(T + rows * s_t, mask=rm, other=0)
        m = tl.full([BLOCK_N], -float("inf"), tl.float32)
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        picked = tl.zeros([BLOCK_N], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cm = cols < V
            acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
            for k0 in range(0, d, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                km = ks < d
                a = tl.load(H + rows[:, None] * s_hn + ks[None, :] * s_hd, mask=rm[:, None] & km[None, :], other=0.0)
                b = tl.load(W + cols[None, :] * s_wv + ks[:, None] * s_wd, mask=km[:, None] & cm[None, :], other=0.0)
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                else:
                    a = a.to(b.dtype)
                if IEEE:
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
            acc = tl.where(cm[None, :], acc, -float("inf"))
            m_new = tl.maximum(m, tl.max(acc, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(acc - m_new[:, None]), axis=1)
            m = m_new
            picked += tl.sum(tl.where(cols[None, :] == tgt[:, None], acc, 0.0), axis=1)
        lse = m + tl.log(s)
        tl.store(OUT + rows, picked - lse, mask=rm)
        tl.store(LSE + rows, lse, mask=rm)

    return logprob_kernel


def _forward_triton(h, w, t):
    global _K
    _K = _K or _kernel()
    N, d = h.shape
    V = w.shape[0]
    out = empty((N,), torch.float32, h.device)
    lse = empty((N,), torch.float32, h.device)
    if N:
        BN = 16 if N <= 16 else 32 if N <= 256 else 64
        BV, BK = 128, min(64, pow2(d))
        _K[(triton_cdiv(N, BN),)](h, w, t, out, lse, N, V, d, *h.stride(), *w.stride(), t.stride(0),
                                  BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=BK,
                                  IEEE=h.dtype == torch.float32 or interpreting(),
                                  UPCAST=interpreting(), num_warps=4)  # the interpreter's bf16 dot is wrong
    return out, lse


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b

"""Per-token log-probabilities of given tokens, without a [tokens, vocab] fp32 log-softmax.

GRPO needs log p(token) for every response token, twice per step (policy and reference). The
obvious `log_softmax(h @ W.T).gather(...)` holds a [N, V] fp32 tensor (and its gradient): for
8 x 8 responses of 150 tokens and a 152k vocabulary that is 5.8 GB. Both paths here work in row
chunks whose logits fit a fixed budget, so memory is O(chunk x V), not O(N x V):

  torch   the readable reference: per chunk, the logits in fp32, logsumexp, gather; the backward
          recomputes a chunk's logits and builds d lp / d logits = onehot(t) - softmax in fp32.
  triton  the fused-linear-cross-entropy pattern. The matmul stays in cuBLAS (an earlier kernel
          with its own Triton matmul ran at 0.13x-0.8x of the torch path on an H200); what torch
          does in several fp32 passes over the logits becomes one Triton pass over the
          compute-dtype chunk: forward, an online log-sum-exp plus the picked logit per row;
          backward, d lp / d logits written in place over the recomputed logits, so the chunk
          buffer is the only [rows, V] tensor.
          Needing no fp32 copies, its chunk may hold as many bytes as the torch path's fp32 logits
          alone (twice the rows in bf16): larger GEMMs, and still a lower peak than the torch path.

Both share the chunk loop and the gh / gw products (cuBLAS, compute dtype, fp32 accumulation).
The chunk buffer never reaches 2^31 elements, so 32-bit offsets would do inside a chunk; the
kernels still index rows in int64 so a larger budget stays safe.

token_logprobs(hidden [N, d], weight [V, d], targets [N]) -> [N] fp32, differentiable wrt
hidden (and weight, if it requires grad). hidden and weight share one dtype: the compute dtype.
Targets must lie in [0, V): the torch path raises otherwise, the Triton path returns NaN for
that row (it does not read out of bounds, and a device-side check would cost a sync).
"""
from __future__ import annotations

import torch

from .dispatch import backend, empty, pow2

CHUNK_ELEMS = 1 << 25  # logits per torch-path chunk: 32M fp32 = 128 MB
FWD_BLOCK = 8192       # vocabulary slice per step of a row's online log-sum-exp
BWD_BLOCK = 4096       # vocabulary slice per program of the in-place gradient


def _rows(V: int, dtype: torch.dtype = torch.float32, fused: bool = False) -> int:
    """Rows per chunk. The torch path holds CHUNK_ELEMS fp32 logits plus fp32 temporaries of the
    same size; the fused path holds only its compute-dtype buffer, given the same bytes."""
    if not fused:
        return max(1, CHUNK_ELEMS // max(V, 1))
    rows = CHUNK_ELEMS * 4 // (max(V, 1) * dtype.itemsize)
    # whole 128-row tiles: a partial tile costs the GEMM as much as a full one
    return rows // 128 * 128 if rows >= 256 else max(1, rows)


def token_logprobs(hidden, weight, targets):
    if backend(hidden, weight) == "torch":
        return token_logprobs_torch(hidden, weight, targets)
    return token_logprobs_triton(hidden, weight, targets)


def token_logprobs_torch(hidden, weight, targets):
    return _LogProbs.apply(hidden, weight, targets, False)


def token_logprobs_triton(hidden, weight, targets):
    return _LogProbs.apply(hidden, weight, targets, True)


# ---------------------------------------------------------------- per chunk: torch
def _lse_pick_torch(hc, w, t, out, lse, buf):
    logits = (hc @ w.T).float()
    lse.copy_(logits.logsumexp(-1))
    out.copy_(logits.gather(1, t[:, None]).squeeze(1) - lse)


def _dlogits_torch(hc, w, t, lse, g, buf):
    dl = -torch.exp((hc @ w.T).float() - lse[:, None]) * g[:, None]
    dl.scatter_add_(1, t[:, None], g[:, None])
    return dl.to(w.dtype)


# ---------------------------------------------------------------- per chunk: cuBLAS + Triton
def _lse_pick_triton(hc, w, t, out, lse, buf):
    r, V = hc.shape[0], w.shape[0]
    logits = torch.mm(hc, w.t(), out=buf[:r])
    BV = min(FWD_BLOCK, pow2(V))
    _k()[0][(r,)](logits, t, out, lse, V, logits.stride(0), BLOCK_V=BV, num_warps=8 if BV >= 4096 else 4)


def _dlogits_triton(hc, w, t, lse, g, buf):
    r, V = hc.shape[0], w.shape[0]
    logits = torch.mm(hc, w.t(), out=buf[:r])
    BV = min(BWD_BLOCK, pow2(V))
    _k()[1][(r, (V + BV - 1) // BV)](logits, t, lse, g, V, logits.stride(0),
                                     BLOCK_V=BV, num_warps=8 if BV >= 4096 else 4)
    return logits


# ---------------------------------------------------------------- the shared chunk loop
class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, fused):
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(f"hidden [N, d] and weight [V, d] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}")
        if targets.shape != hidden.shape[:1]:
            raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
        if hidden.dtype != weight.dtype:
            raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
        N, V = hidden.shape[0], weight.shape[0]
        t = targets.contiguous()
        out = empty((N,), torch.float32, hidden.device)
        lse = empty((N,), torch.float32, hidden.device)
        rows = _rows(V, hidden.dtype, fused)
        buf = hidden.new_empty((min(rows, N), V)) if fused else None  # reused by every chunk
        step = _lse_pick_triton if fused else _lse_pick_torch
        for i in range(0, N, rows):
            j = min(N, i + rows)
            step(hidden[i:j], weight, t[i:j], out[i:j], lse[i:j], buf)
        ctx.save_for_backward(hidden, weight, t, lse)
        ctx.fused = fused
        return out

    @staticmethod
    def backward(ctx, g):
        # d lp_i / d logits_i = onehot(t_i) - softmax_i, recomputed chunk by chunk
        h, w, t, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        if not (need_h or need_w):
            return None, None, None, None
        N, V = h.shape[0], w.shape[0]
        g = g.float().contiguous()  # `lp.sum().backward()` hands in a stride-0 vector
        gh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        rows = _rows(V, h.dtype, ctx.fused)
        buf = h.new_empty((min(rows, N), V)) if ctx.fused else None
        step = _dlogits_triton if ctx.fused else _dlogits_torch
        for i in range(0, N, rows):
            j = min(N, i + rows)
            hc = h[i:j]
            dl = step(hc, w, t[i:j], lse[i:j], g[i:j], buf)  # [rows, V], compute dtype
            if need_h:
                torch.mm(dl, w, out=gh[i:j])
            if need_w:
                _add_gw(gw, dl, hc)
        buf = dl = None  # not alive beside the [V, d] cast below
        return gh, (gw.to(w.dtype) if need_w else None), None, None


def _add_gw(gw, dl, hc):
    """gw += dl.T @ hc with gw in fp32 across chunks. A product in a narrower compute dtype needs a
    temporary (fp32 inside cuBLAS, rounded once): taken in vocabulary slices no larger than the
    chunk's logits, not one [V, d] at a time."""
    if gw.dtype == dl.dtype:
        gw.addmm_(dl.t(), hc)
        return
    step = max(1, dl.numel() // hc.shape[1])
    for v0 in range(0, gw.shape[0], step):
        gw[v0:v0 + step] += dl[:, v0:v0 + step].t() @ hc


# ---------------------------------------------------------------- triton
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def lse_pick_kernel(L, T, OUT, LSE, V, s_l, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one row of the chunk per program
        base = L + row * s_l
        # online log-sum-exp: one exp per logit, one read of the row, all in fp32
        m = -float("inf")
        s = 0.0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        tgt = tl.load(T + row).to(tl.int64)
        ok = (tgt >= 0) & (tgt < V)
        # clamped rather than masked: a scalar-bool mask is not accepted everywhere
        picked = tl.load(base + tl.minimum(tl.maximum(tgt, 0), V - 1)).to(tl.float32)
        tl.store(OUT + row, tl.where(ok, picked - lse, float("nan")))
        tl.store(LSE + row, lse)

    @triton.jit
    def dlogits_kernel(L, T, LSE, G, V, s_l, BLOCK_V: tl.constexpr):
        # no reduction left (lse is saved), so a 2-D grid: rows x vocabulary slices
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        cm = cols < V
        ptr = L + row * s_l + cols
        x = tl.load(ptr, mask=cm, other=0.0).to(tl.float32)
        lse = tl.load(LSE + row)
        g = tl.load(G + row)
        tgt = tl.load(T + row)
        dl = g * (tl.where(cols == tgt, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(ptr, dl.to(L.dtype.element_ty), mask=cm)  # in place: the chunk holds no other copy

    return lse_pick_kernel, dlogits_kernel


_K = None


def _k():
    global _K
    if _K is None:
        _K = _kernels()
    return _K

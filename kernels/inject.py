"""Activation injection: the AV's input embeddings with each row's vector at its placeholder.

`replace` (the reference's): gather the token embeddings and, where `slots >= 0`, write the
activation rescaled to `scale` instead, in one pass (no [B, T, d] intermediate besides the output).
`add` (Activation Oracles): at a hidden state h, add ||h_p|| * v/||v|| at the placeholder.

slots [B, T] holds -1, or the row k of `vectors` to put at that position. Norms are taken in fp32
whatever the storage dtype. Torch references first, Triton kernels below them. The kernels
compute offsets in int64: a [B, T, d] output passes 2^31 elements at realistic sizes (4096 prompts
x 96 tokens x d=8192 is 3.2e9), where 32-bit offsets wrapped into an illegal memory access.
"""
from __future__ import annotations

import torch

from .dispatch import backend, empty, pow2

_EPS = 1e-12


# ---------------------------------------------------------------- torch references
def inject_replace_torch(weight, input_ids, slots, vectors, scale: float):
    emb = torch.nn.functional.embedding(input_ids, weight)
    v = vectors.float()
    v = v * (scale / v.norm(dim=-1, keepdim=True).clamp_min(_EPS))
    return torch.where((slots >= 0)[..., None], v[slots.clamp_min(0)].to(emb.dtype), emb)


def inject_add_torch(h, slots, vectors):
    v = vectors.float()
    vhat = v / v.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    hf = h.float()
    added = hf + hf.norm(dim=-1, keepdim=True) * vhat[slots.clamp_min(0)]
    return torch.where((slots >= 0)[..., None], added.to(h.dtype), h)


# ---------------------------------------------------------------- dispatch
def inject_replace(weight, input_ids, slots, vectors, scale: float):
    # The embedding table is frozen in every NLA role, so the kernel has no backward; a caller that
    # needs gradients into the table or the vectors gets the (exact, autograd) torch path.
    needs_grad = torch.is_grad_enabled() and (weight.requires_grad or vectors.requires_grad)
    if needs_grad or backend(weight, input_ids, vectors) == "torch":
        return inject_replace_torch(weight, input_ids, slots, vectors, scale)
    return inject_replace_triton(weight, input_ids, slots, vectors, scale)


def inject_add(h, slots, vectors):
    if (torch.is_grad_enabled() and vectors.requires_grad) or backend(h, vectors) == "torch":
        return inject_add_torch(h, slots, vectors)
    return inject_add_triton(h, slots, vectors)


# ---------------------------------------------------------------- triton
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def replace_kernel(W, IDS, SLOTS, V, OUT, d, T, scale,
                       s_wv, s_wd, s_ib, s_it, s_sb, s_st, s_vn, s_vd,
                       BLOCK_D: tl.constexpr):
        # int64 offsets: B*T*d passes 2^31 at e.g. 4096 x 96 x 8192, and V*d can for a big vocabulary
        row = tl.program_id(0).to(tl.int64)  # one token position per program
        b, t = row // T, row % T
        tok = tl.load(IDS + b * s_ib + t * s_it).to(tl.int64)
        slot = tl.load(SLOTS + b * s_sb + t * s_st).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        m = cols < d
        inj = (slot + cols * 0) >= 0  # broadcast: a scalar-bool mask is not accepted everywhere
        # masked loads: only the source this position needs is read from memory
        e = tl.load(W + tok * s_wv + cols * s_wd, mask=m & ~inj, other=0.0).to(tl.float32)
        v = tl.load(V + tl.maximum(slot, 0) * s_vn + cols * s_vd, mask=m & inj, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(v * v, axis=0))
        v = v * (scale / tl.maximum(norm, 1e-12))
        tl.store(OUT + row * d + cols, tl.where(inj, v, e).to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def add_kernel(H, SLOTS, V, OUT, d, T, s_hb, s_ht, s_hd, s_sb, s_st, s_vn, s_vd,
                   BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # int64 offsets, as in replace_kernel
        b, t = row // T, row % T
        slot = tl.load(SLOTS + b * s_sb + t * s_st).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        m = cols < d
        inj = (slot + cols * 0) >= 0
        h = tl.load(H + b * s_hb + t * s_ht + cols * s_hd, mask=m, other=0.0)
        hf = h.to(tl.float32)
        v = tl.load(V + tl.maximum(slot, 0) * s_vn + cols * s_vd, mask=m & inj, other=0.0).to(tl.float32)
        hn = tl.sqrt(tl.sum(hf * hf, axis=0))
        vn = tl.maximum(tl.sqrt(tl.sum(v * v, axis=0)), 1e-12)
        out = tl.where(inj, (hf + (hn / vn) * v).to(OUT.dtype.element_ty), h)
        tl.store(OUT + row * d + cols, out, mask=m)

    return replace_kernel, add_kernel


_K = None


def _k():
    global _K
    if _K is None:
        _K = _kernels()
    return _K


def _warps(block: int) -> int:
    return 1 if block <= 256 else 4 if block <= 2048 else 8


def inject_replace_triton(weight, input_ids, slots, vectors, scale: float):
    B, T = input_ids.shape
    d = weight.shape[1]
    out = empty((B, T, d), weight.dtype, weight.device)
    if B * T:
        BD = pow2(d)
        _k()[0][(B * T,)](weight, input_ids, slots, vectors, out, d, T, float(scale),
                          *weight.stride(), *input_ids.stride(), *slots.stride(), *vectors.stride(),
                          BLOCK_D=BD, num_warps=_warps(BD))
    return out


class _InjectAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, slots, vectors):
        B, T, d = h.shape
        out = empty((B, T, d), h.dtype, h.device)
        if B * T:
            BD = pow2(d)
            _k()[1][(B * T,)](h, slots, vectors, out, d, T, *h.stride(), *slots.stride(), *vectors.stride(),
                              BLOCK_D=BD, num_warps=_warps(BD))
        ctx.save_for_backward(h, slots, vectors)
        return out

    @staticmethod
    def backward(ctx, g):
        # d/dh [h + ||h|| vhat] = I + vhat h^T/||h||, only at the (few) placeholder rows
        h, slots, vectors = ctx.saved_tensors
        gh = g.clone()
        where = slots >= 0
        hf, gf = h[where].float(), g[where].float()
        v = vectors[slots[where]].float()
        vhat = v / v.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        gh[where] = (gf + (vhat * gf).sum(-1, keepdim=True) * hf / hf.norm(dim=-1, keepdim=True).clamp_min(_EPS)).to(g.dtype)
        return gh, None, None


def inject_add_triton(h, slots, vectors):
    return _InjectAdd.apply(h, slots, vectors)

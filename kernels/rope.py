"""Rotary position embedding of q and k in one pass, forward and backward.

Hugging Face's `apply_rotary_pos_emb` (Llama, Mistral, Qwen2/3) is ten small kernels per
attention call (for q and for k: a product with cos, a negation and a concatenation for
`rotate_half`, a product with sin, a sum) and 16 in backward. In an RL update of a 7B-deep
model that is ~7k kernels of ~59k, and in a 4-bit decode step (captured, not compiled) 280 of
~1,700 (bench/ops.py). Here one program per (row, position) reads that position's
cos and sin once and rotates every query and key head: one kernel forward, one backward.

    out[:h] = x[:h] cos[:h] - x[h:] sin[:h]        h = head_dim / 2 (Hugging Face's rotate_half)
    out[h:] = x[h:] cos[h:] + x[:h] sin[h:]

and its transpose in backward (cos and sin come from a buffer: no gradient). Computed in fp32,
rounded once (Hugging Face rounds after each of its three ops in bf16). Outputs keep the layout
of their inputs, as Hugging Face's elementwise ops do. Offsets are int64.
"""
from __future__ import annotations

import torch

from .dispatch import backend, empty_like, pow2


# ---------------------------------------------------------------- torch reference
def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope_torch(q, k, cos, sin):
    """Hugging Face's formula: q, k [B, H, T, D]; cos, sin [B or 1, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


# ---------------------------------------------------------------- dispatch
def apply_rope(q, k, cos, sin):
    """q, k [B, H, T, D] rotated by cos, sin [B or 1, T, D]; the torch path for anything else."""
    B, _, T, D = q.shape
    fits = (D % 2 == 0 and cos.dim() == 3 and cos.shape[0] in (1, B) and tuple(cos.shape[1:]) == (T, D)
            and sin.shape == cos.shape and k.shape[0] == B and tuple(k.shape[2:]) == (T, D))
    if not fits or cos.requires_grad or sin.requires_grad or backend(q, k, cos) == "torch":
        return apply_rope_torch(q, k, cos, sin)
    return apply_rope_triton(q, k, cos, sin)


# ---------------------------------------------------------------- triton
_K = None


def _k():
    global _K
    if _K is not None:
        return _K
    import triton
    import triton.language as tl

    @triton.jit
    def rope_kernel(Q, K, COS, SIN, QO, KO, T, Hq, Hk, half,
                    s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd,
                    s_ob, s_oh, s_ot, s_od, s_pb, s_ph, s_pt, s_pd, s_cb, s_ct, s_cd,
                    BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one (batch row, position) per program
        b, t = row // T, row % T
        d = tl.arange(0, BLOCK_D)
        md = d < half
        c1 = tl.load(COS + b * s_cb + t * s_ct + d * s_cd, mask=md, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(COS + b * s_cb + t * s_ct + (d + half) * s_cd, mask=md, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(SIN + b * s_cb + t * s_ct + d * s_cd, mask=md, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(SIN + b * s_cb + t * s_ct + (d + half) * s_cd, mask=md, other=0.0).to(tl.float32)[None, :]
        if BACKWARD:  # the transpose of [[c1, -s1], [s2, c2]]: [[c1, s2], [-s1, c2]]
            t1 = -s2
            s2 = -s1
            s1 = t1
        # q heads, then k heads: the same rotation
        h = tl.arange(0, BLOCK_HQ)[:, None].to(tl.int64)
        m = (h < Hq) & md[None, :]
        src = Q + b * s_qb + t * s_qt + h * s_qh
        x1 = tl.load(src + d[None, :] * s_qd, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + (d[None, :] + half) * s_qd, mask=m, other=0.0).to(tl.float32)
        dst = QO + b * s_ob + t * s_ot + h * s_oh
        tl.store(dst + d[None, :] * s_od, (x1 * c1 - x2 * s1).to(QO.dtype.element_ty), mask=m)
        tl.store(dst + (d[None, :] + half) * s_od, (x2 * c2 + x1 * s2).to(QO.dtype.element_ty), mask=m)
        h = tl.arange(0, BLOCK_HK)[:, None].to(tl.int64)
        m = (h < Hk) & md[None, :]
        src = K + b * s_kb + t * s_kt + h * s_kh
        x1 = tl.load(src + d[None, :] * s_kd, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + (d[None, :] + half) * s_kd, mask=m, other=0.0).to(tl.float32)
        dst = KO + b * s_pb + t * s_pt + h * s_ph
        tl.store(dst + d[None, :] * s_pd, (x1 * c1 - x2 * s1).to(KO.dtype.element_ty), mask=m)
        tl.store(dst + (d[None, :] + half) * s_pd, (x2 * c2 + x1 * s2).to(KO.dtype.element_ty), mask=m)

    _K = rope_kernel
    return _K


def _launch(q, k, cos, sin, backward: bool):
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    qo, ko = empty_like(q), empty_like(k)  # the inputs' layout where dense, as Hugging Face's ops
    if B * T:
        cb = cos.stride(0) if cos.shape[0] > 1 else 0
        block_hq, block_hk = pow2(Hq, 1), pow2(Hk, 1)
        _k()[(B * T,)](q, k, cos, sin, qo, ko, T, Hq, Hk, D // 2, *q.stride(), *k.stride(), *qo.stride(),
                       *ko.stride(), cb, cos.stride(1), cos.stride(2), BACKWARD=backward,
                       BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=pow2(D // 2),
                       num_warps=4 if block_hq * D >= 2048 else 1)
    return qo, ko


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        gq, gk = _launch(gq, gk, cos, sin, True)
        return gq, gk, None, None


def apply_rope_triton(q, k, cos, sin):
    if sin.stride() != cos.stride():  # one set of strides serves both in the kernel
        cos, sin = cos.contiguous(), sin.contiguous()
    return _Rope.apply(q, k, cos, sin)

"""Attention of one new token per row over a static KV cache, reading only the positions it may see.

A decode step's cache is allocated for prompt + cap and masked beyond the current position; SDPA
with that mask reads every slot of it, every step (at 7B with the KL reference's twins, 128 rows
x 226 slots x 57 KB a token: 1.65 GB a step, a third of the weights' bytes). The Triton kernel
reads the mask first and walks the cache only up to its last visible position, so a step reads
the cache up to where it is filled: on average two thirds of it over a 76-token prompt and 150
new tokens. Its loop has no branch, so Triton's pipeliner loads the next blocks' keys and values
while one is used (until the ninth session a block without a visible position was skipped by a
branch, which kept every load waiting where it was issued: bench/sass.py's LATE check). One
program per (row, key/value head) holds that head's query heads as the rows of its tiles (grouped-query
attention without copying keys or values per query head) with an online softmax in fp32, and
writes the output in the [rows, 1, heads, dim] layout the attention module returns, so no
transpose copy follows.

Where rows x key/value heads are too few programs to keep a GPU's memory busy (the Qwen2.5-1.5B
shape's 64 rows x 2 heads: 128 programs, one per SM, each walking its cache alone), the cache's
positions are split among several programs per head (flash-decoding): each writes its softmax's
partial output and log-sum-exp, and a second small kernel weighs them together. On an H200 the
unsplit kernel took 15% of a 1.5B rollout's device time for ~6% of its bytes (bench/RESULTS.md).

  torch   the reference and the fallback: SDPA with the query heads packed per key/value head
          (what nla/decoding.py ran before), which reads the whole cache.
  triton  the above; boolean masks (what Hugging Face's SDPA path builds), head dims that are a
          power of two, fp16, fp32 (IEEE dots), and bf16 where the GPU has bf16 dots (sm_80+).

decode_attention(query [b, h, 1, d], key/value [b, kvh, S, d], mask [b, 1, 1, S] bool, scale)
-> [b, 1, h, d].
"""
from __future__ import annotations

import torch

from .dispatch import backend, dot_supported, empty, pow2, sm_count

# cache positions per step of a program's loop, and warps. By bench/sass.py (with the launch's own
# specialization, since the ninth session; the figures before it were overstated), 32 positions on
# 8 warps take 67-80 registers and 37 KB of shared memory (three pipeline stages of keys and
# values): three programs an SM on sm_80/90, no spill under Triton 3.6 or 3.9
BLOCK_N, WARPS = 32, 8
# programs to aim for by splitting the cache's positions: None is four per SM of the GPU (on an
# H200's 132, the 7B shape with its twins, 128 rows x 4 heads, stays unsplit; the 1.5B shape splits
# in 4), and no split on a CPU (the interpreter: tests set it to split). A split program runs 16
# positions on 4 warps: 76-93 registers and 20.5 KB, four to six programs an SM
PROGRAMS: int | None = None
SPLIT_BLOCK_N, SPLIT_WARPS = 16, 4


def _target(device: torch.device) -> int:
    if PROGRAMS is not None:
        return PROGRAMS
    return 4 * sm_count(device) if device.type == "cuda" else 1


def _split(programs: int, S: int, target: int) -> tuple[int, int, int, int]:
    """(splits, positions per split, BLOCK_N, warps) for `programs` (rows x kv heads) over S slots,
    aiming at `target` programs."""
    if -(-S // BLOCK_N) < 2 or programs * 2 > target:
        return 1, S, BLOCK_N, WARPS
    blocks = -(-S // SPLIT_BLOCK_N)
    per = -(-blocks // min(blocks, target // programs))
    return -(-blocks // per), per * SPLIT_BLOCK_N, SPLIT_BLOCK_N, SPLIT_WARPS


def decode_attention(query, key, value, mask, scale: float):
    if backend(query, key, value) == "torch" or not triton_serves(query, key, value, mask):
        return decode_attention_torch(query, key, value, mask, scale)
    return decode_attention_triton(query, key, value, mask, scale)


def triton_serves(query, key, value, mask) -> bool:
    d, groups = query.shape[-1], query.shape[1] // key.shape[1]
    return (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[-1] == key.shape[2]
            and mask.shape[0] in (1, query.shape[0]) and mask.shape[1] == mask.shape[2] == 1
            and d == pow2(d) and d >= 16 and value.shape[-1] == d
            and groups <= 64 and query.shape[1] % key.shape[1] == 0 and dot_supported(query.device, query.dtype))


def decode_attention_torch(query, key, value, mask, scale: float):
    b, h, _, d = query.shape
    groups = h // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(query.reshape(b, h // groups, groups, d), key, value,
                                                           attn_mask=mask, scale=scale)
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous()


@torch.library.custom_op("nla::decode_attention", mutates_args=())
def _decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """A torch op, so that torch.compile takes a decode step with this kernel whole."""
    b, h, _, d = query.shape
    kvh, S = key.shape[1], key.shape[2]
    out = empty((b, 1, h, value.shape[-1]), query.dtype, query.device)
    if not b:
        return out
    splits, chunk, block_n, warps = _split(b * kvh, S, _target(query.device))
    part, lse = out, out  # unsplit: the kernel writes the output itself
    if splits > 1:
        part = empty((splits, b, h, d), torch.float32, query.device)
        lse = empty((splits, b, h), torch.float32, query.device)
    partials, combine = _k()
    # the mask as bytes: a bool load is converted where it is issued, which would make the loop
    # wait for the next block's mask (the kernel compares the bytes a block later)
    partials[(b * kvh, splits)](query, key, value, mask.view(torch.uint8), part, lse, S, kvh, chunk, float(scale),
                                query.stride(0), query.stride(1), query.stride(3),
                                *key.stride(), *value.stride(), mask.stride(0) if mask.shape[0] > 1 else 0,
                                mask.stride(3), G=h // kvh, BLOCK_G=max(16, pow2(h // kvh)), BLOCK_N=block_n, D=d,
                                IEEE=query.dtype == torch.float32, SPLIT=splits > 1, BLOCK_C=min(1024, pow2(chunk)),
                                num_warps=warps)
    if splits > 1:
        combine[(b * h,)](part, lse, out, b * h, splits, D=d, BLOCK_S=pow2(splits))
    return out


@_decode_attention_op.register_fake
def _(query, key, value, mask, scale):
    return query.new_empty((query.shape[0], 1, query.shape[1], value.shape[-1]))


def decode_attention_triton(query, key, value, mask, scale: float):
    return torch.ops.nla.decode_attention(query, key, value, mask, float(scale))


_K = None


def _k():
    global _K
    if _K is None:
        import triton
        import triton.language as tl

        @triton.jit
        def partials(Q, K, V, MASK, OUT, LSE, S, KVH, CHUNK, scale, s_qb, s_qh, s_qd, s_kb, s_kh, s_ks, s_kd,
                     s_vb, s_vh, s_vs, s_vd, s_mb, s_ms,
                     G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                     IEEE: tl.constexpr, SPLIT: tl.constexpr, BLOCK_C: tl.constexpr):
            pid, sp = tl.program_id(0), tl.program_id(1)
            b, h = (pid // KVH).to(tl.int64), (pid % KVH).to(tl.int64)
            rg, rd = tl.arange(0, BLOCK_G), tl.arange(0, D)
            gm = rg < G
            # the query heads that share key/value head h are h*G .. h*G+G-1 (repeat_kv's order)
            q = tl.load(Q + b * s_qb + (h * G + rg)[:, None] * s_qh + rd[None, :] * s_qd, mask=gm[:, None], other=0.0)
            m = tl.full((BLOCK_G,), -float("inf"), tl.float32)
            l = tl.zeros((BLOCK_G,), tl.float32)
            acc = tl.zeros((BLOCK_G, D), tl.float32)
            kb, vb = K + b * s_kb + h * s_kh, V + b * s_vb + h * s_vh
            # this split's positions end after its last visible one: a cache is read only up to
            # where it is filled, by a loop with no branch in it, so Triton's pipeliner can load the
            # next blocks' mask, keys and values while this one is used (a data-dependent skip
            # inside the loop kept them late: every block waited for its loads, bench/sass.py)
            lo = sp * CHUNK
            hi = tl.minimum(S, lo + CHUNK)
            end = lo
            for c0 in range(lo, hi, BLOCK_C):
                rc = c0 + tl.arange(0, BLOCK_C)
                vis = tl.load(MASK + b * s_mb + rc * s_ms, mask=rc < hi, other=0) != 0
                end = tl.maximum(end, tl.max(tl.where(vis, rc + 1, lo), 0))
            rn = lo + tl.arange(0, BLOCK_N)
            okb = tl.load(MASK + b * s_mb + rn * s_ms, mask=rn < end, other=0)
            for n0 in range(lo, end, BLOCK_N):
                rn = n0 + tl.arange(0, BLOCK_N)
                inb = rn < end
                # the next block's mask bytes, in flight while this block runs (too few bytes a
                # thread for the pipeliner's async copies)
                okb_next = tl.load(MASK + b * s_mb + (rn + BLOCK_N) * s_ms, mask=rn + BLOCK_N < end, other=0)
                ok = okb != 0
                k = tl.load(kb + rn[:, None] * s_ks + rd[None, :] * s_kd, mask=inb[:, None], other=0.0)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s = tl.where(ok[None, :], s * scale, -float("inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                m_use = tl.where(m_new == -float("inf"), 0.0, m_new)  # no position seen yet: weights 0, not NaN
                alpha = tl.exp(m - m_use)
                p = tl.exp(s - m_use[:, None])
                l = l * alpha + tl.sum(p, 1)
                # masked positions before `end` are loaded and weigh 0 (a non-finite value there
                # gives NaN, as it does in SDPA)
                v = tl.load(vb + rn[:, None] * s_vs + rd[None, :] * s_vd, mask=inb[:, None], other=0.0)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m = m_new
                okb = okb_next
            row = b * KVH * G + h * G + rg  # [b, 1, heads, d], contiguous: head h*G+g of row b
            if SPLIT:  # this split's share: its softmax's output and log-sum-exp (none seen: 0 and -inf)
                seen = l > 0
                l = tl.where(seen, l, 1.0)
                out = tl.where(seen[:, None], acc / l[:, None], 0.0)
                n_rows = tl.num_programs(0) * G  # rows x heads
                tl.store(OUT + (sp * n_rows + row)[:, None] * D + rd[None, :], out, mask=gm[:, None])
                tl.store(LSE + sp * n_rows + row, tl.where(seen, m + tl.log(l), -float("inf")), mask=gm)
            else:
                out = acc / l[:, None]
                tl.store(OUT + row[:, None] * D + rd[None, :], out.to(OUT.dtype.element_ty), mask=gm[:, None])

        @triton.jit
        def combine(PART, LSE, OUT, n_rows, splits, D: tl.constexpr, BLOCK_S: tl.constexpr):
            # one (row, head): its splits' outputs weighed by their share of the softmax's mass
            r = tl.program_id(0).to(tl.int64)
            rs, rd = tl.arange(0, BLOCK_S), tl.arange(0, D)
            sm = rs < splits
            lse = tl.load(LSE + rs * n_rows + r, mask=sm, other=-float("inf"))
            w = tl.exp(lse - tl.max(lse, 0))  # a split that saw nothing weighs 0
            part = tl.load(PART + (rs[:, None] * n_rows + r) * D + rd[None, :], mask=sm[:, None], other=0.0)
            out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
            tl.store(OUT + r * D + rd, out.to(OUT.dtype.element_ty))

        _K = (partials, combine)
    return _K

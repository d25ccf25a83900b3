"""Decode-time matmul with a bitsandbytes nf4 weight, dequantised in registers, never in memory.

A rollout on a 4-bit base reads every weight once per decode step. bitsandbytes' matmul for more
than one row first writes a full bf16 copy of the weight and then reads it back: ~4.5 bytes moved
per weight instead of the 0.5 it is stored in, which is why a 7B nf4 rollout takes ~20 ms a step
against a ~1 ms floor (bench/RESULTS.md). Here each program reads a [BLOCK_N, BLOCK_K] tile of
packed nibbles and its block scales, dequantises them exactly as bitsandbytes does (code[nibble]
* absmax in fp32, rounded to the compute dtype), and multiplies with tl.dot; split-K gives a
decode batch's few rows enough programs to fill the GPU.

Format (bitsandbytes, quant_type nf4): W [N, K] flattened row-major; byte i holds elements 2i
(high nibble) and 2i+1 (low nibble); element e is scaled by absmax[e // blocksize]. Double
quantisation (8-bit absmax) is undone once per weight by `prepare`: 4 bytes per 64 weights.
Sampling only (no autograd); training keeps bitsandbytes' own path.
"""
from __future__ import annotations

import torch

from .dispatch import backend, empty, pow2

MAX_ROWS = 128  # a decode batch, or one with its KL reference's rows (lora.side_by_side); above it,
# dequantising per row tile loses to bitsandbytes' dequantise-once


def servable(module) -> bool:
    """Is `module` a bitsandbytes Linear4bit whose weight this kernel reads (nf4, 2-D, whole blocks per row)?"""
    qs = getattr(getattr(module, "weight", None), "quant_state", None)
    return (qs is not None and qs.quant_type == "nf4" and len(qs.shape) == 2
            and qs.shape[1] % qs.blocksize == 0 and qs.shape[1] % 2 == 0
            # bitsandbytes repacks a weight in place for its own CPU kernel (eval, no grad, avx512-bf16):
            and not getattr(qs, "packing_format_for_cpu", False))


def keep_standard_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights in place for its own CPU kernel (it does so
    the first time a Linear4bit runs in eval without grad on an avx512-bf16 CPU): this kernel,
    its torch reference and the grouped sampling weights (nla/lora.py) read the standard layout."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def prepare(module) -> tuple | None:
    """(packed [N*K/2] uint8, absmax [N*K/blocksize] fp32, code [16] fp32, N, K, blocksize) of a
    bitsandbytes Linear4bit with an nf4 weight, or None where this kernel does not apply."""
    if not servable(module):
        return None
    qs = module.weight.quant_state
    N, K = qs.shape
    absmax = qs.absmax
    if qs.nested:
        from bitsandbytes.functional import dequantize_blockwise
        absmax = dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return (module.weight.data.view(torch.uint8).reshape(-1), absmax.float().contiguous(),
            qs.code.float().contiguous(), N, K, qs.blocksize)


# ---------------------------------------------------------------- torch reference
def dequantize_torch(packed, absmax, code, N: int, K: int, blocksize: int, dtype) -> torch.Tensor:
    q = torch.stack([packed >> 4, packed & 15], -1).reshape(-1).long()
    return (code[q].view(-1, blocksize) * absmax.view(-1, 1)).reshape(N, K).to(dtype)


def nf4_linear_torch(x, packed, absmax, code, N, K, blocksize, bias=None):
    return torch.nn.functional.linear(x, dequantize_torch(packed, absmax, code, N, K, blocksize, x.dtype), bias)


# ---------------------------------------------------------------- dispatch
def usable(x, packed) -> bool:
    """Does the kernel pay for x: CUDA (or a forced Triton), a decode batch, no gradient?"""
    rows = x.numel() // max(1, x.shape[-1])
    return not (rows > MAX_ROWS or (torch.is_grad_enabled() and x.requires_grad) or backend(x, packed) == "torch")


def nf4_linear(x, module, prepared: tuple):
    """module(x) for a bitsandbytes nf4 Linear4bit, through the kernel when it pays, else through
    bitsandbytes."""
    return nf4_linear_triton(x, *prepared, bias=module.bias) if usable(x, prepared[0]) else module(x)


# ---------------------------------------------------------------- triton
_K = None


def _k():
    global _K
    if _K is None:
        import triton
        import triton.language as tl

        @triton.jit
        def kernel(X, P, A, C, OUT, M, N, K, k_split, s_xm, s_xk,
                   BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   IEEE: tl.constexpr):
            # row tiles vary fastest: programs that read the same weight tile run together, and the
            # second read comes from L2
            pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
            rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: N*K passes 2^31 at 7B+
            mm, mn = rm < M, rn < N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            k0 = pid_s * k_split
            for kk in range(0, k_split, BLOCK_K):
                rk = k0 + kk + tl.arange(0, BLOCK_K)
                x = tl.load(X + rm[:, None] * s_xm + rk[None, :] * s_xk, mask=mm[:, None] & (rk < K)[None, :], other=0.0)
                rb = (k0 + kk) // 2 + tl.arange(0, BLOCK_K // 2)
                byte = tl.load(P + rn[:, None] * (K // 2) + rb[None, :], mask=mn[:, None] & (rb < K // 2)[None, :], other=0)
                q = tl.join(byte >> 4, byte & 15).reshape(BLOCK_N, BLOCK_K).to(tl.int32)  # 2i: high, 2i+1: low
                v = tl.load(C + q)
                ra = (k0 + kk) // BS + tl.arange(0, BLOCK_K // BS)
                a = tl.load(A + rn[:, None] * (K // BS) + ra[None, :], mask=mn[:, None] & (ra < K // BS)[None, :], other=0.0)
                w = (v.reshape(BLOCK_N, BLOCK_K // BS, BS) * a[:, :, None]).reshape(BLOCK_N, BLOCK_K).to(x.dtype)
                if IEEE:
                    acc += tl.dot(x, tl.trans(w), input_precision="ieee")
                else:
                    acc += tl.dot(x, tl.trans(w))
            tl.store(OUT + pid_s * M * N + rm[:, None] * N + rn[None, :], acc, mask=mm[:, None] & mn[None, :])

        _K = kernel
    return _K


def _splits(K: int, block_k: int, tiles: int, target: int = 264) -> int:
    """Split K into equal parts (whole BLOCK_Ks) so that the programs number about `target` (two
    waves on a 132-SM GPU): a decode batch has one row tile, so N alone gives too few. The split
    nearest the target by ratio, not the first above it: each part writes an fp32 [M, N] partial,
    and at 7B's down projection the first split above 264 programs would write as many partial
    bytes as the weight has."""
    steps = K // block_k
    splits = [s for s in range(1, steps + 1) if steps % s == 0]
    return min(splits, key=lambda s: max(tiles * s / target, target / (tiles * s)))


def _plan(M: int, N: int, K: int, blocksize: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, split-K parts, row tiles) for an [M, K] x [N, K]^T product."""
    BLOCK_M = min(64, pow2(M))
    BLOCK_K = max(blocksize, 128) if K % max(blocksize, 128) == 0 else blocksize
    n_tiles, m_tiles = -(-N // BLOCK_N), -(-M // BLOCK_M)
    return BLOCK_M, BLOCK_K, _splits(K, BLOCK_K, n_tiles * m_tiles), m_tiles


BLOCK_N = 64


@torch.library.custom_op("nla::nf4_partials", mutates_args=())
def nf4_partials(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                 N: int, K: int, blocksize: int) -> torch.Tensor:
    """The kernel's fp32 split-K partial products [S, M, N] of x [M, K]. A torch op, so that
    torch.compile takes the decode step of a 4-bit base whole (the kernel is opaque to it; the sum
    of the partials, the bias and the cast after it are fused with their neighbours)."""
    M = x.shape[0]
    BLOCK_M, BLOCK_K, S, m_tiles = _plan(M, N, K, blocksize)
    part = empty((S, M, N), torch.float32, x.device)
    if M:
        _k()[(m_tiles, -(-N // BLOCK_N), S)](
            x, packed, absmax, code, part, M, N, K, K // S, *x.stride(), BS=blocksize,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, IEEE=x.dtype == torch.float32, num_warps=4)
    return part


@nf4_partials.register_fake
def _(x, packed, absmax, code, N, K, blocksize):
    return x.new_empty((_plan(x.shape[0], N, K, blocksize)[2], x.shape[0], N), dtype=torch.float32)


def nf4_linear_triton(x, packed, absmax, code, N, K, blocksize, bias=None):
    lead = x.shape[:-1]
    part = torch.ops.nla.nf4_partials(x.reshape(-1, K), packed, absmax, code, N, K, blocksize)
    out = part[0] if part.shape[0] == 1 else part.sum(0)
    if bias is not None:  # added before the one rounding, as a GEMM's epilogue does
        out = out + bias.float()
    return out.to(x.dtype).reshape(*lead, N)

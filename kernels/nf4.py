"""Decode-time matmul with a bitsandbytes nf4 weight, dequantised in registers, never in memory.

A rollout on a 4-bit base reads every weight once per decode step. bitsandbytes' matmul for more
than one row first writes a full bf16 copy of the weight and then reads it back: ~4.5 bytes moved
per weight instead of the 0.5 it is stored in, which is why a 7B nf4 rollout takes ~20 ms a step
against a ~1 ms floor (bench/RESULTS.md). Here each program reads a [BLOCK_N, BLOCK_K] tile of
packed nibbles and its block scales, dequantises them exactly as bitsandbytes does (code[nibble]
* absmax in fp32, rounded to the compute dtype), and multiplies with tl.dot; split-K gives a
decode batch's few rows enough programs to fill the GPU.

At 0.5 bytes a weight the kernel has only a few instructions per weight before it is slower than
memory (an H200 can issue ~4 per weight at its bandwidth: 132 SMs x 4 warp-instructions a cycle),
so the dequantisation is cut to the bone, by its compiled SASS (`bench/sass.py`, no GPU needed):
one gather per BYTE from a 256-entry table of code pairs (two fp32 codes in an int64) instead of
one per nibble with its shifts; the even and odd elements of K as two dots (the dot's sum does not
care about order, so the nibbles are never interleaved back); the weight tile as the dot's left
operand; no masks along K (whole blocks by construction) nor N (clamped loads where N is ragged);
and one row tile for up to 128 rows, so each weight is dequantised once per step. No load waits
where it is issued: the next tile's bytes are loaded an iteration ahead (Triton does not do that
for a load that feeds a table lookup), and the activations come reordered (`evens_then_odds`) so
that the pipeliner copies them in ahead. On sm_90, as launched (bench/sass.py): 6-9 instructions
per weight, no register spill on sm_80/89/90.

**Off by default: it loses to bitsandbytes.** Timed on an H200 (2026-11-27, device time in a CUDA
graph, Qwen2.5-7B shapes: bench/RESULTS.md), it reads 40-265 GB/s, 0.21-0.78x bitsandbytes'
dequantise-then-GEMM at every decode size, where the instruction counts above predicted ~1.8 TB/s:
those counts are not what bounds it. What Triton compiled it to says what likely did: each
iteration used the bytes it had just loaded, so every iteration waited a whole memory latency (now
they are loaded an iteration ahead, not yet timed; the table gathers are the next suspect: `table`
has a one-cache-line variant). So a 4-bit base samples through bitsandbytes (its decode step
captured, not compiled), and this kernel runs only where NLA_KERNELS=triton asks for it: its tests,
and work on making it pay.

Format (bitsandbytes, quant_type nf4): W [N, K] flattened row-major; byte i holds elements 2i
(high nibble) and 2i+1 (low nibble); element e is scaled by absmax[e // blocksize]. Double
quantisation (8-bit absmax) is undone once per weight by `prepare`: 4 bytes per 64 weights.
The kernel samples only (no autograd); everything else, training included, goes through
bitsandbytes' own op with those scales (`bnb_linear`).
"""
from __future__ import annotations

import os

import torch

from .dispatch import backend, dot_supported, empty, forced, pow2

MAX_ROWS = 128  # a decode batch, or one with its KL reference's rows (lora.side_by_side); above it
# a step dequantises every weight once per row tile, which may lose to bitsandbytes' dequantise-once


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


def code_pairs(code: torch.Tensor) -> torch.Tensor:
    """[256] int64: entry b holds (code[b >> 4], code[b & 15]) as two fp32, the first in the low
    half: both elements of packed byte b, in order, from one read."""
    b = torch.arange(256, device=code.device)
    return torch.stack([code.float()[b >> 4], code.float()[b & 15]], -1).contiguous().view(torch.int64).reshape(256)


def prepare(module) -> tuple | None:
    """(packed [N*K/2] uint8, absmax [N*K/blocksize] fp32, code pairs [256] int64 (code_pairs), N, K,
    blocksize) of a bitsandbytes Linear4bit with an nf4 weight, or None where this kernel does not
    apply."""
    if not servable(module):
        return None
    qs = module.weight.quant_state
    N, K = qs.shape
    absmax = qs.absmax
    if qs.nested:
        from bitsandbytes.functional import dequantize_blockwise
        absmax = dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return (module.weight.data.view(torch.uint8).reshape(-1), absmax.float().contiguous(),
            code_pairs(qs.code), N, K, qs.blocksize)


# ---------------------------------------------------------------- torch reference
def dequantize_torch(packed, absmax, pairs, N: int, K: int, blocksize: int, dtype) -> torch.Tensor:
    codes = pairs.view(torch.float32).view(256, 2)[packed.long()].reshape(-1)  # element order: byte i -> 2i, 2i+1
    return (codes.view(-1, blocksize) * absmax.view(-1, 1)).reshape(N, K).to(dtype)


def nf4_linear_torch(x, packed, absmax, pairs, N, K, blocksize, bias=None):
    return torch.nn.functional.linear(x, dequantize_torch(packed, absmax, pairs, N, K, blocksize, x.dtype), bias)


# ---------------------------------------------------------------- dispatch
def enabled() -> bool:
    """Is the kernel asked for (NLA_KERNELS=triton)? Not by default: it is slower than bitsandbytes
    (the docstring above)."""
    return forced() == "triton"


def usable(x, packed) -> bool:
    """Can the kernel serve x where it is asked for: CUDA (or the interpreter), a decode batch, no
    gradient, a 16-bit compute dtype on a GPU (the tiles are sized for it: fp32 ones need up to
    145 KB of shared memory, more than a consumer GPU has) that its dots support (bf16: sm_80+)?"""
    rows = x.numel() // max(1, x.shape[-1])
    return not (not enabled() or rows > MAX_ROWS or (torch.is_grad_enabled() and x.requires_grad)
                or backend(x, packed) == "torch" or (x.is_cuda and x.dtype == torch.float32)
                or not dot_supported(x.device, x.dtype))


def nf4_linear(x, module, prepared: tuple):
    """module(x) for a bitsandbytes nf4 Linear4bit (`prepared` = prepare(module)), differentiable in
    x: through the kernel where it is asked for and can serve, else through bitsandbytes' own op."""
    y = product(x, prepared, module.bias, module)
    # else the Linear4bit itself, which casts in and out (our bases compute in the weights' dtype)
    return y if y is not None else module(x)


def product(x, prepared: tuple, bias, module):
    """x W^T (+ bias) for `prepared` (one Linear4bit's weight, or siblings' stacked, with `module`
    one of them): the kernel where it is asked for and can serve, else bitsandbytes' op where x and
    the bias are in the compute dtype; None where neither (the caller falls back)."""
    if usable(x, prepared[0]):
        return nf4_linear_triton(x, *prepared, bias=bias)
    if in_compute_dtype(x, module, bias):
        return bnb_linear(x, prepared, bias)
    return None


def in_compute_dtype(x, module, bias) -> bool:
    """Are x and the bias in `module`'s (a Linear4bit's) compute dtype, as bnb_linear takes them?"""
    dt = module.compute_dtype or x.dtype
    return x.dtype == dt and (bias is None or bias.dtype == dt)


def dequantize_into(out: torch.Tensor, prepared: tuple) -> None:
    """out [N, K] (any float dtype, rows contiguous) = the weight as bitsandbytes dequantises it
    before its own GEMM: a sampling copy of a 4-bit weight (nla/lora.py, _merge)."""
    packed, absmax, _, N, K, blocksize = prepared
    args = (packed.view(-1, 1), absmax, blocksize, "nf4", (N, K), out.dtype)
    try:  # its out= form: no second copy of the weight (bitsandbytes has it for CUDA, not for a CPU)
        torch.ops.bitsandbytes.dequantize_4bit.out(*args, out=out)
    except NotImplementedError:
        out.copy_(torch.ops.bitsandbytes.dequantize_4bit.default(*args))


# ---------------------------------------------------------------- bitsandbytes' op, scales undone once
def _gemm(x, prepared, bias):
    packed, absmax, _, N, K, blocksize = prepared
    return torch.ops.bitsandbytes.gemm_4bit.default(x, packed.view(-1, 1), (N, K), absmax, blocksize, "nf4",
                                                    bias=bias)


class _BnbLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, prepared, bias):
        ctx.prepared = prepared  # frozen weights: held, not saved (nothing for checkpointing to pack)
        return _gemm(x, prepared, bias)

    @staticmethod
    def backward(ctx, g):
        packed, absmax, _, N, K, blocksize = ctx.prepared
        w = torch.ops.bitsandbytes.dequantize_4bit.default(packed.view(-1, 1), absmax, blocksize, "nf4", (N, K),
                                                           g.dtype)
        return g @ w, None, None


def bnb_linear(x, prepared: tuple, bias=None):
    """x W^T (+ bias) through bitsandbytes' gemm op: its own choice per GPU and size between its
    fused 4-bit kernel and dequantise-then-GEMM, and a Linear4bit's numbers to the bit, but with the
    block scales undone once (`prepare`: 4 bytes per 64 weights, ~0.4 GB at 7B), where a Linear4bit
    with double quantisation undoes them at every call (two more kernels wherever it dequantises
    before its GEMM: at training sizes always, three times a projection per checkpointed pass; at
    decode sizes on an H100/H200) under three more layers of Python. The gradient in x as
    bitsandbytes takes it: dequantise, then a GEMM. Rows of sibling projections (lora._NF4Group)
    are one weight here."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _BnbLinear.apply(x, prepared, bias)
    return _gemm(x, prepared, bias)


# ---------------------------------------------------------------- triton
_K = None


def _k():
    global _K
    if _K is None:
        import triton
        import triton.language as tl

        @triton.jit
        def kernel(X, P, A, T, OUT, M, N, K, k_split, s_xm, s_xk,
                   BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN_N: tl.constexpr, IEEE: tl.constexpr, PAIRS: tl.constexpr):
            # row tiles vary fastest: programs that read the same weight tile run together, and the
            # second read comes from L2
            pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
            # a tile's corner in int64 (scalars, so no product of sizes can overflow), the offsets
            # within it in int32 (below 128 rows x a row's length): int64 offsets per element cost
            # registers, and registers decide how many programs an SM holds (bench/RESULTS.md)
            m0, n0, k0 = pid_m * BLOCK_M, pid_n * BLOCK_N, pid_s * k_split
            X += m0.to(tl.int64) * s_xm + k0.to(tl.int64) * s_xk
            P += n0.to(tl.int64) * (K // 2) + k0 // 2
            A += n0.to(tl.int64) * (K // BS) + k0 // BS
            OUT += (pid_s.to(tl.int64) * M + m0) * N + n0
            rm = tl.arange(0, BLOCK_M)
            rn = tl.arange(0, BLOCK_N)
            if not EVEN_N:
                rn = tl.minimum(rn, N - 1 - n0)  # ragged N: the last tile reads a real row twice, stores once
            mm = rm < M - m0
            HB: tl.constexpr = BLOCK_K // 2  # bytes per row of a tile: element 2i is byte i's high nibble
            j = tl.arange(0, HB)
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # out^T: the weight is the left operand
            pb = P + rn[:, None] * (K // 2) + j[None, :]
            byte = tl.load(pb)
            for kk in range(0, k_split, BLOCK_K):
                # the next tile's bytes are loaded before this one's are used, so they are in flight
                # while it is dequantised and multiplied. Loaded where they are used, they cost a
                # whole memory latency every iteration, at one or two programs an SM: Triton's
                # pipeliner prefetches the scales and the table lookups but not a load whose values
                # become addresses (bench/sass.py --check; bench/RESULTS.md, ninth session). The
                # last iteration reloads its own tile: in bounds, unused
                byte_next = tl.load(pb + tl.minimum(kk + BLOCK_K, k_split - BLOCK_K) // 2)
                ra = kk // BS + tl.arange(0, BLOCK_K // BS)
                a = tl.load(A + rn[:, None] * (K // BS) + ra[None, :])[:, :, None]
                # X comes with each quantisation block's even elements first, then its odd ones
                # (nf4_linear_triton): runs the pipeliner copies in ahead, where two-byte loads of
                # every other element were late
                xp = X + rm[None, :] * s_xm + (kk + (j // (BS // 2)) * BS + j % (BS // 2))[:, None] * s_xk
                xe = tl.load(xp, mask=mm[None, :], other=0.0)  # [HB, BLOCK_M]: even elements of K
                xo = tl.load(xp + (BS // 2) * s_xk, mask=mm[None, :], other=0.0)  # odd ones
                if PAIRS:
                    pair = tl.load(T + byte.to(tl.int32))  # both codes of the byte, in one read
                    ch = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
                    cl = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
                else:  # each nibble's code from the 16 (one cache line)
                    ch = tl.load(T + (byte >> 4))  # on the bytes: with an int32 copy, sm_80 spills (3.9)
                    cl = tl.load(T + (byte & 15))
                # scaled in fp32 and rounded once to the compute dtype, as bitsandbytes dequantises
                wh = (ch.reshape(BLOCK_N, BLOCK_K // BS, BS // 2) * a).reshape(BLOCK_N, HB).to(xe.dtype)
                wl = (cl.reshape(BLOCK_N, BLOCK_K // BS, BS // 2) * a).reshape(BLOCK_N, HB).to(xe.dtype)
                if IEEE:
                    acc = tl.dot(wh, xe, acc, input_precision="ieee")
                    acc = tl.dot(wl, xo, acc, input_precision="ieee")
                else:
                    acc = tl.dot(wh, xe, acc)
                    acc = tl.dot(wl, xo, acc)
                byte = byte_next
            rs = tl.arange(0, BLOCK_N)
            tl.store(OUT + rm[None, :] * N + rs[:, None], acc, mask=mm[None, :] & (rs < N - n0)[:, None])

        _K = kernel
    return _K


PROGRAMS = 264  # split-K aims at about this many programs: two waves on a 132-SM GPU


def _splits(K: int, block_k: int, tiles: int) -> int:
    """Split K into equal parts (whole BLOCK_Ks) so that the programs number about PROGRAMS: a
    decode batch has one row tile, so N alone gives too few. The split nearest the target by ratio,
    not the first above it: each part writes an fp32 [M, N] partial, and at 7B's down projection
    the first split above 264 programs would write as many partial bytes as the weight has."""
    steps = K // block_k
    splits = [s for s in range(1, steps + 1) if steps % s == 0]
    return min(splits, key=lambda s: max(tiles * s / PROGRAMS, PROGRAMS / (tiles * s)))


# (BLOCK_N, BLOCK_K, warps) per row tile, chosen by compiled SASS (bench/sass.py --sweep): no
# register spill on sm_80, sm_89 and sm_90 under Triton 3.6 (torch 2.11's) and 3.9 both, at most
# 69 KB of shared memory (consumer GPUs have 99 KB a block), two pipeline stages. As launched, 4
# warps would issue 12-22% fewer instructions per weight at 32 and 64 rows (at 64, two 4-warp
# programs an SM instead of one of 8); instruction counts have not predicted this kernel's speed,
# so the GPU's nf4-sweep decides (bench/RESULTS.md, ninth session)
TILES = {16: (128, 64, 4), 32: (128, 64, 8), 64: (128, 64, 8), 128: (128, 64, 8)}
STAGES = 2
MAXNREG = None  # registers a thread may hold (ptxas' maxnreg); None: as many as ptxas wants (136 at
# 64 rows on sm_90 under Triton 3.6: one 8-warp program an SM). The nf4-sweep bench tries 128: two


def _plan(M: int, N: int, K: int, blocksize: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, split-K parts, row tiles) for an [M, K] x [N, K]^T product."""
    BLOCK_M = min(max(TILES), pow2(M))
    BLOCK_N, want_k, warps = TILES[BLOCK_M]
    BLOCK_K = max(blocksize, want_k) if K % max(blocksize, want_k) == 0 else blocksize
    n_tiles, m_tiles = -(-N // BLOCK_N), -(-M // BLOCK_M)
    return BLOCK_M, BLOCK_N, BLOCK_K, warps, _splits(K, BLOCK_K, n_tiles * m_tiles), m_tiles


def table() -> str:
    """NLA_NF4_TABLE=pairs|codes: how the kernel looks its codes up, an open experiment (`bench/
    kernels.py --only nf4` times both against bitsandbytes). "pairs" (the default): both codes of a
    byte from 256 int64 (2 KB, so a warp's 32 lookups can touch 16 cache lines: the first suspect
    for its measured slowness); "codes": each nibble's from the 16 fp32 codes (64 B, one line), two
    lookups a byte."""
    t = os.environ.get("NLA_NF4_TABLE", "pairs")
    if t not in ("pairs", "codes"):
        raise ValueError(f"NLA_NF4_TABLE must be pairs or codes, got {t!r}")
    return t


_CODES: dict = {}


def _codes(pairs: torch.Tensor) -> torch.Tensor:
    """The 16 fp32 codes inside a pair table (entry 16k holds code[k] first), made once per table."""
    key = (pairs.data_ptr(), pairs.device)
    if key not in _CODES:
        _CODES[key] = pairs.view(torch.float32).view(256, 2)[::16, 0].contiguous()
    return _CODES[key]


@torch.library.custom_op("nla::nf4_partials", mutates_args=())
def nf4_partials(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, pairs: torch.Tensor,
                 N: int, K: int, blocksize: int) -> torch.Tensor:
    """The kernel's fp32 split-K partial products [S, M, N] of x [M, K], given x with each
    quantisation block's even elements first and its odd ones after (`evens_then_odds`). A torch
    op, so that torch.compile takes the decode step of a 4-bit base whole (the kernel is opaque to
    it; the reordering before it, the sum of the partials, the bias and the cast after it are
    fused with their neighbours)."""
    M = x.shape[0]
    BLOCK_M, BLOCK_N, BLOCK_K, warps, S, m_tiles = _plan(M, N, K, blocksize)
    part = empty((S, M, N), torch.float32, x.device)
    pair_table = table() == "pairs"
    if M:
        _k()[(m_tiles, -(-N // BLOCK_N), S)](
            x, packed, absmax, pairs if pair_table else _codes(pairs), part, M, N, K, K // S, *x.stride(),
            BS=blocksize, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EVEN_N=N % BLOCK_N == 0,
            IEEE=x.dtype == torch.float32, PAIRS=pair_table, num_warps=warps, num_stages=STAGES,
            **({"maxnreg": MAXNREG} if MAXNREG else {}))
    return part


@nf4_partials.register_fake
def _(x, packed, absmax, pairs, N, K, blocksize):
    return x.new_empty((_plan(x.shape[0], N, K, blocksize)[4], x.shape[0], N), dtype=torch.float32)


def evens_then_odds(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x [M, K] with each quantisation block's even elements first, then its odd ones (a copy): the
    order the kernel reads, as a byte's high nibble holds an even element and its low one the odd."""
    return x.reshape(x.shape[0], -1, blocksize // 2, 2).transpose(-1, -2).reshape(x.shape[0], -1)


def nf4_linear_triton(x, packed, absmax, pairs, N, K, blocksize, bias=None):
    lead = x.shape[:-1]
    part = torch.ops.nla.nf4_partials(evens_then_odds(x.reshape(-1, K), blocksize), packed, absmax, pairs, N, K,
                                      blocksize)
    out = part[0] if part.shape[0] == 1 else part.sum(0)
    if bias is not None:  # added before the one rounding, as a GEMM's epilogue does
        out = out + bias.float()
    return out.to(x.dtype).reshape(*lead, N)

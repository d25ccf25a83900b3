"""Parity of every Triton kernel with its torch reference: under the interpreter on CPU, or with
real Triton on CUDA when NLA_TEST_GPU=1 (`NLA_TEST_GPU=1 pytest -m "gpu or not slow" tests/test_kernels.py`).

Odd shapes (d not a power of two, groups that do not fill a block, V not a multiple of the vocabulary
block), strided inputs, bf16 and fp32; outputs start as NaN (NLA_KERNELS_POISON) so an element a
kernel never wrote fails. The same tests run on the GPU, which adds realistic log-prob shapes and
tensors past 2^31 elements (tests marked gpu: too big or too slow for the interpreter).
"""
import itertools
import os
import subprocess
import sys

import pytest
import torch

import kernels
import kernels.logprobs as lpmod
from kernels.dispatch import backend, interpreting

ON_GPU = os.environ.get("NLA_TEST_GPU") == "1" and torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
# NLA_TEST_GPU=1 turns the interpreter off (conftest), so without CUDA the kernels cannot run at all
needs_triton = pytest.mark.skipif(not (ON_GPU or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1")
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs CUDA and NLA_TEST_GPU=1")]


def gpu_test(f):
    for mark in gpu_only:
        f = mark(f)
    return f


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("NLA_KERNELS_POISON", "1")


def tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def strided(x: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous storage (every other column of a wider tensor)."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


def slots_for(B, T, g):
    slots = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.randint(0, T, (B,), generator=g)
    slots[torch.arange(B), pos] = torch.arange(B)
    return slots


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,d,V", [(3, 7, 72, 50), (1, 1, 17, 5), (4, 13, 130, 301)])
@pytest.mark.parametrize("stride", [False, True])
def test_inject_replace(dtype, B, T, d, V, stride):
    g = torch.Generator().manual_seed(B * T + d)
    W = torch.randn(V, d, generator=g).to(DEV, dtype)
    ids = torch.randint(0, V, (B, T), generator=g).to(DEV)
    vec = (torch.randn(B, d, generator=g) * 40).to(DEV, dtype)
    slots = slots_for(B, T, g).to(DEV)
    if stride:
        W, vec = strided(W), strided(vec)
        ids, slots = ids.t().contiguous().t(), slots.t().contiguous().t()  # column-major
    ref = kernels.inject_replace_torch(W, ids, slots, vec, 250.0)
    out = kernels.inject_replace_triton(W, ids, slots, vec, 250.0)
    assert out.shape == ref.shape and out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out, ref, **tol(dtype))
    at = out[slots >= 0].float().norm(dim=-1)
    torch.testing.assert_close(at, torch.full_like(at, 250.0), rtol=1e-2, atol=0)
    torch.testing.assert_close(out[slots < 0], W[ids[slots < 0]])  # untouched positions are exact


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,d", [(3, 7, 72), (2, 5, 33)])
@pytest.mark.parametrize("stride", [False, True])
def test_inject_add_forward_and_grad(dtype, B, T, d, stride):
    g = torch.Generator().manual_seed(d)
    h0 = (torch.randn(B, T, d, generator=g) * 3).to(DEV, dtype)
    vec = torch.randn(B, d, generator=g).to(DEV, dtype)
    slots = slots_for(B, T, g).to(DEV)
    if stride:
        h0, vec = strided(h0), strided(vec)
    h_ref = h0.detach().clone().requires_grad_()
    h_tri = h0.detach().clone().requires_grad_()
    ref = kernels.inject_add_torch(h_ref, slots, vec)
    out = kernels.inject_add_triton(h_tri, slots, vec)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **tol(dtype))
    gout = torch.randn(B, T, d, generator=g).to(DEV, dtype)
    ref.backward(gout)
    out.backward(gout)
    torch.testing.assert_close(h_tri.grad, h_ref.grad, **tol(dtype))
    assert h_tri.grad[slots >= 0].ne(gout[slots >= 0]).any()  # the norm's gradient is really there


def _rope_inputs(B, Hq, Hk, T, D, Bc, dtype, layout, g):
    """q and k as Hugging Face makes them (a projection's [B, T, H*D] viewed and transposed), or
    slices of one q/k/v output (fused projections), or contiguous [B, H, T, D]; cos and sin
    [1 or B, T, D]."""
    if layout == "fused":
        qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, generator=g)
        q, k = qkv[..., :Hq * D], qkv[..., Hq * D:(Hq + Hk) * D]
    else:
        q, k = torch.randn(B, T, Hq * D, generator=g), torch.randn(B, T, Hk * D, generator=g)
    q, k = (x.reshape(B, T, -1, D).transpose(1, 2) for x in (q, k))
    if layout == "contiguous":
        q, k = q.contiguous(), k.contiguous()
    # not the same D/2 angles twice, as a rotary embedding has them, nor sin(a) with cos(a): each
    # half of each must be read where it belongs
    cos, sin = (torch.randn(Bc, T, D, generator=g) for _ in range(2))
    return [x.to(DEV, dtype) for x in (q, k, cos, sin)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hk,T,D,Bc", [(2, 5, 1, 7, 12, 1), (3, 4, 2, 1, 64, 3), (1, 3, 3, 5, 6, 1), (2, 7, 1, 3, 80, 2)])
@pytest.mark.parametrize("layout", ["hf", "fused", "contiguous"])
def test_rope_forward_and_grad(dtype, B, Hq, Hk, T, D, Bc, layout):
    g = torch.Generator().manual_seed(B * D + T)
    q, k, cos, sin = _rope_inputs(B, Hq, Hk, T, D, Bc, dtype, layout, g)
    gq = torch.randn(q.shape, generator=g).to(DEV, dtype).transpose(2, 3).contiguous().transpose(2, 3)  # strided
    gk = torch.randn(k.shape, generator=g).to(DEV, dtype)
    outs = []
    for fn in (kernels.apply_rope_torch, kernels.apply_rope_triton):
        qi, ki = (x.detach().clone().requires_grad_() for x in (q, k))  # clone() keeps a dense view's strides
        qo, ko = fn(qi, ki, cos, sin)
        torch.autograd.backward([qo, ko], [gq, gk])
        outs.append((qo, ko, qi.grad, ki.grad))
    assert not any(x.isnan().any() for x in outs[1])
    for a, b in zip(outs[1], outs[0]):
        torch.testing.assert_close(a, b, **tol(dtype))

    def strides(x):  # of the dimensions that have more than one element
        return [st for st, n in zip(x.stride(), x.shape) if n > 1]
    assert strides(outs[1][0]) == strides(outs[0][0])  # Hugging Face's layout


@needs_triton
def test_rope_is_hugging_faces_rotary(monkeypatch):
    """The model families whose rotary embedding becomes kernels.rope compute what it does."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    g = torch.Generator().manual_seed(0)
    q, k, cos, sin = _rope_inputs(2, 4, 2, 5, 16, 1, torch.float32, "hf", g)
    for a, b in zip(getattr(apply_rotary_pos_emb, "hf", apply_rotary_pos_emb)(q, k, cos, sin),
                    kernels.apply_rope_triton(q, k, cos, sin)):
        torch.testing.assert_close(b, a, **tol(torch.float32))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,G,d", [(12, 4, 72), (15, 5, 130), (7, 1, 17), (6, 3, 576)])
@pytest.mark.parametrize("with_valid", [False, True])
def test_reward_stats(dtype, N, G, d, with_valid):
    g = torch.Generator().manual_seed(N * d)
    target = torch.randn(N, d, generator=g).to(dtype)
    pred = (target.float() + torch.randn(N, d, generator=g)).to(dtype)
    pred[0] = 0  # a failed sample's empty prediction must not produce NaN
    if G > 1:
        pred[G:2 * G] = pred[G]  # a zero-spread group (identical predictions... and targets)
        target[G:2 * G] = target[G]
        pred[G + 1] = pred[G] + 1e-6 * pred[G].float().abs().max()  # ...up to rounding-size noise
        target[G + 1] = target[G]
    valid = (torch.rand(N, generator=g) > 0.3) if with_valid else None
    if valid is not None and G > 1:
        valid[G:2 * G] = True
    p, t = strided(pred.to(DEV)), strided(target.to(DEV))
    valid = valid.to(DEV) if valid is not None else None
    ref = kernels.reward_stats_torch(p, t, 0.62, G, valid=valid)
    out = kernels.reward_stats_triton(p, t, 0.62, G, valid=valid)
    for name, a, b in zip(ref._fields, out, ref):
        assert a.dtype == torch.float32 and not a.isnan().any(), name
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    if G > 1:
        assert out.advantage[G:2 * G].eq(0).all() and ref.advantage[G:2 * G].eq(0).all()
    torch.testing.assert_close(out.mse[1:], 2 * (1 - out.cos[1:]), atol=1e-4, rtol=0)  # row 0 is empty
    if valid is not None:
        assert out.reward[~valid].eq(-2.0).all()


@needs_triton
def test_reward_stats_rejects_bad_groups():
    x = torch.randn(10, 8, device=DEV)
    with pytest.raises(ValueError, match="groups of 4"):
        kernels.reward_stats_torch(x, x, 1.0, 4)
    with pytest.raises(ValueError, match="groups of 4"):
        kernels.reward_stats_triton(x, x, 1.0, 4)


# ---------------------------------------------------------------- token log-probs
def naive_logprobs(h, w, t):
    return torch.log_softmax((h @ w.T).float(), -1).gather(1, t[:, None]).squeeze(1)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_logprobs(fn, h0, w0, t, gout):
    """lp and its gradients wrt hidden and weight; gout None means lp.sum() (a stride-0 gradient)."""
    h, w = h0.detach().clone().requires_grad_(), w0.detach().clone().requires_grad_()
    lp = fn(h, w, t)
    (lp.sum() if gout is None else lp).backward(None if gout is None else gout)
    return lp.detach(), h.grad, w.grad


SMALL = [(1, 24, 1000), (7, 40, 4099), (33, 24, 1000), (33, 40, 4099)]
BIG = [pytest.param(2048, 576, 49152, marks=gpu_only, id="smollm2"),
       pytest.param(512, 3584, 152064, marks=gpu_only, id="qwen7b")]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,d,V", SMALL + BIG)
def test_token_logprobs(dtype, N, d, V, monkeypatch):
    small = (N, d, V) in SMALL
    if small:
        # several chunks, several vocabulary blocks and a ragged last one, even at these sizes
        monkeypatch.setattr(lpmod, "CHUNK_ELEMS", 2 * V + 1)
        monkeypatch.setattr(lpmod, "FWD_BLOCK", 1024)
        monkeypatch.setattr(lpmod, "BWD_BLOCK", 1024)
    elif dtype == torch.float32:
        pytest.skip("realistic shapes run in the model's dtype, bf16")
    g = torch.Generator().manual_seed(N + V)
    h0 = torch.randn(N, d, generator=g).to(DEV, dtype)
    w0 = (torch.randn(V, d, generator=g) * (0.3 if small else 0.02)).to(DEV, dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[-1], t[0] = 0, V - 1  # both ends of the vocabulary (N=1: the last, in the ragged block)
    t = t.to(DEV)
    gout = None if N == 7 else torch.randn(N, generator=g).to(DEV)
    if small:
        h0, w0 = strided(h0), strided(w0)
    naive = run_logprobs(naive_logprobs, h0, w0, t, gout)
    ref = run_logprobs(kernels.token_logprobs_torch, h0, w0, t, gout)
    out = run_logprobs(kernels.token_logprobs_triton, h0, w0, t, gout)
    lp = out[0]
    assert lp.dtype == torch.float32 and lp.shape == (N,) and not lp.isnan().any()
    for name, a, b in zip(("lp", "gh", "gw"), out, ref):
        assert a.dtype == b.dtype and not a.isnan().any(), name
    # bf16 logits round to 2^-8 relative; at realistic scale a logit near 6 may differ by one such
    # step between GEMMs of different row counts (the naive one, the torch chunks, ours)
    lp_tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2 if small else 5e-2, rtol=0)
    torch.testing.assert_close(lp, naive[0], **lp_tol)
    torch.testing.assert_close(lp, ref[0], **lp_tol)
    if small:
        for name, a, b, c in zip(("gh", "gw"), out[1:], ref[1:], naive[1:]):
            torch.testing.assert_close(a, c, **tol(dtype), msg=name)
            torch.testing.assert_close(a, b, **tol(dtype), msg=name)
    else:  # bf16 rounding of chunk products: compare whole tensors, not single elements
        for name, a, b, c in zip(("gh", "gw"), out[1:], ref[1:], naive[1:]):
            assert rel_err(a, c) < 1e-2 and rel_err(a, b) < 1e-2, (name, rel_err(a, c), rel_err(a, b))


@needs_triton
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_token_logprobs_frozen_head(impl, monkeypatch):
    """The NLA case: the head needs no gradient, so none is built; the hidden one is unchanged."""
    monkeypatch.setattr(lpmod, "CHUNK_ELEMS", 700)
    g = torch.Generator().manual_seed(3)
    h0 = torch.randn(9, 40, generator=g).to(DEV)
    w = (torch.randn(301, 40, generator=g) * 0.3).to(DEV)
    t = torch.randint(0, 301, (9,), generator=g).to(DEV)
    h = h0.clone().requires_grad_()
    getattr(kernels, f"token_logprobs_{impl}")(h, w, t).sum().backward()
    hr = h0.clone().requires_grad_()
    naive_logprobs(hr, w, t).sum().backward()
    assert w.grad is None
    torch.testing.assert_close(h.grad, hr.grad, **tol(torch.float32))


@needs_triton
def test_token_logprobs_bad_target_is_nan():
    h, w = torch.randn(3, 16, device=DEV), torch.randn(50, 16, device=DEV)
    lp = kernels.token_logprobs_triton(h, w, torch.tensor([-1, 7, 50], device=DEV))
    assert lp[0].isnan() and lp[2].isnan() and not lp[1].isnan()


@pytest.mark.parametrize("V", [17, 1000, 49152, 128256, 152064, 1 << 26])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_chunk_budget(V, dtype):
    """The fused path's one [rows, V] buffer is no bigger than the torch path's fp32 logits (which
    also has fp32 temporaries), and stays far below 2^31 elements whatever the vocabulary."""
    fused = lpmod._rows(V, dtype, fused=True) * V * torch.empty((), dtype=dtype).element_size()
    assert fused <= max(lpmod.CHUNK_ELEMS * 4, V * 4)
    assert lpmod._rows(V, dtype, fused=True) * V < 2**31


# ---------------------------------------------------------------- past 2^31 elements (GPU only)
# Sizes where an int32 offset wraps. Each test checks every element was written (outputs start as
# NaN) and compares a few rows, on both sides of 2^31, with the torch reference computed on those
# rows alone: the largest test holds ~13 GB, well inside an 80 GB card. The log-prob kernels see one
# chunk at a time, which stays below 2^31 elements (test_logprobs_chunk_budget), so none here.
def _no_nan(x):
    step = max(1, (1 << 28) // max(1, x[0].numel()))  # isnan's bool temporary stays near 256 MB
    return not any(x[i:i + step].isnan().any().item() for i in range(0, x.shape[0], step))


def _rows_around_2_31(n, per_row):
    first = 2**31 // per_row  # the first row that starts past element 2^31
    return sorted({0, 1, first - 1, first, first + 1, n - 1})


@gpu_test
def test_inject_replace_past_2_31():
    n, T, d, V = 4096, 96, 8192, 32768
    assert n * T * d > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(V, d, generator=g, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, V, (n, T), generator=g, device="cuda")
    slots = torch.full((n, T), -1, dtype=torch.long, device="cuda")
    slots[torch.arange(n), 40] = torch.arange(n, device="cuda")
    vec = torch.randn(n, d, generator=g, device="cuda", dtype=torch.bfloat16)
    out = kernels.inject_replace_triton(W, ids, slots, vec, 250.0)  # 6.4 GB
    assert _no_nan(out)
    rows = _rows_around_2_31(n, T * d)
    ref = kernels.inject_replace_torch(W, ids[rows], slots[rows], vec, 250.0)
    torch.testing.assert_close(out[rows], ref, **tol(torch.bfloat16))


@gpu_test
def test_inject_add_past_2_31():
    n, T, d = 4096, 96, 8192
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(n, T, d, generator=g, device="cuda", dtype=torch.bfloat16)  # 6.4 GB
    slots = torch.full((n, T), -1, dtype=torch.long, device="cuda")
    slots[torch.arange(n), 40] = torch.arange(n, device="cuda")
    vec = torch.randn(n, d, generator=g, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = kernels.inject_add_triton(h, slots, vec)  # 6.4 GB
    assert _no_nan(out)
    rows = _rows_around_2_31(n, T * d)
    ref = kernels.inject_add_torch(h[rows], slots[rows], vec)
    torch.testing.assert_close(out[rows], ref, **tol(torch.bfloat16))


@gpu_test
def test_reward_stats_past_2_31():
    G, d = 8, 8192
    N = (2**31 // d // G + 64) * G  # 64 groups past 2^31 elements
    g = torch.Generator(device="cuda").manual_seed(2)
    target = torch.randn(N, d, generator=g, device="cuda", dtype=torch.bfloat16)  # 4.4 GB
    pred = torch.randn(N, d, generator=g, device="cuda", dtype=torch.bfloat16)
    out = kernels.reward_stats_triton(pred, target, 0.6, G)
    assert all(_no_nan(x) for x in out)
    rows = _rows_around_2_31(N, d)
    groups = sorted({r // G for r in rows})
    sel = torch.cat([torch.arange(q * G, (q + 1) * G) for q in groups]).cuda()
    ref = kernels.reward_stats_torch(pred[sel], target[sel], 0.6, G)
    for name, a, b in zip(ref._fields, out, ref):
        torch.testing.assert_close(a[sel], b, atol=1e-4, rtol=1e-4, msg=name)


def test_dispatch(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("NLA_KERNELS", raising=False)
    assert backend(x) == "torch"  # CPU tensors
    monkeypatch.setenv("NLA_KERNELS", "triton")
    if interpreting():
        assert backend(x) == "triton"  # allowed on CPU tensors only under the interpreter
    else:
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            backend(x)
    monkeypatch.setenv("NLA_KERNELS", "cuda")
    with pytest.raises(ValueError, match="torch or triton"):
        backend(x)


def _nf4_linear(N, K, nested, dtype, device, seed=0):
    """A bitsandbytes nf4 Linear4bit with a bias, quantised from a random fp32 weight."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N)
    q = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=dtype, compress_statistics=nested, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=nested, quant_type="nf4")
    q.bias = torch.nn.Parameter(lin.bias.data.to(dtype), requires_grad=False)
    return q.to(device)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("N,K", [(80, 128), (33, 192), (96, 256)])
def test_nf4_reference_dequantises_as_bitsandbytes(nested, N, K):
    """The torch reference reads the format exactly as bitsandbytes does: bit for bit."""
    from bitsandbytes.functional import dequantize_4bit
    q = _nf4_linear(N, K, nested, torch.float32, DEV)
    p = kernels.nf4_prepare(q)
    for dtype in (torch.float32, torch.bfloat16):
        want = dequantize_4bit(q.weight.data, q.weight.quant_state).to(dtype)
        assert torch.equal(kernels.nf4.dequantize_torch(*p, dtype), want)


# bf16 tl.dot is wrong under the Triton interpreter (numpy has no bf16): bf16 runs on the GPU only
NF4_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@needs_triton
@pytest.mark.parametrize("dtype", NF4_DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 80, 128), (5, 33, 192), (17, 96, 256), (64, 70, 384), (100, 40, 128),
                                   (3, 128, 256), (40, 256, 384), (200, 200, 128)])  # every row tile, and two
# (past MAX_ROWS: the kernel is asked directly); N ragged and whole, one tile and two
def test_nf4_linear(monkeypatch, dtype, M, N, K):
    q = _nf4_linear(N, K, True, dtype, DEV, seed=M)
    p = kernels.nf4_prepare(q)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(N)).to(DEV, dtype)
    with torch.no_grad():
        want = kernels.nf4_linear_torch(x, *p, bias=q.bias)
        got = kernels.nf4_linear_triton(x, *p, bias=q.bias)
        got3 = kernels.nf4_linear_triton(strided(x)[None], *p, bias=q.bias)[0]  # batch dims, strided rows
        monkeypatch.setattr(kernels.nf4, "PROGRAMS", 1)  # no split: a program loops over all of K, each
        # iteration on the bytes the one before loaded
        got1 = kernels.nf4_linear_triton(x, *p, bias=q.bias)
    assert got.dtype == dtype and got.shape == (M, N)
    torch.testing.assert_close(got, want, **tol(dtype))
    torch.testing.assert_close(got3, want, **tol(dtype))
    torch.testing.assert_close(got1, want, **tol(dtype))


@needs_triton
@pytest.mark.parametrize("M,N,K", [(3, 33, 192), (64, 128, 256)])
def test_nf4_linear_with_the_code_table(monkeypatch, M, N, K):
    """NLA_NF4_TABLE=codes (each nibble's code from the 16, an experiment beside the pair table)
    gives the same products."""
    dtype = NF4_DTYPES[-1]
    q = _nf4_linear(N, K, True, dtype, DEV, seed=M)
    p = kernels.nf4_prepare(q)
    assert torch.equal(kernels.nf4._codes(p[2]).cpu(), q.weight.quant_state.code.float().cpu())
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(N)).to(DEV, dtype)
    monkeypatch.setenv("NLA_NF4_TABLE", "codes")
    with torch.no_grad():
        want = kernels.nf4_linear_torch(x, *p, bias=q.bias)
        got = kernels.nf4_linear_triton(x, *p, bias=q.bias)
    torch.testing.assert_close(got, want, **tol(dtype))
    monkeypatch.setenv("NLA_NF4_TABLE", "nibbles")
    with pytest.raises(ValueError, match="NLA_NF4_TABLE"):
        kernels.nf4_linear_triton(x, *p, bias=q.bias)


@needs_triton
def test_nf4_sweep_tiles_give_the_references_products(monkeypatch):
    """Every tile, pipeline depth and code table `bench/kernels.py --only nf4-sweep` times on a GPU
    computes the same products (a wrong one would waste a lent GPU's minutes), split or not."""
    from bench.kernels import NF4_SWEEP, NF4_TABLES, use_tile
    import kernels.nf4 as nf4
    dtype = NF4_DTYPES[-1]
    q = _nf4_linear(128, 512, True, dtype, DEV, seed=1)
    p = kernels.nf4_prepare(q)
    default = dict(nf4.TILES)
    monkeypatch.setattr(nf4, "TILES", dict(default))  # use_tile rewrites it
    for m, tiles in NF4_SWEEP.items():
        x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).to(DEV, dtype)
        want = kernels.nf4_linear_torch(x, *p)
        for (bm, bn, bk, warps, stages, regs), table in itertools.product(tiles, NF4_TABLES):
            monkeypatch.setenv("NLA_NF4_TABLE", table)
            for programs in (1, 264):
                use_tile(bm, (bn, bk, warps), default)
                monkeypatch.setattr(nf4, "STAGES", stages)
                monkeypatch.setattr(nf4, "MAXNREG", regs)  # a compile option (the interpreter ignores it)
                monkeypatch.setattr(nf4, "PROGRAMS", programs)
                assert nf4._plan(m, 128, 512, 64)[:3] == (bm, bn, bk)
                with torch.no_grad():
                    torch.testing.assert_close(kernels.nf4_linear_triton(x, *p), want, **tol(dtype))


@needs_triton
def test_nf4_linear_dispatch(monkeypatch, count_calls):
    """The kernel runs only where it is asked for (NLA_KERNELS=triton: by default bitsandbytes,
    which it loses to on a GPU) and can serve: a decode batch without gradients; everything else
    is bitsandbytes' own path."""
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32  # CUDA: 16-bit compute only
    q = _nf4_linear(40, 128, True, dt, DEV)
    p = kernels.nf4_prepare(q)
    calls = count_calls(kernels.nf4, "nf4_linear_triton")
    x3 = lambda: torch.randn(3, 128, device=DEV, dtype=dt)  # noqa: E731
    monkeypatch.delenv("NLA_KERNELS", raising=False)
    monkeypatch.setattr(kernels.nf4, "backend", lambda *t: "triton")  # what CUDA tensors get unforced
    with torch.no_grad():
        kernels.nf4_linear(x3(), q, p)
    assert not calls  # not asked for
    monkeypatch.setattr(kernels.nf4, "backend", kernels.dispatch.backend)
    monkeypatch.setenv("NLA_KERNELS", "triton")
    with torch.no_grad():
        kernels.nf4_linear(x3(), q, p)
        kernels.nf4_linear(torch.randn(kernels.nf4.MAX_ROWS + 1, 128, device=DEV, dtype=dt), q, p)
    x = x3().requires_grad_()
    kernels.nf4_linear(x, q, p).sum().backward()
    assert len(calls) == 1 and x.grad is not None
    monkeypatch.setattr(kernels.nf4, "dot_supported", lambda device, dtype: False)  # e.g. bf16 on a T4
    with torch.no_grad():
        kernels.nf4_linear(x3(), q, p)
    assert len(calls) == 1
    assert kernels.nf4_prepare(torch.nn.Linear(4, 4)) is None


def test_nf4_split_k_is_near_two_waves():
    """Split-K parts divide K into whole blocks and give about 264 programs (two waves of 132 SMs):
    not the first split above it, which at 7B's down projection writes 37 fp32 partials."""
    from kernels.nf4 import _plan
    for M in (1, 64, 128):
        for N, K in ((3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)):  # Qwen2.5-7B projections
            BM, BN, BK, _, s, m_tiles = _plan(M, N, K, 64)
            programs = m_tiles * -(-N // BN) * s
            assert BM >= M and m_tiles == 1 and (K // BK) % s == 0 and 100 <= programs <= 528, (M, N, K, s)


@needs_triton
def test_every_launch_compiles_for_gpus_without_spills():
    """Each kernel launch our code makes (recorded from the real call paths) compiles for sm_80
    and sm_90 with Triton's bundled ptxas, spills no register and fits a consumer GPU's 99 KB of
    shared memory: what a GPU would show first, checked without one. In its own process: the
    interpreter the other tests run under leaves triton.language patched."""
    nv = pytest.importorskip("triton.backends.nvidia")
    if not os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")):
        pytest.skip("this Triton has no bundled CUDA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "bench/sass.py", "--arch", "80,90", "--check"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [ln for ln in r.stdout.splitlines() if "sm_90" in ln]
    names = [ln.split()[0] for ln in rows]
    assert sorted(set(names)) == ["decode_attention", "decode_attention.combine", "inject.add", "inject.replace",
                                  "logprobs.dlogits", "logprobs.lse_pick", "nf4", "reward", "rope", "sample"]
    assert names.count("nf4") == len(kernels.nf4.TILES) + 2  # every row tile, and the code table's 64 and 128
    # the late-load check can see a late load: the token draw streams its logits through loads it
    # uses where it issues them (no dot, so the pipeliner leaves them), which must show
    assert all(" bf16 " in ln.split("sm_90")[1] for ln in rows if ln.startswith("sample "))


@needs_triton
def test_sample_next_triton_draws_from_the_softmax(monkeypatch):
    """The fused exponential race takes token i with probability softmax(logits / T)_i: frequencies
    over 1.2k rows within 5 standard errors, never a token of probability 0 (first, last, at a
    slice boundary); the same draws however a row is split among programs (the uniforms belong to
    (row, token), and the partial winners are reduced exactly); the same draws for the same seed,
    others for another; bf16 logits read as they are. (Small: the interpreter runs ~5 ms a program.)"""
    import kernels.sample as ks
    inf = float("inf")
    logits = torch.randn(1, 37, generator=torch.Generator().manual_seed(0)) * 1.5
    logits[0, [0, 15, 16, 36]] = -inf
    logits[0, 20] = 3.0  # a favourite in the middle slice
    seed = lambda s: torch.tensor([s], device=DEV)  # noqa: E731
    T = 0.7
    p = torch.softmax(logits / T, -1)[0].double()
    ids = kernels.sample_next_triton(logits.expand(1200, -1).to(DEV), T, seed(1)).cpu()  # one slice a row
    freq = torch.bincount(ids, minlength=37).double() / len(ids)
    assert (freq[p == 0] == 0).all()
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / len(ids)).sqrt() + 1e-12).all(), (freq, p)
    rows = logits.expand(200, -1).to(DEV)
    whole = kernels.sample_next_triton(rows, 1.0, seed(7))
    monkeypatch.setattr(ks, "BLOCK_V", 8)
    monkeypatch.setattr(ks, "SLICE", 16)  # V = 37: slices of 16, 16 and 5
    split = kernels.sample_next_triton(rows, 1.0, seed(7))
    assert torch.equal(whole, split) and not torch.equal(split, kernels.sample_next_triton(rows, 1.0, seed(8)))
    one = torch.full((100, 37), -inf)
    one[:, 30] = 0.0
    assert (kernels.sample_next_triton(one.to(DEV, torch.bfloat16), 1.0, seed(2)).cpu() == 30).all()


def _decode_inputs(b, kvh, G, S, d, filled, dtype, seed=0):
    """A decode step's query and a static cache filled up to `filled` per row (a prefix mask), the
    slots beyond it holding junk, as a static cache's do."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, kvh * G, 1, d, generator=g).to(DEV, dtype)
    k, v = (torch.randn(b, kvh, S, d, generator=g).to(DEV, dtype) for _ in range(2))
    mask = (torch.arange(S)[None, :] < torch.tensor(filled)[:, None])[:, None, None, :].to(DEV)
    return q, k, v, mask


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else []))
@pytest.mark.parametrize("b,kvh,G,S,d,filled", [
    (1, 1, 1, 5, 16, [5]),                 # one head, a cache shorter than a block
    (3, 2, 3, 70, 32, [1, 64, 70]),        # a ragged last block, rows filled to 1, a block edge, the end
    (2, 2, 7, 226, 64, [77, 150]),         # Qwen2.5-7B's 7 query heads per key/value head, the bench's cache
    (2, 1, 16, 130, 16, [129, 3]),         # a full 16-head tile
])
@pytest.mark.parametrize("programs", [1, 512])
def test_decode_attention(dtype, b, kvh, G, S, d, filled, programs, monkeypatch):
    """Attention of one token over a partly filled static cache: as SDPA with the mask, whatever
    the junk beyond the filled slots (they are never read), in the [b, 1, heads, d] layout; with
    one program per (row, key/value head), and with the positions split among several (these
    shapes split down to a block each: a split whose positions a row cannot see weighs nothing)."""
    monkeypatch.setattr(kernels.attention, "PROGRAMS", programs)
    splits, per, _, _ = kernels.attention._split(b * kvh, S, programs)
    assert (splits > 1) == (programs > 1 and S > kernels.attention.BLOCK_N) and splits * per >= S
    q, k, v, mask = _decode_inputs(b, kvh, G, S, d, filled, dtype)
    assert kernels.attention.triton_serves(q, k, v, mask)
    want = kernels.decode_attention_torch(q, k, v, mask, d ** -0.5)
    got = kernels.decode_attention_triton(q, k, v, mask, d ** -0.5)
    assert got.shape == (b, 1, kvh * G, d) and got.is_contiguous()
    torch.testing.assert_close(got, want, **tol(dtype))
    k2, v2 = k.clone(), v.clone()
    for i, n in enumerate(filled):
        k2[i, :, n:], v2[i, :, n:] = float("nan"), float("nan")  # slots it must not read
    torch.testing.assert_close(kernels.decode_attention_triton(q, k2, v2, mask, d ** -0.5), got, rtol=0, atol=0)
    one = mask[:1]  # a mask broadcast over the rows
    torch.testing.assert_close(kernels.decode_attention_triton(q, k, v, one, d ** -0.5),
                               kernels.decode_attention_torch(q, k, v, one, d ** -0.5), **tol(dtype))


@needs_triton
@pytest.mark.parametrize("programs", [1, 512])
def test_decode_attention_masks_with_holes(programs, monkeypatch):
    """A mask need not be a prefix (left padding, a masked stretch): whole blocks nothing sees come
    before and between the visible positions, and a split may start with one. As SDPA, without a
    NaN from a block that has no position to see."""
    monkeypatch.setattr(kernels.attention, "PROGRAMS", programs)
    q, k, v, _ = _decode_inputs(3, 2, 3, 150, 32, [150] * 3, torch.float32, seed=1)
    pos = torch.arange(150)
    mask = torch.stack([(pos >= 70) & (pos < 90), ((pos >= 5) & (pos < 10)) | (pos >= 120), pos == 149])
    mask = mask[:, None, None, :].to(DEV)
    want = kernels.decode_attention_torch(q, k, v, mask, 32 ** -0.5)
    got = kernels.decode_attention_triton(q, k, v, mask, 32 ** -0.5)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, **tol(torch.float32))


def test_decode_attention_dispatch(monkeypatch):
    """What the kernel does not serve (a float mask, a head dim that is not a power of two, a dtype
    the GPU has no dots for) is left to the SDPA path."""
    q, k, v, mask = _decode_inputs(2, 2, 3, 40, 32, [10, 40], torch.float32)
    serves = kernels.attention.triton_serves
    assert serves(q, k, v, mask) and not serves(q, k, v, mask.float())
    assert not serves(q[..., :24], k[..., :24], v[..., :24], mask)
    monkeypatch.setattr(kernels.attention, "dot_supported", lambda device, dtype: False)
    assert not serves(q, k, v, mask)


def test_bf16_dots_only_where_the_gpu_has_them(monkeypatch):
    """The kernels that multiply in Triton (nf4, decode attention) take bf16 only on sm_80+: a T4 or
    V100 keeps the torch path, which ran there before them; fp16 and CPU tensors are not asked."""
    from kernels import dispatch
    asked = []
    for cap, want in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(dispatch, "_MMA_BF16", {})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i, c=cap: asked.append(i) or c)
        assert dispatch.dot_supported(torch.device("cuda", 0), torch.bfloat16) is want
        assert dispatch.dot_supported(torch.device("cuda", 0), torch.bfloat16) is want  # asked once
        assert dispatch.dot_supported(torch.device("cuda", 0), torch.float16)
        assert dispatch.dot_supported(torch.device("cpu"), torch.bfloat16)
    assert asked == [0, 0, 0]

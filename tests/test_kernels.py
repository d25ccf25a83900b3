"""Parity of every Triton kernel with its torch reference, under the interpreter on CPU.

Odd shapes (d not a power of two, groups that do not fill a block), strided inputs, bf16 and
fp32; outputs start as NaN (NLA_KERNELS_POISON) so an element a kernel never wrote fails.
"""
import pytest
import torch

import kernels
from kernels.dispatch import backend


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("NLA_KERNELS_POISON", "1")


def tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def strided(x: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous storage (every other column of a wider tensor)."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


def slots_for(B, T, g):
    slots = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.randint(0, T, (B,), generator=g)
    slots[torch.arange(B), pos] = torch.arange(B)
    return slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,d,V", [(3, 7, 72, 50), (1, 1, 17, 5), (4, 13, 130, 301)])
@pytest.mark.parametrize("stride", [False, True])
def test_inject_replace(dtype, B, T, d, V, stride):
    g = torch.Generator().manual_seed(B * T + d)
    W = torch.randn(V, d, generator=g).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    vec = (torch.randn(B, d, generator=g) * 40).to(dtype)
    slots = slots_for(B, T, g)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,d", [(3, 7, 72), (2, 5, 33)])
@pytest.mark.parametrize("stride", [False, True])
def test_inject_add_forward_and_grad(dtype, B, T, d, stride):
    g = torch.Generator().manual_seed(d)
    h0 = (torch.randn(B, T, d, generator=g) * 3).to(dtype)
    vec = torch.randn(B, d, generator=g).to(dtype)
    slots = slots_for(B, T, g)
    if stride:
        h0, vec = strided(h0), strided(vec)
    h_ref = h0.detach().clone().requires_grad_()
    h_tri = h0.detach().clone().requires_grad_()
    ref = kernels.inject_add_torch(h_ref, slots, vec)
    out = kernels.inject_add_triton(h_tri, slots, vec)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **tol(dtype))
    gout = torch.randn(B, T, d, generator=g).to(dtype)
    ref.backward(gout)
    out.backward(gout)
    torch.testing.assert_close(h_tri.grad, h_ref.grad, **tol(dtype))
    assert h_tri.grad[slots >= 0].ne(gout[slots >= 0]).any()  # the norm's gradient is really there


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
    valid = (torch.rand(N, generator=g) > 0.3) if with_valid else None
    if valid is not None and G > 1:
        valid[G:2 * G] = True
    p, t = strided(pred), strided(target)
    ref = kernels.reward_stats_torch(p, t, 0.62, G, valid=valid)
    out = kernels.reward_stats_triton(p, t, 0.62, G, valid=valid)
    for name, a, b in zip(ref._fields, out, ref):
        assert a.dtype == torch.float32 and not a.isnan().any(), name
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    if G > 1:
        assert out.advantage[G:2 * G].eq(0).all()
    torch.testing.assert_close(out.mse[1:], 2 * (1 - out.cos[1:]), atol=1e-4, rtol=0)  # row 0 is empty
    if valid is not None:
        assert out.reward[~valid].eq(-2.0).all()


def test_reward_stats_rejects_bad_groups():
    x = torch.randn(10, 8)
    with pytest.raises(ValueError, match="groups of 4"):
        kernels.reward_stats_torch(x, x, 1.0, 4)
    with pytest.raises(ValueError, match="groups of 4"):
        kernels.reward_stats_triton(x, x, 1.0, 4)


def naive_logprobs(h, w, t):
    return torch.log_softmax((h @ w.T).float(), -1).gather(1, t[:, None]).squeeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,d,V", [(5, 72, 300), (37, 33, 129), (1, 16, 17)])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_token_logprobs(dtype, N, d, V, impl, monkeypatch):
    import kernels.logprobs as lpmod
    monkeypatch.setattr(lpmod, "CHUNK_ELEMS", 2 * V + 1)  # several chunks even at these sizes
    g = torch.Generator().manual_seed(N + V)
    h0 = torch.randn(N, d, generator=g).to(dtype)
    w0 = (torch.randn(V, d, generator=g) * 0.3).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    h0, w0 = strided(h0), strided(w0)
    hr, wr = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    hk, wk = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    ref = naive_logprobs(hr, wr, t)
    out = getattr(kernels, f"token_logprobs_{impl}")(hk, wk, t)
    assert out.dtype == torch.float32 and not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-4 if dtype == torch.float32 else 3e-2, rtol=1e-4)
    gout = torch.randn(N, generator=g)
    ref.backward(gout)
    out.backward(gout)
    torch.testing.assert_close(hk.grad, hr.grad, **tol(dtype))
    torch.testing.assert_close(wk.grad, wr.grad, **tol(dtype))


def test_dispatch(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("NLA_KERNELS", raising=False)
    assert backend(x) == "torch"  # CPU tensors
    monkeypatch.setenv("NLA_KERNELS", "triton")
    assert backend(x) == "triton"  # allowed here only because the tests run the interpreter
    monkeypatch.setenv("NLA_KERNELS", "cuda")
    with pytest.raises(ValueError, match="torch or triton"):
        backend(x)

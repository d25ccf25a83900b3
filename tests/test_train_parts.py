"""The training pieces on a tiny random Llama: placeholder, injection, adapters, AV, AR, reward,
one GRPO update, checkpoints."""
import math

import pytest
import torch

from nla import checkpoint, lora
from nla.errors import NLAError
from nla.inject import injected, locate
from nla.models import load_base, residual
from nla.reconstructor import ARHead, reconstruct
from nla.reward import FAIL_REWARD, mse, score
from nla.spec import NLASpec, build_spec, choose_placeholder
from nla.verbalizer import Sample, generate, response_logprobs, target_ids

META = {"injection_scale": 3.0, "mse_mean": {"train": 1.5}}


@pytest.fixture()
def nla_base(tiny_path):
    base = load_base(tiny_path, device="cpu")
    lora.attach(base.model, {"av": 4, "ref": 4, "ar": 4})
    return base


def spec_for(base, mode="replace"):
    return build_spec(base, 2, META, mode, 4, 4)


def test_placeholder_is_one_token_found_by_checking(tokenizer):
    ch, pid, nb, prompt = choose_placeholder(tokenizer)
    assert tokenizer.encode(ch, add_special_tokens=False) == [pid]
    assert prompt.count(pid) == 1 and len(nb) == 2
    assert (ch, pid) == ("§", 31854)  # measured in environment.md for SmolLM2


def test_locate_is_strict(nla_base):
    spec = spec_for(nla_base)
    ids = torch.tensor([spec.av_prompt_ids] * 3)
    slots = locate(ids, spec, 3)
    assert (slots >= 0).sum() == 3 and slots.max() == 2
    with pytest.raises(NLAError, match="placeholder count mismatch"):
        locate(ids, spec, 2)
    broken = ids.clone()
    broken[1, spec.av_prompt_ids.index(spec.placeholder_id)] = 11
    with pytest.raises(NLAError, match="placeholder count mismatch"):
        locate(broken, spec, 3)


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_injection_modes(nla_base, mode):
    spec = spec_for(nla_base, mode)
    model = nla_base.model
    ids = torch.tensor([spec.av_prompt_ids] * 2)
    p = spec.av_prompt_ids.index(spec.placeholder_id)
    v = torch.randn(2, nla_base.d_model)
    with torch.no_grad(), injected(model, ids, v, spec) as emb:
        h1 = residual(model, 1, inputs_embeds=emb)
    plain = model.get_input_embeddings()(ids)
    with torch.no_grad():
        h1_plain = residual(model, 1, inputs_embeds=plain)
    if mode == "replace":
        torch.testing.assert_close(emb[:, p], v * spec.injection_scale / v.norm(dim=-1, keepdim=True))
        others = torch.ones(ids.shape[1], dtype=torch.bool)
        others[p] = False
        torch.testing.assert_close(emb[:, others], plain[:, others])
    else:
        torch.testing.assert_close(emb, plain)
        hp = h1_plain[:, p]
        torch.testing.assert_close(h1[:, p], hp + hp.norm(dim=-1, keepdim=True) * v / v.norm(dim=-1, keepdim=True))
        torch.testing.assert_close(h1[:, :p], h1_plain[:, :p])
    # the hook is gone afterwards
    with torch.no_grad():
        torch.testing.assert_close(residual(model, 1, inputs_embeds=plain), h1_plain)


def test_adapters_switch_save_and_copy(nla_base):
    model, ids = nla_base.model, torch.randint(0, 500, (1, 7))
    with torch.no_grad():
        plain = model(ids).logits
        with lora.use(model, "av"):
            torch.testing.assert_close(model(ids).logits, plain)  # B = 0: a new adapter is a no-op
        for p in lora.params(model, "av"):
            p.add_(torch.randn_like(p) * 0.05)
        with lora.use(model, "av"):
            changed = model(ids).logits
        assert not torch.allclose(changed, plain)
        with lora.use(model, "ar"):
            torch.testing.assert_close(model(ids).logits, plain)
    lora.copy_role(model, "av", "ref")
    with torch.no_grad(), lora.use(model, "ref"):
        torch.testing.assert_close(model(ids).logits, changed)
    with pytest.raises(ValueError):
        lora.load_state(model, "ar", {"x.A": torch.zeros(1)})
    bare = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="no adapters attached"), lora.use(bare, "av"):
        pass
    with lora.use(bare, None):  # the plain model needs none
        pass


def test_ar_identity_head_and_grads_reach_only_ar(nla_base):
    spec = spec_for(nla_base)
    head = ARHead(nla_base.d_model)
    assert torch.equal(head.weight, torch.eye(nla_base.d_model))
    texts = ["a cat on a mat", "the stock market fell sharply today"]
    pred = reconstruct(nla_base, spec, head, texts)
    assert pred.shape == (2, nla_base.d_model)
    mse(pred, torch.randn(2, nla_base.d_model)).mean().backward()
    ar = lora.params(nla_base.model, "ar")
    assert all(p.grad is not None for p in ar[:2])  # block 0
    assert all(p.grad is None for p in ar[-2:])  # block 3 lies beyond the early exit at L=2
    assert all(p.grad is None for p in lora.params(nla_base.model, "av"))
    assert head.weight.grad is not None
    # padding does not change a row's reconstruction
    with torch.no_grad():
        alone = reconstruct(nla_base, spec, head, texts[:1])
        torch.testing.assert_close(reconstruct(nla_base, spec, head, texts)[:1], alone, rtol=1e-4, atol=1e-4)


def test_generate_and_logprobs_agree_with_plain_forward(nla_base):
    spec = spec_for(nla_base)
    v = torch.randn(3, nla_base.d_model)
    g = torch.Generator().manual_seed(0)
    samples = generate(nla_base, spec, v, max_new=6, temperature=1.0, generator=g)
    assert len(samples) == 3 and all(1 <= len(s.ids) <= 6 for s in samples)
    assert all(not s.ok for s in samples if len(s.ids) == 6 and "</explanation>" not in s.text)
    lp, mask = response_logprobs(nla_base, spec, v, [s.ids for s in samples], "av")
    model = nla_base.model
    for i, s in enumerate(samples):  # same numbers from a plain full-vocab forward of one row
        ids = torch.tensor([spec.av_prompt_ids + s.ids])
        with torch.no_grad(), lora.use(model, "av"), injected(model, ids, v[i:i + 1], spec) as emb:
            logits = model(inputs_embeds=emb).logits[0]
        P = len(spec.av_prompt_ids)
        ref = torch.log_softmax(logits[P - 1:-1].float(), -1).gather(1, torch.tensor(s.ids)[:, None]).flatten()
        torch.testing.assert_close(lp[i, :len(s.ids)].detach(), ref, rtol=1e-4, atol=1e-4)
        assert mask[i].sum() == len(s.ids)
    # greedy decoding is deterministic
    a = generate(nla_base, spec, v, max_new=5, temperature=0.0)
    b = generate(nla_base, spec, v, max_new=5, temperature=0.0)
    assert [s.ids for s in a] == [s.ids for s in b]


def test_reward_arithmetic():
    d = 37
    t = torch.randn(8, d)
    p = torch.randn(8, d)
    m = mse(p, t)
    cos = torch.nn.functional.cosine_similarity(p, t, dim=-1)
    torch.testing.assert_close(m, 2 * (1 - cos), rtol=1e-5, atol=1e-5)
    assert torch.allclose(mse(t * 5.0, t), torch.zeros(8), atol=1e-6)
    valid = torch.tensor([True] * 6 + [False] * 2)
    st = score(p, t, 1.5, group_size=4, valid=valid)
    assert torch.allclose(st.reward[6:], torch.tensor([FAIL_REWARD] * 2))
    torch.testing.assert_close(st.reward[:6], -m[:6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.fve, 1 - m / 1.5, rtol=1e-5, atol=1e-5)
    g = st.reward.view(2, 4)
    torch.testing.assert_close(st.advantage.view(2, 4), (g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-6),
                               rtol=1e-4, atol=1e-4)


def test_grpo_update_moves_both_and_zero_spread_is_only_kl(nla_base):
    from nla.grpo import update
    spec = spec_for(nla_base)
    head = ARHead(nla_base.d_model)
    model = nla_base.model
    lora.copy_role(model, "av", "ref")
    opt_av = torch.optim.AdamW(lora.params(model, "av"), lr=1e-2)
    opt_ar = torch.optim.AdamW(lora.params(model, "ar") + list(head.parameters()), lr=1e-2)
    v = torch.randn(2, nla_base.d_model).repeat_interleave(2, 0)
    tok = nla_base.tokenizer
    samples = [Sample(target_ids(tok, t), t, True) for t in ("red apples", "blue sky", "fast cars", "slow")]
    samples[3] = Sample(tok.encode(" slow", add_special_tokens=False), "slow", False)  # cut: reward -2
    av0 = [p.detach().clone() for p in lora.params(model, "av")]
    ar0 = head.weight.detach().clone()
    m = update(nla_base, spec, head, v, samples, opt_av, opt_ar, G=2, kl_coef=0.01, clip_eps=0.2)
    assert m["fail_frac"] == 0.25 and 0 <= m["zero_spread"] <= 1
    assert not torch.equal(head.weight, ar0)
    assert any(not torch.equal(a, b) for a, b in zip(av0, lora.params(model, "av")))
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)  # av == ref before the step


def test_checkpoint_roundtrip_and_recover(nla_base, tiny_path, tmp_path):
    spec = spec_for(nla_base)
    head = ARHead(nla_base.d_model)
    with torch.no_grad():
        head.weight.mul_(0.5)
        for p in lora.params(nla_base.model, "av"):
            p.normal_()
    path = tmp_path / "ck"
    checkpoint.save(path, nla_base, spec, head, info={"stage": "sft"})
    checkpoint.save(path, nla_base, spec, head, info={"stage": "sft", "again": 1})  # replaces whole
    other = load_base(tiny_path, device="cpu")
    spec2, head2, meta = checkpoint.load(path, other)
    assert spec2 == spec and meta["again"] == 1
    torch.testing.assert_close(head2.weight, head.weight)
    for a, b in zip(lora.params(nla_base.model, "av"), lora.params(other.model, "av")):
        torch.testing.assert_close(a, b)
    (path).rename(tmp_path / "ck.old")  # a kill between the two renames
    assert checkpoint.exists(path)
    (path / "av.safetensors").write_bytes(b"garbage")
    with pytest.raises(NLAError, match="corrupt"):
        checkpoint.load(path, load_base(tiny_path, device="cpu"))
    bad = NLASpec.from_dict({**spec.to_dict(), "d_model": 99})
    checkpoint.save(tmp_path / "bad", nla_base, bad, head)
    with pytest.raises(NLAError, match="d_model=99"):
        checkpoint.load(tmp_path / "bad", load_base(tiny_path, device="cpu"))


def test_micro_batches_give_the_same_update(tiny_path):
    from nla.grpo import update
    results = []
    for micro in (0, 1, 3):
        base = load_base(tiny_path, device="cpu")
        lora.attach(base.model, {"av": 4, "ref": 4, "ar": 4})
        torch.manual_seed(3)
        with torch.no_grad():
            for role in ("av", "ar"):
                for p in lora.params(base.model, role):
                    p.normal_(0, 0.02)
        lora.copy_role(base.model, "av", "ref")
        spec = spec_for(base)
        head = ARHead(base.d_model)
        opt_av = torch.optim.SGD(lora.params(base.model, "av"), lr=0.5)
        opt_ar = torch.optim.SGD(lora.params(base.model, "ar") + list(head.parameters()), lr=0.5)
        v = torch.randn(3, base.d_model, generator=torch.Generator().manual_seed(1)).repeat_interleave(2, 0)
        tok = base.tokenizer
        samples = [Sample(target_ids(tok, t), t, i != 2) for i, t in enumerate(["a b", "c", "d e f", "g", "h i", "j"])]
        m = update(base, spec, head, v, samples, opt_av, opt_ar, G=2, kl_coef=0.01, clip_eps=0.2, micro=micro)
        results.append((lora.state(base.model, "av"), head.weight.detach().clone(), m))
    for av, hw, m in results[1:]:
        torch.testing.assert_close(hw, results[0][1], rtol=1e-5, atol=1e-6)
        for k in av:
            torch.testing.assert_close(av[k], results[0][0][k], rtol=1e-5, atol=1e-6)
        assert m["kl"] == pytest.approx(results[0][2]["kl"], abs=1e-6)


def test_chunks_pad_rows_to_a_length_near_their_own(tiny_path, monkeypatch):
    """With several chunks, rows go longest first, so a chunk's rows pad to near their own length
    (the AR's likewise); the update is the same as in one chunk."""
    import nla.grpo as grpo
    from nla.grpo import _by_length, update
    assert _by_length([3, 9, 1, 1, 8, 2], 4) == [1, 4, 0, 5, 2, 3]  # ties keep the sampled order
    assert _by_length([3, 9, 1, 1], 0) == [0, 1, 2, 3]  # one chunk: the sampled order
    words = ["a b c d e f g h i j k l", "a", "b", "c", "d e f g h i j k l m n", "e", "f g", "h"]
    results, padded = [], []
    real = grpo.response_logprobs

    def spy(base, spec, v, ids, role="av"):
        padded.append(len(ids) * max(len(r) for r in ids))
        return real(base, spec, v, ids, role)
    monkeypatch.setattr(grpo, "response_logprobs", spy)
    for micro in (0, 4, 4):
        base = load_base(tiny_path, device="cpu")
        lora.attach(base.model, {"av": 4, "ref": 4, "ar": 4})
        torch.manual_seed(3)
        with torch.no_grad():
            for p in lora.params(base.model, "av") + lora.params(base.model, "ar"):
                p.normal_(0, 0.02)
        lora.copy_role(base.model, "av", "ref")
        head = ARHead(base.d_model)
        opt_av = torch.optim.SGD(lora.params(base.model, "av"), lr=0.5)
        opt_ar = torch.optim.SGD(lora.params(base.model, "ar") + list(head.parameters()), lr=0.5)
        v = torch.randn(4, base.d_model, generator=torch.Generator().manual_seed(1)).repeat_interleave(2, 0)
        samples = [Sample(target_ids(base.tokenizer, t), t, True) for t in words]
        if len(results) == 2:  # the sampled order, for the padding it would cost
            monkeypatch.setattr(grpo, "_by_length", lambda lengths, micro: list(range(len(lengths))))
        padded.clear()
        m = update(base, spec_for(base), head, v, samples, opt_av, opt_ar, G=2, kl_coef=0.01, clip_eps=0.2, micro=micro)
        results.append((lora.state(base.model, "av"), head.weight.detach().clone(), m, sum(padded)))
    assert results[1][3] < results[2][3]  # sorted chunks pad less than the sampled order's
    for av, hw, m, _ in results[1:]:
        torch.testing.assert_close(hw, results[0][1], rtol=1e-5, atol=1e-6)
        for k in av:
            torch.testing.assert_close(av[k], results[0][0][k], rtol=1e-5, atol=1e-6)


def test_micro_batches_are_at_most_micro_rows():
    from nla.grpo import _chunks
    assert [(c.start, c.stop) for c in _chunks(64, 20)] == [(0, 20), (20, 40), (40, 60), (60, 64)]
    assert [(c.start, c.stop) for c in _chunks(6, 0)] == [(0, 6)]


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_is_weight_plus_scaled_low_rank(base_dtype):
    """A wrapped projection computes W x + b + (alpha/r) B A x, with gradients to A and B only
    (fp32 master adapters, on an fp32 or bf16 base), for 2-D and 3-D inputs."""
    from torch import nn
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(12, 10, bias=True).to(base_dtype).requires_grad_(False)
    sw = lora._Switch()
    m = lora.LoRALinear(lin, sw)
    m.adapters["av"] = lora.Adapter(12, 10, rank=3, alpha=6.0)
    with torch.no_grad():
        m.adapters["av"].B.normal_(0, 0.3, generator=g)
    a = m.adapters["av"]
    sw.active = "av"
    for shape in ((7, 12), (2, 5, 12)):
        x = torch.randn(*shape, generator=g).to(base_dtype)
        y = m(x)
        want = (x.float() @ lin.weight.float().t() + lin.bias.float()
                + 2.0 * (x.float() @ a.A.detach().t()) @ a.B.detach().t())
        assert y.shape == want.shape and y.dtype == base_dtype
        tol = 1e-5 if base_dtype == torch.float32 else 3e-2
        torch.testing.assert_close(y.float(), want, atol=tol, rtol=tol)
        gy = torch.randn(y.shape, generator=g)
        a.A.grad = a.B.grad = None
        (y.float() * gy).sum().backward()
        A, B = a.A.detach().clone().requires_grad_(), a.B.detach().clone().requires_grad_()
        ((2.0 * (x.float() @ A.t()) @ B.t()) * gy).sum().backward()
        torch.testing.assert_close(a.A.grad, A.grad, atol=20 * tol, rtol=20 * tol)
        torch.testing.assert_close(a.B.grad, B.grad, atol=20 * tol, rtol=20 * tol)
    sw.active = None
    torch.testing.assert_close(m(x), lin(x))

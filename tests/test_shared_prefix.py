"""Rows that share a prefix run it once (nla/shared_prefix.py), and nothing else changes: the
AV's log-probs and the AR's reconstructions, and their gradients, equal a plain forward of every
whole row, with and without gradient checkpointing, in both injection modes."""
import pytest
import torch

from nla import lora
from nla.inject import injected
from nla.models import decoder_of, load_base, residual
from nla.reconstructor import ARHead, Prefix, reconstruct
from nla.shared_prefix import common_level
from nla.spec import build_spec
from nla.verbalizer import Prompts, generate, response_logprobs

META = {"injection_scale": 3.0, "mse_mean": {"train": 1.5}}
TEXTS = ["alpha beta", "gamma delta epsilon zeta", "", "one two three four five six", "cats"]


def _setup(path, checkpointing, mode="replace", device="cpu"):
    base = load_base(path, device=device, dtype=torch.float32)
    lora.attach(base.model, {"av": 4, "ar": 4})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B: the adapters change every block's keys and values
        for p in lora.params(base.model, "av") + lora.params(base.model, "ar"):
            p.copy_(torch.randn(p.shape, generator=g).to(p.device) * 0.05)
    if checkpointing:
        lora.enable_checkpointing(base.model)
    base.model.train()
    return base, build_spec(base, 2, META, mode, 4, 4)


def _plain_logprobs(base, spec, vectors, responses):
    """Every row whole: prompt + response, right-padded, one forward."""
    model, n = base.model, len(responses)
    P, R = len(spec.av_prompt_ids), max(map(len, responses))
    ids = torch.full((n, P + R), base.tokenizer.pad_token_id)
    att = torch.zeros((n, P + R), dtype=torch.long)
    for i, r in enumerate(responses):
        ids[i, :P + len(r)] = torch.tensor(spec.av_prompt_ids + r)
        att[i, :P + len(r)] = 1
    ids, att = ids.to(base.device), att.to(base.device)
    with lora.use(model, "av"), injected(model, ids, vectors, spec) as emb:
        logits = model(inputs_embeds=emb, attention_mask=att).logits[:, P - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(2, ids[:, P:, None]).squeeze(2)


def _plain_reconstruct(base, spec, head, texts):
    """Every row whole: template prefix + text + suffix, right-padded, one forward."""
    tok = base.tokenizer
    rows = [spec.ar_prefix_ids + tok.encode(t, add_special_tokens=False) + spec.ar_suffix_ids for t in texts]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
    att = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    with lora.use(base.model, "ar"):
        h = residual(base.model, spec.layer, ids, att)
    return head(h[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])].float())


def _grads(params):
    out = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]  # blocks past L: none
    for p in params:
        p.grad = None
    return out


CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("checkpointing,mode,device,common", [
    (False, "replace", "cpu", "1"), (True, "replace", "cpu", "1"), (True, "add", "cpu", "1"),
    (True, "replace", "cpu", "0"),  # the prompt as one level, as on a GPU (shared_prefix.common_level)
    pytest.param(True, "replace", "cuda", "", marks=CUDA)])
def test_av_logprobs_and_grads_equal_a_plain_forward(tiny_path, checkpointing, mode, device, common, monkeypatch):
    monkeypatch.setenv("NLA_COMMON_LEVEL", common)
    base, spec = _setup(tiny_path, checkpointing, mode, device)
    g = torch.Generator().manual_seed(2)
    vectors = torch.randn(3, base.d_model, generator=g)[torch.tensor([0, 0, 0, 1, 2, 2, 1])].to(device)  # groups, unsorted
    responses = [torch.randint(200, 2000, (k,), generator=g).tolist() for k in (5, 1, 7, 3, 7, 2, 4)]
    weights = torch.randn(len(responses), 7, generator=g).to(device)  # a different weight on every token's gradient
    params = lora.params(base.model, "av")

    lp, mask = response_logprobs(base, spec, vectors, responses, "av")
    ((lp * weights[:, :lp.shape[1]]) * mask).sum().backward()
    got = _grads(params)
    ref = _plain_logprobs(base, spec, vectors, responses)
    ((ref * weights[:, :ref.shape[1]]) * mask).sum().backward()
    want = _grads(params)

    torch.testing.assert_close(lp[mask], ref[mask], rtol=1e-5, atol=1e-5)
    assert any(float(w.abs().max()) > 0 for w in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("checkpointing,common", [(False, "1"), (True, "1"), (True, "0")])  # "0": a GPU's way
def test_ar_reconstructions_and_grads_equal_a_plain_forward(tiny_path, checkpointing, common, monkeypatch):
    monkeypatch.setenv("NLA_COMMON_LEVEL", common)
    base, spec = _setup(tiny_path, checkpointing)
    head = ARHead(base.d_model)
    params = lora.params(base.model, "ar") + list(head.parameters())
    target = torch.randn(len(TEXTS), base.d_model, generator=torch.Generator().manual_seed(3))

    pred = reconstruct(base, spec, head, TEXTS)
    (pred - target).square().sum().backward()
    got = _grads(params)

    ref = _plain_reconstruct(base, spec, head, TEXTS)
    (ref - target).square().sum().backward()
    want = _grads(params)

    torch.testing.assert_close(pred, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("checkpointing,mode,common", [(False, "replace", "1"), (True, "replace", "1"),
                                                      (True, "add", "1"), (True, "replace", "0")])
def test_held_prompts_and_prefix_give_micro_batches_a_plain_forwards_grads(tiny_path, checkpointing, mode, common,
                                                                           monkeypatch):
    """An update's micro-batches read the AV prompts and the AR's prefix run once for all of them
    (held): each backward stops at their leaves, and one backward after the last sends the sum
    through them. The gradients are a plain forward's of every whole row. (common "0": a GPU's
    way, the prompt one level and the AR's prefix with every row.)"""
    monkeypatch.setenv("NLA_COMMON_LEVEL", common)
    base, spec = _setup(tiny_path, checkpointing, mode)
    g = torch.Generator().manual_seed(2)
    vectors = torch.randn(3, base.d_model, generator=g)[torch.tensor([0, 0, 0, 1, 2, 2, 1])]
    responses = [torch.randint(200, 2000, (k,), generator=g).tolist() for k in (5, 1, 7, 3, 7, 2, 4)]
    weights = torch.randn(len(responses), 7, generator=g)
    av = lora.params(base.model, "av")
    prompts = Prompts(base, spec, vectors, "av", held=True)
    for rows in ([0, 1, 2, 6], [3, 4, 5]):  # the second micro-batch shares a prompt with the first
        lp, mask = response_logprobs(base, spec, prompts.rows(rows), [responses[i] for i in rows])
        ((lp * weights[rows, :lp.shape[1]]) * mask).sum().backward()
    prompts.backward()
    got = _grads(av)
    ref = _plain_logprobs(base, spec, vectors, responses)
    mask = torch.tensor([[j < len(r) for j in range(ref.shape[1])] for r in responses])
    ((ref * weights[:, :ref.shape[1]]) * mask).sum().backward()
    want = _grads(av)
    assert any(float(w.abs().max()) > 0 for w in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    head = ARHead(base.d_model)
    ar = lora.params(base.model, "ar") + list(head.parameters())
    target = torch.randn(len(TEXTS), base.d_model, generator=g)
    prefix = Prefix(base, spec, "ar", held=True)
    for rows in ([0, 3], [1, 2, 4]):
        pred = reconstruct(base, spec, head, [TEXTS[i] for i in rows], prefix=prefix)
        (pred - target[rows]).square().sum().backward()
    prefix.backward()
    got = _grads(ar)
    (_plain_reconstruct(base, spec, head, TEXTS) - target).square().sum().backward()
    for a, b in zip(got, _grads(ar)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("common", ["1", "0"])
def test_an_update_runs_its_shared_tokens_once(tiny_path, common, monkeypatch):
    """Whatever the micro-batches: the AR's prefix runs once per update (a CPU's way; a GPU's runs
    it with every row), the AV prompts once per role (the policy's, and the reference's where the
    rollout did not take its log-probs): their common tokens as a level of their own on a CPU."""
    from nla.grpo import update
    from nla.verbalizer import Sample, target_ids
    monkeypatch.setenv("NLA_COMMON_LEVEL", common)
    base, spec = _setup(tiny_path, False)
    lora.attach(base.model, {"ref": 4})
    head = ARHead(base.d_model)
    texts = ["a b", "c", "d e f", "g", "h i", "j"]
    samples = [Sample(target_ids(base.tokenizer, t), t, True) for t in texts]
    vectors = torch.randn(3, base.d_model).repeat_interleave(2, 0)
    opt_av = torch.optim.SGD(lora.params(base.model, "av"), lr=0.1)
    opt_ar = torch.optim.SGD(lora.params(base.model, "ar") + list(head.parameters()), lr=0.1)
    seen = []
    hook = decoder_of(base.model).layers[0].register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape[:2])))
    update(base, spec, head, vectors, samples, opt_av, opt_ar, G=2, kl_coef=0.01, clip_eps=0.2, micro=2)
    hook.remove()
    P, split, Pa = len(spec.av_prompt_ids), spec.av_prompt_ids.index(spec.placeholder_id), len(spec.ar_prefix_ids)
    prompts = [(1, split), (3, P - split)] if common == "1" else [(3, P)]
    assert seen.count((1, Pa)) == (common == "1")  # three chunks of AR rows
    assert [s for s in seen if s[1] in (split, P - split, P)] == prompts * 2  # av, ref


def test_each_distinct_prompt_runs_once(tiny_path, monkeypatch):
    """The first block sees one prompt per distinct vector, then every row's response (GRPO's
    log-probs) or token (a rollout's decode steps): never a prompt per row. On a CPU the tokens
    before the placeholder run once for all rows; on a GPU with the rest (one pass fewer)."""
    base, spec = _setup(tiny_path, False)
    seen = []
    hook = decoder_of(base.model).layers[0].register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape[:2])))
    vectors = torch.randn(2, base.d_model).repeat_interleave(4, 0)
    P = len(spec.av_prompt_ids)
    split = spec.av_prompt_ids.index(spec.placeholder_id)  # before it: the same tokens for every row
    assert 0 < split < P
    prompts = [(1, split), (2, P - split)]
    with torch.no_grad():
        response_logprobs(base, spec, vectors, [[300, 301, 302]] * 8, "av")
        assert seen == prompts + [(8, 2)]
        seen.clear()
        generate(base, spec, vectors, 3, 1.0, generator=torch.Generator().manual_seed(0))
        assert seen == prompts + [(8, 1), (8, 1)]
        seen.clear()
        lp, _ = response_logprobs(base, spec, vectors, [[300]] * 8, "av")  # one token each: the prompt only
        assert seen == prompts and lp.shape == (8, 1)
        levels = generate(base, spec, vectors, 3, 0.0)
        monkeypatch.setenv("NLA_COMMON_LEVEL", "0")  # a GPU's default: the prompt in one level
        seen.clear()
        response_logprobs(base, spec, vectors, [[300, 301, 302]] * 8, "av")
        assert seen == [(2, P), (8, 2)]
        seen.clear()
        assert [s.ids for s in generate(base, spec, vectors, 3, 0.0)] == [s.ids for s in levels]
        assert seen == [(2, P), (8, 1), (8, 1)]
        monkeypatch.delenv("NLA_COMMON_LEVEL")
    hook.remove()
    assert common_level(torch.device("cpu")) and not common_level(torch.device("cuda"))
    base, spec = _setup(tiny_path, False, "add")  # the vector enters at block 1 over the whole prompt
    seen.clear()
    hook = decoder_of(base.model).layers[0].register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape[:2])))
    with torch.no_grad():
        response_logprobs(base, spec, vectors, [[300, 301, 302]] * 8, "av")
    hook.remove()
    assert seen == [(2, P), (8, 2)]


def test_other_attention_implementations_are_refused(tiny_path):
    """Shared prefixes run Hugging Face's SDPA path; a model set up for another implementation gets
    one clear line, not a silent change of its attention."""
    from nla.errors import NLAError
    base, spec = _setup(tiny_path, False)
    base.model.config._attn_implementation = "eager"
    with pytest.raises(NLAError, match="runs 'eager' attention"):
        response_logprobs(base, spec, torch.randn(2, base.d_model), [[300, 301]] * 2, "av")

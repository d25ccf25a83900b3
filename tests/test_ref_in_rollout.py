"""GRPO's KL reference taken in the rollout (lora.side_by_side, verbalizer.generate's ref_role):
each policy row has a twin under the reference adapter, fed the same tokens in the same forward.
The policy's samples are those of a rollout without twins, each sample's ref_lp equals the
reference's log-probs from a plain forward, and an update that reads them equals one that runs
the reference forward itself."""
import pytest
import torch

import nla.grpo as grpo
from nla import lora
from nla.errors import NLAError
from nla.models import load_base
from nla.reconstructor import ARHead
from nla.spec import build_spec
from nla.verbalizer import Sample, generate, response_logprobs


def _base(tiny_path, device="cpu", **kw):
    base = load_base(tiny_path, device=device, **kw)
    lora.attach(base.model, {"av": 4, "ref": 4, "ar": 4})
    torch.manual_seed(3)
    with torch.no_grad():
        for role in ("av", "ref", "ar"):  # the reference differs from the policy, as after RL steps
            for p in lora.params(base.model, role):
                p.normal_(0, 0.05)
    return base


def _spec(base):
    return build_spec(base, 2, {"injection_scale": 3.0, "mse_mean": {"train": 1.5}}, "replace", 4, 4)


def _vectors(base):  # three activations, in groups of unequal size and order, as distinct_rows sees them
    return torch.randn(3, base.d_model, generator=torch.Generator().manual_seed(1))[torch.tensor([0, 2, 0, 1, 2])]


def _padded(samples):
    return torch.nn.utils.rnn.pad_sequence([s.ref_lp for s in samples], batch_first=True)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_twins_give_the_references_logprobs_and_leave_the_samples(tiny_path, monkeypatch, temperature):
    monkeypatch.setenv("NLA_MERGE_SAMPLING", "0")  # the plain rollout unmerged too: the same sums
    base = _base(tiny_path)
    spec, v = _spec(base), _vectors(base)

    def run(**kw):
        g = torch.Generator().manual_seed(0) if temperature > 0 else None
        return generate(base, spec, v, 12, temperature, generator=g, **kw)
    plain, both = run(), run(ref_role="ref")
    assert [s.ids for s in both] == [s.ids for s in plain]
    assert all(s.ref_lp is None for s in plain) and [len(s.ref_lp) for s in both] == [len(s.ids) for s in both]
    ids = [s.ids for s in both]
    with torch.no_grad():
        want, mask = response_logprobs(base, spec, v, ids, "ref")
        policy, _ = response_logprobs(base, spec, v, ids, "av")
    got = _padded(both)
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-4, atol=1e-4)
    assert (got[mask] - policy[mask]).abs().max() > 1e-2  # the twins really ran the other adapter
    # and the plain path is back afterwards: no twin's mask is left live
    assert not lora.switch_of(base.model).pair
    assert [s.ids for s in run()] == ids


@pytest.mark.parametrize("micro", [0, 2])
def test_update_reads_the_rollouts_reference(tiny_path, monkeypatch, count_calls, micro):
    monkeypatch.setenv("NLA_MERGE_SAMPLING", "0")
    base = _base(tiny_path)
    spec, v = _spec(base), _vectors(base)[:4]  # two groups of G=2
    head = ARHead(base.d_model)
    opt_av = torch.optim.SGD(lora.params(base.model, "av"), lr=0.0)  # lr 0: both updates start alike
    opt_ar = torch.optim.SGD(lora.params(base.model, "ar") + list(head.parameters()), lr=0.0)
    samples = generate(base, spec, v, 10, 1.0, generator=torch.Generator().manual_seed(2), ref_role="ref")
    calls = count_calls(grpo, "response_logprobs")
    runs = []
    for ss in (samples, [Sample(s.ids, s.text, s.ok) for s in samples]):
        n = len(calls)
        m = grpo.update(base, spec, head, v, ss, opt_av, opt_ar, G=2, kl_coef=0.5, clip_eps=0.2, micro=micro)
        runs.append((m, [p.grad.clone() for p in lora.params(base.model, "av")], len(calls) - n))
    (m1, g1, n1), (m2, g2, n2) = runs
    chunks = len(grpo._chunks(len(v), micro))
    assert (n1, n2) == (chunks, 2 * chunks)  # with twins' log-probs: no reference forward
    assert m1["kl"] == pytest.approx(m2["kl"], rel=1e-4, abs=1e-7) and m1["kl"] > 1e-4
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_rollout_in_passes_of_whole_groups(tiny_path, monkeypatch):
    """A rollout too big for the 4-bit decode kernel runs in passes of whole groups (grpo.pass_rows):
    one pass on a CPU whatever the rows; passes of one size but a shorter last one, none above the cap
    (a group alone where G exceeds it); in passes, the greedy samples of one pass, the reference's
    twins in every pass, and the same draws for the same seed."""
    base = _base(tiny_path)
    spec = _spec(base)
    assert grpo.pass_rows(base, 256, 8) == 256  # a CPU: nothing to fit
    monkeypatch.setenv("NLA_ROLLOUT_ROWS", "64")
    assert [grpo.pass_rows(base, n, 8) for n in (64, 256, 240, 72)] == [64, 64, 64, 40]
    monkeypatch.setenv("NLA_ROLLOUT_ROWS", "4")
    assert [grpo.pass_rows(base, n, G) for n, G in ((6, 2), (8, 2), (9, 3), (10, 5))] == [4, 4, 3, 5]
    monkeypatch.setenv("NLA_ROLLOUT_ROWS", "all")
    with pytest.raises(NLAError, match="NLA_ROLLOUT_ROWS must be a number of rows"):
        grpo.pass_rows(base, 6, 2)
    monkeypatch.setenv("NLA_ROLLOUT_ROWS", "4")
    v = torch.randn(3, base.d_model, generator=torch.Generator().manual_seed(2)).repeat_interleave(2, 0)
    calls = []
    real = grpo.generate
    monkeypatch.setattr(grpo, "generate",
                        lambda b, s, vecs, *a, **k: calls.append(len(vecs)) or real(b, s, vecs, *a, **k))
    monkeypatch.setenv("NLA_ROLLOUT_ROWS", "0")
    one = grpo.rollout(base, spec, v, 6, 0.0, G=2)
    monkeypatch.setenv("NLA_ROLLOUT_ROWS", "4")
    monkeypatch.setenv("NLA_REF_IN_ROLLOUT", "1")
    parts = grpo.rollout(base, spec, v, 6, 0.0, G=2)
    assert calls == [6, 4, 2]
    assert [s.ids for s in parts] == [s.ids for s in one] and all(s.ref_lp is not None for s in parts)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert [s.ids for s in grpo.rollout(base, spec, v, 6, 1.0, g(), G=2)] == \
        [s.ids for s in grpo.rollout(base, spec, v, 6, 1.0, g(), G=2)]


def test_when_the_reference_rides_along(tiny_path, monkeypatch):
    import kernels
    base = _base(tiny_path)
    spec, v = _spec(base), _vectors(base)
    assert not grpo.ref_in_rollout(base, 8)  # a CPU: compute-bound, nothing to share
    monkeypatch.setenv("NLA_REF_IN_ROLLOUT", "1")
    assert grpo.ref_in_rollout(base, kernels.nf4.MAX_ROWS)
    assert all(s.ref_lp is not None for s in grpo.rollout(base, spec, v, 4, 0.0))
    assert all(s.ref_lp is None for s in grpo.rollout(base, spec, v, 4, 0.0, kl_coef=0.0))  # no KL: no twins
    lora.attach(base.model, {"other": 2})
    with pytest.raises(ValueError, match="equal ranks"):
        with lora.side_by_side(base.model, ("av", "other"), torch.float32):
            pass


@pytest.mark.parametrize("fused", ["0", "1"])
def test_twins_on_a_4bit_base_read_the_nf4_kernel(tiny_path, monkeypatch, count_calls, fused):
    """On a 4-bit base the twins' decode steps are one nf4 product for both roles' rows (2n <=
    nf4.MAX_ROWS; fused, as on a GPU: one for q/k/v and one for gate/up), with bitsandbytes' ids
    and log-probs. fp16: bf16 dots fail in the interpreter."""
    from kernels.dispatch import interpreting
    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    import kernels.nf4 as nf4
    monkeypatch.setenv("NLA_FUSED_SAMPLING", fused)
    base = _base(tiny_path, dtype=torch.float16, load_in_4bit=True)
    spec, v = _spec(base), _vectors(base)
    rows = []
    real = nf4.nf4_linear_triton
    monkeypatch.setattr(nf4, "nf4_linear_triton", lambda x, *a, **k: rows.append(x.numel() // x.shape[-1]) or real(x, *a, **k))
    out = {}
    for impl in ("torch", "triton"):
        monkeypatch.setenv("NLA_KERNELS", impl)
        out[impl] = generate(base, spec, v, 6, 0.0, ref_role="ref")
    # every projection of the 5 decode steps, both roles at once
    assert rows.count(2 * len(v)) == (4 if fused == "1" else 7) * base.n_layers * 5
    assert [s.ids for s in out["triton"]] == [s.ids for s in out["torch"]]
    torch.testing.assert_close(_padded(out["triton"]), _padded(out["torch"]), rtol=2e-2, atol=2e-2)


def test_twins_decode_step_compiles_whole(tiny_path, monkeypatch, compiled_steps):
    """What CUDA runs for a 4-bit base: the twins' decode step under torch.compile is one graph
    (no break into bitsandbytes), every projection one nf4 op for both roles, the eager logits."""
    from kernels.dispatch import interpreting
    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    from nla.decoding import Decoder, _all_nf4_kernel
    from nla.shared_prefix import SharedPrefix
    from nla.verbalizer import _prompt
    monkeypatch.setenv("NLA_KERNELS", "triton")
    base = _base(tiny_path, dtype=torch.float16, load_in_4bit=True)
    m, spec, n = base.model, _spec(base), 3
    dec = Decoder(m, 2 * n, 100, ("av", "ref"))
    with torch.no_grad():
        emb = m.get_input_embeddings()(_prompt(spec, n, "cpu"))
        levels, first = [], []
        for role in ("av", "ref"):
            with lora.use(m, role):
                levels.append(SharedPrefix(m))
                first.append(levels[-1].forward(m, inputs_embeds=emb, logits_to_keep=1).logits[:, -1])
        nxt = first[0].argmax(-1).repeat(2)
        with lora.use(m, "av"), lora.side_by_side(m, ("av", "ref"), torch.float16):
            eager, graphs = compiled_steps(dec, levels, torch.arange(n), nxt, fullgraph=True)
    assert len(graphs) == 1
    assert sum("nf4_partials" in str(x.target) for x in graphs[0].graph.nodes if x.op == "call_function") == 7 * base.n_layers
    assert _all_nf4_kernel(m, 2 * n, torch.float16)
    assert not torch.allclose(eager[0][:n], eager[0][n:], atol=1e-2)  # the twins' rows are not the policy's


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_twins_on_cuda_with_a_4bit_base(tiny_path, monkeypatch):
    """What training runs on a GPU with a 4-bit base: twins by default, their decode step captured
    as a CUDA graph (no silent fallback), and log-probs that match the reference adapter's plain
    forward (bitsandbytes' path) to bf16 rounding, far closer than the policy's."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("NLA_COMPILE_DECODE", "0")  # the parity stage's time; bench/memory.py compiles it at 7B
    monkeypatch.setenv("NLA_MERGE_SAMPLING", "0")  # where merged copies do not fit (a tiny model's always would)
    base = _base(tiny_path, device="cuda", dtype=torch.bfloat16, load_in_4bit=True)
    spec, v = _spec(base), _vectors(base).cuda()
    assert grpo.ref_in_rollout(base, len(v))
    samples = grpo.rollout(base, spec, v, 16, 1.0, torch.Generator(device="cuda").manual_seed(0))
    dec = next(iter(base.model._nla_decoders.values()))
    assert dec.role == ("av", "ref") and dec.graph is not None
    ids = [s.ids for s in samples]
    with torch.no_grad():
        want, mask = response_logprobs(base, spec, v, ids, "ref")
        policy, _ = response_logprobs(base, spec, v, ids, "av")
    got = _padded(samples)
    err, gap = (got - want.float())[mask].abs(), (got - policy.float())[mask].abs()
    assert err.max() < 0.15 and err.mean() < 0.03, (err.max(), err.mean())
    assert err.mean() < gap.mean() / 3, (err.mean(), gap.mean())

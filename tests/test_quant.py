"""The 4-bit shared base (bitsandbytes nf4): loads on CPU, adapters stay fp32 and train, and
the residual stays close to the full-precision one."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="the quant extra is part of the default install")

from nla import lora  # noqa: E402
from nla.models import load_base, residual  # noqa: E402
from nla.reconstructor import ARHead, reconstruct  # noqa: E402
from nla.reward import mse  # noqa: E402
from nla.spec import build_spec  # noqa: E402


def test_4bit_base_with_fp32_adapters(tiny_path):
    full = load_base(tiny_path, device="cpu")
    q = load_base(tiny_path, device="cpu", load_in_4bit=True)
    assert q.quant == "nf4"
    linears = [m for m in q.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 7 * q.n_layers
    ids = torch.randint(0, 2000, (2, 12))
    with torch.no_grad():
        a, b = residual(full.model, 2, ids), residual(q.model, 2, ids)
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min()
    assert cos > 0.9, cos
    lora.attach(q.model, {"ar": 4})
    ps = lora.params(q.model, "ar")
    assert all(p.dtype == torch.float32 and p.requires_grad for p in ps)
    spec = build_spec(q, 2, {"injection_scale": 3.0, "mse_mean": {"train": 1.5}}, "replace", 4, 4)
    head = ARHead(q.d_model)
    opt = torch.optim.AdamW(ps + list(head.parameters()), lr=1e-2)
    target = torch.randn(3, q.d_model)
    texts = ["one", "two words", "three little words"]
    losses = []
    for _ in range(6):
        loss = mse(reconstruct(q, spec, head, texts), target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    frozen = [p for n, p in q.model.named_parameters() if "adapters" not in n]
    assert not any(p.requires_grad for p in frozen)


def test_backward_through_4bit_matches_dequantised_weight():
    """bitsandbytes warns that its CPU gemv_4bit has no autograd kernel; check the input
    gradient (the one LoRA training needs) is nonetheless exact."""
    import warnings
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    q = bnb.nn.Linear4bit(64, 48, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    q.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4")
    q = q.to("cpu")  # quantises the weight
    q(torch.randn(1, 64))
    deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    for shape in [(3, 7, 64), (1, 1, 64), (5, 64)]:
        x = torch.randn(*shape, requires_grad=True)
        y = q(x)
        g = torch.randn_like(y)
        y.backward(g)
        x2 = x.detach().clone().requires_grad_()
        (x2 @ deq.t()).backward(g)
        torch.testing.assert_close(y, (x2 @ deq.t()).detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_bnb_linear_is_a_linear4bit():
    """kernels.nf4.bnb_linear (bitsandbytes' op, the block scales undone once) gives a Linear4bit's
    outputs and input gradients exactly: double quantisation, a bias, any leading shape."""
    import kernels
    torch.manual_seed(0)
    q = bnb.nn.Linear4bit(192, 40, bias=True, quant_type="nf4", compute_dtype=torch.float32, compress_statistics=True)
    q.weight = bnb.nn.Params4bit(torch.randn(40, 192), requires_grad=False, quant_type="nf4", compress_statistics=True)
    q.bias = torch.nn.Parameter(torch.randn(40), requires_grad=False)
    q = q.to("cpu")  # quantises
    q.support_avx512bf16_for_cpu = False  # as load_base sets it: no repacking for bitsandbytes' CPU kernel
    prepared = kernels.nf4_prepare(q)
    assert q.weight.quant_state.nested
    for shape in [(3, 7, 192), (1, 192), (5, 192)]:
        x = torch.randn(*shape, requires_grad=True)
        y = q(x)
        g = torch.randn_like(y)
        y.backward(g)
        x2 = x.detach().clone().requires_grad_()
        y2 = kernels.nf4.bnb_linear(x2, prepared, q.bias)
        y2.backward(g)
        assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
        with torch.no_grad():
            assert torch.equal(q(x), kernels.nf4.bnb_linear(x, prepared, q.bias))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 16, 64, 128, 700])
def test_bnb_linear_on_cuda(rows):
    """On a GPU bitsandbytes picks its fused kernel or dequantise-then-GEMM by size; either way
    bnb_linear, alone and with siblings stacked as one weight (lora._NF4Group's layout), gives a
    Linear4bit's outputs and input gradients (bf16; the fused kernel may round the scales
    differently, so to bf16 rounding, not to the bit)."""
    import kernels
    torch.manual_seed(0)
    qs = []
    for n in (512, 256, 256):  # q, k, v
        q = bnb.nn.Linear4bit(384, n, bias=True, quant_type="nf4", compute_dtype=torch.bfloat16, compress_statistics=True)
        q.weight = bnb.nn.Params4bit(torch.randn(n, 384, dtype=torch.bfloat16), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        q.bias = torch.nn.Parameter(torch.randn(n, dtype=torch.bfloat16), requires_grad=False)
        qs.append(q.cuda())
    x = torch.randn(rows, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    preps = [kernels.nf4_prepare(q) for q in qs]
    stacked = (torch.cat([p[0] for p in preps]), torch.cat([p[1] for p in preps]), preps[0][2], 1024, 384, 64)
    bias = torch.cat([q.bias for q in qs])
    want = torch.cat([q(x) for q in qs], -1)
    g = torch.randn_like(want)
    (gx_want,) = torch.autograd.grad(want, x, g)
    for got in (torch.cat([kernels.nf4.bnb_linear(x, p, q.bias) for p, q in zip(preps, qs)], -1),
                kernels.nf4.bnb_linear(x, stacked, bias)):
        (gx,) = torch.autograd.grad(got, x, g)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(gx, gx_want, rtol=2e-2, atol=5e-2)


def test_4bit_training_through_bitsandbytes_op_is_exact(tiny_path, monkeypatch, count_calls):
    """A 4-bit base's projections train through kernels.nf4.bnb_linear: the AR's and the AV's
    gradients equal those through bitsandbytes' Linear4bit, with checkpointing."""
    import warnings

    import kernels
    from test_checkpointing import _ar_and_av_grads
    warnings.simplefilter("ignore")
    calls = count_calls(kernels.nf4, "bnb_linear")
    ours = _ar_and_av_grads(tiny_path, True, "replace", quant=True)
    assert calls
    monkeypatch.setattr(kernels.nf4, "servable", lambda m: False)  # every projection through its Linear4bit
    n = len(calls)
    theirs = _ar_and_av_grads(tiny_path, True, "replace", quant=True)
    assert len(calls) == n
    for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fused", ["0", "1"])
def test_sampling_through_bitsandbytes_op(tiny_path, monkeypatch, av_on, count_calls, fused):
    """Without the decode kernel a 4-bit base samples through bitsandbytes' op with the block
    scales undone once; fused (a GPU's default), q/k/v and gate/up are one product each. Either
    way the ids are those of its Linear4bits, greedy and sampled."""
    import kernels
    from nla.verbalizer import generate
    monkeypatch.setenv("NLA_KERNELS", "torch")  # no decode kernel
    monkeypatch.setenv("NLA_FUSED_SAMPLING", fused)
    calls = count_calls(kernels.nf4, "bnb_linear")
    out = []
    for plain in (False, True):
        if plain:  # every projection through its Linear4bit
            monkeypatch.setattr(kernels.nf4, "servable", lambda m: False)
        q = av_on(load_base(tiny_path, device="cpu", dtype=torch.float16, load_in_4bit=True))
        spec = build_spec(q, 2, {"injection_scale": 3.0, "mse_mean": {"train": 1.5}}, "replace", 4, 4)
        v = torch.randn(2, q.d_model, generator=torch.Generator().manual_seed(1)).repeat_interleave(2, 0)
        out.append([[s.ids for s in generate(q, spec, v, 8, t, generator=torch.Generator().manual_seed(5))]
                    for t in (0.0, 1.0)])
        if not plain:  # every projection (fused: q/k/v and gate/up as one) of the decode steps and
            # prompt levels of both rollouts; the plain run adds none
            assert len(calls) == (4 if fused == "1" else 7) * q.n_layers * (7 + 2) * 2
            groups = q.model.__dict__.get("_nla_nf4_groups", [])
            assert len(groups) == 2 * q.n_layers and all(g.live == (fused == "1") for g in groups)
    assert len(calls) == (4 if fused == "1" else 7) * q.n_layers * (7 + 2) * 2
    assert out[0] == out[1]


@pytest.mark.parametrize("fused", ["0", "1"])
def test_sampling_through_the_nf4_decode_kernel(tiny_path, monkeypatch, av_on, count_calls, fused):
    """A rollout on a 4-bit base: the decode steps' projections go through kernels.nf4 (Triton,
    here under the interpreter) and give the ids of bitsandbytes' own path; fused (a GPU's
    default), q/k/v and gate/up are one kernel each, and bitsandbytes' own path still reads the
    weights it read before. fp16 compute: the interpreter cannot run bf16 dots, and an fp32 base
    samples through the plain path."""
    from kernels.dispatch import interpreting
    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    from nla.verbalizer import generate, response_logprobs
    import kernels.nf4 as nf4
    monkeypatch.setenv("NLA_FUSED_SAMPLING", fused)
    q = av_on(load_base(tiny_path, device="cpu", dtype=torch.float16, load_in_4bit=True))
    spec = build_spec(q, 2, {"injection_scale": 3.0, "mse_mean": {"train": 1.5}}, "replace", 4, 4)
    v = torch.randn(2, q.d_model, generator=torch.Generator().manual_seed(1)).repeat_interleave(2, 0)
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in q.model.modules())  # load_base
    with torch.no_grad():
        before = response_logprobs(q, spec, v, [[5, 6, 7]] * 4, "av")[0]
    calls = count_calls(nf4, "nf4_linear_triton")
    out = {}
    for impl in ("torch", "triton"):
        monkeypatch.setenv("NLA_KERNELS", impl)
        q.model.__dict__.pop("_nla_decoders", None)
        out[impl] = [s.ids for s in generate(q, spec, v, 8, 0.0)]
    # every projection (fused: q/k/v and gate/up as one) of the 7 decode steps and of both prompt
    # levels (41 common tokens, then 2 x 35 rows, each <= nf4.MAX_ROWS)
    assert len(calls) == (4 if fused == "1" else 7) * q.n_layers * (7 + 2)
    assert out["triton"] == out["torch"]
    monkeypatch.setenv("NLA_KERNELS", "torch")  # as for `before` (the log-prob kernel rounds otherwise)
    with torch.no_grad():  # the training path (bitsandbytes) reads the same bytes, wherever they now live
        assert torch.equal(response_logprobs(q, spec, v, [[5, 6, 7]] * 4, "av")[0], before)
    groups = q.model.__dict__.get("_nla_nf4_groups", [])
    assert len(groups) == 2 * q.n_layers and all(g.live == (fused == "1") for g in groups)


def _4bit_step_graphs(tiny_path, monkeypatch, av_on, compiled_steps, kernels_mode: str, fused: str):
    """A 4-bit base (fp16 compute) and the FX graphs torch.compile makes of its decode step (full
    graph, logits checked against the eager step) under NLA_KERNELS=kernels_mode; fused "1": q/k/v
    and gate/up as one nf4 op each, as on a GPU."""
    from nla import lora
    from nla.decoding import Decoder
    from nla.shared_prefix import SharedPrefix
    from nla.verbalizer import _prompt
    monkeypatch.setenv("NLA_KERNELS", kernels_mode)
    monkeypatch.setenv("NLA_FUSED_SAMPLING", fused)
    q = av_on(load_base(tiny_path, device="cpu", dtype=torch.float16, load_in_4bit=True))
    spec = build_spec(q, 2, {"injection_scale": 3.0, "mse_mean": {"train": 1.5}}, "replace", 4, 4)
    m = q.model
    dec = Decoder(m, 3, 100, "av")
    with torch.no_grad(), lora.use(m, "av"), lora.inference_weights(m, "av", torch.float16):
        emb = m.get_input_embeddings()(_prompt(spec, 3, "cpu"))
        prompts = SharedPrefix(m)
        nxt = prompts.forward(m, inputs_embeds=emb, logits_to_keep=1).logits[:, -1].argmax(-1)
        _, graphs = compiled_steps(dec, prompts, torch.arange(3), nxt, fullgraph=True)
    return q, graphs


@pytest.mark.parametrize("fused", ["0", "1"])
def test_4bit_decode_step_through_bitsandbytes_compiles_whole(tiny_path, monkeypatch, av_on, compiled_steps, fused):
    """Without the decode kernel, a 4-bit base's decode step calls bitsandbytes' gemm op directly
    (kernels.nf4.bnb_linear), which torch.compile takes into ONE graph with the rest of the step
    (no break into a Linear4bit's Python) and the eager step's logits: what NLA_COMPILE_DECODE=1
    times on a GPU (bench/gpu_check.py's memory-compiled stage)."""
    q, graphs = _4bit_step_graphs(tiny_path, monkeypatch, av_on, compiled_steps, "torch", fused)
    assert len(graphs) == 1
    ops = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "gemm_4bit" in str(n.target)]
    assert len(ops) == (4 if fused == "1" else 7) * q.n_layers


@pytest.mark.parametrize("fused", ["0", "1"])
def test_4bit_decode_step_compiles_whole(tiny_path, monkeypatch, av_on, compiled_steps, fused):
    """With every quantised weight in kernels.nf4 (a torch op), torch.compile takes a 4-bit base's
    decode step as ONE graph, no break into bitsandbytes, and gives the eager step's logits; so on
    CUDA it is compiled by default, and not where any projection would fall back to bitsandbytes."""
    from kernels.dispatch import interpreting
    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    import kernels.nf4 as nf4
    from nla.decoding import _all_nf4_kernel
    q, graphs = _4bit_step_graphs(tiny_path, monkeypatch, av_on, compiled_steps, "triton", fused)
    m = q.model
    assert len(graphs) == 1
    ops = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "nf4_partials" in str(n.target)]
    assert len(ops) == (4 if fused == "1" else 7) * q.n_layers
    att = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "decode_attention" in str(n.target)]
    assert len(att) == q.n_layers  # the cache read up to its fill (kernels/attention.py), in the same graph
    assert _all_nf4_kernel(m, 3, torch.float16)
    assert not _all_nf4_kernel(m, nf4.MAX_ROWS + 1, torch.float16)  # past the kernel's rows: bitsandbytes
    assert not _all_nf4_kernel(m, 3, torch.float32)  # an fp32 base samples through the plain path
    monkeypatch.setenv("NLA_KERNELS", "torch")
    assert not _all_nf4_kernel(m, 3, torch.float16)


def test_4bit_sampling_copies_are_the_merge_of_the_dequantised_weights(tiny_path, monkeypatch, av_on, count_calls,
                                                                       capsys):
    """Where they fit (a GPU's choice; forced here), a 4-bit base samples from merged copies:
    each projection's weight dequantised as bitsandbytes does, plus s B A, in the compute dtype.
    The logits are exactly those of a full-precision base holding the dequantised weights, with
    no 4-bit product run (prompts and steps), q/k/v and gate/up as one GEMM each where fused;
    a refresh after an update reads the new adapters; the unmerged path, run after, still reads
    its own 4-bit groups; and the step then compiles by default, as a full-precision base's does."""
    import warnings

    import kernels
    from nla import decoding
    warnings.simplefilter("ignore")
    monkeypatch.setenv("NLA_KERNELS", "torch")
    q = av_on(load_base(tiny_path, device="cpu", dtype=torch.float16, load_in_4bit=True))
    full = load_base(tiny_path, device="cpu", dtype=torch.float16)
    lora.attach(full.model, {"av": 4})
    lora.load_state(full.model, "av", lora.state(q.model, "av"))
    mods = {n: m for n, m in q.model.named_modules() if isinstance(m, lora.LoRALinear)}
    with torch.no_grad():
        for n, m in full.model.named_modules():
            if isinstance(m, lora.LoRALinear):
                w = mods[n].base.weight
                m.base.weight.copy_(bnb.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float16))
    assert not lora.merge_wanted(q.model)  # a CPU keeps bitsandbytes' path for a 4-bit base
    assert lora.merged_bytes(q.model) == sum(m.in_features * m.out_features * 2 for m in mods.values())
    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    gemm = count_calls(kernels.nf4, "bnb_linear")
    linear, real = [], torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: linear.append(1) or real(*a, **k))

    def logits(base, merge, fused):
        monkeypatch.setenv("NLA_MERGE_SAMPLING", merge)
        monkeypatch.setenv("NLA_FUSED_SAMPLING", fused)
        gemm.clear()
        linear.clear()
        with torch.no_grad(), lora.use(base.model, "av"), lora.inference_weights(base.model, "av", torch.float16):
            return base.model(input_ids=ids).logits, len(gemm), len(linear)

    unmerged, n_gemm, _ = logits(q, "0", "1")
    assert n_gemm == 4 * q.n_layers  # its q/k/v and gate/up as one 4-bit product each
    for fused, n_linear in (("0", 7), ("1", 4)):
        got, n_gemm, n_got = logits(q, "1", fused)
        want, _, _ = logits(full, "1", fused)
        assert torch.equal(got, want) and n_gemm == 0 and n_got == n_linear * q.n_layers + 1  # + the LM head
    torch.testing.assert_close(got.float(), unmerged.float(), atol=1e-2, rtol=1e-2)  # fp16's rounding apart
    said = capsys.readouterr().out  # what the copies cost, once, and for the 4-bit base only
    assert said.count("[nla] sampling from merged float16 copies of the 4-bit weights (0.0 GB") == 1, said
    assert torch.equal(logits(q, "0", "1")[0], unmerged)
    with torch.no_grad():  # an update
        for p in lora.params(q.model, "av") + lora.params(full.model, "av"):
            p.mul_(1.5)
    got, want = logits(q, "1", "1")[0], logits(full, "1", "1")[0]
    assert torch.equal(got, want) and not torch.allclose(got, unmerged, atol=1e-2)
    monkeypatch.setattr(decoding, "_graphs_wanted", lambda device: True)
    assert decoding._compile_wanted(q.model, torch.device("cpu"), 3, torch.float16)  # merged
    monkeypatch.setenv("NLA_MERGE_SAMPLING", "0")
    assert not decoding._compile_wanted(q.model, torch.device("cpu"), 3, torch.float16)  # bitsandbytes' step


def test_4bit_decode_step_from_merged_copies_compiles_whole(tiny_path, monkeypatch, av_on, compiled_steps):
    """From merged copies a 4-bit base's decode step is one graph with no 4-bit op in it: one
    GEMM per input (q/k/v and gate/up fused) and the LM head, with the eager step's logits, as a
    full-precision base's step compiles on CUDA by default."""
    monkeypatch.setenv("NLA_MERGE_SAMPLING", "1")
    q, graphs = _4bit_step_graphs(tiny_path, monkeypatch, av_on, compiled_steps, "torch", "1")
    assert len(graphs) == 1
    calls = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert not [c for c in calls if "bitsandbytes" in c or "gemm_4bit" in c]
    assert sum("linear" in c for c in calls) == 4 * q.n_layers + 1

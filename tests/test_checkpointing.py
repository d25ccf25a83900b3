"""Gradient checkpointing is exact for every role: gradients (and GRPO updates) with it equal
those without it. Each block recomputed in backward must see the adapter and the add-mode
injection that were live in its forward, although `lora.use` has switched back by then."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nla import lora
from nla.grpo import update
from nla.models import load_base
from nla.reconstructor import ARHead, reconstruct
from nla.reward import mse
from nla.spec import build_spec
from nla.verbalizer import Sample, response_logprobs, target_ids

TEXTS = ["alpha beta", "gamma delta epsilon", "one two three four", "cats"]


def _setup(path, checkpointing: bool, mode: str, quant: bool = False, dtype=None):
    base = load_base(path, device="cpu", dtype=dtype, load_in_4bit=quant)
    lora.attach(base.model, {"av": 4, "ref": 4, "ar": 4})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B everywhere, and ref != av, so a wrong role changes the numbers
        for role in ("av", "ref", "ar"):
            for p in lora.params(base.model, role):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    for p in lora.params(base.model, "ref"):
        p.requires_grad_(False)
    if checkpointing:
        lora.enable_checkpointing(base.model)
    base.model.train()  # both ways: bitsandbytes' CPU path repacks nf4 weights for a bf16 kernel in eval mode
    spec = build_spec(base, 2, {"injection_scale": 3.0, "mse_mean": {"train": 1.5}}, mode, 4, 4)
    head = ARHead(base.d_model)
    return base, spec, head


def _grads(params):
    out = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]  # blocks past L: none
    for p in params:
        p.grad = None
    return out


def _ar_and_av_grads(path, checkpointing, mode, quant=False):
    base, spec, head = _setup(path, checkpointing, mode, quant)
    vecs = torch.randn(len(TEXTS), base.d_model, generator=torch.Generator().manual_seed(2))
    mse(reconstruct(base, spec, head, TEXTS), vecs).mean().backward()  # AR warm start
    ar = _grads(lora.params(base.model, "ar") + list(head.parameters()))
    resp = [target_ids(base.tokenizer, t) for t in TEXTS]
    lp, mask = response_logprobs(base, spec, vecs, resp, "av")  # AV warm start
    (-(lp * mask).sum() / mask.sum()).backward()
    av = _grads(lora.params(base.model, "av"))
    return ar, av


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_sft_gradients_equal_with_and_without_checkpointing(tiny_path, mode):
    ar0, av0 = _ar_and_av_grads(tiny_path, False, mode)
    ar1, av1 = _ar_and_av_grads(tiny_path, True, mode)
    assert any(float(g.abs().max()) > 0 for g in av0) and any(float(g.abs().max()) > 0 for g in ar0)
    for a, b in zip(ar0 + av0, ar1 + av1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _grpo_after(path, checkpointing, mode, quant=False, micro=0, dtype=None, during=None):
    base, spec, head = _setup(path, checkpointing, mode, quant, dtype)
    G = 2
    vecs = torch.randn(len(TEXTS) // G, base.d_model, generator=torch.Generator().manual_seed(3)).repeat_interleave(G, 0)
    samples = [Sample(target_ids(base.tokenizer, t), t, True) for t in TEXTS]
    opt_av = torch.optim.SGD(lora.params(base.model, "av"), lr=0.5)
    opt_ar = torch.optim.SGD(lora.params(base.model, "ar") + list(head.parameters()), lr=0.5)
    with during(base) if during else contextlib.nullcontext():
        m = update(base, spec, head, vecs, samples, opt_av, opt_ar, G, 0.5, 0.2, micro=micro)
    return lora.state(base.model, "av"), lora.state(base.model, "ar"), head.weight.detach().clone(), m


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_grpo_update_equal_with_and_without_checkpointing(tiny_path, mode):
    av0, ar0, h0, m0 = _grpo_after(tiny_path, False, mode)
    av1, ar1, h1, m1 = _grpo_after(tiny_path, True, mode, micro=3)  # micro-batches too: same update
    assert m0["kl"] > 0  # ref differs from av: the reference log-probs are exercised
    torch.testing.assert_close(h0, h1, rtol=1e-5, atol=1e-6)
    for a, b in ((av0, av1), (ar0, ar1)):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert m0["kl"] == pytest.approx(m1["kl"], rel=1e-4)


def test_target_role_under_checkpointing_is_the_plain_model(tiny_path):
    """Role None (the target model, no adapter) stays plain when another role was live at the
    time of an earlier checkpointed forward."""
    base, spec, head = _setup(tiny_path, True, "replace")
    ids = torch.randint(100, 2000, (2, 9))
    emb = base.model.get_input_embeddings()(ids).detach().requires_grad_()
    with lora.use(base.model, None):
        out = base.model(inputs_embeds=emb).logits
    out.square().mean().backward()
    ref = load_base(tiny_path, device="cpu")
    emb2 = emb.detach().clone().requires_grad_()
    ref.model(inputs_embeds=emb2).logits.square().mean().backward()
    torch.testing.assert_close(emb.grad, emb2.grad, rtol=1e-5, atol=1e-8)


def test_checkpointing_with_4bit_base(tiny_path):
    pytest.importorskip("bitsandbytes")
    import warnings
    warnings.simplefilter("ignore")
    ar0, av0 = _ar_and_av_grads(tiny_path, False, "replace", quant=True)
    ar1, av1 = _ar_and_av_grads(tiny_path, True, "replace", quant=True)
    for a, b in zip(ar0 + av0, ar1 + av1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_checkpointing_can_be_turned_off_again(tiny_path):
    """bench/memory.py compares plans on one model: after disable, blocks run once (nothing is
    recomputed in backward)."""
    from nla.models import decoder_of
    base, spec, head = _setup(tiny_path, True, "replace")
    layers = decoder_of(base.model).layers
    resp = [target_ids(base.tokenizer, t) for t in TEXTS]
    vecs = torch.randn(len(TEXTS), base.d_model)

    def attention_calls_in_backward():
        calls = []
        hook = layers[0].self_attn.register_forward_pre_hook(lambda m, a: calls.append(1))
        lp, mask = response_logprobs(base, spec, vecs, resp, "av")
        n = len(calls)
        (lp * mask).sum().backward()
        hook.remove()
        return len(calls) - n
    assert attention_calls_in_backward() > 0  # checkpointing: the block runs again
    lora.disable_checkpointing(base.model)
    assert attention_calls_in_backward() == 0


class _AdapterCasts(TorchDispatchMode):
    """Counts the casts (and scalings: B's cast is of s B) of the given parameters, per parameter."""
    def __init__(self, params):
        super().__init__()
        self.ptrs, self.casts = {p.data_ptr() for p in params}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.mul) and args[0].data_ptr() in self.ptrs:
            self.casts[args[0].data_ptr()] = self.casts.get(args[0].data_ptr(), 0) + 1
        return func(*args, **(kwargs or {}))


def test_update_casts_each_adapter_once_per_phase(tiny_path, monkeypatch):
    """On a bf16 base an update's phases read adapter copies cast once (lora.training_weights), not
    cast at every projection call: the same update to bf16's rounding, with micro-batches and
    checkpointing (several backwards through one cast, recomputed blocks reading it), and no copy
    left after it (stale once the optimizer has stepped)."""
    seen = {}

    def watch(base):
        seen["base"] = base
        seen["params"] = [p for r in ("av", "ar", "ref") for p in lora.params(base.model, r)]
        seen["mode"] = _AdapterCasts(seen["params"])
        return seen["mode"]
    new = _grpo_after(tiny_path, True, "replace", micro=3, dtype=torch.bfloat16, during=watch)
    assert new[3]["kl"] > 0  # the reference's own forward ran: its adapters are read too
    casts = seen["mode"].casts
    assert len(casts) == len(seen["params"]) and set(casts.values()) == {1}, sorted(casts.values())
    assert all(a.cast is None for _, m in lora._wrapped(seen["base"].model) for a in m.adapters.values())
    monkeypatch.setattr(lora, "training_weights", lambda model, *roles: contextlib.nullcontext())
    old = _grpo_after(tiny_path, True, "replace", micro=3, dtype=torch.bfloat16)
    start = _setup(tiny_path, False, "replace", dtype=torch.bfloat16)[0]
    for role, a, b in (("av", new[0], old[0]), ("ar", new[1], old[1])):
        before = lora.state(start.model, role)
        d_new, d_old = ({k: w[k] - before[k] for k in w} for w in (a, b))  # blocks past the AR's layer: 0
        scale = max(float(d.abs().max()) for d in d_old.values())
        assert scale > 0, role
        for k in d_old:
            torch.testing.assert_close(d_new[k], d_old[k], rtol=0.05, atol=0.02 * scale)


def test_training_weights_hand_each_gradient_to_its_master_when_its_block_is_done(tiny_path):
    """The phase's bf16 copies pass their gradients to the fp32 masters as soon as backward is done
    with their block, and keep none: the last block's masters have theirs before backward reaches
    the first block (copies cast with autograd were the graph's oldest nodes, so autograd ran their
    casts last, holding every copy's gradient to the end), and a second backward adds to them."""
    base, spec, head = _setup(tiny_path, False, "replace", dtype=torch.bfloat16)
    vecs = torch.randn(len(TEXTS), base.d_model, generator=torch.Generator().manual_seed(2))
    resp = [target_ids(base.tokenizer, t) for t in TEXTS]
    layers = base.model.model.layers
    last = [p for n, p in base.model.named_parameters() if f"layers.{len(layers) - 1}." in n and ".av." in n]
    assert len(last) == 2 * len(lora.TARGETS)
    seen, before = [], []

    def delivered(g):  # in this backward: the master's gradient is new or has changed
        seen[-1] = sum(p.grad is not None and (b is None or not torch.equal(p.grad, b)) for p, b in zip(last, before))

    def hook(module, args, out):
        (out[0] if isinstance(out, tuple) else out).register_hook(delivered)
    handle = layers[0].register_forward_hook(hook)
    try:
        with lora.training_weights(base.model, "av"):
            copies = [c for _, m in lora._wrapped(base.model) for c in m.adapters["av"].cast]
            for i in range(2):
                before[:] = [None if p.grad is None else p.grad.clone() for p in last]
                seen.append(None)
                lp, mask = response_logprobs(base, spec, vecs, resp, "av")
                (-(lp * mask).sum() / mask.sum()).backward()
                assert all(c.grad is None for c in copies)
                if i == 0:
                    once = [p.grad.clone() for p in last]
    finally:
        handle.remove()
    # when backward was last at the first block (of any of the passes), every time
    assert seen == [len(last), len(last)], seen
    for p, g in zip(last, once):  # the same rows twice: twice the first backward's gradient
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-6, atol=0)


def _out_of_memory_once(fn):
    """fn, except that its second call with gradients on a chunk of more than one row raises a GPU
    out-of-memory error: after the first chunk's backward has added its gradients."""
    calls = []

    def wrapped(*a, **k):
        if torch.is_grad_enabled():
            calls.append(1)
            n = len(a[3])  # reconstruct's texts, response_logprobs' response ids
            if len(calls) == 2 and n > 1:
                raise torch.OutOfMemoryError("CUDA out of memory (faked)")
        return fn(*a, **k)
    return wrapped


@pytest.mark.parametrize("phase", ["reconstruct", "response_logprobs"])
def test_update_out_of_gpu_memory_retries_with_half_the_rows(tiny_path, monkeypatch, capsys, phase):
    """A chunk that runs out of GPU memory costs a retry of its phase (AR or GRPO) at half the rows
    per chunk, not the run: the same update as one that fit, and the micro-batch that fit is
    returned for later steps (grpo.fitting)."""
    from nla import grpo
    monkeypatch.setattr(grpo, phase, _out_of_memory_once(getattr(grpo, phase)))
    av1, ar1, h1, m1 = _grpo_after(tiny_path, True, "replace", micro=2)
    monkeypatch.undo()
    av0, ar0, h0, m0 = _grpo_after(tiny_path, True, "replace", micro=0)
    assert m1["micro_batch"] == 1 and m0["micro_batch"] == 0
    assert "out of GPU memory in the " + ("AR" if phase == "reconstruct" else "GRPO") in capsys.readouterr().out
    torch.testing.assert_close(h0, h1, rtol=1e-5, atol=1e-6)
    for a, b in ((av0, av1), (ar0, ar1)):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert m0["kl"] == pytest.approx(m1["kl"], rel=1e-4)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (faked)"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")])
def test_fitting_halves_the_chunks_on_every_kind_of_gpu_out_of_memory(error, capsys):
    """Out of memory in torch's allocator or in a library's own (cuBLAS's workspace): each retried
    at half the rows; any other error passes through at once, untouched."""
    from nla.grpo import fitting
    zeroed, tried = [], []

    class Opt:
        def zero_grad(self, set_to_none=True):
            zeroed.append(set_to_none)

    def phase(micro, fail=error):
        tried.append(micro)
        if micro == 0 or micro > 2:  # 0: all 8 rows at once
            raise fail
        return "done"
    assert fitting(phase, 0, 8, Opt(), "AR") == ("done", 2)
    assert tried == [0, 4, 2] and zeroed == [True] * 3
    assert capsys.readouterr().out.count("out of GPU memory in the AR phase") == 2
    tried.clear()
    with pytest.raises(RuntimeError, match="same device") as e:
        fitting(lambda m: phase(m, RuntimeError("Expected all tensors to be on the same device")), 8, 8, Opt(), "AR")
    assert tried == [8] and not isinstance(e.value, torch.OutOfMemoryError)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fitting_recovers_from_a_real_cuda_out_of_memory(capsys):
    """On a real GPU: a chunk whose rows cannot all fit fails in torch's allocator part way
    through, holding what it had allocated; the memory comes back (nothing of it kept by the
    handler's traceback), and the phase runs again at half the rows, which fit only if it did."""
    from nla.grpo import fitting
    w = torch.nn.Parameter(torch.randn(64, 64, device="cuda"))
    opt = torch.optim.SGD([w], lr=0.1)
    torch.cuda.empty_cache()
    row = torch.cuda.mem_get_info()[0] // 6 // 4  # fp32 elements of a row's activations: 8 rows
    # need 4/3 of the free memory, 4 rows 2/3, so 4 fit after 8 failed only if the 6 that did
    # allocate were given back

    def phase(micro):
        for c in range(0, 8, micro or 8):
            held = [torch.empty(row, device="cuda") for _ in range(min(micro or 8, 8 - c))]  # a chunk's activations
            w.pow(2).sum().backward()
            del held
        return "done"
    try:
        assert fitting(phase, 0, 8, opt, "GRPO") == ("done", 4)
        assert "out of GPU memory in the GRPO phase at 8 rows per chunk: again at 4" in capsys.readouterr().out
        assert w.grad is not None and torch.cuda.memory_allocated() < 4 * row  # not a row's bytes held
    finally:
        torch.cuda.empty_cache()  # the later tests' libraries allocate outside torch's cache


def test_update_out_of_gpu_memory_at_one_row_says_what_to_do(tiny_path, monkeypatch):
    from nla import grpo
    from nla.errors import NLAError

    def never_fits(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (faked)")
    monkeypatch.setattr(grpo, "reconstruct", never_fits)
    with pytest.raises(NLAError, match="out of GPU memory in the AR phase even at one row per chunk: try") as e:
        _grpo_after(tiny_path, False, "replace", micro=0)
    assert "NLA_MERGE_SAMPLING=0 (sampling's merged weight copies hold 0.0 GB)" in str(e.value)  # they are made here
    monkeypatch.setenv("NLA_MERGE_SAMPLING", "0")
    with pytest.raises(NLAError, match="out of GPU memory in the AR phase") as e:
        _grpo_after(tiny_path, False, "replace", micro=0)
    assert "NLA_MERGE_SAMPLING" not in str(e.value)


def test_fused_norms_are_the_models_norms(tiny_path, monkeypatch):
    """A base's Llama-style RMSNorms run torch's fused rms_norm where it is wanted (on CUDA; forced
    here) with their own weight and eps: Hugging Face's values and gradients. eps matters at these
    magnitudes, so a wrong or default eps fails this."""
    from nla import models
    base = load_base(tiny_path, device="cpu")
    norms = [m for m in base.model.modules() if type(m).__name__ in models.RMS_NORMS]
    assert len(norms) == 2 * base.n_layers + 1
    calls = []
    rms_norm = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm", lambda *a, **k: calls.append(1) or rms_norm(*a, **k))
    x = torch.randn(3, 5, base.d_model, generator=torch.Generator().manual_seed(0)) * 1e-3
    for m in norms[:2]:
        with torch.no_grad():
            m.weight.copy_(torch.rand(m.weight.shape) + 0.5)
        outs = []
        for flag in ("0", "1"):
            monkeypatch.setenv("NLA_FUSED_NORM", flag)
            xi = x.clone().requires_grad_()
            y = m(xi)
            (y * torch.arange(y.numel()).view_as(y)).sum().backward()
            outs.append((y.detach(), xi.grad))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-7)
    assert len(calls) == 2
    monkeypatch.setenv("NLA_FUSED_NORM", "1")
    norms[0](x.double())  # another dtype than the weight's: Hugging Face's own forward
    assert len(calls) == 2


def test_update_with_fused_norms_is_the_same_update(tiny_path, monkeypatch):
    """The GPU's fused norms (forced on the CPU) in a checkpointed, micro-batched bf16 update: the
    same update as Hugging Face's norms, to bf16's rounding."""
    monkeypatch.setenv("NLA_FUSED_NORM", "1")
    new = _grpo_after(tiny_path, True, "replace", micro=3, dtype=torch.bfloat16)
    monkeypatch.setenv("NLA_FUSED_NORM", "0")
    old = _grpo_after(tiny_path, True, "replace", micro=3, dtype=torch.bfloat16)
    start = _setup(tiny_path, False, "replace", dtype=torch.bfloat16)[0]
    for role, a, b in (("av", new[0], old[0]), ("ar", new[1], old[1])):
        before = lora.state(start.model, role)
        d_new, d_old = ({k: w[k] - before[k] for k in w} for w in (a, b))
        scale = max(float(d.abs().max()) for d in d_old.values())
        assert scale > 0, role
        for k in d_old:
            torch.testing.assert_close(d_new[k], d_old[k], rtol=0.05, atol=0.02 * scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_norms_by_default_on_cuda(tiny_path, monkeypatch):
    """On CUDA a bf16 base's norms run the fused kernel unasked: Hugging Face's values and input
    gradients to bf16's rounding (one rounding where Hugging Face's norm has two)."""
    from nla import models
    monkeypatch.delenv("NLA_FUSED_NORM", raising=False)
    base = load_base(tiny_path, device="cuda", dtype=torch.bfloat16)
    m = next(m for m in base.model.modules() if type(m).__name__ in models.RMS_NORMS)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, device="cuda") + 0.5)
    x = torch.randn(7, 33, base.d_model, device="cuda", dtype=torch.bfloat16)
    assert models.fused_norm_wanted(x, m.weight)
    outs = []
    for flag in ("", "0"):
        monkeypatch.setenv("NLA_FUSED_NORM", flag)
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        outs.append((y.detach().float(), xi.grad.float()))
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)


def _rotary_through_the_kernel(tiny_path, monkeypatch, device, wanted=None):
    """A tiny base's logits and adapter gradients with its rotary through Hugging Face's ops
    (NLA_KERNELS=torch) and where kernels.apply_rope is wanted, and the kernel's calls."""
    import sys

    from nla import models
    base = load_base(tiny_path, device=device, dtype=torch.float32)
    lora.attach(base.model, {"av": 4})
    base.model.to(device)
    if wanted:
        monkeypatch.setattr(models, "fused_rope_wanted", wanted)
    calls = []
    rope = sys.modules["kernels.rope"]
    real = rope.apply_rope_triton
    monkeypatch.setattr(rope, "apply_rope_triton", lambda *a: calls.append(1) or real(*a))
    ids = torch.tensor([[5, 9, 14, 3, 7, 7, 2], [8, 1, 4, 4, 11, 6, 3]], device=device)
    outs = {}
    for impl in ("torch", "triton", "torch"):
        monkeypatch.setenv("NLA_KERNELS", impl)
        base.model.zero_grad(set_to_none=True)
        with lora.use(base.model, "av"):
            logits = base.model(input_ids=ids).logits
        (logits.float() * torch.linspace(-1, 1, logits.shape[-1], device=device)).sum().backward()
        got = (logits.detach(), [p.grad.clone() for p in lora.params(base.model, "av")])
        if impl in outs:  # the torch path again: the same to the bit
            assert torch.equal(got[0], outs[impl][0])
        outs[impl] = got
    return base, outs, calls


def test_models_rotary_runs_the_kernel_where_wanted(tiny_path, monkeypatch):
    """Where kernels.apply_rope is wanted (CUDA; here forced, under the interpreter) a base's
    attention rotates q and k with it, one call per block: the same logits and gradients as
    Hugging Face's rotary; elsewhere Hugging Face's own, bit for bit."""
    from kernels.dispatch import backend, interpreting
    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    base, outs, calls = _rotary_through_the_kernel(tiny_path, monkeypatch, "cpu",
                                                   wanted=lambda q: backend(q) == "triton")
    assert len(calls) == base.n_layers
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs["triton"][1], outs["torch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_models_rotary_is_hugging_faces_on_a_cpu(tiny_path, monkeypatch):
    """On a CPU, even where Triton is forced for the other kernels (NLA_KERNELS=triton under the
    interpreter), the rotary stays Hugging Face's: no kernel call, the same numbers to the bit."""
    _, outs, calls = _rotary_through_the_kernel(tiny_path, monkeypatch, "cpu")
    assert calls == [] and torch.equal(outs["triton"][0], outs["torch"][0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_models_rotary_runs_the_kernel_on_cuda(tiny_path, monkeypatch):
    """On CUDA a base's rotary goes through kernels.apply_rope unasked, one call per block, with
    Hugging Face's values and gradients (fp32)."""
    base, outs, calls = _rotary_through_the_kernel(tiny_path, monkeypatch, "cuda")
    assert len(calls) == base.n_layers
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(outs["triton"][1], outs["torch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)

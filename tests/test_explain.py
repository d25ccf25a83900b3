"""`nla-cli explain` on a tiny random Llama: --tokens parsing, the JSON schema and its arithmetic,
the table, one-line errors through the CLI, and the reference release's two-directory layout
(built here from a native checkpoint by merging its adapters) giving the native results."""
import json
import math
import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

from nla import checkpoint, lora, reference
from nla.collect import collect
from nla.config import CollectConfig
from nla.errors import NLAError
from nla.explain import ExplainConfig, explain, parse_tokens, prompt_ids, render_table
from nla.models import load_base
from nla.reconstructor import ARHead
from nla.spec import AR_PREFIX, AR_SUFFIX, AV_TEMPLATE, build_spec

LAYER = 2
PROMPT = "The river ran past the old mill while the baker sold bread"


def make_tiny_run(root, tiny_path) -> dict:
    """Activations of the tiny model and a run dir with sft/ and rl/ checkpoints holding random,
    non-zero adapters: every code path of explain/eval without the cost of training."""
    corpus = root / "c.jsonl"
    with open(corpus, "w") as f:
        for i in range(24):
            f.write(json.dumps({"text": f"Note {i}: " + " ".join(f"word{(i * 7 + j) % 50}." for j in range(30))}) + "\n")
    acts = root / "acts"
    meta = collect(CollectConfig(model=tiny_path, layer=LAYER, corpus=str(corpus), out=str(acts), per_doc=2, min_pos=4,
                                 device="cpu", heldout_frac=0.25))
    base = load_base(tiny_path, device="cpu")
    torch.manual_seed(0)  # lora.attach draws A at random: the run must not depend on which tests ran before
    lora.attach(base.model, {"av": 4, "ref": 4, "ar": 4})
    spec = build_spec(base, LAYER, meta, "replace", 4, 4)
    head = ARHead(base.d_model)
    torch.manual_seed(0)
    for stage, info in (("sft", {"stage": "sft"}), ("rl", {"stage": "rl", "step": 4})):
        with torch.no_grad():
            for role in ("av", "ar"):
                for p in lora.params(base.model, role):
                    p.add_(torch.randn_like(p) * 0.05)
            head.weight.add_(torch.randn_like(head.weight) * 0.05)
        lora.copy_role(base.model, "av", "ref")
        roles = ("av", "ar") if stage == "sft" else ("av", "ar", "ref")
        checkpoint.save(root / "run" / stage, base, spec, head, roles=roles, info=info)
    return dict(acts=str(acts), run=root / "run", rl=str(root / "run" / "rl"), meta=meta)


@pytest.fixture(scope="module")
def tiny_run(tiny_path, tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("explain"), tiny_path)


def cli(*args, **kw):
    from cli import app
    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def one_line_error(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output[-2000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and r.stderr.rstrip().splitlines()[-1] == errors[0], r.stderr[-2000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@pytest.mark.parametrize("var,value", [("NLA_KERNELS", "cuda"), ("NLA_NF4_TABLE", "nibbles"), ("NLA_COMMON_LEVEL", "on"),
                                       ("NLA_ROLLOUT_ROWS", "all")])
def test_a_bad_switch_is_one_line_before_any_work(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    one_line_error(cli("explain", "x", "--checkpoint", "missing"), var, value)


def test_parse_tokens():
    assert parse_tokens("last", 7) == [6]
    assert parse_tokens("all", 3) == [0, 1, 2]
    assert parse_tokens("2..4", 7) == [2, 3, 4]
    assert parse_tokens(" 5 ", 7) == [5]
    assert parse_tokens("0..6", 7) == list(range(7))
    assert parse_tokens("3..9") == list(range(3, 10))  # without a length only the syntax is checked
    for bad in ("first", "-1", "2-4", "2..", "..3", "1..2..3", ""):
        with pytest.raises(NLAError, match="--tokens must be"):
            parse_tokens(bad, 7)
    with pytest.raises(NLAError, match="empty range"):
        parse_tokens("4..2", 7)
    with pytest.raises(NLAError, match="out of range: the prompt has 7 tokens"):
        parse_tokens("5..7", 7)
    with pytest.raises(NLAError, match="--tokens"):
        ExplainConfig(prompt="x", tokens="4..2")
    with pytest.raises(NLAError, match="prompt is required"):
        ExplainConfig(prompt="  ")
    with pytest.raises(NLAError, match="--samples"):
        ExplainConfig(prompt="x", samples=0)


def test_chat_wraps_the_prompt(tokenizer):
    plain, chat = prompt_ids(tokenizer, "Hello there", False), prompt_ids(tokenizer, "Hello there", True)
    assert plain == tokenizer("Hello there")["input_ids"]
    text = tokenizer.decode(chat)
    assert len(chat) > len(plain) and "Hello there" in text and text.rstrip().endswith("assistant")


def test_render_table_aligns_and_wraps():
    long = " ".join(f"word{i}" for i in range(60))
    res = dict(model="m", layer=2, checkpoint="ck", decoding="greedy", tokens=[
        dict(index=0, token="The", explanation=long, fve=0.5, cos=0.75, ok=True),
        dict(index=11, token=" river\n", explanation="short", fve=None, cos=-0.125, ok=False)])
    lines = render_table(res, width=70).splitlines()
    assert all(len(line) <= 70 for line in lines[1:])
    start = lines[1].index("explanation")
    assert lines[2][start:].startswith("word0 ") and lines[3][:start].strip() == ""  # continuation under its column
    assert " ".join(line[start:].strip() for line in lines[2:-1]) == long
    assert "n/a" in lines[-1] and "-0.125" in lines[-1] and "[no closing tag]" in lines[-1]
    assert repr(" river\n") in lines[-1]


def test_explain_json_schema_and_scores(tiny_run):
    r = cli("explain", PROMPT, "--checkpoint", tiny_run["rl"], "--tokens", "1..3", "--samples", "3", "--json",
            "--max-new", "6", "--device", "cpu")
    assert r.exit_code == 0, r.output[-3000:]
    res = json.loads(r.stdout)
    assert set(res) == {"model", "layer", "checkpoint", "prompt", "chat", "decoding", "mse_mean", "tokens"}
    assert res["layer"] == LAYER and res["checkpoint"] == tiny_run["rl"] and res["prompt"] == PROMPT
    assert "best of 3" in res["decoding"] and res["mse_mean"] == pytest.approx(tiny_run["meta"]["mse_mean"]["train"])
    assert [t["index"] for t in res["tokens"]] == [1, 2, 3]
    for t in res["tokens"]:
        assert set(t) == {"index", "token", "explanation", "fve", "cos", "ok", "samples", "fve_spread", "fve_std",
                          "cos_spread"}
        assert isinstance(t["token"], str) and isinstance(t["explanation"], str) and isinstance(t["ok"], bool)
        assert len(t["samples"]) == 3 and all(set(s) == {"explanation", "fve", "cos", "ok"} for s in t["samples"])
        fves = [s["fve"] for s in t["samples"]]
        assert t["fve"] == max(fves) and t["fve_spread"] == pytest.approx(max(fves) - min(fves))
        for s in t["samples"]:  # FVE and cosine are one number on the sqrt(d) sphere: MSE = 2(1 - cos)
            assert math.isfinite(s["fve"]) and s["fve"] == pytest.approx(1 - 2 * (1 - s["cos"]) / res["mse_mean"], abs=1e-4)

    r2 = cli("explain", PROMPT, "--checkpoint", tiny_run["run"], "--tokens", "all", "--max-new", "6", "--device", "cpu",
             env={"COLUMNS": "90"})  # the run dir resolves to its rl/ checkpoint; greedy; the table
    assert r2.exit_code == 0, r2.output[-3000:]
    lines = r2.stdout.splitlines()
    assert "greedy" in lines[0] and lines[1].split() == ["#", "token", "FVE", "cos", "explanation"]
    assert all(len(line) <= 90 for line in lines[1:])


def test_cli_errors_are_one_line(tiny_run, smol_path, tmp_path):
    rl = tiny_run["rl"]
    one_line_error(cli("explain", "x", "--checkpoint", rl, "--layer", 1), "layer mismatch", "layer 2", "layer 1", rl)
    err = one_line_error(cli("explain", "x", "--checkpoint", rl, "--model", smol_path), "model mismatch")
    assert str(reference.locate(rl).base_model) in err and smol_path in err
    bad = tmp_path / "bad"
    shutil.copytree(rl, bad)
    meta = yaml.safe_load(open(bad / "nla_meta.yaml"))
    meta["d_model"] = 32
    (bad / "nla_meta.yaml").write_text(yaml.safe_dump(meta))
    one_line_error(cli("explain", "x", "--checkpoint", bad, "--device", "cpu"), "d_model mismatch", "d_model 32", "d_model 64")
    tiny = reference.locate(rl).base_model
    one_line_error(cli("explain", "x", "--model", tiny, "--layer", 1), "no NLA checkpoint for", "layer 1",
                   "nla-cli collect --model", "nla-cli train --acts", "--checkpoint runs/model-L1/rl")
    one_line_error(cli("explain", "x", "--layer", 7), "no NLA checkpoint for smollm2 layer 7", "nla-cli train")
    one_line_error(cli("explain", "x", "--checkpoint", tmp_path / "nowhere"), "checkpoint not found")
    one_line_error(cli("explain", "x", "--checkpoint", tmp_path), "is not an NLA checkpoint")
    one_line_error(cli("explain", "x", "--checkpoint", rl, "--tokens", "x"), "--tokens must be")
    one_line_error(cli("explain", "two words", "--checkpoint", rl, "--tokens", "0..99", "--device", "cpu"),
                   "out of range: the prompt has 2 tokens")


def export_reference(native: str, tiny_path: str, out, layer: int = LAYER) -> None:
    """Write a native checkpoint in the reference release's layout: AV and AR as full models
    (adapters merged into the weights; the AR cut to layer+1 blocks), value_head.safetensors,
    and reference-style sidecars."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = load_base(tiny_path, device="cpu")
    spec, head, _ = checkpoint.load(native, base, ("av", "ar"))
    tok = AutoTokenizer.from_pretrained(tiny_path)
    for role in ("av", "ar"):
        model = AutoModelForCausalLM.from_pretrained(tiny_path)
        with torch.no_grad():
            for name, mod in lora._wrapped(base.model):
                a = mod.adapters[role]
                model.get_submodule(name).weight.add_(a.scale * a.B @ a.A)
        if role == "ar":
            model.model.layers = model.model.layers[:layer + 1]
            model.config.num_hidden_layers = layer + 1
            if isinstance(getattr(model.config, "layer_types", None), list):
                model.config.layer_types = model.config.layer_types[:layer + 1]
        model.save_pretrained(out / role)
        tok.save_pretrained(out / role)
    save_file({"weight": head.weight.detach().clone()}, str(out / "ar" / "value_head.safetensors"))
    left, right = spec.placeholder_neighbours
    (out / "av" / "nla_meta.yaml").write_text(yaml.safe_dump(dict(
        kind="nla_model", role="av", d_model=spec.d_model,
        extraction=dict(layer_index=layer, injection_scale=spec.injection_scale, mse_scale="sqrt_d_model"),
        tokens=dict(injection_char=spec.placeholder, injection_token_id=spec.placeholder_id,
                    injection_left_neighbor_id=left, injection_right_neighbor_id=right),
        prompt_templates=dict(av=AV_TEMPLATE.replace("{placeholder}", "{injection_char}"))), allow_unicode=True))
    (out / "ar" / "nla_meta.yaml").write_text(yaml.safe_dump(dict(  # no layer_index: K comes from ar.num_hidden_layers
        kind="nla_model", role="ar", d_model=spec.d_model, extraction=dict(mse_scale=8.0),
        ar=dict(num_hidden_layers=layer), tokens=dict(critic_suffix_ids=tok.encode(AR_SUFFIX, add_special_tokens=False)[1:]),
        prompt_templates=dict(ar=AR_PREFIX + "{explanation}" + AR_SUFFIX))))


def test_reference_layout_gives_the_native_results(tiny_run, tiny_path, tmp_path, capsys):
    ref = tmp_path / "ref"
    export_reference(tiny_run["rl"], tiny_path, ref)
    loc = reference.locate(str(ref))
    assert (loc.layout, loc.layer, loc.d_model, loc.base_model) == ("reference", LAYER, 64, None)
    assert loc.path == ref / "av" and loc.ar_path == ref / "ar"
    assert reference.locate(f"{ref / 'ar'},{ref / 'av'}").path == ref / "av"  # either order
    shutil.copytree(ref / "av", tmp_path / "nla-L2-av")
    shutil.copytree(ref / "ar", tmp_path / "nla-L2-ar")
    assert reference.locate(str(tmp_path / "nla-L2-av")).ar_path == tmp_path / "nla-L2-ar"  # the sibling AR
    with pytest.raises(NLAError, match="reference-layout AR"):
        reference.locate(str(ref / "ar"))
    with pytest.raises(NLAError, match="does not name its base model"):
        explain(ExplainConfig(prompt=PROMPT, checkpoint=str(ref)))

    kw = dict(prompt=PROMPT, tokens="all", max_new=8, device="cpu", json=True)
    native = explain(ExplainConfig(checkpoint=tiny_run["rl"], **kw))
    theirs = explain(ExplainConfig(checkpoint=str(ref), model=tiny_path, acts=tiny_run["acts"], **kw))
    again = explain(ExplainConfig(checkpoint=str(ref), model=tiny_path, acts=tiny_run["acts"], **kw))
    capsys.readouterr()
    assert theirs == again  # deterministic
    assert theirs["mse_mean"] == pytest.approx(native["mse_mean"])
    for a, b in zip(native["tokens"], theirs["tokens"]):
        assert a["explanation"] == b["explanation"] and a["token"] == b["token"]
        assert math.isfinite(b["fve"]) and b["fve"] == pytest.approx(a["fve"], abs=1e-3)
        assert b["cos"] == pytest.approx(a["cos"], abs=1e-4)

    # the sidecar fields land where our code expects them
    base = load_base(tiny_path, device="cpu")
    nat = reference.load(reference.locate(tiny_run["rl"]), base)
    their = reference.load(loc, device="cpu")
    for k in ("placeholder", "placeholder_id", "placeholder_neighbours", "injection_scale", "layer", "d_model",
              "av_prompt_ids", "ar_prefix_ids", "ar_num_layers"):
        assert getattr(their.spec, k) == getattr(nat.spec, k), k
    assert math.isnan(their.spec.mse_mean) and their.spec.mse_scale == "8.0" and their.av_role is None
    texts = ["alpha beta gamma", "the river ran past the mill."]
    torch.testing.assert_close(their.reconstruct(texts), nat.reconstruct(texts), rtol=1e-4, atol=1e-4)
    # the reference AR tokenises its prompt as one string: at an edge where BPE merges (an empty
    # explanation puts '>' next to '</'), the ids, and so the reconstruction, differ from ours
    tok = their.ar.tokenizer
    assert tok(AR_PREFIX + AR_SUFFIX)["input_ids"] != nat.spec.ar_prefix_ids + nat.spec.ar_suffix_ids
    assert not torch.allclose(their.reconstruct([""]), nat.reconstruct([""]), atol=1e-4)

"""`nla-cli train` end to end on a tiny model: stages, files, metrics, exact resume, and
two-process data parallelism (gloo) giving the same update as one process."""
import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch

from nla.config import TrainConfig
from nla.errors import NLAError

TINY = dict(n_warm=8, summary_max_new=12, sft_ar_steps=3, sft_av_steps=3, sft_batch=4, rank_av=4, rank_ar=4,
            rl_steps=4, rl_batch=2, group=2, max_new=8, eval_every=2, eval_n=4, eval_max_new=8, save_every=2,
            device="cpu")


def _params(out):
    from safetensors.torch import load_file
    return {f: load_file(str(out / "rl" / f)) for f in ("av.safetensors", "ar.safetensors")}


def test_train_end_to_end_and_exact_resume(tiny_acts, tmp_path):
    from nla.train import train
    ref = tmp_path / "ref"
    summary = train(TrainConfig(acts=tiny_acts, out=str(ref), **TINY))
    for f in ("metrics.jsonl", "training.png", "warmstart_eval.json", "summary.json", "rl/nla_meta.yaml",
              "rl/state.pt", "sft/av.safetensors", "warmstart/sft_av.summaries.jsonl"):
        assert (ref / f).exists(), f
    rows = [json.loads(l) for l in open(ref / "metrics.jsonl")]
    rl = [r for r in rows if r["stage"] == "rl"]
    assert [r["step"] for r in rl] == [1, 2, 3, 4]
    for k in ("reward_mean", "reward_std", "train_fve", "kl", "expl_len", "zero_spread", "step_time", "fail_frac"):
        assert k in rl[0]
    assert [r["step"] for r in rows if r["stage"] == "eval"] == [0, 2, 4]
    ws = json.loads((ref / "warmstart_eval.json").read_text())
    assert 0 <= ws["heldout_token_hits"] <= 1 and 0 <= ws["shuffled_token_hits"] <= 1
    assert summary["final_fve"] is not None
    import yaml
    meta = yaml.safe_load(open(ref / "rl" / "nla_meta.yaml"))
    for k in ("d_model", "layer", "injection_scale", "mse_scale", "placeholder", "placeholder_id",
              "placeholder_neighbours", "av_template", "ar_prefix", "ar_suffix_ids", "ar_num_layers",
              "base_model", "lora_rank_av", "lora_rank_ar", "quant"):
        assert k in meta, k
    assert meta["step"] == 4 and meta["ar_num_layers"] == 3

    # kill a second run right after its step-2 RL checkpoint, then rerun the same command
    out = tmp_path / "killed"
    code = (
        "import os, nla.checkpoint as ck, nla.train as t\n"
        "from nla.config import TrainConfig\n"
        "orig = ck.save\n"
        "def save(path, *a, **k):\n"
        "    orig(path, *a, **k)\n"
        "    if k.get('info', {}).get('step') == 2: os._exit(9)\n"
        "t.checkpoint.save = save\n"
        f"t.train(TrainConfig(acts={tiny_acts!r}, out={str(out)!r}, **{TINY!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr[-3000:]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"stage": "rl", "step": 3, "torn')  # a half-written line from the kill
    train(TrainConfig(acts=tiny_acts, out=str(out), **TINY))
    a, b = _params(ref), _params(out)
    for f in a:
        for k in a[f]:
            torch.testing.assert_close(a[f][k], b[f][k], rtol=0, atol=0)
    rows2 = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows2 if r["stage"] == "rl"] == [1, 2, 3, 4]


def test_train_refuses_bad_inputs(tiny_acts, tmp_path):
    from nla.train import train
    with pytest.raises(NLAError, match="no activation dataset"):
        train(TrainConfig(acts=str(tmp_path / "none"), out=str(tmp_path / "o"), **TINY))
    with pytest.raises(NLAError, match="group"):
        TrainConfig(group=1)
    with pytest.raises(NLAError, match="preset"):
        TrainConfig(preset="huge")
    c = TrainConfig(preset="cpu-smoke", rl_steps=3)
    assert c.rl_steps == 3 and c.group == 4 and c.max_new == 48


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


DDP_SCRIPT = r'''
import os, sys, torch
from nla import dist, lora
from nla.models import load_base
from nla.spec import build_spec
from nla.reconstructor import ARHead
from nla.verbalizer import Sample, target_ids
from nla.grpo import update
dist.init()
path, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
base = load_base(path, device="cpu")
lora.attach(base.model, {"av": 4, "ref": 4, "ar": 4})
torch.manual_seed(1)
with torch.no_grad():
    for role in ("av", "ar"):
        for p in lora.params(base.model, role):
            p.normal_(0, 0.02)
lora.copy_role(base.model, "av", "ref")
spec = build_spec(base, 2, {"injection_scale": 3.0, "mse_mean": {"train": 1.5}}, "replace", 4, 4)
head = ARHead(base.d_model)
G = 2
vecs = torch.randn(4, base.d_model, generator=torch.Generator().manual_seed(5)).repeat_interleave(G, 0)
texts = ["alpha beta", "gamma", "one two three four", "cats", "dogs bark loudly", "x", "weather report rain", "z z"]
tok = base.tokenizer
samples = [Sample(target_ids(tok, t), t, i != 5) for i, t in enumerate(texts)]
sl = dist.shard(len(texts))
opt_av = torch.optim.SGD(lora.params(base.model, "av"), lr=0.5)
opt_ar = torch.optim.SGD(lora.params(base.model, "ar") + list(head.parameters()), lr=0.5)
m = update(base, spec, head, vecs[sl], samples[sl], opt_av, opt_ar, G, 0.01, 0.2)
if dist.rank() == 0:
    torch.save({"av": lora.state(base.model, "av"), "ar": lora.state(base.model, "ar"), "head": head.weight.detach(), "m": m}, out)
dist.finish()
'''


def _torchrun(script, tiny_path, out, env):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", str(script), tiny_path, str(out)],
                          capture_output=True, text=True, env=env)


def test_two_process_gloo_equals_one_process(tiny_path, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), tiny_path, str(tmp_path / "one.pt")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(script, tiny_path, tmp_path / "two.pt", env)
    if two.returncode != 0 and "terminate called" in two.stderr:
        # CI saw this once (2026-11-27; "without an active exception"), never in ~160 runs here: a
        # rank's C++ side aborts, with no Python error. Not our numerics (those fail the same way
        # every time), so one retry, said out loud in the warnings summary with the stacks
        # faulthandler printed (dist.init).
        warnings.warn(f"a gloo rank aborted; retrying once. Its stderr ended:\n{two.stderr[-4000:]}")
        two = _torchrun(script, tiny_path, tmp_path / "two.pt", env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    torch.testing.assert_close(a["head"], b["head"], rtol=1e-5, atol=1e-6)
    for role in ("av", "ar"):
        for k in a[role]:
            torch.testing.assert_close(a[role][k], b[role][k], rtol=1e-5, atol=1e-6)
    for k in ("reward_mean", "kl", "expl_len", "fail_frac", "zero_spread"):
        assert a["m"][k] == pytest.approx(b["m"][k], rel=1e-5, abs=1e-6), k
    assert not torch.equal(a["head"], torch.eye(a["head"].shape[0]))  # the update did something

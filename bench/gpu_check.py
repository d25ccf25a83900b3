"""Everything only a GPU can show, in ONE command of at most ~8 minutes.

A lent GPU machine comes with little time (about 15 minutes per session, start-up included), its
own torch/triton/transformers, no bitsandbytes, no gguf, no network, and only what one call
carries (64 MiB). So this script installs the carried wheels (bitsandbytes, pytest) into a
private folder, then runs each stage in its own process under its own time cap, so that one
failure or hang does not eat the rest, and ends with a one-screen summary:

    parity     Triton kernels vs torch on CUDA (odd and realistic shapes, fp32/bf16, fwd/bwd, past 2^31),
               and the CUDA-graph decode loop vs eager (tests marked gpu)
    kernels    bench/kernels.py: speed-ups, bandwidth, log-prob targets
    rl-smol    bench/rl_step.py on a random SmolLM2-shaped model: our loop / old loop / HF generate, roofline
    rl-1.5b    the same on a random Qwen2.5-1.5B shape (batch 64, cap 150: the issue's targets)
    memory     bench/memory.py: a Qwen2.5-7B-shaped nf4 RL step, time and peak memory, with gradient
               checkpointing; its update's and its rollout's kernels; the rollout with the KL
               reference's twins and without
    nf4        bench/kernels.py --only nf4,sample,attention,rope: the 4-bit decode matmul against
               bitsandbytes, the fused next-token draw against torch.multinomial, the decode attention
               that reads the cache up to its fill against SDPA, the rotary embedding against Hugging
               Face's
    e2e        collect -> train --preset gpu (scaled down) -> explain -> eval on a random model
    profile, memory-merged, memory-compiled, nf4-sweep, memory-torch, memory-nf4, memory-plans
               diagnoses: the decode step's and the update's kernels at 1.5B, the 7B step sampling
               from merged copies of its 4-bit weights (the second call's first job), the 7B step
               with bitsandbytes' decode step compiled, the nf4 kernel's tiles by device time, the 7B
               step with torch kernels, the 7B step with its rollout through the nf4 kernel (if the
               nf4 stage shows the kernel beating bitsandbytes, this is the second call's job,
               before nf4-sweep), the 7B step without checkpointing

    python bench/gpu_check.py [--out DIR] [--only STAGE,...|all] [--budget SECONDS] [--dry-run]

By default it runs what is not yet settled on a GPU (DEFAULT below, <= 540 s, so a rerun of a stage
still fits the session); `--only all` runs every stage (~10 minutes: more than one call allows).
`--budget S` then spends what the stages left of S seconds on the diagnoses (EXTRA) whose caps fit.
Carry: `.whl` (wheels: bitsandbytes, pytest and its deps) and `.gpu/tokenizer` (the SmolLM2
tokenizer files); see the README's GPU section for the exact `run` call.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RANDOM_MODEL = "/tmp/nla-gpu-check/random-smollm2"
M = "env NLA_MERGE_SAMPLING=0 "  # a 4-bit base's step from its 4-bit weights (lora.merge_wanted)

# (name, cap in seconds, command, what to quote in the summary)
STAGES = [
    # (-v: a stage cut by its cap still says which tests passed, failed, or were running)
    ("parity", 110, f"{PY} -m pytest -v --tb=short -p no:cacheprovider -m 'gpu or not slow' tests/test_kernels.py tests/test_decoding.py "
                   f"tests/test_shared_prefix.py tests/test_ref_in_rollout.py::test_twins_on_cuda_with_a_4bit_base "
                   f"tests/test_quant.py::test_bnb_linear_on_cuda tests/test_checkpointing.py::test_fused_norms_by_default_on_cuda "
                   f"tests/test_checkpointing.py::test_models_rotary_runs_the_kernel_on_cuda "
                   f"tests/test_checkpointing.py::test_fitting_recovers_from_a_real_cuda_out_of_memory "
                   # the compile check needs no GPU (CI runs it) and judges the machine's Triton, not the kernels' results;
                   # the nf4 sweep's tiles are checked by CI too (twenty more compiles here, for an experiment)
                   f"--deselect tests/test_kernels.py::test_every_launch_compiles_for_gpus_without_spills "
                   f"--deselect tests/test_kernels.py::test_nf4_sweep_tiles_give_the_references_products",
     r"passed|failed|error|FAILED|ERROR"),
    ("kernels", 45, f"{PY} bench/kernels.py --quick", r"target|MISSED|met|speed-up|x$"),
    ("nf4", 50, f"{PY} bench/kernels.py --quick --only nf4,sample,attention,rope", r"copy bandwidth|x \d+ x|\d+ x \d+ "),
    ("rl-smol", 40, f"{PY} bench/rl_step.py --shape smollm2 --acts 8 --group 8 --max-new 64 --steps 2 --loops ours,ours-adapters,reference",
     r"roofline|ours|old eager|torch |triton |failed"),
    # (the graph-only loop "ours" was measured on an H200: 0.825 s; its place goes to the memory stage)
    # (the old loop, 864-1,370 tok/s in three H200 runs, and the fused projections' gain, 1.09x on
    # 2026-11-27, are measured: their places go to HF generate, which the last run's 220 s cut off,
    # and since the fourteenth session to the step compiled with Inductor's max-autotune, after HF
    # (the slow compiles last, so a cut stage keeps the rest): does timing each GEMM against Triton
    # templates pay, and what does its compile cost?)
    ("rl-1.5b", 200, f"{PY} bench/rl_step.py --shape qwen2.5-1.5b --acts 8 --group 8 --max-new 150 --steps 2 --rank 64 "
                     f"--micro 32 --loops ours-compiled,hf,ours-autotune --modes triton --profile-decode",
     r"roofline|ours|old eager|HF generate|torch |triton |failed|peak|^prof |^phase|cudaMalloc"),
    # the 7B step with checkpointing (a cold 7B build, put at ~70 s; printed now) at micro 16, its
    # update and a rollout profiled (the AR and GRPO phases took 3-4x their earlier times in the
    # last run, with twice the decoder passes: since cut to ~half, nla/shared_prefix.Held; the
    # decode step took ~20 ms, bitsandbytes' products, timed alone, ~13 of them), then at micro 64
    # (one chunk: 2.6x fewer ops than micro 16, counted on a CPU; does it fit in 20 GB?), then the
    # rollout with the reference's twins and without, and the update with the reference forward
    # (the plans without checkpointing: stage memory-plans)
    # (the copies, not merged: what a 24 GB card runs, the <= 20 GB target; merged: memory-merged)
    ("memory", 180, f"{M}{PY} bench/memory.py --steps 2 --plans ckpt:16,ckpt:64 --rollout-ab --profile",
     r"built in|RL step|peak GPU|step \d|out of|decode step|rollout|reference forward|^phase"),
    # diagnosis, on request: the compiled decode step's kernels, and the update per kernel mode
    # with the modes' order reversed (is the Triton mode's slower AR phase kernels or warm-up?)
    ("profile", 170, f"{PY} bench/rl_step.py --shape qwen2.5-1.5b --acts 8 --group 8 --max-new 150 --steps 3 --rank 64 "
                     f"--micro 32 --loops ours-compiled --modes triton,torch --profile --profile-decode --profile-rows 30",
     r"roofline|ours|torch |triton |profile of|cudaMalloc"),
    # which nf4 tile, pipeline depth and code table the H200 likes (the tiles were chosen by
    # instruction counts, which did not predict its speed; all of them kept ~1 program per SM)
    ("nf4-sweep", 120, f"{PY} bench/kernels.py --only nf4-sweep", r"best|copy bandwidth"),
    # the 7B step sampling from merged copies of the 4-bit weights (dequantised once a rollout, plus
    # s B A: ~13 GB more, what training does where they fit twice over in free memory, as on an
    # H100/H200): a compiled step through cuBLAS at ~2 bytes a weight, against bitsandbytes' ~4.5
    # and its ~20 ms a step; no twins, so the update runs the reference forward. Compiles (~60 s?)
    ("memory-merged", 200, f"env NLA_MERGE_SAMPLING=1 {PY} bench/memory.py --steps 2 --plans ckpt:64 --rollout-ab",
     r"built in|RL step|decode step|step \d|peak GPU|rollout|reference forward"),
    # does bitsandbytes' 4-bit decode step pay for a compile (not by default; the nf4 kernel's 7B
    # step took ~66 s to compile)? Through its gemm op (kernels.nf4.bnb_linear) the twins' step
    # traces whole on a CPU, one graph
    ("memory-compiled", 200, f"env NLA_COMPILE_DECODE=1 {M}{PY} bench/memory.py --steps 2 --plans ckpt:64",
     r"RL step|decode step|step \d|peak GPU"),
    ("memory-torch", 100, f"env NLA_KERNELS=torch {M}{PY} bench/memory.py --steps 3", r"RL step|peak GPU|step \d"),
    # the 7B step with its rollout through the nf4 kernel, its decode step compiled (~66 s at 7B):
    # worth its minutes once the nf4 stage shows the kernel (since the ninth session no load of it
    # waits where it is issued) beating bitsandbytes
    ("memory-nf4", 200, f"env NLA_KERNELS=triton {M}{PY} bench/memory.py --steps 2 --plans ckpt:64",
     r"RL step|decode step|step \d|peak GPU"),
    # the 7B step without checkpointing (one forward fewer per backward, a third of the update's
    # FLOPs, for ~8.5 MB of stored activations a token, 302 KB a layer counted on a CPU: tenth
    # session's RESULTS; 4 rows of 150 tokens ~5 GB, 8 rows ~10 GB, with the rest past 20 GB)
    ("memory-plans", 200, f"{M}{PY} bench/memory.py --steps 2 --plans full:4,full:8",
     r"RL step|peak GPU|step \d|out of"),
    ("e2e", 100, "bash -c " + shlex.quote(
        f"set -e; {PY} bench/gpu_check.py --make-random-model {RANDOM_MODEL}; D=/tmp/nla-gpu-check; "
        f"{PY} cli.py collect --model {RANDOM_MODEL} --layer 20 --max-docs 96 --per-doc 4 --out $D/acts --overwrite; "
        f"{PY} cli.py train --acts $D/acts --out $D/run --preset gpu --n-warm 32 --sft-ar-steps 10 --sft-av-steps 10 "
        f"--rl-steps 2 --rl-batch 8 --eval-every 1 --eval-n 16 --max-new 48 --eval-max-new 32 --summary-max-new 32 --save-every 1; "
        f"{PY} cli.py train --acts $D/acts --out $D/run --preset gpu --n-warm 32 --sft-ar-steps 10 --sft-av-steps 10 "
        f"--rl-steps 3 --rl-batch 8 --eval-every 1 --eval-n 16 --max-new 48 --eval-max-new 32 --summary-max-new 32 --save-every 1; "
        f"{PY} cli.py explain 'The capital of France is Paris' --model {RANDOM_MODEL} --checkpoint $D/run/rl --layer 20 --max-new 24; "
        f"{PY} cli.py eval --checkpoint $D/run/rl --data $D/acts --max-n 16 --max-new 24 --out $D/eval"),
     r"plan|resuming|warm start:|done:|FVE|Token test|Faithfulness|error"),
]

# kernels, rl-smol and e2e were measured on an H200 (2026-11-26) and have not changed since. nf4
# runs before memory: the nf4 kernel has never run on a GPU, and if its stage fails the 7B step is
# still measured, on bitsandbytes' path (NLA_KERNELS=torch), rather than lost with it
DEFAULT = ("parity", "nf4", "rl-1.5b", "memory")
# stage: (the stage it needs, prefix if that failed). The nf4 stage also runs the sampling and
# decode-attention kernels once on the GPU, which the 1.5B rollout then uses
FALLBACK = {"rl-1.5b": ("nf4", "env NLA_KERNELS=torch "), "memory": ("nf4", "env NLA_KERNELS=torch ")}
# run after the chosen stages, each only if its whole cap fits in what is left of --budget (the
# memory stage profiles the 7B update itself now)
EXTRA = ("memory-merged", "memory-compiled", "nf4-sweep", "memory-torch", "profile", "memory-nf4", "memory-plans")


def setup_env(log) -> dict:
    """Carried wheels into a private site folder (nothing is installed system-wide)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               NLA_TEST_GPU="1", NLA_CACHE="/tmp/nla-gpu-check/cache")
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    site = "/tmp/nla-gpu-check/site"
    if wheels:
        r = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site,
                            *map(str, wheels)], capture_output=True, text=True)
        log.write(f"$ pip install {len(wheels)} carried wheels -> {site}: rc {r.returncode}\n{r.stderr[-2000:]}\n")
    env["PYTHONPATH"] = f"{site}:{ROOT}" + (f":{env['PYTHONPATH']}" if env.get("PYTHONPATH") else "")
    tok = ROOT / ".gpu" / "tokenizer"
    if tok.exists():
        env["NLA_TOKENIZER"] = str(tok)
    return env


def versions(env) -> str:
    code = ("import torch, transformers, sys\n"
            "try:\n import triton; tv = triton.__version__\nexcept Exception: tv = 'none'\n"
            "try:\n import bitsandbytes as b; bv = b.__version__\nexcept Exception as e: bv = 'none'\n"
            "dev = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'\n"
            "print(f'{dev}; python {sys.version.split()[0]}, torch {torch.__version__}, triton {tv}, '\n"
            "      f'transformers {transformers.__version__}, bitsandbytes {bv}')")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    return (r.stdout.strip() or r.stderr.strip().splitlines()[-1]) if (r.stdout or r.stderr) else "?"


def make_random_model(path: str) -> None:
    """A random-weight SmolLM2-shaped model dir with the carried tokenizer: what `collect`,
    `train`, `explain` and `eval` get as --model on a machine with no real weights."""
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.common import random_model, tokenizer_dir
    from transformers import AutoTokenizer
    if (Path(path) / "config.json").exists():
        return
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    model = random_model("smollm2", "cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16, tokenizer=tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def run_stage(name, cap, cmd, env, log) -> tuple[str, float, str]:
    log.write(f"\n===== {name} (cap {cap} s) =====\n$ {cmd}\n")
    log.flush()
    t = time.time()
    try:
        r = subprocess.run(cmd, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=cap)
        out, status = r.stdout + r.stderr, ("ok" if r.returncode == 0 else f"FAILED rc={r.returncode}")
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        status = "TIMEOUT"
    log.write(out)
    log.flush()
    return status, time.time() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/nla-gpu-check/out"))
    ap.add_argument("--only", default=",".join(DEFAULT), help="comma-separated stage names, or all")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--budget", type=float, default=0, help="seconds this call may take: after the chosen "
                    "stages, run the extra diagnoses whose cap fits in what is left (0: none)")
    ap.add_argument("--parity-k", default="", help="pytest -k expression for the parity stage (a quick rerun)")
    ap.add_argument("--make-random-model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make_random_model:
        return make_random_model(a.make_random_model)
    stages = [s for s in STAGES if a.only == "all" or s[0] in a.only.split(",")]
    if a.parity_k:
        stages = [(n, c, cmd + f" -k {shlex.quote(a.parity_k)}" if n == "parity" else cmd, p) for n, c, cmd, p in stages]
    if a.dry_run:
        print(f"bench/gpu_check.py plan: {len(stages)} stages, at most {sum(s[1] for s in stages)} s in all"
              + (f"; then {', '.join(EXTRA)} while they fit in {a.budget:.0f} s" if a.budget else ""))
        for name, cap, cmd, _ in stages:
            print(f"  {name:8} cap {cap:4d} s  {cmd}")
        print(f"carried wheels: {', '.join(p.name for p in sorted((ROOT / '.whl').glob('*.whl'))) or 'none'}; "
              f"tokenizer: {'.gpu/tokenizer' if (ROOT / '.gpu' / 'tokenizer').exists() else 'the embedded cache'}")
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / "gpu_check.log", "w") as log:
        env = setup_env(log)
        head = versions(env)
        log.write(f"{head}\n")
        results = []
        chosen = {s[0] for s in stages}
        extras = [s for s in STAGES if s[0] in EXTRA and s[0] not in chosen] if a.budget else []
        for name, cap, cmd, pattern in stages + extras:
            if name not in chosen and time.time() - t0 + cap > a.budget:
                continue
            need, prefix = FALLBACK.get(name, (None, ""))
            if any(r[0] == need and r[1] != "ok" for r in results):
                cmd, name = prefix + cmd, f"{name} (without the {need} kernel: its stage failed)"
            status, secs, text = run_stage(name, cap, cmd, env, log)
            keep = [ln.rstrip() for ln in text.splitlines() if re.search(pattern, ln) and "Warning" not in ln]
            results.append((name, status, secs, keep[-14:]))
            print(f"[gpu_check] {name}: {status} in {secs:.0f} s", flush=True)
    lines = [f"gpu_check {time.strftime('%Y-%m-%d %H:%M')} UTC: {head}"]
    for name, status, secs, keep in results:
        lines.append(f"--- {name}: {status} ({secs:.0f} s)")
        lines += [f"    {ln[:150]}" for ln in keep]
    lines.append(f"total {time.time() - t0:.0f} s; full log: gpu_check.log")
    summary = "\n".join(lines)
    (out / "summary.txt").write_text(summary + "\n")
    print(summary)
    sys.exit(0 if all(r[1] == "ok" for r in results) else 1)


if __name__ == "__main__":
    main()

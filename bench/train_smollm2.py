"""Issue 3's numbers: collect + train on the embedded SmolLM2 at layer 20, wall time and
held-out FVE after the warm start (with the shuffled-vector control) and after RL.

    python bench/train_smollm2.py [--preset cpu-smoke] [--run runs/bench-smoke] [--per-doc 12] [--ship] [extra train flags...]
Resumable like the verbs it calls; prints one summary block at the end for bench/RESULTS.md.
--ship copies the final AV and AR (bf16, no KL reference or optimiser state) to
nla/data/checkpoints/smollm2-L<layer>/, the NLA that `nla-cli explain` uses by default.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu-smoke")
    ap.add_argument("--run", default="runs/bench-smoke")
    ap.add_argument("--layer", type=int, default=20)
    ap.add_argument("--ship", action="store_true")
    ap.add_argument("--per-doc", type=int, default=12, help="positions sampled per document")
    a, extra = ap.parse_known_args()
    run = Path(a.run)
    cli = [sys.executable, "-m", "cli"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.time()
    subprocess.run(cli + ["collect", "--layer", str(a.layer), "--out", str(run / "acts"), "--per-doc", str(a.per_doc)],
                   check=True, cwd=root)
    t1 = time.time()
    subprocess.run(cli + ["train", "--acts", str(run / "acts"), "--out", str(run), "--preset", a.preset] + extra,
                   check=True, cwd=root)
    t2 = time.time()
    ws = json.loads((Path(root) / run / "warmstart_eval.json").read_text())
    evals = [json.loads(l) for l in open(Path(root) / run / "metrics.jsonl")]
    evals = [r for r in evals if r.get("stage") == "eval"]
    print("\n== NLA on smollm2 layer", a.layer, "preset", a.preset, "==")
    print(f"wall time: collect {t1 - t0:.0f} s, train {t2 - t1:.0f} s, total {(t2 - t0) / 60:.1f} min")
    print(f"warm start: held-out FVE {ws['heldout_fve']:.3f} (cos {ws['heldout_cos']:.3f}), "
          f"shuffled-vector control FVE {ws['shuffled_fve']:.3f} (cos {ws['shuffled_cos']:.3f}); explanations quote "
          f"their token {ws.get('heldout_token_hits', float('nan')):.0%} (control {ws.get('shuffled_token_hits', float('nan')):.0%})")
    print("held-out FVE by RL step: " + ", ".join(f"{r['step']}: {r['heldout_fve']:.3f}" for r in evals))
    if a.ship:
        ship(Path(root) / run / "rl", Path(root) / "nla" / "data" / "checkpoints" / f"smollm2-L{a.layer}", run, a.preset)


def ship(src: Path, dst: Path, run: Path, preset: str) -> None:
    import shutil

    import torch
    import yaml
    from safetensors.torch import load_file

    from nla.io import save_tensors, write_text
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for role in ("av", "ar"):  # bf16 halves the package; the loader copies into fp32 adapters
        save_tensors(tmp / f"{role}.safetensors",
                     {k: v.to(torch.bfloat16) for k, v in load_file(str(src / f"{role}.safetensors")).items()})
    meta = yaml.safe_load((src / "nla_meta.yaml").read_text())
    meta["trained_with"] = f"python bench/train_smollm2.py --preset {preset} --run {run} --ship"
    write_text(tmp / "nla_meta.yaml", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    print(f"shipped {src} -> {dst}")


if __name__ == "__main__":
    main()

"""Issue 3's numbers: collect + train on the embedded SmolLM2 at layer 20, wall time and
held-out FVE after the warm start (with the shuffled-vector control) and after RL.

    python bench/train_smollm2.py [--preset cpu-smoke] [--run runs/bench-smoke] [extra train flags...]
Resumable like the verbs it calls; prints one summary block at the end for bench/RESULTS.md.
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
    a, extra = ap.parse_known_args()
    run = Path(a.run)
    cli = [sys.executable, "-m", "cli"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.time()
    subprocess.run(cli + ["collect", "--layer", str(a.layer), "--out", str(run / "acts")], check=True, cwd=root)
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
          f"shuffled-vector control FVE {ws['shuffled_fve']:.3f} (cos {ws['shuffled_cos']:.3f})")
    print("held-out FVE by RL step: " + ", ".join(f"{r['step']}: {r['heldout_fve']:.3f}" for r in evals))


if __name__ == "__main__":
    main()
